using System.Collections;
using System.Globalization;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace PeftServe.Core.Templates;

/// <summary>A small Jinja2 interpreter for the subset Hugging Face chat templates use: for/if/set
/// (with namespace() and block set), macros, loop variables, tests, Python-style string/list/dict
/// methods, filters such as trim and tojson, and raise_exception. No Jinja package exists for .NET
/// here, so, like llama.cpp's minja and @huggingface/jinja, the project carries its own. Values are
/// plain CLR values: string, bool, long, double, null, lists and string-keyed dictionaries
/// (JsonElement / JsonNode are converted).</summary>
public sealed class JinjaTemplate
{
    private readonly List<Node> _body;

    private JinjaTemplate(List<Node> body) => _body = body;

    public static JinjaTemplate Parse(string source, bool trimBlocks = true, bool lstripBlocks = true) =>
        Guarded(() => new JinjaTemplate(new Parser(TemplateLexer.Split(source, trimBlocks, lstripBlocks)).ParseTemplate()), "parsing");

    public string Render(IReadOnlyDictionary<string, object?> context) => Guarded(() => RenderUnguarded(context), "rendering");

    /// <summary>A builtin given arguments it cannot use (a test or filter missing its argument, a
    /// division by zero, a value of the wrong type, ...) is the template's error, reported as a
    /// <see cref="JinjaException"/> like every other; the runtime's own message is not passed on.</summary>
    private static T Guarded<T>(Func<T> body, string what)
    {
        try { return body(); }
        catch (LoopControl) { throw new JinjaException($"the template failed while {what}: break or continue outside a loop"); }
        catch (Exception e) when (e is ArgumentException or IndexOutOfRangeException or InvalidCastException or FormatException
                                      or OverflowException or DivideByZeroException or KeyNotFoundException or InvalidOperationException)
        {
            throw new JinjaException($"the template failed while {what}: a filter, test, method or operator was given arguments it cannot use ({e.GetType().Name})");
        }
    }

    private string RenderUnguarded(IReadOnlyDictionary<string, object?> context)
    {
        var scope = new Scope(null);
        TemplateLimits.ResetIterations();
        foreach (var (k, v) in context) scope.Set(k, Values.FromClr(v));
        var output = new StringBuilder();
        new Evaluator(output).Run(_body, scope);
        return output.ToString();
    }
}

/// <summary>The value of a name that does not exist: prints as nothing, is false, and fails on use
/// that needs a real value.</summary>
internal sealed class Undefined
{
    public static readonly Undefined Instance = new();
    public override string ToString() => "";
}

/// <summary>namespace(): an object whose attributes can be set from inside loops.</summary>
internal sealed class Namespace : Dictionary<string, object?>;

internal sealed class Macro(MacroNode node, Scope closure, Evaluator evaluator)
{
    public object? Invoke(List<object?> args, Dictionary<string, object?> kwargs)
    {
        var scope = new Scope(closure);
        for (int i = 0; i < node.Parameters.Count; i++)
        {
            var (name, def) = node.Parameters[i];
            scope.Set(name, i < args.Count ? args[i] : kwargs.TryGetValue(name, out var kw) ? kw : def is null ? Undefined.Instance : evaluator.Eval(def, closure));
        }
        var output = new StringBuilder();
        new Evaluator(output).Run(node.Body, scope);
        return output.ToString();
    }
}

internal delegate object? Callable(List<object?> args, Dictionary<string, object?> kwargs);

internal sealed class Scope(Scope? parent)
{
    private readonly Dictionary<string, object?> _vars = [];
    public object? Get(string name) => _vars.TryGetValue(name, out var v) ? v : parent is null ? Undefined.Instance : parent.Get(name);
    public void Set(string name, object? value) => _vars[name] = value;
}

internal sealed class LoopControl(bool isBreak) : Exception { public bool IsBreak { get; } = isBreak; }

/// <summary>Walks the tree, writing output.</summary>
internal sealed class Evaluator(StringBuilder output)
{
    public void Run(List<Node> nodes, Scope scope)
    {
        foreach (var node in nodes) Execute(node, scope);
    }

