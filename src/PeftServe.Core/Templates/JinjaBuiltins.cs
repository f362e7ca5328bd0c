using System.Globalization;
using System.Text;
using System.Text.Encodings.Web;
using System.Text.Json;

namespace PeftServe.Core.Templates;

/// <summary>Global functions, filters, tests and Python-style methods available to templates.</summary>
internal static class Builtins
{
    public static object? Global(string name) => name switch
    {
        "range" => (Callable)((a, _) =>
        {
            long start = a.Count > 1 ? Values.ToLong(a[0]) : 0, stop = Values.ToLong(a[a.Count > 1 ? 1 : 0]), step = a.Count > 2 ? Values.ToLong(a[2]) : 1;
            if (step == 0) throw new JinjaException("range() arg 3 must not be zero");
            var r = new List<object?>();
            for (long i = start; step > 0 ? i < stop : i > stop; i += step)
            {
                r.Add(i);
                if (r.Count > TemplateLimits.MaxIterations) throw new JinjaException($"range() makes more than {TemplateLimits.MaxIterations} items");
            }
            return r;
        }),
        "namespace" => (Callable)((a, kw) =>
        {
            var ns = new Namespace();
            foreach (var d in a.OfType<IDictionary<string, object?>>()) foreach (var (k, v) in d) ns[k] = v;
            foreach (var (k, v) in kw) ns[k] = v;
            return ns;
        }),
        "dict" => (Callable)((_, kw) => new Dictionary<string, object?>(kw)),
        "raise_exception" => (Callable)((a, _) => throw new JinjaException(a.Count > 0 ? Values.Str(a[0]) : "raise_exception called")),
        "strftime_now" => (Callable)((a, _) => StrFTime(DateTime.Now, a.Count > 0 ? Values.Str(a[0]) : "%Y-%m-%d")),
        _ => null,
    };

