using System.Collections.Concurrent;
using System.Runtime.CompilerServices;
using System.Text;
using PeftServe.Core.Tokenization;
using Node = PeftServe.Core.Generation.JsonSchema.Node;
using JsonTypes = PeftServe.Core.Generation.JsonSchema.JsonTypes;

namespace PeftServe.Core.Generation;

/// <summary>
/// Guided JSON decoding: the output is held to a prefix of one JSON object that a <see cref="JsonSchema"/> allows
/// (JSON mode is the schema "any object"). Before each step the tokens that would break that are masked out; once
/// the object is closed only the stop tokens remain, so generation ends there (or, without stop tokens, goes on in
/// whitespace).
/// <para>
/// The check is a pushdown recognizer of JSON that also follows the schema (which keys, which types, which values),
/// run over each candidate token's text as it reads in the middle of a text (<see cref="JsonVocabulary"/>). anyOf
/// makes it nondeterministic, so its state is a set of deterministic states. Why our own: the JSON readers at hand
/// (System.Text.Json) check a finished or streamed document, but cannot be asked "would this continuation still be
/// valid?" for every token of a vocabulary; masks are cached by state, and inside free strings (most steps) a
/// per-token flag answers without running the recognizer.
/// </para>
/// </summary>
public sealed class JsonConstraint(JsonVocabulary vocabulary, JsonSchema schema, IReadOnlyList<int> stopTokenIds)
{
    private JsonStates? _states = JsonStates.Start(schema.Root);

    /// <summary>Whether the object is complete.</summary>
    public bool Complete => _states?.Done == true;

    /// <summary>Which tokens may come next (indexed by id, the vocabulary's size); null when nothing is held (a token
    /// outside the mask was taken, which happens only when the mask allowed nothing).</summary>
    public bool[]? Allowed() => _states is { } s ? vocabulary.Mask(s, stopTokenIds) : null;

    /// <summary>Moves past a sampled token.</summary>
    public void Advance(int token)
    {
        if (_states is not { } s || stopTokenIds.Contains(token)) return;
        _states = vocabulary.Feed(s, token);
    }

    /// <summary>Feeds text directly (tests): false when it breaks the JSON or the schema.</summary>
    internal bool Feed(string text)
    {
        if (_states is null) return false;
        _states = _states.Step(text);
        return _states is not null;
    }
}

internal enum JsonMode : byte
{
    Start, Lead, ObjectFirst, ObjectNext, AfterKey, Value, ArrayFirst, AfterValue,
    InString, Escape, Unicode, InKey, EnumText, Literal,
    NumMinus, NumZero, NumInt, NumDot, NumFrac, NumE, NumESign, NumExp, Done,
}

/// <summary>An open container: an object (with the keys it has) or an array, and the schema it follows.</summary>
internal sealed record JsonFrame(bool IsObject, Node Node, string Seen, JsonFrame? Outer)
{
    /// <summary>How deep containers may nest (System.Text.Json's default too): the state's equality and signature
    /// recurse through the open containers, so an unbounded depth would end in a stack overflow.</summary>
    public const int MaxDepth = 64;

    public int Depth { get; } = (Outer?.Depth ?? 0) + 1;

    public bool HasSeen(string key) => Seen.Length > 0 && Seen.Split('\n').Contains(key);
    public JsonFrame WithKey(string key) => this with { Seen = Seen.Length == 0 ? key : Seen + "\n" + key };
    public bool RequiredMet => Node.Required.All(HasSeen);
    /// <summary>Whether another key may still come (after a comma).</summary>
    public bool MoreKeys => Node.Additional is not null || (Node.Properties?.Keys.Any(k => !HasSeen(k)) ?? false);
    public string Signature => $"{(IsObject ? 'o' : 'a')}{Node.Id}:{Seen.Replace('\n', ',')}/{Outer?.Signature}";
}

