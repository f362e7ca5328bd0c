using System.Text;
using System.Text.Json;

namespace PeftServe.Core.Tokenization;

/// <summary>tokenizer.json's "decoder": turns the token strings of a sequence back into text pieces
/// (concatenated by the caller).</summary>
internal static class Decoders
{
    public static Func<List<string>, List<string>> Create(JsonElement e, string source)
    {
        if (e.ValueKind == JsonValueKind.Null) return t => t;
        var type = e.GetProperty("type").GetString();
        switch (type)
        {
            case "Sequence":
                var parts = e.GetProperty("decoders").EnumerateArray().Select(x => Create(x, source)).ToArray();
                return t => parts.Aggregate(t, (acc, f) => f(acc));
            case "ByteLevel":
                return tokens =>
                {
                    var bytes = new List<byte>();
                    foreach (var t in tokens) ByteLevel.Decode(t, bytes);
                    return [Encoding.UTF8.GetString(bytes.ToArray())];
                };
            case "Replace":
                var replace = Patterns.Replacer(e, source);
                return t => t.Select(replace).ToList();
            case "ByteFallback":
                return ByteFallback;
            case "Fuse":
                return t => [string.Concat(t)];
            case "Strip":
                var content = e.GetProperty("content").GetString()![0];
                int start = e.GetProperty("start").GetInt32(), stop = e.GetProperty("stop").GetInt32();
                return t => t.Select(s => Strip(s, content, start, stop)).ToList();
            case "Metaspace":
                var replacement = e.TryGetProperty("replacement", out var rep) ? rep.GetString()! : "▁";
                var scheme = e.TryGetProperty("prepend_scheme", out var ps) ? ps.GetString()! : "always";
                return t => t.Select((s, i) =>
                {
                    var r = s.Replace(replacement, " ", StringComparison.Ordinal);
                    return i == 0 && scheme != "never" && r.StartsWith(' ') ? r[1..] : r;
                }).ToList();
            default:
                throw new InvalidDataException($"{source}: decoder type '{type}' is not supported");
        }
    }

    /// <summary>Runs of &lt;0xXX&gt; tokens become the text their bytes spell (U+FFFD per byte where invalid).</summary>
    private static List<string> ByteFallback(List<string> tokens)
    {
        var result = new List<string>();
        var pending = new List<byte>();
        void Flush()
        {
            if (pending.Count == 0) return;
            var bytes = pending.ToArray();
            try { result.Add(new UTF8Encoding(false, true).GetString(bytes)); }
            catch (DecoderFallbackException) { result.Add(new string('\uFFFD', bytes.Length)); }
            pending.Clear();
        }
        foreach (var t in tokens)
        {
            if (t.Length == 6 && t.StartsWith("<0x", StringComparison.Ordinal) && t[5] == '>' &&
                byte.TryParse(t.AsSpan(3, 2), System.Globalization.NumberStyles.HexNumber, null, out var b))
                pending.Add(b);
            else
            {
                Flush();
                result.Add(t);
            }
        }
        Flush();
        return result;
    }

    private static string Strip(string s, char c, int start, int stop)
    {
        int from = 0, to = s.Length;
        for (int i = 0; i < start && from < to && s[from] == c; i++) from++;
        for (int i = 0; i < stop && to > from && s[to - 1] == c; i++) to--;
        return s[from..to];
    }
}
