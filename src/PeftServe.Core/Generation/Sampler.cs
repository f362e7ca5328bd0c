using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Generation;

/// <summary>
/// Batched next-token sampler. Everything runs as whole-batch tensor ops on the logits' device; the only
/// per-row work on the host is packing the rows' parameters into small [B] tensors.
/// <para>
/// Per row, in this order: presence/frequency penalties (if counts are given), then greedy rows
/// (temperature 0) take the argmax; sampled rows divide by their temperature, keep their top-k, then keep the
/// smallest most-likely prefix whose probability reaches top-p, and draw with the Gumbel-max trick:
/// <c>argmax(masked_logits / T + g)</c>, where <c>g = -log(-log(u))</c> is standard Gumbel noise. That argmax is
/// distributed exactly as softmax of the masked, tempered logits, and because <c>u</c> comes from
/// <see cref="CounterRandom"/> (a hash of seed, step and vocabulary index) the draw of a request is reproducible
/// whatever else is in the batch.
/// </para>
/// <para>
/// Filtering is done by value: top-k / top-p are evaluated on the descending-sorted logits to find each row's
/// cutoff value, and every token whose logit is &gt;= the cutoff is kept. With distinct logits this is exactly the
/// top-k / minimal top-p prefix; tokens tied with the cutoff are all kept, which keeps the result independent of
/// how a (possibly unstable, device-specific) sort orders ties.
/// </para>
/// </summary>
public static class Sampler
{
    /// <summary>
    /// Samples one token per row.
    /// </summary>
    /// <param name="logits">[B, V] logits, any floating dtype, any device. Not modified.</param>
    /// <param name="rows">Sampling parameters of each row (their <c>Seed</c> is not read; see <paramref name="seeds"/>).</param>
    /// <param name="seeds">The resolved seed of each row.</param>
    /// <param name="steps">Index of the token being sampled in each row (0 for the first generated token).</param>
    /// <param name="tokenCounts">Optional [B, V] count of each token so far (any numeric dtype), for the penalties.</param>
    /// <returns>Token ids, int64 [B], on the logits' device.</returns>
    public static Tensor Sample(Tensor logits, IReadOnlyList<SamplingParams> rows, IReadOnlyList<ulong> seeds,
        IReadOnlyList<long> steps, Tensor? tokenCounts = null)
    {
        ArgumentNullException.ThrowIfNull(logits);
        ArgumentNullException.ThrowIfNull(rows);
        ArgumentNullException.ThrowIfNull(seeds);
        ArgumentNullException.ThrowIfNull(steps);
        if (logits.dim() != 2)
            throw new ArgumentException($"logits must be [B, V]; got shape [{string.Join(", ", logits.shape)}].", nameof(logits));
        if (!is_floating_point(logits))
            throw new ArgumentException($"logits must be a floating-point tensor; got {logits.dtype}.", nameof(logits));
        int batch = checked((int)logits.shape[0]);
        long vocab = logits.shape[1];
        if (vocab < 1)
            throw new ArgumentException("logits must have at least one column.", nameof(logits));
        if (rows.Count != batch || seeds.Count != batch || steps.Count != batch)
            throw new ArgumentException($"rows ({rows.Count}), seeds ({seeds.Count}) and steps ({steps.Count}) must each have one entry per logits row ({batch}).");
        if (tokenCounts is not null && (tokenCounts.dim() != 2 || tokenCounts.shape[0] != batch || tokenCounts.shape[1] != vocab))
            throw new ArgumentException($"tokenCounts must be [{batch}, {vocab}]; got [{string.Join(", ", tokenCounts.shape)}].", nameof(tokenCounts));

        // ---- Host side: validate and pack per-row parameters (no tensor ops here). ----
        var temperature = new float[batch];
        var topP = new float[batch];
        var topK = new long[batch];
        var presence = new float[batch];
        var frequency = new float[batch];
        var greedy = new bool[batch];
        var seedBits = new long[batch];
        var stepArr = new long[batch];
        bool anySampled = false, anyTopK = false, anyTopP = false, anyPenalty = false;
        long maxTopK = 0;
        for (int b = 0; b < batch; b++)
        {
            var p = rows[b] ?? throw new ArgumentException($"rows[{b}] is null.", nameof(rows));
            p.Validate();
            if (steps[b] < 0)
                throw new ArgumentException($"steps[{b}] must be >= 0; got {steps[b]}.", nameof(steps));
            greedy[b] = p.IsGreedy;
            presence[b] = p.PresencePenalty;
            frequency[b] = p.FrequencyPenalty;
            anyPenalty |= p.PresencePenalty != 0f || p.FrequencyPenalty != 0f;
            seedBits[b] = unchecked((long)seeds[b]);
            stepArr[b] = steps[b];
            if (greedy[b])
            {
                // Neutral values: greedy rows go through the sampled path too (batched) but their result is discarded.
                temperature[b] = 1f;
                topP[b] = 1f;
                topK[b] = vocab;
                continue;
            }
            anySampled = true;
            temperature[b] = p.Temperature;
            topP[b] = p.TopP;
            topK[b] = p.TopK > 0 && p.TopK < vocab ? p.TopK : vocab; // k >= V keeps everything
            if (topK[b] < vocab) { anyTopK = true; maxTopK = Math.Max(maxTopK, topK[b]); }
            if (p.TopP < 1f) anyTopP = true;
        }

        // ---- Device side: batched. ----
        using var scope = NewDisposeScope();
        var device = logits.device;
        var x = logits.to_type(ScalarType.Float32); // all math in float32, even for bf16/fp16 logits

        if (tokenCounts is not null && anyPenalty)
        {
            x = ApplyPenalties(x, tokenCounts.to(device),
                tensor(presence, device: device).unsqueeze(1), tensor(frequency, device: device).unsqueeze(1));
        }

        var greedyIds = x.argmax(1);
        if (!anySampled)
            return greedyIds.MoveToOuterDisposeScope();

        var scaled = x / tensor(temperature, device: device).unsqueeze(1); // [B, V]
        var kTensor = tensor(topK, device: device); // [B], in [1, V]

        Tensor? cutoff = null; // [B, 1]: keep tokens with scaled >= cutoff
        if (anyTopP)
        {
            var sorted = scaled.sort(1, descending: true).Values;
            var positions = arange(vocab, dtype: ScalarType.Int64, device: device).unsqueeze(0);
            var sortedTopK = sorted.masked_fill(positions >= kTensor.unsqueeze(1), float.NegativeInfinity);
            var cumulative = sortedTopK.softmax(1).cumsum(1);
            var pTensor = tensor(topP, device: device).unsqueeze(1);
            // Smallest prefix whose mass reaches top_p: every position whose cumulative mass is still < top_p,
            // plus the one that reaches it (so the first token is always kept). top_p = 1 keeps everything, which
            // also protects against the cumulative sum ending a rounding error below 1.
            var prefix = (cumulative < pTensor).sum(1, type: ScalarType.Int64) + 1L;
            prefix = where(pTensor.squeeze(1) >= 1f, full_like(prefix, vocab), prefix);
            var keep = minimum(prefix, kTensor); // top-k applies too (the probabilities above were top-k renormalised)
            cutoff = sorted.gather(1, (keep - 1L).unsqueeze(1));
        }
        else if (anyTopK)
        {
            // Only top-k: a partial top-k is much cheaper than a full sort of the vocabulary.
            var top = scaled.topk(checked((int)maxTopK), dim: 1).values; // [B, maxK], descending
            var index = kTensor.clamp_max(maxTopK) - 1L;
            var kth = top.gather(1, index.unsqueeze(1));
            cutoff = where((kTensor < vocab).unsqueeze(1), kth, full_like(kth, float.NegativeInfinity));
        }

        var masked = cutoff is null ? scaled : scaled.masked_fill(scaled < cutoff, float.NegativeInfinity);
        var noise = CounterRandom.Gumbel(tensor(seedBits, device: device), tensor(stepArr, device: device), vocab);
        var sampledIds = (masked + noise).argmax(1);
        var result = where(tensor(greedy, device: device), greedyIds, sampledIds);
        return result.MoveToOuterDisposeScope();
    }

    /// <summary>
    /// OpenAI presence/frequency penalties: <c>logits - presence * (counts &gt; 0) - frequency * counts</c>,
    /// with <paramref name="presence"/> and <paramref name="frequency"/> broadcastable to [B, V] (e.g. [B, 1]).
    /// Returns a new float32 tensor.
    /// </summary>
    internal static Tensor ApplyPenalties(Tensor logits, Tensor counts, Tensor presence, Tensor frequency)
    {
        using var scope = NewDisposeScope();
        var c = counts.to_type(ScalarType.Float32);
        var seen = c.gt(0f).to_type(ScalarType.Float32);
        var result = logits.to_type(ScalarType.Float32) - presence * seen - frequency * c;
        return result.MoveToOuterDisposeScope();
    }
}