/// <summary>One deterministic state: a mode, the open containers, the schema of the value being read, and what the
/// mode needs (a key or enum value read so far, hex digits left, a literal's rest, whether a number is an integer).</summary>
internal readonly record struct JsonState(JsonMode Mode, JsonFrame? Stack, Node? Value = null, string Text = "", int Hex = 0, string Rest = "", bool Integer = false)
{
    private static bool Space(char c) => c is ' ' or '\t' or '\n' or '\r';

    /// <summary>The text of a key that no property has (its text is no longer needed): any text may follow.</summary>
    public const string OtherKey = "\u0001";

    public string Signature => $"{(int)Mode}|{Value?.Id}|{Text}|{Hex}|{Rest}|{Integer}|{Stack?.Signature}";

    /// <summary>Where an escape sequence returns: a key's escapes only occur in keys no property has (text
    /// <see cref="OtherKey"/>), a value string's text is empty.</summary>
    private JsonMode EscapedIn => Text == OtherKey ? JsonMode.InKey : JsonMode.InString;

    /// <summary>Adds the states after <paramref name="c"/> to <paramref name="next"/> (none when c cannot come here).</summary>
    public void Step(char c, List<JsonState> next)
    {
        switch (Mode)
        {
            case JsonMode.Start:
                // One whitespace character at most before the object (a SentencePiece "▁{" reads " {" mid-text): more is
                // valid JSON, but a model may never stop producing it.
                if (Space(c)) next.Add(this with { Mode = JsonMode.Lead });
                else StartValue(c, Value!, next);
                return;
            case JsonMode.Lead:
                StartValue(c, Value!, next);
                return;
            case JsonMode.ObjectFirst:
                if (Space(c)) next.Add(this);
                else if (c == '"') next.Add(this with { Mode = JsonMode.InKey, Text = "" });
                else if (c == '}' && Stack!.RequiredMet) next.Add(Close());
                return;
            case JsonMode.ObjectNext:
                if (Space(c)) next.Add(this);
                else if (c == '"') next.Add(this with { Mode = JsonMode.InKey, Text = "" });
                return;
            case JsonMode.InKey:
                KeyChar(c, next);
                return;
            case JsonMode.AfterKey:
                if (Space(c)) next.Add(this);
                else if (c == ':') next.Add(this with { Mode = JsonMode.Value });
                return;
            case JsonMode.ArrayFirst:
                if (Space(c)) next.Add(this);
                else if (c == ']') next.Add(Close());
                else StartValue(c, Stack!.Node.ItemsOrAny, next);
                return;
            case JsonMode.Value:
                if (Space(c)) next.Add(this);
                else StartValue(c, Value!, next);
                return;
            case JsonMode.InString:
                if (c == '"') next.Add(ValueEnded());
                else if (c == '\\') next.Add(this with { Mode = JsonMode.Escape });
                else if (c >= ' ') next.Add(this);
                return;
            case JsonMode.Escape:
                if (c == 'u') next.Add(this with { Mode = JsonMode.Unicode, Hex = 4 });
                else if (c is '"' or '\\' or '/' or 'b' or 'f' or 'n' or 'r' or 't') next.Add(this with { Mode = EscapedIn });
                return;
            case JsonMode.Unicode:
                if (Uri.IsHexDigit(c)) next.Add(Hex == 1 ? this with { Mode = EscapedIn, Hex = 0 } : this with { Hex = Hex - 1 });
                return;
            case JsonMode.EnumText:
            {
                var text = Text + c;
                if (Value!.Enum!.Any(e => e.StartsWith(text, StringComparison.Ordinal))) next.Add(this with { Text = text });
                else if (Value.Enum!.Contains(Text)) ValueEnded().Step(c, next);   // a number value ends at the next character
                return;
            }
            case JsonMode.Literal:
                if (c == Rest[0]) next.Add(Rest.Length == 1 ? ValueEnded() : this with { Rest = Rest[1..] });
                return;
            case JsonMode.NumMinus:
                if (c == '0') next.Add(this with { Mode = JsonMode.NumZero });
                else if (c is >= '1' and <= '9') next.Add(this with { Mode = JsonMode.NumInt });
                return;
            case JsonMode.NumZero:
            case JsonMode.NumInt:
                if (Mode == JsonMode.NumInt && char.IsAsciiDigit(c)) next.Add(this);
                else if (c == '.' && !Integer) next.Add(this with { Mode = JsonMode.NumDot });
                else if (c is 'e' or 'E' && !Integer) next.Add(this with { Mode = JsonMode.NumE });
                else if (!char.IsAsciiDigit(c)) ValueEnded().Step(c, next);
                return;
            case JsonMode.NumDot:
                if (char.IsAsciiDigit(c)) next.Add(this with { Mode = JsonMode.NumFrac });
                return;
            case JsonMode.NumFrac:
                if (char.IsAsciiDigit(c)) next.Add(this);
                else if (c is 'e' or 'E') next.Add(this with { Mode = JsonMode.NumE });
                else ValueEnded().Step(c, next);
                return;
            case JsonMode.NumE:
                if (c is '+' or '-') next.Add(this with { Mode = JsonMode.NumESign });
                else if (char.IsAsciiDigit(c)) next.Add(this with { Mode = JsonMode.NumExp });
                return;
            case JsonMode.NumESign:
                if (char.IsAsciiDigit(c)) next.Add(this with { Mode = JsonMode.NumExp });
                return;
            case JsonMode.NumExp:
                if (char.IsAsciiDigit(c)) next.Add(this);
                else ValueEnded().Step(c, next);
                return;
            case JsonMode.AfterValue:
            {
                if (Space(c)) { next.Add(this); return; }
                var top = Stack!;
                if (top.IsObject)
                {
                    if (c == ',' && top.MoreKeys) next.Add(this with { Mode = JsonMode.ObjectNext });
                    else if (c == '}' && top.RequiredMet) next.Add(Close());
                }
                else if (c == ',') next.Add(this with { Mode = JsonMode.Value, Value = top.Node.ItemsOrAny });
                else if (c == ']') next.Add(Close());
                return;
            }
            default:   // Done: whitespace only
                if (Space(c)) next.Add(this);
                return;
        }
    }

    /// <summary>The first character of a value that <paramref name="node"/> allows (each alternative of an anyOf; an
    /// alternative met again through a cycle of references adds nothing and is passed over).</summary>
    private void StartValue(char c, Node node, List<JsonState> next, HashSet<Node>? expanding = null)
    {
        if (node.Alternatives is { } alternatives)
        {
            expanding ??= [];
            if (!expanding.Add(node)) return;
            foreach (var a in alternatives) StartValue(c, a, next, expanding);
            return;
        }
        if (node.Enum is { } values)
        {
            var text = c.ToString();
            if (values.Any(e => e.StartsWith(text, StringComparison.Ordinal)))
                next.Add(new JsonState(JsonMode.EnumText, Stack, node, text));
            return;
        }
        var t = node.Types;
        // A scalar's state keeps no schema: what follows it depends only on the containers (better mask caching).
        var here = new JsonState(JsonMode.Value, Stack);
        switch (c)
        {
            case '{' when t.HasFlag(JsonTypes.Object) && (Stack?.Depth ?? 0) < JsonFrame.MaxDepth:
                next.Add(new JsonState(JsonMode.ObjectFirst, new JsonFrame(true, node, "", Stack)));
                break;
            case '[' when t.HasFlag(JsonTypes.Array) && (Stack?.Depth ?? 0) < JsonFrame.MaxDepth:
                next.Add(new JsonState(JsonMode.ArrayFirst, new JsonFrame(false, node, "", Stack)));
                break;
            case '"' when t.HasFlag(JsonTypes.String):
                next.Add(here with { Mode = JsonMode.InString });
                break;
            case '-' when (t & (JsonTypes.Number | JsonTypes.Integer)) != 0:
                next.Add(here with { Mode = JsonMode.NumMinus, Integer = !t.HasFlag(JsonTypes.Number) });
                break;
            case '0' when (t & (JsonTypes.Number | JsonTypes.Integer)) != 0:
                next.Add(here with { Mode = JsonMode.NumZero, Integer = !t.HasFlag(JsonTypes.Number) });
                break;
            case >= '1' and <= '9' when (t & (JsonTypes.Number | JsonTypes.Integer)) != 0:
                next.Add(here with { Mode = JsonMode.NumInt, Integer = !t.HasFlag(JsonTypes.Number) });
                break;
            case 't' when t.HasFlag(JsonTypes.Boolean):
                next.Add(here with { Mode = JsonMode.Literal, Rest = "rue" });
                break;
            case 'f' when t.HasFlag(JsonTypes.Boolean):
                next.Add(here with { Mode = JsonMode.Literal, Rest = "alse" });
                break;
            case 'n' when t.HasFlag(JsonTypes.Null):
                next.Add(here with { Mode = JsonMode.Literal, Rest = "ull" });
                break;
        }
    }

    /// <summary>A character of a key. Where the object names its keys and allows no others, the key must stay a
    /// prefix of one not given yet; otherwise any key goes, and its text is kept only while it may still be a named one.</summary>
    private void KeyChar(char c, List<JsonState> next)
    {
        var frame = Stack!;
        var node = frame.Node;
        bool open = node.Additional is not null;
        const string Other = OtherKey;
        if (c == '"')
        {
            var key = Text == Other ? null : Text;
            bool isNamed = key is not null && (node.Properties?.ContainsKey(key) ?? false);
            if (isNamed ? frame.HasSeen(key!) : !open) return;   // a named key once; others only where the object allows them
            var value = isNamed ? node.Properties![key!] : node.Additional!;
            next.Add(new JsonState(JsonMode.AfterKey, isNamed ? frame.WithKey(key!) : frame, value));
            return;
        }
        if (c == '\\')
        {
            if (open) next.Add(this with { Mode = JsonMode.Escape, Text = Other });
            return;
        }
        if (c < ' ') return;
        var text = Text == Other ? Other : Text + c;
        bool named = text != Other && node.Properties is not null && node.Properties.Keys.Any(k => !frame.HasSeen(k) && k.StartsWith(text, StringComparison.Ordinal));
        if (named) next.Add(this with { Text = text });
        else if (open) next.Add(this with { Text = Other });
    }

    private JsonState ValueEnded() => new(JsonMode.AfterValue, Stack);

    private JsonState Close()
    {
        var outer = Stack!.Outer;
        return outer is null ? new JsonState(JsonMode.Done, null) : new JsonState(JsonMode.AfterValue, outer);
    }
}