    public static object? ApplyFilter(string name, object? v, List<object?> a, Dictionary<string, object?> kw, Evaluator ev, Scope scope)
    {
        object? Arg(int i, string key, object? def) => i < a.Count ? a[i] : kw.TryGetValue(key, out var x) ? x : def;
        switch (name)
        {
            case "trim": return Values.Str(v).Trim();
            case "upper": return Values.Str(v).ToUpperInvariant();
            case "lower": return Values.Str(v).ToLowerInvariant();
            case "capitalize": var c = Values.Str(v); return c.Length == 0 ? c : char.ToUpperInvariant(c[0]) + c[1..].ToLowerInvariant();
            case "title": return CultureInfo.InvariantCulture.TextInfo.ToTitleCase(Values.Str(v).ToLowerInvariant());
            case "string": return Values.Str(v);
            case "safe" or "e" or "escape" when name == "safe": return v;
            case "e" or "escape": return System.Net.WebUtility.HtmlEncode(Values.Str(v));
            case "length" or "count": return v switch { string s => (long)s.Length, ICollection<object?> l => (long)l.Count, IDictionary<string, object?> d => (long)d.Count, Undefined or null => 0L, _ => (long)Values.Iterate(v).Count() };
            case "first": return Values.Iterate(v).FirstOrDefault(Undefined.Instance);
            case "last": return Values.Iterate(v).LastOrDefault(Undefined.Instance);
            case "list": return Values.Iterate(v).ToList();
            case "reverse": return v is string rs ? new string(rs.Reverse().ToArray()) : Values.Iterate(v).Reverse().ToList();
            case "join": return string.Join(Values.Str(Arg(0, "d", "")), Values.Iterate(v).Select(x => Arg(1, "attribute", null) is string at ? Values.Str(Values.GetAttribute(x, at)) : Values.Str(x)));
            case "default" or "d":
                bool boolean = Values.Truthy(Arg(1, "boolean", false));
                return v is Undefined || boolean && !Values.Truthy(v) ? Arg(0, "default_value", "") : v;
            case "int": return v switch { long l => l, double d => (long)d, string s when long.TryParse(s.Trim(), out var p) => p, string s when double.TryParse(s, CultureInfo.InvariantCulture, out var pd) => (long)pd, _ => Arg(0, "default", 0L) };
            case "float": return v switch { long l => (double)l, double d => d, string s when double.TryParse(s, CultureInfo.InvariantCulture, out var p) => p, _ => Arg(0, "default", 0.0) };
            case "abs": return v is long al ? Math.Abs(al) : Math.Abs(Convert.ToDouble(v));
            case "round": return Math.Round(Convert.ToDouble(v), (int)Values.ToLong(Arg(0, "precision", 0L)), MidpointRounding.ToEven);
            case "items": return v is IDictionary<string, object?> di ? di.Select(kv => (object?)new List<object?> { kv.Key, kv.Value }).ToList() : throw new JinjaException("items needs a mapping");
            case "keys": return v is IDictionary<string, object?> dk ? dk.Keys.Cast<object?>().ToList() : throw new JinjaException("keys needs a mapping");
            case "values": return v is IDictionary<string, object?> dv ? dv.Values.ToList() : throw new JinjaException("values needs a mapping");
            case "unique": return Values.Iterate(v).Aggregate(new List<object?>(), (acc, x) => { if (!acc.Any(y => Values.Equal(x, y))) acc.Add(x); return acc; });
            case "tojson": return ToJson(v, Arg(0, "indent", null) is { } ind and not Undefined ? (int)Values.ToLong(ind) : null);
            case "indent": return Indent(Values.Str(v), (int)Values.ToLong(Arg(0, "width", 4L)), Values.Truthy(Arg(1, "first", false)), Values.Truthy(Arg(2, "blank", false)));
            case "replace": return Values.Str(v).Replace(Values.Str(a[0]), Values.Str(a[1]), StringComparison.Ordinal);
            case "sort":
            {
                var items = Values.Iterate(v).ToList();
                var attr = Arg(2, "attribute", null) as string;
                object? Key(object? x) => attr is null ? x : Values.GetAttribute(x, attr);
                items.Sort((x, y) => Values.Truthy(Values.BinaryOp("<", Key(x), Key(y))) ? -1 : Values.Truthy(Values.BinaryOp(">", Key(x), Key(y))) ? 1 : 0);
                if (Values.Truthy(Arg(0, "reverse", false))) items.Reverse();
                return items;
            }
            case "map":
                if (kw.TryGetValue("attribute", out var mapAttr)) return Values.Iterate(v).Select(x => Values.GetAttribute(x, Values.Str(mapAttr))).ToList();
                return Values.Iterate(v).Select(x => ApplyFilter(Values.Str(a[0]), x, a.Skip(1).ToList(), [], ev, scope)).ToList();
            case "select" or "reject":
                return Values.Iterate(v).Where(x => (a.Count == 0 ? Values.Truthy(x) : ApplyTest(Values.Str(a[0]), x, a.Skip(1).ToList())) == (name == "select")).ToList();
            case "selectattr" or "rejectattr":
                return Values.Iterate(v).Where(x =>
                {
                    var attr = Values.GetAttribute(x, Values.Str(a[0]));
                    bool ok = a.Count == 1 ? Values.Truthy(attr) : ApplyTest(Values.Str(a[1]), attr, a.Skip(2).ToList());
                    return ok == (name == "selectattr");
                }).ToList();
            case "wordcount": return (long)Values.Str(v).Split((char[]?)null, StringSplitOptions.RemoveEmptyEntries).Length;
            case "batch":
            {
                long size = Values.ToLong(a[0]);
                return Values.Iterate(v).Chunk((int)size).Select(ch => (object?)ch.ToList()).ToList();
            }
            default:
                throw new JinjaException($"unknown filter '{name}'");
        }
    }

    public static bool ApplyTest(string name, object? v, List<object?> a) => name switch
    {
        "defined" => v is not Undefined,
        "undefined" => v is Undefined,
        "none" => v is null,
        "string" => v is string,
        "number" => v is long or double,
        "integer" => v is long,
        "float" => v is double,
        "boolean" => v is bool,
        "true" => v is true,
        "false" => v is false,
        "mapping" => v is IDictionary<string, object?>,
        "sequence" or "iterable" => v is string or IList<object?> or IDictionary<string, object?>,
        "callable" => v is Macro or Callable,
        "even" => Values.ToLong(v) % 2 == 0,
        "odd" => Values.ToLong(v) % 2 != 0,
        "divisibleby" => Values.ToLong(v) % Values.ToLong(a[0]) == 0,
        "equalto" or "eq" or "==" => Values.Equal(v, a[0]),
        "ne" or "!=" => !Values.Equal(v, a[0]),
        "lower" => v is string ls && ls == ls.ToLowerInvariant(),
        "upper" => v is string us && us == us.ToUpperInvariant(),
        "in" => Values.Truthy(Values.BinaryOp("in", v, a[0])),
        _ => throw new JinjaException($"unknown test '{name}'"),
    };

