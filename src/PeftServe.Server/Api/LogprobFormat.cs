using System.Text;
using PeftServe.Core.Engine;

namespace PeftServe.Server.Api;

/// <summary>Writes tokens' log probabilities in OpenAI's two shapes: the completions API's parallel lists
/// (tokens, token_logprobs, top_logprobs as token-to-value maps, text_offset) and the chat API's content list
/// (token, logprob, bytes, top_logprobs). Token texts are the tokenizer's decoding of each id alone.</summary>
public sealed class LogprobFormat(Func<int, string> tokenText)
{
    /// <summary>JSON has no infinity: a log probability that underflowed is written as vLLM writes it.</summary>
    private static float Finite(float logprob) => float.IsFinite(logprob) ? logprob : -9999f;

    /// <summary>The completions shape; <paramref name="offset"/> is where the first token's text starts in the choice's text.</summary>
    public object Completion(IReadOnlyList<TokenLogprob> tokens, int offset)
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
            token_logprobs = tokens.Select(t => Finite(t.Logprob)),
            // The chosen token always appears, as in vLLM, beside the most likely ones.
            top_logprobs = tokens.Select(t =>
            {
                var map = new Dictionary<string, float>(StringComparer.Ordinal);
                foreach (var (id, value) in t.Top) map.TryAdd(tokenText(id), Finite(value));
                map.TryAdd(tokenText(t.TokenId), Finite(t.Logprob));
                return map;
            }),
            text_offset = offsets,
        };
    }

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