/// <summary>The recognizer's state: every deterministic state still alive (anyOf keeps several).</summary>
internal sealed class JsonStates
{
    public IReadOnlyList<JsonState> States { get; }
    /// <summary>A text that two equal state sets share (the mask cache's key); built when first asked for.</summary>
    public string Signature => _signature ??= string.Join(";", States.Select(s => s.Signature).Order(StringComparer.Ordinal));
    private string? _signature;
    public bool Done => States.Any(s => s.Mode == JsonMode.Done);
    /// <summary>Every state is inside a string (a value, or a key no property has) that takes any text: a token without
    /// quote, backslash or control character keeps them all alive as they are.</summary>
    public bool FreeString { get; }

    private JsonStates(IReadOnlyList<JsonState> states)
    {
        States = states;
        FreeString = states.All(s => s.Mode == JsonMode.InString || s.Mode == JsonMode.InKey && s.Text == JsonState.OtherKey);
    }

    public static JsonStates Start(Node root) => new([new JsonState(JsonMode.Start, null, root)]);

    /// <summary>The most deterministic states kept alive at once.</summary>
    public const int MaxStates = 256;

    /// <summary>The states after <paramref name="text"/>, or null when none survives.</summary>
    public JsonStates? Step(string text)
    {
        var current = new List<JsonState>(States);
        var next = new List<JsonState>();
        foreach (var c in text)
        {
            if (!Advance(current, c, next)) return null;
            (current, next) = (next, current);
        }
        return new JsonStates(current);
    }