    private void Execute(Node node, Scope scope)
    {
        TemplateLimits.EnsureStack();
        switch (node)
        {
            case TextNode t: output.Append(t.Text); TemplateLimits.CheckOutput(output); break;
            case OutputNode o: output.Append(Values.Str(Eval(o.Expr, scope))); TemplateLimits.CheckOutput(output); break;
            case IfNode i:
                foreach (var (condition, body) in i.Branches)
                    if (Values.Truthy(Eval(condition, scope))) { Run(body, scope); return; }
                if (i.Else is not null) Run(i.Else, scope);
                break;
            case ForNode f: ExecuteFor(f, scope); break;
            case SetNode s:
                var value = s.Value is not null ? Eval(s.Value, scope) : Render(s.Body!, scope);
                Assign(s.Target, value, scope);
                break;
            case MacroNode m: scope.Set(m.MacroName, new Macro(m, scope, this)); break;
            case BreakNode: throw new LoopControl(true);
            case ContinueNode: throw new LoopControl(false);
        }
    }

    private string Render(List<Node> body, Scope scope)
    {
        var sb = new StringBuilder();
        new Evaluator(sb).Run(body, scope);
        return sb.ToString();
    }

    private void Assign(Expr target, object? value, Scope scope)
    {
        switch (target)
        {
            case Name n: scope.Set(n.Id, value); break;
            case Attribute { Target: Name ns } a when scope.Get(ns.Id) is Namespace space: space[a.Attr] = value; break;
            case Attribute a: throw new JinjaException($"cannot set attribute '{a.Attr}': only namespace() objects take assignments");
            case TupleExpr t:
                var items = Values.Iterate(value).ToList();
                if (items.Count != t.Items.Count) throw new JinjaException($"cannot unpack {items.Count} values into {t.Items.Count} names");
                for (int i = 0; i < items.Count; i++) Assign(t.Items[i], items[i], scope);
                break;
            default: throw new JinjaException("invalid assignment target");
        }
    }

    private void ExecuteFor(ForNode f, Scope outer)
    {
        var items = Values.Iterate(Eval(f.Iterable, outer)).ToList();
        TemplateLimits.CountIterations(items.Count);
        if (f.Filter is not null)
            items = items.Where(item => { var s = new Scope(outer); Bind(f.Targets, item, s); return Values.Truthy(Eval(f.Filter, s)); }).ToList();
        if (items.Count == 0)
        {
            if (f.Else is not null) Run(f.Else, outer);
            return;
        }
        // Jinja scopes: assignments inside a loop body do not leak out (namespace() exists for that).
        var scope = new Scope(outer);
        for (int i = 0; i < items.Count; i++)
        {
            Bind(f.Targets, items[i], scope);
            scope.Set("loop", new Dictionary<string, object?>
            {
                ["index"] = (long)(i + 1), ["index0"] = (long)i, ["revindex"] = (long)(items.Count - i), ["revindex0"] = (long)(items.Count - i - 1),
                ["first"] = i == 0, ["last"] = i == items.Count - 1, ["length"] = (long)items.Count,
                ["previtem"] = i > 0 ? items[i - 1] : Undefined.Instance, ["nextitem"] = i + 1 < items.Count ? items[i + 1] : Undefined.Instance,
            });
            try { Run(f.Body, scope); }
            catch (LoopControl c) when (c.IsBreak) { break; }
            catch (LoopControl) { }
        }
    }

    private static void Bind(List<string> targets, object? item, Scope scope)
    {
        if (targets.Count == 1) { scope.Set(targets[0], item); return; }
        var parts = Values.Iterate(item).ToList();
        if (parts.Count != targets.Count) throw new JinjaException($"cannot unpack {parts.Count} values into {targets.Count} loop variables");
        for (int i = 0; i < targets.Count; i++) scope.Set(targets[i], parts[i]);
    }

