using System.Collections.Concurrent;
using System.Text;
using System.Text.Json;

namespace PeftServe.Core.Tokenization;

/// <summary>Byte-pair encoding over a vocabulary and a ranked merge list, as tokenizer.json's "BPE"
/// model describes it: each pre-tokenized word starts as its characters (unknown characters become
/// &lt;0xXX&gt; byte tokens with byte_fallback, or the unknown token), then the adjacent pair with the
/// lowest merge rank is merged until no known merge is left.</summary>
internal sealed class BpeModel
{
    private readonly Dictionary<string, int> _vocab;
    private readonly string[] _idToToken;
    private readonly Dictionary<(int, int), (int Rank, int Merged)> _merges = [];
    private readonly int? _unkId;
    private readonly bool _byteFallback, _fuseUnk, _ignoreMerges;
    private readonly string _continuingPrefix, _endOfWordSuffix;
    private readonly ConcurrentDictionary<string, int[]> _cache = new();
    private readonly int[] _byteTokens = new int[256];

    public int VocabSize => _idToToken.Length;

    /// <summary>Largest token id read (16M: far beyond any real vocabulary, small enough to index).</summary>
    public const int MaxTokenId = (1 << 24) - 1;

    private static string Shorten(string s) => s.Length <= 40 ? s : s[..37] + "...";

    public BpeModel(JsonElement model, string source)
    {
        var vocab = model.GetProperty("vocab");
        _vocab = new Dictionary<string, int>(vocab.EnumerateObject().Count(), StringComparer.Ordinal);
        int max = -1;
        foreach (var p in vocab.EnumerateObject())
        {
            // Ids index an array: non-negative and of a sane size (the largest real vocabularies have ~260k).
            if (p.Value.ValueKind != JsonValueKind.Number || !p.Value.TryGetInt32(out int id) || id is < 0 or > MaxTokenId)
                throw new InvalidDataException($"{source}: the id of vocabulary entry '{Shorten(p.Name)}' is not an integer in 0..{MaxTokenId}");
            _vocab[p.Name] = id;
            max = Math.Max(max, id);
        }
        _idToToken = new string[max + 1];
        foreach (var (token, id) in _vocab) _idToToken[id] = token;

        _byteFallback = model.TryGetProperty("byte_fallback", out var bf) && bf.ValueKind == JsonValueKind.True;
        _fuseUnk = model.TryGetProperty("fuse_unk", out var fu) && fu.ValueKind == JsonValueKind.True;
        _ignoreMerges = model.TryGetProperty("ignore_merges", out var im) && im.ValueKind == JsonValueKind.True;
        _continuingPrefix = model.TryGetProperty("continuing_subword_prefix", out var cp) && cp.ValueKind == JsonValueKind.String ? cp.GetString()! : "";
        _endOfWordSuffix = model.TryGetProperty("end_of_word_suffix", out var ew) && ew.ValueKind == JsonValueKind.String ? ew.GetString()! : "";
        if (model.TryGetProperty("unk_token", out var unk) && unk.ValueKind == JsonValueKind.String && _vocab.TryGetValue(unk.GetString()!, out var unkId))
            _unkId = unkId;
        for (int b = 0; b < 256; b++) _byteTokens[b] = _vocab.TryGetValue($"<0x{b:X2}>", out var id) ? id : -1;

        int rank = 0;
        foreach (var m in model.GetProperty("merges").EnumerateArray())
        {
            // Two formats: "a b" (older files) or ["a", "b"] (newer ones, which allow spaces in tokens).
            string left, right;
            if (m.ValueKind == JsonValueKind.Array)
            {
                if (m.GetArrayLength() != 2 || m[0].ValueKind != JsonValueKind.String || m[1].ValueKind != JsonValueKind.String)
                    throw new InvalidDataException($"{source}: merge {rank} is not a pair of token strings");
                left = m[0].GetString()!;
                right = m[1].GetString()!;
            }
            else
            {
                if (m.ValueKind != JsonValueKind.String) throw new InvalidDataException($"{source}: merge {rank} is neither \"a b\" nor [\"a\", \"b\"]");
                var s = m.GetString()!;
                if (s.Length == 0) throw new InvalidDataException($"{source}: merge {rank} is empty");
                int space = s.IndexOf(' ', 1);
                if (space < 0) throw new InvalidDataException($"{source}: merge '{s}' is not two tokens");
                left = s[..space]; right = s[(space + 1)..];
            }
            if (_vocab.TryGetValue(left, out var l) && _vocab.TryGetValue(right, out var r) &&
                _vocab.TryGetValue(left + right[(_continuingPrefix.Length > 0 && right.StartsWith(_continuingPrefix, StringComparison.Ordinal) ? _continuingPrefix.Length : 0)..], out var merged))
                _merges.TryAdd((l, r), (rank, merged));
            rank++;
        }
    }

