using PeftServe.Core.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Generation;

/// <summary>
/// Batched next-token sampler. Everything runs as whole-batch tensor ops on the logits' device; the only
/// per-row work on the host is packing the rows' parameters into small [B] tensors.
/// <para>
/// Per row, in this order: logit bias, repetition and presence/frequency penalties (if counts are given), then greedy rows
/// (temperature 0) take the argmax; sampled rows divide by their temperature, keep their top-k, then keep the
/// smallest most-likely prefix whose probability reaches top-p and the tokens at least min-p times as likely as
/// the most likely one, and draw with the Gumbel-max trick:
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
    /// <param name="promptTokens">Optional [B, V]: nonzero where the token is in the row's prompt (repetition penalty).</param>
    /// <returns>Token ids, int64 [B], on the logits' device.</returns>
    public static Tensor Sample(Tensor logits, IReadOnlyList<SamplingParams> rows, IReadOnlyList<ulong> seeds,
        IReadOnlyList<long> steps, Tensor? tokenCounts = null, Tensor? promptTokens = null)
    {
        ArgumentNullException.ThrowIfNull(logits);
        if (logits.dim() != 2)
            throw new ArgumentException($"logits must be [B, V]; got shape [{string.Join(", ", logits.shape)}].", nameof(logits));
        using var batch = Prepare(rows, seeds, steps, logits.shape[1], logits.device);
        return Sample(logits, batch, tokenCounts, promptTokens);
    }

    /// <summary>
    /// Validates and packs the per-row parameters and uploads them (two small copies), before the forward
    /// pass whose logits they will sample is queued: nothing is uploaded after it.
    /// </summary>
    public static SamplingBatch Prepare(IReadOnlyList<SamplingParams> rows, IReadOnlyList<ulong> seeds, IReadOnlyList<long> steps, long vocab, Device device)
    {
        ArgumentNullException.ThrowIfNull(rows);
        ArgumentNullException.ThrowIfNull(seeds);
        ArgumentNullException.ThrowIfNull(steps);
        if (vocab < 1)
            throw new ArgumentException("logits must have at least one column.", nameof(vocab));
        int batch = rows.Count;
        if (seeds.Count != batch || steps.Count != batch)
            throw new ArgumentException($"rows ({rows.Count}), seeds ({seeds.Count}) and steps ({steps.Count}) must each have one entry per logits row.");

        // floats: [0] temperature (0 = greedy), [1] top_p, [2] presence penalty, [3] frequency penalty, [4] log(min_p),
        //         [5] repetition penalty (1 = off)
        // longs:  [0] top_k in [1, V] (V = off), [1] seed (bits of the ulong), [2] step
        var floats = new float[6 * batch];
        var longs = new long[3 * batch];
        bool anySampled = false, anyTopK = false, anyTopP = false, anyPenalty = false, anyMinP = false, allSampledTopK = true;
        var biasRows = new List<long>();
        var biasIds = new List<long>();
        var biasValues = new List<float>();
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
            floats[5 * batch + b] = p.RepetitionPenalty;
            anyPenalty |= p.PresencePenalty != 0f || p.FrequencyPenalty != 0f || p.RepetitionPenalty != 1f;
            longs[batch + b] = unchecked((long)seeds[b]);
            longs[2 * batch + b] = steps[b];
            // Greedy rows run through the batched sampling path too (their result is discarded): give them
            // neutral filters so that they never force a sort.
            long k = p.IsGreedy || p.TopK == 0 || p.TopK >= vocab ? vocab : p.TopK; // k >= V keeps everything
            float topP = p.IsGreedy ? 1f : p.TopP;
            floats[batch + b] = topP;
            longs[b] = k;
            anySampled |= !p.IsGreedy;
            floats[4 * batch + b] = p.IsGreedy || p.MinP == 0f ? float.NegativeInfinity : MathF.Log(p.MinP);
            anyMinP |= !p.IsGreedy && p.MinP > 0f;
            if (p.LogitBias is { Count: > 0 } bias)
                foreach (var (id, value) in bias)
                {
                    if (id >= vocab) throw new ArgumentException($"logit_bias names token {id}; the vocabulary has {vocab}.", nameof(rows));
                    biasRows.Add(b);
                    biasIds.Add(id);
                    biasValues.Add(value);
                }
            // min_tokens: the stop ids are masked out until the row has generated that many.
            if (steps[b] < p.MinTokens)
                foreach (var id in p.StopTokenIds.Where(id => id < vocab).Distinct())
                {
                    biasRows.Add(b);
                    biasIds.Add(id);
                    biasValues.Add(float.NegativeInfinity);
                }
            if (k < vocab) { anyTopK = true; maxTopK = Math.Max(maxTopK, k); }
            anyTopP |= topP < 1f;
            allSampledTopK &= p.IsGreedy || k < vocab;
        }
        // Greedy-only batches need no parameters on the device at all.
        var floatParams = anySampled || anyPenalty ? Upload(floats, [6, batch], device) : null;
        var longParams = anySampled ? Upload(longs, [3, batch], device) : null;
        // The biases as a sparse list: [2, n] (row, token) and [n] values, only when some row has one.
        var biasIndex = biasRows.Count > 0 ? Upload([.. biasRows, .. biasIds], [2, biasRows.Count], device) : null;
        var biasValue = biasRows.Count > 0 ? Upload(biasValues.ToArray(), [biasValues.Count], device) : null;
        return new SamplingBatch(batch, vocab, floatParams, longParams, anySampled, anyTopK, anyTopP, anyPenalty, maxTopK)
        {
            AnyMinP = anyMinP, BiasIndex = biasIndex, BiasValues = biasValue, Device = device,
            AllSampledTopK = allSampledTopK && anyTopK,
        };
    }

    /// <summary>Restricts the rows to the tokens <paramref name="allowed"/> (per row; null rows keep all): guided JSON's
    /// masks, computed while the forward ran, become one [B, V] bool tensor on the batch's device.</summary>
    public static void Restrict(SamplingBatch batch, IReadOnlyList<bool[]?> allowed)
    {
        batch.Allowed?.Dispose();
        batch.Allowed = null;
        if (allowed.All(a => a is null)) return;
        int rows = batch.Rows;
        long vocab = batch.Vocab;
        if (allowed.Count != rows) throw new ArgumentException($"allowed has {allowed.Count} rows; the batch has {rows}.", nameof(allowed));
        var flat = new byte[rows * vocab];
        for (int b = 0; b < rows; b++)
        {
            var row = allowed[b];
            for (long v = 0; v < vocab; v++) flat[b * vocab + v] = (byte)(row is null || (v < row.Length && row[v]) ? 1 : 0);
        }
        using var host = tensor(flat, [rows, vocab]);
        using var onDevice = Upload(host.clone(), batch.Device);
        batch.Allowed = onDevice.to_type(ScalarType.Bool).DetachFromDisposeScope();
    }

    private static Tensor Upload(float[] values, long[] shape, Device device) => Upload(tensor(values, shape), device);
    private static Tensor Upload(long[] values, long[] shape, Device device) => Upload(tensor(values, shape), device);

    /// <summary>A host tensor on <paramref name="device"/>: on CUDA through pinned memory, asynchronously.</summary>
    private static Tensor Upload(Tensor host, Device device)
    {
        using var _ = host;
        if (device.type == DeviceType.CPU) return host.clone().DetachFromDisposeScope();
        using var pinned = host.pin_memory();
        return pinned.to(device, non_blocking: true).DetachFromDisposeScope();
    }

    /// <summary>Samples one token per row of <paramref name="logits"/> [B, V] with parameters made by
    /// <see cref="Prepare"/>; <paramref name="tokenCounts"/>: optional [B, V] counts of the generated tokens for the
    /// penalties, <paramref name="promptTokens"/>: optional [B, V] prompt-token marks for the repetition penalty.</summary>
    public static Tensor Sample(Tensor logits, SamplingBatch batch, Tensor? tokenCounts = null, Tensor? promptTokens = null)
    {
        ArgumentNullException.ThrowIfNull(logits);
        ArgumentNullException.ThrowIfNull(batch);
        if (logits.dim() != 2)
            throw new ArgumentException($"logits must be [B, V]; got shape [{string.Join(", ", logits.shape)}].", nameof(logits));
        if (!is_floating_point(logits))
            throw new ArgumentException($"logits must be a floating-point tensor; got {logits.dtype}.", nameof(logits));
        if (logits.shape[0] != batch.Rows || logits.shape[1] != batch.Vocab)
            throw new ArgumentException($"logits are [{logits.shape[0]}, {logits.shape[1]}]; the sampling parameters are for [{batch.Rows}, {batch.Vocab}].", nameof(logits));
        long vocab = batch.Vocab;
        if (tokenCounts is not null && (tokenCounts.dim() != 2 || tokenCounts.shape[0] != batch.Rows || tokenCounts.shape[1] != vocab))
            throw new ArgumentException($"tokenCounts must be [{batch.Rows}, {vocab}]; got [{string.Join(", ", tokenCounts.shape)}].", nameof(tokenCounts));

        using var scope = NewDisposeScope();
        var device = logits.device;
        // Numbers go to the ops as Scalars kept alive until the calls return (Scalars, alpha given; docs/reliability.md):
        // this runs every decode step.
        var one = Scalars.One;
        var minusInfinity = Scalars.Of(float.NegativeInfinity);
        var x = logits.to_type(ScalarType.Float32); // all math in float32, even for bf16/fp16 logits

        if (batch.BiasIndex is { } biasAt && batch.BiasValues is { } values)
        {
            // Out of place: the caller's logits (log probabilities are read from them) stay as the model gave them.
            var bias = zeros_like(x).index_put_(values, [biasAt[0], biasAt[1]], accumulate: true);
            x = x.add(bias, one);
        }

        if (tokenCounts is not null && batch.AnyPenalty)
            x = ApplyPenalties(x, tokenCounts.to(device), batch.Floats![2].unsqueeze(1), batch.Floats[3].unsqueeze(1),
                batch.Floats[5].unsqueeze(1), promptTokens?.to(device));

        if (batch.Allowed is { } allowedTokens) x = x.masked_fill(allowedTokens.logical_not(), minusInfinity);

        var greedyIds = x.argmax(1);
        if (!batch.AnySampled)
            return greedyIds.MoveToOuterDisposeScope();

        var floatParams = batch.Floats!;
        var longParams = batch.Longs!;
        var temperature = floatParams[0];
        var isGreedy = temperature.eq(Scalars.Of(0f));
        var scaled = x / where(isGreedy, ones_like(temperature), temperature).unsqueeze(1); // [B, V]
        var kTensor = longParams[0]; // [B], in [1, V]

        Tensor? cutoff = null; // [B, 1]: keep tokens with scaled >= cutoff
        using var vocabScalar = vocab.ToScalar();
        using var maxTopK = batch.MaxTopK.ToScalar();
        if (batch.AnyTopP)
        {
            // When every sampled row keeps a top-k, the nucleus lies within the best max-k tokens: sorting those is
            // exact and much cheaper than sorting the vocabulary (greedy rows' cutoffs are never used).
            long width = batch.AllSampledTopK ? batch.MaxTopK : vocab;
            using var widthScalar = width.ToScalar();
            var sorted = width < vocab ? scaled.topk(checked((int)width), dim: 1).values : scaled.sort(1, descending: true).Values;
            var positions = arange(Scalars.Of(0L), widthScalar, Scalars.Of(1L), ScalarType.Int64, device).unsqueeze(0);
            var sortedTopK = sorted.masked_fill(positions >= kTensor.unsqueeze(1), minusInfinity);
            var cumulative = sortedTopK.softmax(1).cumsum(1);
            var topP = floatParams[1];
            // Smallest prefix whose mass reaches top_p: every position whose cumulative mass is still < top_p,
            // plus the one that reaches it (so the first token is always kept). top_p = 1 keeps everything, which
            // also protects against the cumulative sum ending a rounding error below 1.
            var prefix = (cumulative < topP.unsqueeze(1)).sum(1, type: ScalarType.Int64).add(Scalars.Of(1L), one);
            prefix = where(topP.ge(Scalars.Of(1f)), full_like(prefix, vocabScalar), prefix);
            var keep = minimum(prefix, kTensor).clamp_max(widthScalar); // top-k applies too (the probabilities above were top-k renormalised)
            cutoff = sorted.gather(1, keep.sub(Scalars.Of(1L)).unsqueeze(1));
        }
        else if (batch.AnyTopK)
        {
            // Only top-k: a partial top-k is much cheaper than a full sort of the vocabulary.
            var top = scaled.topk(checked((int)batch.MaxTopK), dim: 1).values; // [B, maxK], descending
            var index = kTensor.clamp_max(maxTopK).sub(Scalars.Of(1L));
            var kth = top.gather(1, index.unsqueeze(1));
            cutoff = where(kTensor.lt(vocabScalar).unsqueeze(1), kth, full_like(kth, minusInfinity));
        }

        var masked = cutoff is null ? scaled : scaled.masked_fill(scaled < cutoff, minusInfinity);
        if (batch.AnyMinP)
        {
            // p < min_p * p_max  <=>  logit < max logit + log(min_p), on the tempered logits (rows without: -inf).
            var threshold = scaled.amax([1], keepdim: true).add(floatParams[4].unsqueeze(1), one);
            masked = masked.masked_fill(scaled < threshold, minusInfinity);
        }
        var noise = CounterRandom.Gumbel(longParams[1], longParams[2], vocab);
        var sampledIds = noise.add_(masked, one).argmax(1);
        var result = where(isGreedy, greedyIds, sampledIds);
        return result.MoveToOuterDisposeScope();
    }

    /// <summary>For rows that ask for log probabilities: the log-softmax of the raw <paramref name="logits"/> [B, V]
    /// (float32, before penalties and temperature), packed per row as [sampled id, its log probability, the
    /// <paramref name="top"/> best ids, their log probabilities] in float64 (ids are exact there), so that ids and
    /// values come back to the host in the pass's one copy. Returns [B, 2 + 2 top].</summary>
    public static Tensor PackLogprobs(Tensor logits, Tensor sampled, int top)
    {
        using var scope = NewDisposeScope();
        var logProbabilities = logits.to_type(ScalarType.Float32).log_softmax(1);
        var ids = sampled.to_type(ScalarType.Int64).unsqueeze(1);
        var parts = new List<Tensor> { ids.to_type(ScalarType.Float64), logProbabilities.gather(1, ids).to_type(ScalarType.Float64) };
        if (top > 0)
        {
            var best = logProbabilities.topk(top, dim: 1);
            parts.Add(best.indexes.to_type(ScalarType.Float64));
            parts.Add(best.values.to_type(ScalarType.Float64));
        }
        return cat(parts, 1).MoveToOuterDisposeScope();
    }

    /// <summary>Repetition penalty over the prompt's and the output's tokens (divide positive logits, multiply negative
    /// ones), then presence and frequency penalties over the output's (OpenAI's formula).</summary>
    internal static Tensor ApplyPenalties(Tensor logits, Tensor counts, Tensor presence, Tensor frequency,
        Tensor? repetition = null, Tensor? promptTokens = null)
    {
        using var scope = NewDisposeScope();
        var c = counts.to_type(ScalarType.Float32);
        var generated = c.gt(Scalars.Of(0f));
        var x = logits.to_type(ScalarType.Float32);
        if (repetition is not null)
        {
            var seen = promptTokens is null ? generated : generated.logical_or(promptTokens.ne(Scalars.Of(0)));
            var factor = where(x.gt(Scalars.Of(0f)), repetition.reciprocal(), repetition);
            x = where(seen, x * factor, x);
        }
        var result = x - presence * generated.to_type(ScalarType.Float32) - frequency * c;
        return result.MoveToOuterDisposeScope();
    }
}