    public static object? CallMethod(object? target, string method, List<object?> a, Dictionary<string, object?> kw)
    {
        switch (target)
        {
            case string s:
                string Chars(int i) => i < a.Count && a[i] is string c ? c : "";
                return method switch
                {
                    "strip" => a.Count > 0 && a[0] is string sc ? s.Trim(sc.ToCharArray()) : s.Trim(),
                    "lstrip" => a.Count > 0 && a[0] is string lc ? s.TrimStart(lc.ToCharArray()) : s.TrimStart(),
                    "rstrip" => a.Count > 0 && a[0] is string rc ? s.TrimEnd(rc.ToCharArray()) : s.TrimEnd(),
                    "upper" => s.ToUpperInvariant(),
                    "lower" => s.ToLowerInvariant(),
                    "title" => CultureInfo.InvariantCulture.TextInfo.ToTitleCase(s.ToLowerInvariant()),
                    "capitalize" => s.Length == 0 ? s : char.ToUpperInvariant(s[0]) + s[1..].ToLowerInvariant(),
                    "startswith" => a[0] is IList<object?> ps ? ps.Any(p => s.StartsWith(Values.Str(p), StringComparison.Ordinal)) : s.StartsWith(Chars(0), StringComparison.Ordinal),
                    "endswith" => a[0] is IList<object?> pe ? pe.Any(p => s.EndsWith(Values.Str(p), StringComparison.Ordinal)) : s.EndsWith(Chars(0), StringComparison.Ordinal),
                    "split" => Split(s, a.Count > 0 && a[0] is string sep ? sep : null, a.Count > 1 ? (int)Values.ToLong(a[1]) : -1),
                    "replace" => s.Replace(Chars(0), Chars(1), StringComparison.Ordinal),
                    "find" => (long)s.IndexOf(Chars(0), StringComparison.Ordinal),
                    "count" => (long)(Chars(0).Length == 0 ? s.Length + 1 : (s.Length - s.Replace(Chars(0), "", StringComparison.Ordinal).Length) / Chars(0).Length),
                    "isdigit" => s.Length > 0 && s.All(char.IsDigit),
                    "isspace" => s.Length > 0 && s.All(char.IsWhiteSpace),
                    "join" => string.Join(s, Values.Iterate(a[0]).Select(Values.Str)),
                    "format" => Format(s, a),
                    _ => throw new JinjaException($"strings have no method '{method}'"),
                };
            case IDictionary<string, object?> d:
                return method switch
                {
                    "get" => d.TryGetValue(Values.Str(a[0]), out var x) ? x : a.Count > 1 ? a[1] : null,
                    "items" => d.Select(kv => (object?)new List<object?> { kv.Key, kv.Value }).ToList(),
                    "keys" => d.Keys.Cast<object?>().ToList(),
                    "values" => d.Values.ToList(),
                    _ => throw new JinjaException($"mappings have no method '{method}'"),
                };
            case IList<object?> l:
                switch (method)
                {
                    case "append": l.Add(a[0]); return null;
                    case "index": return (long)l.ToList().FindIndex(x => Values.Equal(x, a[0]));
                    case "count": return (long)l.Count(x => Values.Equal(x, a[0]));
                    case "pop":
                        int at = a.Count > 0 ? (int)Values.ToLong(a[0]) : l.Count - 1;
                        if (at < 0) at += l.Count;
                        var item = l[at];
                        l.RemoveAt(at);
                        return item;
                    default: throw new JinjaException($"lists have no method '{method}'");
                }
            case Undefined:
                throw new JinjaException($"cannot call '{method}' on an undefined value");
            default:
                throw new JinjaException($"{Values.Repr(target)} has no method '{method}'");
        }
    }