    public int? TokenToId(string token) => _vocab.TryGetValue(token, out var id) ? id : null;
    public string? IdToToken(int id) => id >= 0 && id < _idToToken.Length ? _idToToken[id] : null;

    /// <summary>The ids of one pre-tokenized word.</summary>
    public int[] Tokenize(string word)
    {
        if (word.Length == 0) return [];
        if (_cache.TryGetValue(word, out var hit)) return hit;
        var result = Encode(word);
        if (_cache.Count < 100_000) _cache[word] = result;
        return result;
    }

    private int[] Encode(string word)
    {
        if (_ignoreMerges && _vocab.TryGetValue(word, out var whole)) return [whole];

        // Initial symbols: one per character (a surrogate pair is one character).
        var symbols = new List<int>(word.Length);
        bool lastWasUnk = false;
        var chars = EnumerateChars(word).ToList();
        for (int i = 0; i < chars.Count; i++)
        {
            var c = chars[i];
            if (i > 0 && _continuingPrefix.Length > 0) c = _continuingPrefix + c;
            if (i == chars.Count - 1 && _endOfWordSuffix.Length > 0) c += _endOfWordSuffix;
            if (_vocab.TryGetValue(c, out var id)) { symbols.Add(id); lastWasUnk = false; continue; }
            if (_byteFallback && Encoding.UTF8.GetBytes(chars[i]) is var bytes && bytes.All(b => _byteTokens[b] >= 0))
            {
                foreach (var b in bytes) symbols.Add(_byteTokens[b]);
                lastWasUnk = false;
                continue;
            }
            if (_unkId is null) throw new InvalidDataException($"character '{chars[i]}' is not in the vocabulary and the tokenizer has no unknown token");
            if (!(_fuseUnk && lastWasUnk)) symbols.Add(_unkId.Value);
            lastWasUnk = true;
        }
        return Merge(symbols);
    }

    /// <summary>Repeatedly merges the lowest-ranked adjacent pair (leftmost on ties), with a heap over a
    /// linked list so long words (SentencePiece-style files have no pre-tokenizer) stay fast.</summary>
    private int[] Merge(List<int> symbols)
    {
        int n = symbols.Count;
        if (n < 2) return symbols.ToArray();
        var ids = symbols.ToArray();
        var prev = new int[n];
        var next = new int[n];
        var alive = new bool[n];
        for (int i = 0; i < n; i++) { prev[i] = i - 1; next[i] = i + 1 < n ? i + 1 : -1; alive[i] = true; }
        var heap = new PriorityQueue<(int Left, int LeftId, int RightId), (int Rank, int Pos)>();
        void Push(int left)
        {
            int right = next[left];
            if (right < 0) return;
            if (_merges.TryGetValue((ids[left], ids[right]), out var m)) heap.Enqueue((left, ids[left], ids[right]), (m.Rank, left));
        }
        for (int i = 0; i < n - 1; i++) Push(i);
        while (heap.TryDequeue(out var item, out _))
        {
            int left = item.Left, right = next[left];
            // Stale entry: a neighbour changed since it was queued.
            if (!alive[left] || right < 0 || ids[left] != item.LeftId || ids[right] != item.RightId) continue;
            ids[left] = _merges[(item.LeftId, item.RightId)].Merged;
            alive[right] = false;
            next[left] = next[right];
            if (next[right] >= 0) prev[next[right]] = left;
            if (prev[left] >= 0) Push(prev[left]);
            Push(left);
        }
        var result = new List<int>();
        for (int i = 0; i >= 0; i = next[i]) result.Add(ids[i]);
        return result.ToArray();
    }

    private static IEnumerable<string> EnumerateChars(string s)
    {
        for (int i = 0; i < s.Length; i++)
        {
            if (char.IsHighSurrogate(s[i]) && i + 1 < s.Length && char.IsLowSurrogate(s[i + 1])) { yield return s.Substring(i, 2); i++; }
            else yield return s[i].ToString();
        }
    }
}
