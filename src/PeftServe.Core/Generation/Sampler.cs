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
        // Two arrays, so that moving them to the device costs two small copies per step.
        // floats: [0] temperature (0 = greedy), [1] top_p, [2] presence penalty, [3] frequency penalty
        // longs:  [0] top_k in [1, V] (V = off), [1] seed (bits of the ulong), [2] step
        var floats = new float[4 * batch];
        var longs = new long[3 * batch];
        bool anySampled = false, anyTopK = false, anyTopP = false, anyPenalty = false;
        long maxTopK = 0;
        for (int b = 0; b < batch; b++)
        {
            var p = rows[b] ?? throw new ArgumentException($"rows[{b}] is null.", nameof(rows));
            p.Validate();
            if (steps[b] < 0)
                throw new ArgumentException($"steps[{b}] must be >= 0; got {steps[b]}.", nameof(steps));
            floats[b] = p.Temperature;
            floats[2 * batch + b] = p.PresencePenalty;
            floats[3 * batch + b] = p.FrequencyPenalty;
            anyPenalty |= p.PresencePenalty != 0f || p.FrequencyPenalty != 0f;
            longs[batch + b] = unchecked((long)seeds[b]);
            longs[2 * batch + b] = steps[b];
            // Greedy rows run through the batched sampling path too (their result is discarded): give them
            // neutral filters so that they never force a sort.
            long k = p.IsGreedy || p.TopK == 0 || p.TopK >= vocab ? vocab : p.TopK; // k >= V keeps everything
            float topP = p.IsGreedy ? 1f : p.TopP;
            floats[batch + b] = topP;
            longs[b] = k;
            anySampled |= !p.IsGreedy;
            if (k < vocab) { anyTopK = true; maxTopK = Math.Max(maxTopK, k); }
            anyTopP |= topP < 1f;
        }

        // ---- Device side: batched. ----
        using var scope = NewDisposeScope();
        var device = logits.device;
        var floatParams = tensor(floats, [4, batch], device: device);
        var longParams = tensor(longs, [3, batch], device: device);
        var x = logits.to_type(ScalarType.Float32); // all math in float32, even for bf16/fp16 logits

        if (tokenCounts is not null && anyPenalty)
            x = ApplyPenalties(x, tokenCounts.to(device), floatParams[2].unsqueeze(1), floatParams[3].unsqueeze(1));

        var greedyIds = x.argmax(1);
        if (!anySampled)
            return greedyIds.MoveToOuterDisposeScope();

        var temperature = floatParams[0];
        var isGreedy = temperature.eq(0f);
        var scaled = x / where(isGreedy, ones_like(temperature), temperature).unsqueeze(1); // [B, V]
        var kTensor = longParams[0]; // [B], in [1, V]

        Tensor? cutoff = null; // [B, 1]: keep tokens with scaled >= cutoff
        if (anyTopP)
        {
            var sorted = scaled.sort(1, descending: true).Values;
            var positions = arange(vocab, dtype: ScalarType.Int64, device: device).unsqueeze(0);
            var sortedTopK = sorted.masked_fill(positions >= kTensor.unsqueeze(1), float.NegativeInfinity);
            var cumulative = sortedTopK.softmax(1).cumsum(1);
            var topP = floatParams[1];
            // Smallest prefix whose mass reaches top_p: every position whose cumulative mass is still < top_p,
            // plus the one that reaches it (so the first token is always kept). top_p = 1 keeps everything, which
            // also protects against the cumulative sum ending a rounding error below 1.
            var prefix = (cumulative < topP.unsqueeze(1)).sum(1, type: ScalarType.Int64) + 1L;
            prefix = where(topP >= 1f, full_like(prefix, vocab), prefix);
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
        var noise = CounterRandom.Gumbel(longParams[1], longParams[2], vocab);
        var sampledIds = noise.add_(masked).argmax(1);
        var result = where(isGreedy, greedyIds, sampledIds);
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
