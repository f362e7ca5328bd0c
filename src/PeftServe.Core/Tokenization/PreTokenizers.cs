using System.Text;
using System.Text.Json;
using System.Text.RegularExpressions;

namespace PeftServe.Core.Tokenization;

/// <summary>tokenizer.json's "pre_tokenizer": splits normalized text into words, each encoded on
/// its own. A function from the current pieces to new pieces; <c>first</c> tells whether the text is
/// the first section of the input (Metaspace's "first" prepend scheme needs it).</summary>
internal delegate List<string> PreTokenizer(List<string> pieces, bool first);

internal static class PreTokenizers
{
    /// <summary>GPT-2's word pattern, which ByteLevel uses when use_regex is set.</summary>
    private static readonly Regex Gpt2Words = new(@"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
        RegexOptions.Compiled | RegexOptions.CultureInvariant);

    public static PreTokenizer Create(JsonElement e, string source)
    {
        if (e.ValueKind == JsonValueKind.Null) return (p, _) => p;
        var type = e.GetProperty("type").GetString();
        switch (type)
        {
            case "Sequence":
                var parts = e.GetProperty("pretokenizers").EnumerateArray().Select(x => Create(x, source)).ToArray();
                return (p, first) => parts.Aggregate(p, (acc, f) => f(acc, first));
            case "Split":
                var regex = Patterns.Regex(e.GetProperty("pattern"), source);
                var behavior = e.GetProperty("behavior").GetString()!;
                bool invert = e.TryGetProperty("invert", out var inv) && inv.GetBoolean();
                return (p, _) => p.SelectMany(s => Split(s, regex, behavior, invert)).ToList();
            case "ByteLevel":
                bool prefixSpace = e.TryGetProperty("add_prefix_space", out var aps) && aps.GetBoolean();
                bool useRegex = !e.TryGetProperty("use_regex", out var ur) || ur.GetBoolean();
                return (p, first) =>
                {
                    if (prefixSpace && p.Count > 0 && !p[0].StartsWith(' ')) p[0] = " " + p[0];
                    var words = useRegex ? p.SelectMany(s => Split(s, Gpt2Words, "Isolated", false)) : p;
                    return words.Select(ByteLevel.Encode).ToList();
                };
            case "Metaspace":
                var replacement = e.TryGetProperty("replacement", out var rep) ? rep.GetString()! : "▁";
                var scheme = e.TryGetProperty("prepend_scheme", out var ps) ? ps.GetString()! : (e.TryGetProperty("add_prefix_space", out var ap) && !ap.GetBoolean() ? "never" : "always");
                bool split = !e.TryGetProperty("split", out var sp) || sp.GetBoolean();
                return (p, first) => Metaspace(p, first, replacement, scheme, split);
            case "Digits":
                bool individual = e.TryGetProperty("individual_digits", out var id) && id.GetBoolean();
                var digits = new Regex(individual ? @"\p{Nd}" : @"\p{Nd}+", RegexOptions.Compiled);
                return (p, _) => p.SelectMany(s => Split(s, digits, "Isolated", false)).ToList();
            case "Whitespace":
                var ws = new Regex(@"\w+|[^\w\s]+", RegexOptions.Compiled);
                return (p, _) => p.SelectMany(s => ws.Matches(s).Select(m => m.Value)).ToList();
            case "WhitespaceSplit":
                return (p, _) => p.SelectMany(s => s.Split((char[]?)null, StringSplitOptions.RemoveEmptyEntries)).ToList();
            case "Punctuation":
                var punct = new Regex(@"\p{P}", RegexOptions.Compiled);
                return (p, _) => p.SelectMany(s => Split(s, punct, "Isolated", false)).ToList();
            default:
                throw new InvalidDataException($"{source}: pre_tokenizer type '{type}' is not supported");
        }
    }

