using System.Text;
using PeftServe.Core.Engine;

namespace PeftServe.Server.Api;

/// <summary>Writes tokens' log probabilities in OpenAI's two shapes: the completions API's parallel lists
/// (tokens, token_logprobs, top_logprobs as token-to-value maps, text_offset) and the chat API's content list
/// (token, logprob, bytes, top_logprobs). Token texts are the tokenizer's decoding of each id alone.</summary>
public sealed class LogprobFormat(Func<int, string> tokenText)
{
    /// <summary>JSON has no infinity: a log probability that underflowed is written as vLLM writes it.</summary>
    internal static float Finite(float logprob) => float.IsFinite(logprob) ? logprob : -9999f;

    /// <summary>The completions shape, for generated tokens; <paramref name="offset"/> is where the first token's
    /// text starts (offsets run along the listed tokens' texts).</summary>
    public object Completion(IReadOnlyList<TokenLogprob> tokens, int offset) =>
        Completion(tokens.Select(t => (t.TokenId, (TokenLogprob?)t)).ToList(), offset);

    /// <summary>The completions shape for any tokens, a prompt's included: a token without log probabilities (the
    /// prompt's first) has null in token_logprobs and top_logprobs.</summary>
    public object Completion(IReadOnlyList<(int TokenId, TokenLogprob? Logprob)> tokens, int offset)
    {
        var texts = tokens.Select(t => tokenText(t.TokenId)).ToList();
        var offsets = new List<int>(texts.Count);
        foreach (var text in texts)
        {
            offsets.Add(offset);
            offset += text.Length;
        }
        return new
        {
            tokens = texts,
            token_logprobs = tokens.Select(t => t.Logprob is { } lp ? Finite(lp.Logprob) : (float?)null),
            // The chosen token always appears, as in vLLM, beside the most likely ones.
            top_logprobs = tokens.Select(t =>
            {
                if (t.Logprob is not { } lp) return null;
                var map = new Dictionary<string, float>(StringComparer.Ordinal);
                foreach (var (id, value) in lp.Top) map.TryAdd(tokenText(id), Finite(value));
                map.TryAdd(tokenText(lp.TokenId), Finite(lp.Logprob));
                return map;
            }),
            text_offset = offsets,
        };
    }

    /// <summary>Total length of the tokens' texts (where the next token's offset starts).</summary>
    public int TextLength(IEnumerable<int> tokenIds) => tokenIds.Sum(id => tokenText(id).Length);

    /// <summary>The chat shape.</summary>
    public object Chat(IReadOnlyList<TokenLogprob> tokens) => new
    {
        content = tokens.Select(t => new
        {
            token = tokenText(t.TokenId),
            logprob = Finite(t.Logprob),
            bytes = Bytes(t.TokenId),
            top_logprobs = t.Top.Select(a => new { token = tokenText(a.TokenId), logprob = Finite(a.Logprob), bytes = Bytes(a.TokenId) }),
        }),
    };

    private int[] Bytes(int id) => Encoding.UTF8.GetBytes(tokenText(id)).Select(b => (int)b).ToArray();
}
