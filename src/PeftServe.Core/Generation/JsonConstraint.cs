using System.Collections.Concurrent;
using System.Runtime.CompilerServices;
using PeftServe.Core.Tokenization;

namespace PeftServe.Core.Generation;

/// <summary>
/// JSON mode (OpenAI's <c>response_format: {"type": "json_object"}</c>): the output is held to a prefix of one JSON
/// object. Before each step the tokens that would break that are masked out; once the object is closed only the
/// stop tokens remain, so generation ends there (or, without stop tokens, goes on in whitespace).
/// <para>
/// The check is a small pushdown recognizer of RFC 8259 run over each candidate token's text as it reads in the
/// middle of a text (<see cref="JsonVocabulary"/>). Why our own: the JSON readers at hand (System.Text.Json) check a
/// finished or streamed document, but cannot be asked "would this continuation still be valid?" for every token of
/// the vocabulary cheaply; masks are cached by recognizer state, and inside strings (most steps) a per-token flag
/// answers without running the recognizer.
/// </para>
/// </summary>
public sealed class JsonObjectConstraint(JsonVocabulary vocabulary, IReadOnlyList<int> stopTokenIds)
{
    private JsonState? _state = JsonState.Start;

    /// <summary>Whether the object is complete.</summary>
    public bool Complete => _state is { Mode: JsonMode.Done };

    /// <summary>False once a token outside the mask was taken (it cannot be, unless the mask was empty): no mask then.</summary>
    public bool Holding => _state is not null;

    /// <summary>Which tokens may come next (indexed by id, the vocabulary's size); null when nothing is held.</summary>
    public bool[]? Allowed()
    {
        if (_state is not { } state) return null;
        return vocabulary.Mask(state, stopTokenIds);
    }

    /// <summary>Moves past a sampled token.</summary>
    public void Advance(int token)
    {
        if (_state is not { } state) return;
        if (stopTokenIds.Contains(token)) return;
        _state = vocabulary.Feed(state, token);
    }
}

internal enum JsonMode : byte
{
    Start, Lead, ObjectFirst, ObjectNext, Value, ArrayFirst, AfterKey, AfterValue, InString, Escape, Unicode,
    Literal, NumMinus, NumZero, NumInt, NumDot, NumFrac, NumE, NumESign, NumExp, Done,
}

/// <summary>The recognizer's state: a mode, the open containers ('{' or '[', innermost last), whether a string is a
/// key, what a literal still needs, how many hex digits a \u escape still needs.</summary>
internal readonly record struct JsonState(JsonMode Mode, string Stack, bool Key = false, string Rest = "", int Hex = 0)
{
    public static readonly JsonState Start = new(JsonMode.Start, "");

    private static bool Space(char c) => c is ' ' or '\t' or '\n' or '\r';

    /// <summary>The state after <paramref name="c"/>, or null when c cannot come here.</summary>
    public JsonState? Step(char c)
    {
        switch (Mode)
        {
            case JsonMode.Start:
                // One whitespace character at most before the object (a SentencePiece "▁{" reads " {" mid-text): more is
                // valid JSON, but a model may never stop producing it.
                return c == '{' ? new JsonState(JsonMode.ObjectFirst, "{") : Space(c) ? this with { Mode = JsonMode.Lead } : null;
            case JsonMode.Lead:
                return c == '{' ? new JsonState(JsonMode.ObjectFirst, "{") : null;
            case JsonMode.ObjectFirst:
                return Space(c) ? this : c == '"' ? this with { Mode = JsonMode.InString, Key = true } : c == '}' ? Close() : null;
            case JsonMode.ObjectNext:
                return Space(c) ? this : c == '"' ? this with { Mode = JsonMode.InString, Key = true } : null;
            case JsonMode.AfterKey:
                return Space(c) ? this : c == ':' ? this with { Mode = JsonMode.Value } : null;
            case JsonMode.ArrayFirst:
                return c == ']' ? Close() : Space(c) ? this : StartValue(c);
            case JsonMode.Value:
                return Space(c) ? this : StartValue(c);
            case JsonMode.InString:
                return c == '"' ? (Key ? this with { Mode = JsonMode.AfterKey, Key = false } : ValueEnded())
                    : c == '\\' ? this with { Mode = JsonMode.Escape }
                    : c < ' ' ? null : this;
            case JsonMode.Escape:
                return c == 'u' ? this with { Mode = JsonMode.Unicode, Hex = 4 }
                    : c is '"' or '\\' or '/' or 'b' or 'f' or 'n' or 'r' or 't' ? this with { Mode = JsonMode.InString } : null;
            case JsonMode.Unicode:
                if (!Uri.IsHexDigit(c)) return null;
                return Hex == 1 ? this with { Mode = JsonMode.InString, Hex = 0 } : this with { Hex = Hex - 1 };
            case JsonMode.Literal:
                if (c != Rest[0]) return null;
                return Rest.Length == 1 ? ValueEnded() : this with { Rest = Rest[1..] };
            case JsonMode.NumMinus:
                return c == '0' ? this with { Mode = JsonMode.NumZero } : c is >= '1' and <= '9' ? this with { Mode = JsonMode.NumInt } : null;
            case JsonMode.NumZero:
                return c == '.' ? this with { Mode = JsonMode.NumDot } : c is 'e' or 'E' ? this with { Mode = JsonMode.NumE } : ValueEnded().Step(c);
            case JsonMode.NumInt:
                return char.IsAsciiDigit(c) ? this : c == '.' ? this with { Mode = JsonMode.NumDot } : c is 'e' or 'E' ? this with { Mode = JsonMode.NumE } : ValueEnded().Step(c);
            case JsonMode.NumDot:
                return char.IsAsciiDigit(c) ? this with { Mode = JsonMode.NumFrac } : null;
            case JsonMode.NumFrac:
                return char.IsAsciiDigit(c) ? this : c is 'e' or 'E' ? this with { Mode = JsonMode.NumE } : ValueEnded().Step(c);
            case JsonMode.NumE:
                return c is '+' or '-' ? this with { Mode = JsonMode.NumESign } : char.IsAsciiDigit(c) ? this with { Mode = JsonMode.NumExp } : null;
            case JsonMode.NumESign:
                return char.IsAsciiDigit(c) ? this with { Mode = JsonMode.NumExp } : null;
            case JsonMode.NumExp:
                return char.IsAsciiDigit(c) ? this : ValueEnded().Step(c);
            case JsonMode.AfterValue:
                if (Space(c)) return this;
                char top = Stack[^1];
                return c == ',' ? this with { Mode = top == '{' ? JsonMode.ObjectNext : JsonMode.Value }
                    : (c == '}' && top == '{') || (c == ']' && top == '[') ? Close() : null;
            default:   // Done: whitespace only
                return Space(c) ? this : null;
        }
    }

    private JsonState? StartValue(char c) => c switch
    {
        '"' => this with { Mode = JsonMode.InString, Key = false },
        '{' => new JsonState(JsonMode.ObjectFirst, Stack + "{"),
        '[' => new JsonState(JsonMode.ArrayFirst, Stack + "["),
        '-' => this with { Mode = JsonMode.NumMinus },
        '0' => this with { Mode = JsonMode.NumZero },
        >= '1' and <= '9' => this with { Mode = JsonMode.NumInt },
        't' => this with { Mode = JsonMode.Literal, Rest = "rue" },
        'f' => this with { Mode = JsonMode.Literal, Rest = "alse" },
        'n' => this with { Mode = JsonMode.Literal, Rest = "ull" },
        _ => null,
    };

    /// <summary>A value ended inside its container (the top level is an object, so there always is one).</summary>
    private JsonState ValueEnded() => new(JsonMode.AfterValue, Stack);

    private JsonState Close()
    {
        var rest = Stack[..^1];
        return rest.Length == 0 ? new JsonState(JsonMode.Done, "") : new JsonState(JsonMode.AfterValue, rest);
    }
}