    public object? Eval(Expr e, Scope scope) => TemplateLimits.EnsureStack() ? e switch
    {
        Literal l => l.Value,
        Name n => scope.Get(n.Id) is var v and not Undefined ? v : Builtins.Global(n.Id) ?? Undefined.Instance,
        ListExpr l => l.Items.Select(x => Eval(x, scope)).ToList(),
        TupleExpr t => t.Items.Select(x => Eval(x, scope)).ToList(),
        DictExpr d => d.Items.ToDictionary(kv => Values.Str(Eval(kv.Key, scope)), kv => Eval(kv.Value, scope)),
        Attribute a => Values.GetAttribute(Eval(a.Target, scope), a.Attr),
        Subscript s => s.Index is Slice slice
            ? Values.SliceOf(Eval(s.Target, scope), Opt(slice.Start, scope), Opt(slice.Stop, scope), Opt(slice.Step, scope))
            : Values.GetItem(Eval(s.Target, scope), Eval(s.Index, scope)),
        Call c => Invoke(c, scope),
        Filter f => Builtins.ApplyFilter(f.FilterName, Eval(f.Target, scope), f.Args.Select(x => Eval(x, scope)).ToList(),
            f.Kwargs.ToDictionary(k => k.Name, k => Eval(k.Value, scope)), this, scope),
        Test t => Builtins.ApplyTest(t.TestName, Eval(t.Target, scope), t.Args.Select(x => Eval(x, scope)).ToList()) != t.Negated,
        Unary { Op: "not" } u => !Values.Truthy(Eval(u.Operand, scope)),
        Unary { Op: "-" } u => Values.Negate(Eval(u.Operand, scope)),
        Binary { Op: "and" } b => Eval(b.Left, scope) is var l1 && !Values.Truthy(l1) ? l1 : Eval(b.Right, scope),
        Binary { Op: "or" } b => Eval(b.Left, scope) is var l2 && Values.Truthy(l2) ? l2 : Eval(b.Right, scope),
        Binary b => Values.BinaryOp(b.Op, Eval(b.Left, scope), Eval(b.Right, scope)),
        Conditional c => Values.Truthy(Eval(c.Condition, scope)) ? Eval(c.Then, scope) : c.Else is null ? Undefined.Instance : Eval(c.Else, scope),
        _ => throw new JinjaException($"cannot evaluate {e.GetType().Name}"),
    } : null;

    private long? Opt(Expr? e, Scope scope) => e is null ? null : Values.ToLong(Eval(e, scope));

    private object? Invoke(Call c, Scope scope)
    {
        var args = c.Args.Select(x => Eval(x, scope)).ToList();
        var kwargs = c.Kwargs.ToDictionary(k => k.Name, k => Eval(k.Value, scope));
        // obj.method(...): Python-style methods on strings, lists and dicts.
        if (c.Function is Attribute a)
        {
            var target = Eval(a.Target, scope);
            if (target is IDictionary<string, object?> d && d.TryGetValue(a.Attr, out var member) && member is Macro or Callable)
                return CallValue(member, args, kwargs, a.Attr);
            return Builtins.CallMethod(target, a.Attr, args, kwargs);
        }
        return CallValue(Eval(c.Function, scope), args, kwargs, c.Function is Name n ? n.Id : "value");
    }

    private static object? CallValue(object? f, List<object?> args, Dictionary<string, object?> kwargs, string name) => f switch
    {
        Macro m => m.Invoke(args, kwargs),
        Callable fn => fn(args, kwargs),
        _ => throw new JinjaException($"'{name}' is not callable"),
    };
}

/// <summary>Python-like semantics for the values templates handle.</summary>
internal static class Values
{
    public static object? FromClr(object? v) => v switch
    {
        null => null,
        string or bool or long or double or Undefined or Namespace or Macro or Callable => v,
        int i => (long)i,
        float f => (double)f,
        decimal m => (double)m,
        JsonElement j => FromJson(j),
        JsonNode n => FromJson(JsonSerializer.SerializeToElement(n)),
        IDictionary<string, object?> d => d.ToDictionary(kv => kv.Key, kv => FromClr(kv.Value)),
        IReadOnlyDictionary<string, object?> d => d.ToDictionary(kv => kv.Key, kv => FromClr(kv.Value)),
        IDictionary d => d.Keys.Cast<object>().ToDictionary(k => k.ToString()!, k => FromClr(d[k])),
        IEnumerable e => e.Cast<object?>().Select(FromClr).ToList(),
        _ => FromJson(JsonSerializer.SerializeToElement(v)),   // records such as ChatMessage
    };

    private static object? FromJson(JsonElement j) => j.ValueKind switch
    {
        JsonValueKind.String => j.GetString(),
        JsonValueKind.Number => j.TryGetInt64(out var l) ? l : j.GetDouble(),
        JsonValueKind.True => true,
        JsonValueKind.False => false,
        JsonValueKind.Array => j.EnumerateArray().Select(FromJson).ToList(),
        JsonValueKind.Object => j.EnumerateObject().ToDictionary(p => p.Name, p => FromJson(p.Value)),
        _ => null,
    };