    private static List<object?> Split(string s, string? sep, int max)
    {
        if (sep is null)
        {
            var parts = s.Split((char[]?)null, StringSplitOptions.RemoveEmptyEntries);
            return parts.Cast<object?>().ToList();
        }
        if (sep.Length == 0) throw new JinjaException("empty separator");
        return (max < 0 ? s.Split(sep) : s.Split(sep, max + 1)).Cast<object?>().ToList();
    }

    private static string Format(string s, List<object?> a)
    {
        int next = 0;
        return System.Text.RegularExpressions.Regex.Replace(s, @"\{(\d*)\}", m => Values.Str(a[m.Groups[1].Length > 0 ? int.Parse(m.Groups[1].Value) : next++]));
    }

    private static string Indent(string s, int width, bool first, bool blank)
    {
        var pad = new string(' ', width);
        var lines = s.Split('\n');
        for (int i = 0; i < lines.Length; i++)
            if ((i > 0 || first) && (blank || lines[i].Length > 0)) lines[i] = pad + lines[i];
        return string.Join('\n', lines);
    }

    /// <summary>Python's json.dumps as transformers calls it: ensure_ascii off, ", " and ": " separators
    /// (",", ": " with an indent), keys in insertion order.</summary>
    public static string ToJson(object? v, int? indent)
    {
        var sb = new StringBuilder();
        Write(v, 0);
        return sb.ToString();

        void Write(object? x, int depth)
        {
            TemplateLimits.EnsureStack();   // a list or namespace that contains itself
            TemplateLimits.CheckOutput(sb);
            switch (x)
            {
                case null or Undefined: sb.Append("null"); break;
                case bool b: sb.Append(b ? "true" : "false"); break;
                case long l: sb.Append(l.ToString(CultureInfo.InvariantCulture)); break;
                case double d: sb.Append(Values.Str(d) switch { "nan" => "NaN", "inf" => "Infinity", "-inf" => "-Infinity", var t => t }); break;
                case string s: sb.Append(JsonSerializer.Serialize(s, JsonOptions)); break;
                case IDictionary<string, object?> dict:
                    Container('{', '}', dict.Select(kv => (Action)(() => { sb.Append(JsonSerializer.Serialize(kv.Key, JsonOptions)).Append(": "); Write(kv.Value, depth + 1); })).ToList(), depth);
                    break;
                case IEnumerable<object?> list:
                    Container('[', ']', list.Select(item => (Action)(() => Write(item, depth + 1))).ToList(), depth);
                    break;
                default: sb.Append(JsonSerializer.Serialize(Values.Str(x), JsonOptions)); break;
            }
        }

        void Container(char open, char close, List<Action> items, int depth)
        {
            sb.Append(open);
            if (items.Count == 0) { sb.Append(close); return; }
            for (int i = 0; i < items.Count; i++)
            {
                if (indent is { } n) sb.Append('\n').Append(' ', n * (depth + 1));
                items[i]();
                if (i + 1 < items.Count) sb.Append(indent is null ? ", " : ",");
            }
            if (indent is { } m) sb.Append('\n').Append(' ', m * depth);
            sb.Append(close);
        }
    }

    private static readonly JsonSerializerOptions JsonOptions = new() { Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping };

    private static string StrFTime(DateTime t, string format)
    {
        var sb = new StringBuilder();
        for (int i = 0; i < format.Length; i++)
        {
            if (format[i] != '%' || i + 1 >= format.Length) { sb.Append(format[i]); continue; }
            char f = format[++i];
            sb.Append(f switch
            {
                'Y' => t.ToString("yyyy", CultureInfo.InvariantCulture), 'm' => t.ToString("MM", CultureInfo.InvariantCulture),
                'd' => t.ToString("dd", CultureInfo.InvariantCulture), 'B' => t.ToString("MMMM", CultureInfo.InvariantCulture),
                'b' => t.ToString("MMM", CultureInfo.InvariantCulture), 'H' => t.ToString("HH", CultureInfo.InvariantCulture),
                'M' => t.ToString("mm", CultureInfo.InvariantCulture), 'S' => t.ToString("ss", CultureInfo.InvariantCulture),
                'A' => t.ToString("dddd", CultureInfo.InvariantCulture), 'a' => t.ToString("ddd", CultureInfo.InvariantCulture),
                'y' => t.ToString("yy", CultureInfo.InvariantCulture), '%' => "%",
                _ => "%" + f,
            });
        }
        return sb.ToString();
    }
}
