using System.Text.Json;

namespace PeftServe.Core.Tokenization;

/// <summary>tokenizer.json's "added_tokens": strings matched in the raw text before anything else
/// (longest first), each becoming its own id. lstrip/rstrip let a token swallow the whitespace beside
/// it; single_word only matches whole words.</summary>
internal sealed class AddedTokens
{
    private sealed record Entry(int Id, string Content, bool Special, bool LStrip, bool RStrip, bool SingleWord);

    private readonly Dictionary<string, Entry> _byContent = new(StringComparer.Ordinal);
    private readonly Dictionary<int, Entry> _byId = [];
    private readonly Dictionary<char, Entry[]> _byFirstChar;

    public int MaxId { get; }

    public AddedTokens(JsonElement list, BpeModel model)
    {
        if (list.ValueKind == JsonValueKind.Array)
            foreach (var e in list.EnumerateArray())
            {
                bool Flag(string k) => e.TryGetProperty(k, out var v) && v.ValueKind == JsonValueKind.True;
                var entry = new Entry(e.GetProperty("id").GetInt32(), e.GetProperty("content").GetString()!, Flag("special"), Flag("lstrip"), Flag("rstrip"), Flag("single_word"));
                if (entry.Content.Length == 0) continue;
                _byContent[entry.Content] = entry;
                _byId[entry.Id] = entry;
            }
        MaxId = _byId.Count == 0 ? -1 : _byId.Keys.Max();
        _byFirstChar = _byContent.Values.GroupBy(e => e.Content[0])
            .ToDictionary(g => g.Key, g => g.OrderByDescending(e => e.Content.Length).ToArray());
    }

    public int? Find(string content) => _byContent.TryGetValue(content, out var e) ? e.Id : null;
    public string? Content(int id) => _byId.TryGetValue(id, out var e) ? e.Content : null;
    public bool IsSpecial(int id) => _byId.TryGetValue(id, out var e) && e.Special;

    /// <summary>The text as (plain text, null, offset) and (token text, id, offset) segments, in order.</summary>
    public IEnumerable<(string Text, int? Id, int Offset)> Split(string text)
    {
        if (_byFirstChar.Count == 0) { if (text.Length > 0) yield return (text, null, 0); yield break; }
        int plainStart = 0, i = 0;
        while (i < text.Length)
        {
            var match = _byFirstChar.TryGetValue(text[i], out var candidates)
                ? candidates.FirstOrDefault(e => string.CompareOrdinal(text, i, e.Content, 0, e.Content.Length) == 0 && WordBoundaryOk(text, i, e))
                : null;
            if (match is null) { i++; continue; }
            int start = i, end = i + match.Content.Length;
            if (match.LStrip) while (start > plainStart && char.IsWhiteSpace(text[start - 1])) start--;
            if (match.RStrip) while (end < text.Length && char.IsWhiteSpace(text[end])) end++;
            if (start > plainStart) yield return (text[plainStart..start], null, plainStart);
            yield return (match.Content, match.Id, start);
            plainStart = i = end;
        }
        if (plainStart < text.Length) yield return (text[plainStart..], null, plainStart);
    }

    private static bool WordBoundaryOk(string text, int at, Entry e)
    {
        if (!e.SingleWord) return true;
        int end = at + e.Content.Length;
        return (at == 0 || !char.IsLetterOrDigit(text[at - 1])) && (end >= text.Length || !char.IsLetterOrDigit(text[end]));
    }
}
