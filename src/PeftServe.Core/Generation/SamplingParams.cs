using System.Security.Cryptography;

namespace PeftServe.Core.Generation;

/// <summary>
/// Per-request decoding parameters (OpenAI-style). Immutable; build variants with <c>with { ... }</c>.
/// </summary>
public sealed record SamplingParams
{
    /// <summary>Softmax temperature. 0 means greedy (argmax); must be finite and &gt;= 0.</summary>
    public float Temperature { get; init; } = 1.0f;

    /// <summary>Nucleus sampling: keep the smallest set of most likely tokens whose mass reaches TopP. In (0, 1]; 1 = off.</summary>
    public float TopP { get; init; } = 1.0f;

    /// <summary>Keep only the K most likely tokens. 0 = off; values &gt;= the vocabulary size are also "off".</summary>
    public int TopK { get; init; }

    /// <summary>
    /// Seed of this request's random stream. Null means "pick one at request creation":
    /// call <see cref="WithResolvedSeed"/> once and keep the result so the request can be replayed.
    /// </summary>
    public ulong? Seed { get; init; }

    /// <summary>Maximum number of tokens to generate (&gt;= 1).</summary>
    public int MaxTokens { get; init; } = 16;

    /// <summary>Repetition penalty (Keskar et al. 2019, as Hugging Face and vLLM apply it): the logit of every token
    /// already in the prompt or the output is divided by it when positive and multiplied by it when negative.
    /// Greater than 0; 1 = off.</summary>
    public float RepetitionPenalty { get; init; } = 1f;

    /// <summary>Guided JSON: the output is held to one JSON object this schema allows (<see cref="JsonConstraint"/>;
    /// <see cref="JsonSchema.AnyObject"/> is OpenAI's JSON mode). Null: free text. The engine needs a tokenizer for it.</summary>
    public JsonSchema? Json { get; init; }

    /// <summary>vLLM's min_tokens: until this many tokens are generated, the stop token ids cannot be sampled.</summary>
    public int MinTokens { get; init; }

    /// <summary>min-p sampling (vLLM's min_p): after temperature, drop tokens less likely than MinP times the most
    /// likely one. In [0, 1]; 0 = off.</summary>
    public float MinP { get; init; }

    /// <summary>OpenAI's logit_bias: added to the logits of these token ids before anything else (greedy included);
    /// each bias in [-100, 100]. Null or empty: none.</summary>
    public IReadOnlyDictionary<int, float>? LogitBias { get; init; }

    /// <summary>Token ids that end generation.</summary>
    public IReadOnlyList<int> StopTokenIds { get; init; } = [];

    /// <summary>OpenAI presence penalty in [-2, 2]: logits[id] -= PresencePenalty if id already occurred.</summary>
    public float PresencePenalty { get; init; }

    /// <summary>OpenAI frequency penalty in [-2, 2]: logits[id] -= FrequencyPenalty * count(id).</summary>
    public float FrequencyPenalty { get; init; }

    /// <summary>The most alternatives <see cref="Logprobs"/> may ask for.</summary>
    public const int MaxLogprobs = 20;

    /// <summary>Null: no log probabilities. Otherwise each generated token comes with its log probability under the
    /// model (the raw distribution, before penalties and temperature, as vLLM reports by default) and that of the
    /// this-many most likely tokens (0 to <see cref="MaxLogprobs"/>).</summary>
    public int? Logprobs { get; init; }

    /// <summary>Null: none. Otherwise every prompt token after the first comes back with its log probability given
    /// the tokens before it, and this many alternatives (0 to <see cref="MaxLogprobs"/>): what an evaluation
    /// harness scores continuations with.</summary>
    public int? PromptLogprobs { get; init; }

    /// <summary>True when this request decodes greedily (temperature 0).</summary>
    public bool IsGreedy => Temperature == 0f;

    /// <summary>Greedy decoding (temperature 0) of at most <paramref name="maxTokens"/> tokens.</summary>
    public static SamplingParams Greedy(int maxTokens) => new() { Temperature = 0f, MaxTokens = maxTokens };

    /// <summary>A fresh random seed (cryptographic RNG, so concurrent requests never share one by accident).</summary>
    public static ulong NewSeed()
    {
        Span<byte> bytes = stackalloc byte[8];
        RandomNumberGenerator.Fill(bytes);
        return BitConverter.ToUInt64(bytes);
    }

    /// <summary>This request with <see cref="Seed"/> set: itself if it already has one, else a copy with a new random seed.</summary>
    public SamplingParams WithResolvedSeed() => Seed.HasValue ? this : this with { Seed = NewSeed() };

    /// <summary>Throws <see cref="ArgumentException"/> describing the first invalid field.</summary>
    public void Validate()
    {
        if (float.IsNaN(Temperature) || Temperature < 0f || float.IsInfinity(Temperature))
            throw new ArgumentException($"temperature must be a finite number >= 0 (0 = greedy); got {Temperature}.", nameof(Temperature));
        if (!(TopP > 0f && TopP <= 1f))
            throw new ArgumentException($"top_p must be in (0, 1]; got {TopP}.", nameof(TopP));
        if (TopK < 0)
            throw new ArgumentException($"top_k must be >= 0 (0 = disabled); got {TopK}.", nameof(TopK));
        if (MaxTokens < 1)
            throw new ArgumentException($"max_tokens must be >= 1; got {MaxTokens}.", nameof(MaxTokens));
        if (!(PresencePenalty >= -2f && PresencePenalty <= 2f))
            throw new ArgumentException($"presence_penalty must be in [-2, 2]; got {PresencePenalty}.", nameof(PresencePenalty));
        if (!(FrequencyPenalty >= -2f && FrequencyPenalty <= 2f))
            throw new ArgumentException($"frequency_penalty must be in [-2, 2]; got {FrequencyPenalty}.", nameof(FrequencyPenalty));
        if (Logprobs is < 0 or > MaxLogprobs)
            throw new ArgumentException($"logprobs must be between 0 and {MaxLogprobs}; got {Logprobs}.", nameof(Logprobs));
        if (PromptLogprobs is < 0 or > MaxLogprobs)
            throw new ArgumentException($"prompt logprobs must be between 0 and {MaxLogprobs}; got {PromptLogprobs}.", nameof(PromptLogprobs));
        if (!(RepetitionPenalty > 0f && float.IsFinite(RepetitionPenalty)))
            throw new ArgumentException($"repetition_penalty must be a finite number > 0 (1 = off); got {RepetitionPenalty}.", nameof(RepetitionPenalty));
        if (MinTokens < 0 || MinTokens > MaxTokens)
            throw new ArgumentException($"min_tokens must be between 0 and max_tokens ({MaxTokens}); got {MinTokens}.", nameof(MinTokens));
        if (!(MinP >= 0f && MinP <= 1f))
            throw new ArgumentException($"min_p must be in [0, 1]; got {MinP}.", nameof(MinP));
        if (LogitBias is not null)
            foreach (var (id, bias) in LogitBias)
            {
                if (id < 0) throw new ArgumentException($"logit_bias token ids must be >= 0; got {id}.", nameof(LogitBias));
                if (!(bias >= -100f && bias <= 100f)) throw new ArgumentException($"logit_bias values must be in [-100, 100]; got {bias} for {id}.", nameof(LogitBias));
            }
        if (StopTokenIds is null)
            throw new ArgumentException("stop token ids must not be null (use an empty list).", nameof(StopTokenIds));
        foreach (var id in StopTokenIds)
        {
            if (id < 0)
                throw new ArgumentException($"stop token ids must be >= 0; got {id}.", nameof(StopTokenIds));
        }
    }
}