    /// <summary>Metaspace: spaces become the replacement character, which is prepended (per the scheme)
    /// unless the text already starts with it; with split, every word keeps its leading marker.</summary>
    internal static List<string> Metaspace(List<string> pieces, bool first, string replacement, string scheme, bool split)
    {
        var result = new List<string>();
        for (int i = 0; i < pieces.Count; i++)
        {
            var s = pieces[i].Replace(" ", replacement, StringComparison.Ordinal);
            bool prepend = scheme == "always" || scheme == "first" && first && i == 0;
            if (prepend && s.Length > 0 && !s.StartsWith(replacement, StringComparison.Ordinal)) s = replacement + s;
            if (!split) { result.Add(s); continue; }
            var words = Split(s, new Regex(Regex.Escape(replacement)), "MergedWithNext", false);
            result.AddRange(words);
        }
        return result;
    }

    /// <summary>Splits on the pattern's matches, keeping them per tokenizers' SplitDelimiterBehavior.</summary>
    internal static List<string> Split(string s, Regex regex, string behavior, bool invert)
    {
        // (text, isMatch) runs covering s.
        var runs = new List<(string Text, bool Match)>();
        int at = 0;
        foreach (Match m in regex.Matches(s))
        {
            if (m.Length == 0) continue;
            if (m.Index > at) runs.Add((s[at..m.Index], invert));
            runs.Add((m.Value, !invert));
            at = m.Index + m.Length;
        }
        if (at < s.Length) runs.Add((s[at..], invert));

        var result = new List<string>();
        switch (behavior)
        {
            case "Removed":
                result.AddRange(runs.Where(r => !r.Match).Select(r => r.Text));
                break;
            case "Isolated":
                result.AddRange(runs.Select(r => r.Text));
                break;
            case "MergedWithPrevious":
                foreach (var r in runs)
                    if (r.Match && result.Count > 0) result[^1] += r.Text; else result.Add(r.Text);
                break;
            case "MergedWithNext":
                string? pending = null;
                foreach (var r in runs)
                {
                    if (r.Match) pending = (pending ?? "") + r.Text;
                    else { result.Add((pending ?? "") + r.Text); pending = null; }
                }
                if (pending is not null) result.Add(pending);
                break;
            case "Contiguous":
                for (int i = 0; i < runs.Count; i++)
                    if (runs[i].Match && i > 0 && runs[i - 1].Match) result[^1] += runs[i].Text; else result.Add(runs[i].Text);
                break;
            default:
                throw new InvalidDataException($"Split behavior '{behavior}' is not supported");
        }
        return result.Where(x => x.Length > 0).ToList();
    }
}

/// <summary>GPT-2's reversible map from bytes to printable characters, so byte-level vocabularies are
/// plain strings.</summary>
internal static class ByteLevel
{
    public static readonly char[] ByteToChar = BuildMap();
    public static readonly Dictionary<char, byte> CharToByte = ByteToChar.Select((c, b) => (c, (byte)b)).ToDictionary(x => x.c, x => x.Item2);

    private static char[] BuildMap()
    {
        var map = new char[256];
        int extra = 0;
        for (int b = 0; b < 256; b++)
        {
            bool printable = b is >= '!' and <= '~' or >= 0xA1 and <= 0xAC or >= 0xAE and <= 0xFF;
            map[b] = printable ? (char)b : (char)(256 + extra++);
        }
        return map;
    }

    public static string Encode(string s)
    {
        var bytes = Encoding.UTF8.GetBytes(s);
        var chars = new char[bytes.Length];
        for (int i = 0; i < bytes.Length; i++) chars[i] = ByteToChar[bytes[i]];
        return new string(chars);
    }

    /// <summary>Mapped characters back to bytes; characters outside the map keep their UTF-8 bytes.</summary>
    public static void Decode(string s, List<byte> into)
    {
        foreach (var c in s)
            if (CharToByte.TryGetValue(c, out var b)) into.Add(b);
            else into.AddRange(Encoding.UTF8.GetBytes(c.ToString()));
    }
}
