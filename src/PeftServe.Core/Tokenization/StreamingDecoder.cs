namespace PeftServe.Core.Tokenization;

/// <summary>Turns ids arriving one at a time into text as soon as it is complete. Decoding a token on
/// its own is wrong for byte-level and byte-fallback vocabularies (a character may span tokens) and for
/// SentencePiece-style ones (a leading space is stripped only at the start of a text), so each new piece
/// is the difference between decoding a short window of recent ids with and without the new ones; text
/// ending in an incomplete UTF-8 sequence (U+FFFD) is held back until the next id completes it.</summary>
public sealed class StreamingDecoder(Tokenizer tokenizer, bool skipSpecialTokens = true)
{
    private readonly List<int> _ids = [];
    private int _prefixOffset, _readOffset;

    /// <summary>Adds an id; returns the text it completes (possibly empty).</summary>
    public string Push(int id)
    {
        _ids.Add(id);
        var window = _ids.GetRange(_prefixOffset, _ids.Count - _prefixOffset);
        var before = tokenizer.Decode(_ids.GetRange(_prefixOffset, _readOffset - _prefixOffset), skipSpecialTokens);
        var after = tokenizer.Decode(window, skipSpecialTokens);
        if (after.Length <= before.Length || after.EndsWith('\uFFFD') || !after.StartsWith(before, StringComparison.Ordinal)) return "";
        _prefixOffset = _readOffset;
        _readOffset = _ids.Count;
        return after[before.Length..];
    }

    /// <summary>Whatever is still held back (an incomplete character at the end of the stream).</summary>
    public string Flush()
    {
        var before = tokenizer.Decode(_ids.GetRange(_prefixOffset, _readOffset - _prefixOffset), skipSpecialTokens);
        var after = tokenizer.Decode(_ids.GetRange(_prefixOffset, _ids.Count - _prefixOffset), skipSpecialTokens);
        _prefixOffset = _readOffset = _ids.Count;
        return after.Length > before.Length && after.StartsWith(before, StringComparison.Ordinal) ? after[before.Length..] : "";
    }
}