/// <summary>What JSON mode needs of a tokenizer, computed once per tokenizer: each token's text as it reads in the
/// middle of a text (a byte-level token that is part of a character reads as U+FFFD and may only sit inside a
/// string), whether it can stay inside a string as it is, and the masks already computed, by recognizer state.</summary>
public sealed class JsonVocabulary
{
    private static readonly ConditionalWeakTable<Tokenizer, JsonVocabulary> Cache = new();
    private const int MaxCachedMasks = 512;

    private readonly string?[] _pieces;        // null: never allowed in JSON (special, or empty)
    private readonly bool[] _stringSafe;       // no quote, backslash or control character: stays inside a string
    private readonly bool[] _fragment;         // part of a multi-byte character: only inside a string
    private readonly bool[] _blank;            // whitespace only
    private readonly ConcurrentDictionary<(JsonState, int), bool[]> _masks = new();

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

    /// <summary>The state after a token, or null when it breaks the JSON (or is no text).</summary>
    internal JsonState? Feed(JsonState state, int token)
    {
        if ((uint)token >= (uint)_pieces.Length || _pieces[token] is not { } piece) return null;
        if (_fragment[token]) return state.Mode == JsonMode.InString && _stringSafe[token] ? state : null;
        JsonState? s = state;
        foreach (var c in piece)
        {
            s = s.Value.Step(c);
            if (s is null) return null;
        }
        return s;
    }

    internal bool[] Mask(JsonState state, IReadOnlyList<int> stopTokenIds)
    {
        int stops = stopTokenIds.Count == 0 ? 0 : stopTokenIds.Aggregate(17, (h, id) => h * 31 + id);
        if (_masks.TryGetValue((state, stops), out var cached)) return cached;
        var mask = new bool[_pieces.Length];
        bool any = false;
        if (state.Mode == JsonMode.Done)
        {
            // Closed: the stop tokens end it; without any, whitespace fills the rest.
            foreach (var id in stopTokenIds) if ((uint)id < (uint)mask.Length) any = mask[id] = true;
            if (!any) for (int id = 0; id < mask.Length; id++) any |= mask[id] = _blank[id];
        }
        else
        {
            bool inString = state.Mode == JsonMode.InString;
            for (int id = 0; id < mask.Length; id++)
                any |= mask[id] = _pieces[id] is not null && (inString && _stringSafe[id] || Feed(state, id) is not null);
        }
        if (!any) Array.Fill(mask, true);   // nothing fits (a vocabulary without these characters): hold nothing
        if (_masks.Count < MaxCachedMasks) _masks.TryAdd((state, stops), mask);
        return mask;
    }
}