    public static bool Truthy(object? v) => v switch
    {
        null or Undefined => false,
        bool b => b,
        long l => l != 0,
        double d => d != 0,
        string s => s.Length > 0,
        ICollection c => c.Count > 0,
        _ => true,
    };

    /// <summary>str(): how a value prints.</summary>
    public static string Str(object? v) => v switch
    {
        null => "None",
        Undefined => "",
        string s => s,
        bool b => b ? "True" : "False",
        long l => l.ToString(CultureInfo.InvariantCulture),
        double d => FormatDouble(d),
        _ => Repr(v),
    };

    public static string Repr(object? v) => TemplateLimits.EnsureStack() ? ReprOf(v) : "";

    private static string ReprOf(object? v) => v switch
    {
        string s => "'" + s.Replace("\\", "\\\\").Replace("'", "\\'").Replace("\n", "\\n") + "'",
        IList<object?> l => "[" + string.Join(", ", l.Select(Repr)) + "]",
        IDictionary<string, object?> d => "{" + string.Join(", ", d.Select(kv => Repr(kv.Key) + ": " + Repr(kv.Value))) + "}",
        _ => Str(v),
    };

    private static string FormatDouble(double d)
    {
        if (double.IsNaN(d)) return "nan";
        if (double.IsInfinity(d)) return d > 0 ? "inf" : "-inf";
        var s = d.ToString("R", CultureInfo.InvariantCulture);
        return s.Contains('.') || s.Contains('E') ? s : s + ".0";
    }

    public static long ToLong(object? v) => v switch
    {
        long l => l,
        double d => (long)d,
        bool b => b ? 1 : 0,
        string s when long.TryParse(s, out var p) => p,
        _ => throw new JinjaException($"expected an integer, got {Repr(v)}"),
    };

    public static IEnumerable<object?> Iterate(object? v) => v switch
    {
        null or Undefined => [],
        string s => s.Select(c => (object?)c.ToString()),
        IDictionary<string, object?> d => d.Keys.Cast<object?>(),
        IEnumerable<object?> e => e,
        _ => throw new JinjaException($"{Repr(v)} is not iterable"),
    };

    public static object? GetAttribute(object? target, string attr) => target switch
    {
        IDictionary<string, object?> d => d.TryGetValue(attr, out var v) ? v : Undefined.Instance,
        IList<object?> l when int.TryParse(attr, out var i) => i < l.Count ? l[i] : Undefined.Instance,
        _ => Undefined.Instance,
    };

    public static object? GetItem(object? target, object? key)
    {
        switch (target)
        {
            case IDictionary<string, object?> d:
                return d.TryGetValue(Str(key), out var v) ? v : Undefined.Instance;
            case IList<object?> l when key is long or double:
                long i = ToLong(key);
                if (i < 0) i += l.Count;
                return i >= 0 && i < l.Count ? l[(int)i] : Undefined.Instance;
            case string s when key is long or double:
                long j = ToLong(key);
                if (j < 0) j += s.Length;
                return j >= 0 && j < s.Length ? s[(int)j].ToString() : Undefined.Instance;
            case Undefined:
                throw new JinjaException($"cannot index an undefined value with {Repr(key)}");
            default:
                return Undefined.Instance;
        }
    }

    public static object? SliceOf(object? target, long? start, long? stop, long? step)
    {
        var items = target is string s ? s.Select(c => (object?)c.ToString()).ToList() : Iterate(target).ToList();
        long n = items.Count, st = step ?? 1;
        if (st == 0) throw new JinjaException("slice step cannot be zero");
        long Clamp(long? x, long def, bool forStop)
        {
            if (x is null) return def;
            long v = x.Value < 0 ? x.Value + n : x.Value;
            return st > 0 ? Math.Clamp(v, 0, n) : Math.Clamp(v, -1, n - 1);
        }
        long from = Clamp(start, st > 0 ? 0 : n - 1, false), to = Clamp(stop, st > 0 ? n : -1, true);
        var result = new List<object?>();
        for (long i = from; st > 0 ? i < to : i > to; i += st) result.Add(items[(int)i]);
        return target is string ? string.Concat(result.Cast<string>()) : result;
    }

    public static object? Negate(object? v) => v switch
    {
        long l => -l,
        double d => -d,
        _ => throw new JinjaException($"cannot negate {Repr(v)}"),
    };