    /// <summary>One character of <see cref="Step"/>: fills <paramref name="next"/> with the states after
    /// <paramref name="c"/> from <paramref name="current"/>, each once (first occurrence first), at most
    /// <see cref="MaxStates"/>; false when none survives.</summary>
    internal static bool Advance(List<JsonState> current, char c, List<JsonState> next)
    {
        next.Clear();
        foreach (var s in current) s.Step(c, next);
        if (next.Count == 0) return false;
        if (next.Count > 1)
        {
            var seen = new HashSet<JsonState>();
            int kept = 0;
            for (int i = 0; i < next.Count; i++)
                if (seen.Add(next[i])) next[kept++] = next[i];
            next.RemoveRange(kept, next.Count - kept);
        }
        // Bounded alternatives keep this small; a cap all the same, so no input makes it grow without end.
        if (next.Count > MaxStates) next.RemoveRange(MaxStates, next.Count - MaxStates);
        return true;
    }
}

/// <summary>What guided JSON decoding needs of a tokenizer, computed once per tokenizer: each token's text as it
/// reads in the middle of a text (a byte-level token that is part of a character reads as U+FFFD and may only sit
/// inside a string), whether it can stay inside a string as it is, and the masks already computed, by state.</summary>
public sealed class JsonVocabulary
{
    private static readonly ConditionalWeakTable<Tokenizer, JsonVocabulary> Cache = new();
    private const int MaxCachedMasks = 256;   // a mask is a byte per token: 32 MB at most for a 128k vocabulary

