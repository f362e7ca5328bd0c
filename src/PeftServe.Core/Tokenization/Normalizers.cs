using System.Text;
using System.Text.Json;
using System.Text.RegularExpressions;

namespace PeftServe.Core.Tokenization;

/// <summary>tokenizer.json's "normalizer": a text-to-text function applied to each stretch of text
/// between added tokens.</summary>
internal static class Normalizers
{
    public static Func<string, string> Create(JsonElement e, string source)
    {
        if (e.ValueKind == JsonValueKind.Null) return s => s;
        var type = e.GetProperty("type").GetString();
        switch (type)
        {
            case "Sequence":
                var parts = e.GetProperty("normalizers").EnumerateArray().Select(x => Create(x, source)).ToArray();
                return s => parts.Aggregate(s, (acc, f) => f(acc));
            case "Prepend":
                var prefix = e.GetProperty("prepend").GetString()!;
                return s => s.Length == 0 ? s : prefix + s;
            case "Replace":
                var replace = Patterns.Replacer(e, source);
                return s => replace(s);
            case "NFC": return s => s.Normalize(NormalizationForm.FormC);
            case "NFD": return s => s.Normalize(NormalizationForm.FormD);
            case "NFKC": return s => s.Normalize(NormalizationForm.FormKC);
            case "NFKD": return s => s.Normalize(NormalizationForm.FormKD);
            case "Lowercase": return s => s.ToLowerInvariant();
            case "Strip":
                bool left = e.TryGetProperty("strip_left", out var l) && l.GetBoolean(), right = e.TryGetProperty("strip_right", out var r) && r.GetBoolean();
                return s => left && right ? s.Trim() : left ? s.TrimStart() : right ? s.TrimEnd() : s;
            default:
                throw new InvalidDataException($"{source}: normalizer type '{type}' is not supported");
        }
    }
}

/// <summary>The {"String": ...} / {"Regex": ...} patterns tokenizer.json uses in Replace and Split.</summary>
internal static class Patterns
{
    public static Regex Regex(JsonElement pattern, string source)
    {
        if (pattern.TryGetProperty("Regex", out var re)) return new Regex(re.GetString()!, RegexOptions.Compiled | RegexOptions.CultureInvariant);
        if (pattern.TryGetProperty("String", out var str)) return new Regex(System.Text.RegularExpressions.Regex.Escape(str.GetString()!), RegexOptions.CultureInvariant);
        throw new InvalidDataException($"{source}: a pattern must be {{\"String\": ...}} or {{\"Regex\": ...}}");
    }

    public static Func<string, string> Replacer(JsonElement e, string source)
    {
        var content = e.GetProperty("content").GetString()!;
        var pattern = e.GetProperty("pattern");
        if (pattern.TryGetProperty("String", out var str))
        {
            var from = str.GetString()!;
            return s => from.Length == 0 ? s : s.Replace(from, content, StringComparison.Ordinal);
        }
        var regex = Regex(pattern, source);
        return s => regex.Replace(s, content.Replace("$", "$$"));
    }
}