    public static object? BinaryOp(string op, object? a, object? b)
    {
        switch (op)
        {
            case "~": return Str(a) + Str(b);
            case "==": return Equal(a, b);
            case "!=": return !Equal(a, b);
            case "in": return Contains(b, a);
            case "+" when a is string sa && b is string sb: return sa + sb;
            case "+" when a is IList<object?> la && b is IList<object?> lb: return la.Concat(lb).ToList();
            case "*" when a is string s && b is long times:
                TemplateLimits.CheckLength((double)s.Length * Math.Max(0, times));
                return string.Concat(Enumerable.Repeat(s, (int)Math.Max(0, times)));
        }
        if (op is "<" or ">" or "<=" or ">=")
        {
            int c = Compare(a, b);
            return op switch { "<" => c < 0, ">" => c > 0, "<=" => c <= 0, _ => c >= 0 };
        }
        if (a is long x && b is long y)
            return op switch
            {
                // (object) keeps integers integers: a switch expression would otherwise unify to double.
                "+" => (object)(x + y), "-" => x - y, "*" => x * y, "/" => (double)x / y,
                "//" => (long)Math.Floor((double)x / y), "%" => ((x % y) + y) % y, "**" => (long)Math.Pow(x, y),
                _ => throw new JinjaException($"unknown operator {op}"),
            };
        if (a is long or double && b is long or double)
        {
            double p = Convert.ToDouble(a), q = Convert.ToDouble(b);
            return op switch
            {
                "+" => p + q, "-" => p - q, "*" => p * q, "/" => p / q, "//" => Math.Floor(p / q),
                "%" => p - q * Math.Floor(p / q), "**" => Math.Pow(p, q), _ => throw new JinjaException($"unknown operator {op}"),
            };
        }
        throw new JinjaException($"unsupported operand types for {op}: {Repr(a)} and {Repr(b)}");
    }

    public static bool Equal(object? a, object? b) => (a, b) switch
    {
        (null, null) => true,
        (Undefined, Undefined) => true,
        (long x, double y) => x == y,
        (double x, long y) => x == y,
        (IList<object?> x, IList<object?> y) => x.Count == y.Count && x.Zip(y).All(p => Equal(p.First, p.Second)),
        _ => Equals(a, b),
    };

    private static int Compare(object? a, object? b) => (a, b) switch
    {
        (long or double, long or double) => Convert.ToDouble(a).CompareTo(Convert.ToDouble(b)),
        (string x, string y) => string.CompareOrdinal(x, y),
        _ => throw new JinjaException($"cannot compare {Repr(a)} and {Repr(b)}"),
    };

    private static bool Contains(object? container, object? item) => container switch
    {
        string s => s.Contains(Str(item), StringComparison.Ordinal),
        IDictionary<string, object?> d => item is string k && d.ContainsKey(k),
        IEnumerable<object?> e => e.Any(x => Equal(x, item)),
        null or Undefined => false,
        _ => throw new JinjaException($"'in' needs a string, list or mapping, not {Repr(container)}"),
    };
}

/// <summary>Bounds on what one template may make the interpreter do, so that a hostile or broken
/// template ends in a <see cref="JinjaException"/>, never in a stack overflow (which no handler can
/// catch: it ends the process) or in gigabytes of output. Real chat templates stay far below them.</summary>
internal static class TemplateLimits
{
    /// <summary>Characters a render, or one string, may reach.</summary>
    public const int MaxChars = 16 << 20;
    /// <summary>Loop iterations (over all loops) one render may run, and items range() may make.</summary>
    public const int MaxIterations = 1_000_000;
    [ThreadStatic] private static long _iterations;

    /// <summary>Throws before the stack runs out (deep nesting or endless macro recursion). Returns true.</summary>
    public static bool EnsureStack()
    {
        if (!System.Runtime.CompilerServices.RuntimeHelpers.TryEnsureSufficientExecutionStack())
            throw new JinjaException("the template nests or recurses too deeply");
        return true;
    }

    public static void CheckOutput(StringBuilder output)
    {
        if (output.Length > MaxChars) throw new JinjaException($"the template's output exceeds {MaxChars} characters");
    }

    public static void CheckLength(double chars)
    {
        if (chars > MaxChars) throw new JinjaException($"a string of {chars:0} characters exceeds the limit of {MaxChars}");
    }

    public static void ResetIterations() => _iterations = 0;

    public static void CountIterations(long n)
    {
        _iterations += n;
        if (n > MaxIterations || _iterations > MaxIterations) throw new JinjaException($"the template loops more than {MaxIterations} times");
    }
}