    private readonly string?[] _pieces;        // null: never allowed in JSON (special, or empty)
    private readonly bool[] _stringSafe;       // no quote, backslash or control character: stays inside a string
    private readonly bool[] _fragment;         // part of a multi-byte character: only inside a string
    private readonly bool[] _blank;            // whitespace only
    private readonly ConcurrentDictionary<string, bool[]> _masks = new(StringComparer.Ordinal);
    private (int[] Ids, int[] Shared)? _sorted;     // see Sorted

    public int Size => _pieces.Length;

    public static JsonVocabulary For(Tokenizer tokenizer) => Cache.GetValue(tokenizer, t => new JsonVocabulary(t));

    private JsonVocabulary(Tokenizer tokenizer)
    {
        int v = tokenizer.VocabSize;
        _pieces = new string?[v];
        _stringSafe = new bool[v];
        _fragment = new bool[v];
        _blank = new bool[v];
        // A token's text mid-text: what it adds after a plain letter (SentencePiece strips a leading space only at the start).
        var context = tokenizer.Encode("a", addSpecialTokens: false);
        var before = tokenizer.Decode(context);
        for (int id = 0; id < v; id++)
        {
            if (tokenizer.IsSpecial(id)) continue;
            string piece;
            try
            {
                var after = tokenizer.Decode([.. context, id]);
                piece = after.StartsWith(before, StringComparison.Ordinal) ? after[before.Length..] : tokenizer.Decode([id]);
            }
            catch (ArgumentOutOfRangeException) { continue; }   // a hole in the vocabulary
            if (piece.Length == 0) continue;
            _pieces[id] = piece;
            _fragment[id] = piece.Contains('\uFFFD');
            _stringSafe[id] = !piece.Any(c => c is '"' or '\\' || c < ' ');
            _blank[id] = piece.All(c => c is ' ' or '\t' or '\n' or '\r');
        }
    }

    /// <summary>The states after a token, or null when it breaks the JSON (or is no text).</summary>
    internal JsonStates? Feed(JsonStates states, int token)
    {
        if ((uint)token >= (uint)_pieces.Length || _pieces[token] is not { } piece) return null;
        // A piece of a character: only where any text may go, and it changes nothing there.
        if (_fragment[token]) return states.FreeString && _stringSafe[token] ? states : null;
        return states.Step(piece);
    }

    internal bool[] Mask(JsonStates states, IReadOnlyList<int> stopTokenIds)
    {
        var key = states.Signature + "#" + string.Join(",", stopTokenIds);
        if (_masks.TryGetValue(key, out var cached)) return cached;
        var mask = ComputeMask(states, stopTokenIds);
        if (_masks.Count < MaxCachedMasks) _masks.TryAdd(key, mask);
        return mask;
    }