/// <summary>One step's sampling parameters, validated and already on the device (see <see cref="Sampler.Prepare"/>).</summary>
public sealed class SamplingBatch(int rows, long vocab, Tensor? floats, Tensor? longs, bool anySampled, bool anyTopK, bool anyTopP, bool anyPenalty, long maxTopK) : IDisposable
{
    public int Rows { get; } = rows;
    public long Vocab { get; } = vocab;
    /// <summary>[4, B]: temperature, top_p, presence and frequency penalty (null when every row is greedy without penalties).</summary>
    internal Tensor? Floats { get; } = floats;
    /// <summary>[3, B]: top_k, seed bits, step (null when every row is greedy).</summary>
    internal Tensor? Longs { get; } = longs;
    public bool AnySampled { get; } = anySampled;
    public bool AnyTopK { get; } = anyTopK;
    public bool AnyTopP { get; } = anyTopP;
    public bool AnyPenalty { get; } = anyPenalty;
    public long MaxTopK { get; } = maxTopK;
    public bool AnyMinP { get; init; }
    /// <summary>Every sampled row keeps a top-k (so top-p needs only the best <see cref="MaxTopK"/> tokens sorted).</summary>
    public bool AllSampledTopK { get; init; }
    /// <summary>[2, n] (row, token id) of every logit bias in the batch, and their [n] values; null when none.</summary>
    internal Tensor? BiasIndex { get; init; }
    internal Tensor? BiasValues { get; init; }
    /// <summary>[B, V] bool: the tokens each row may take (guided JSON); null when no row is restricted.</summary>
    internal Tensor? Allowed { get; set; }
    /// <summary>Masks still being computed (joined by <see cref="Sampler.Restrict"/> before sampling), or null.</summary>
    public Task<IReadOnlyList<bool[]?>>? PendingAllowed { get; set; }
    internal Device Device { get; init; } = CPU;

    public void Dispose()
    {
        Allowed?.Dispose();
        Floats?.Dispose();
        Longs?.Dispose();
        BiasIndex?.Dispose();
        BiasValues?.Dispose();
    }
}