    /// <summary>The mask, not cached. Tokens are walked in the sorted order of their texts, so a token reuses the states
    /// its predecessor reached over their common prefix (a vocabulary's texts share most of their characters with a
    /// neighbour), and once a prefix breaks the JSON every token that begins with it is refused without a step. Equal,
    /// token by token, to feeding each token on its own (<see cref="MaskByFeeding"/>, which the tests compare it with).</summary>
    internal bool[] ComputeMask(JsonStates states, IReadOnlyList<int> stopTokenIds)
    {
        var mask = new bool[_pieces.Length];
        bool any = false;
        if (states.Done)
        {
            // Closed: the stop tokens end it; without any, whitespace fills the rest.
            foreach (var id in stopTokenIds) if ((uint)id < (uint)mask.Length) any = mask[id] = true;
            if (!any) for (int id = 0; id < mask.Length; id++) any |= mask[id] = _blank[id];
        }
        else
        {
            // Where any text may go, a text without quote, backslash or control character stays inside the string as it
            // is (pieces of a character included, which are allowed nowhere else: see Feed); the walk skips those.
            if (states.FreeString)
                for (int id = 0; id < mask.Length; id++)
                    if (_pieces[id] is not null && _stringSafe[id]) any = mask[id] = true;
            var (ids, shared) = Sorted();
            // levels[d]: the states after the first d characters of the current text; levels[0..valid] hold for it.
            var levels = new List<List<JsonState>> { new(states.States) };
            int valid = 0, deadPrefix = 0;
            for (int i = 0; i < ids.Length; i++)
            {
                int id = ids[i];
                string piece = _pieces[id]!;
                if (deadPrefix > 0 && shared[i] >= deadPrefix) continue;   // begins with a prefix that broke it
                deadPrefix = 0;
                valid = Math.Min(valid, shared[i]);
                if (mask[id]) continue;                                     // allowed above
                bool ok = true;
                for (int d = valid; d < piece.Length; d++)
                {
                    if (levels.Count == d + 1) levels.Add([]);
                    if (!JsonStates.Advance(levels[d], piece[d], levels[d + 1])) { ok = false; deadPrefix = d + 1; break; }
                    valid = d + 1;
                }
                if (ok) any = mask[id] = true;
            }
        }
        if (!any) Array.Fill(mask, true);   // nothing fits (a vocabulary without these characters): hold nothing
        return mask;
    }

    /// <summary>The reference: each token's text fed on its own from <paramref name="states"/>.</summary>
    internal bool[] MaskByFeeding(JsonStates states, IReadOnlyList<int> stopTokenIds)
    {
        if (states.Done) return ComputeMask(states, stopTokenIds);
        var mask = new bool[_pieces.Length];
        bool any = false;
        for (int id = 0; id < mask.Length; id++) any |= mask[id] = Feed(states, id) is not null;
        if (!any) Array.Fill(mask, true);
        return mask;
    }

    /// <summary>The ids of the tokens with a text that is not part of a character, sorted by text (ordinal), and for
    /// each the length of the prefix it shares with the one before it. Made on first use.</summary>
    private (int[] Ids, int[] Shared) Sorted()
    {
        if (_sorted is { } done) return done;
        var ids = Enumerable.Range(0, _pieces.Length).Where(id => _pieces[id] is not null && !_fragment[id]).ToArray();
        Array.Sort(ids, (a, b) => string.CompareOrdinal(_pieces[a], _pieces[b]));
        var shared = new int[ids.Length];
        for (int i = 1; i < ids.Length; i++)
        {
            string a = _pieces[ids[i - 1]]!, b = _pieces[ids[i]]!;
            int n = 0, max = Math.Min(a.Length, b.Length);
            while (n < max && a[n] == b[n]) n++;
            shared[i] = n;
        }
        var result = (ids, shared);
        _sorted = result;
        return result;
    }
}
