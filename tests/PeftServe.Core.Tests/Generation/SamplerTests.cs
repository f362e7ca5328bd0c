using PeftServe.Core.Generation;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Tests.Generation;

public class SamplerTests
{
    // ---------- helpers ----------

    private static Tensor Logits(float[][] rows)
    {
        var flat = rows.SelectMany(r => r).ToArray();
        return tensor(flat, [rows.Length, rows[0].Length]);
    }

    private static float[][] RandomLogits(int seed, int batch, int vocab, float scale = 3f)
    {
        var rng = new Random(seed);
        return Enumerable.Range(0, batch)
            .Select(_ => Enumerable.Range(0, vocab).Select(_ => (float)(rng.NextDouble() * 2 - 1) * scale).ToArray())
            .ToArray();
    }

    private static long[] Run(float[][] logits, IReadOnlyList<SamplingParams> rows, IReadOnlyList<ulong> seeds, IReadOnlyList<long> steps, float[][]? counts = null)
    {
        using var l = Logits(logits);
        using var c = counts is null ? null : Logits(counts);
        using var ids = Sampler.Sample(l, rows, seeds, steps, c);
        Assert.Equal(ScalarType.Int64, ids.dtype);
        Assert.Equal(new long[] { logits.Length }, ids.shape);
        return ids.data<long>().ToArray();
    }

    private static int ArgMax(IReadOnlyList<double> v)
    {
        int best = 0;
        for (int i = 1; i < v.Count; i++) if (v[i] > v[best]) best = i;
        return best;
    }

    /// <summary>
    /// The distribution the sampler should draw from, computed independently in double on the host:
    /// penalties, temperature, top-k (k most likely), top-p (smallest most-likely prefix of the top-k-renormalised
    /// distribution whose mass reaches p), renormalised.
    /// </summary>
    private static double[] ExpectedProbs(float[] logits, SamplingParams p, float[]? counts = null)
    {
        int v = logits.Length;
        var l = new double[v];
        for (int i = 0; i < v; i++)
        {
            double c = counts?[i] ?? 0;
            l[i] = logits[i] - p.PresencePenalty * (c > 0 ? 1 : 0) - p.FrequencyPenalty * c;
        }
        var order = Enumerable.Range(0, v).OrderByDescending(i => l[i]).ToArray();
        int k = p.TopK > 0 && p.TopK < v ? p.TopK : v;
        var top = order.Take(k).ToArray();
        var max = l[top[0]];
        var w = top.Select(i => Math.Exp((l[i] - max) / p.Temperature)).ToArray();
        var z = w.Sum();
        int keep = top.Length;
        if (p.TopP < 1f)
        {
            double cum = 0;
            keep = 0;
            while (keep < top.Length && cum < p.TopP) { cum += w[keep] / z; keep++; }
        }
        var probs = new double[v];
        var zk = w.Take(keep).Sum();
        for (int j = 0; j < keep; j++) probs[top[j]] = w[j] / zk;
        return probs;
    }

    /// <summary>Independent host-side Gumbel-max draw from the scalar counter RNG, for a whole-pipeline comparison.</summary>
    private static long ReferenceDraw(float[] logits, SamplingParams p, ulong seed, long step, float[]? counts = null)
    {
        int v = logits.Length;
        if (p.IsGreedy)
        {
            var pen = new double[v];
            for (int i = 0; i < v; i++)
            {
                double c = counts?[i] ?? 0;
                pen[i] = logits[i] - p.PresencePenalty * (c > 0 ? 1 : 0) - p.FrequencyPenalty * c;
            }
            return ArgMax(pen);
        }
        var probs = ExpectedProbs(logits, p, counts);
        var score = new double[v];
        for (int i = 0; i < v; i++)
        {
            double u = CounterRandom.Uniform(seed, step, i);
            // log p + Gumbel: same argmax as logit/T + Gumbel over the kept set (log p differs by a per-row constant).
            score[i] = probs[i] > 0 ? Math.Log(probs[i]) - Math.Log(-Math.Log(u)) : double.NegativeInfinity;
        }
        return ArgMax(score);
    }

    /// <summary>Draws n tokens from one logits row with one seed and steps 0..n-1, all in a single batched call.</summary>
    private static long[] Counts(float[] logits, SamplingParams p, int n, ulong seed = 2024, bool varySeedInstead = false)
    {
        using var row = tensor(logits, [1, logits.Length]);
        using var batch = row.expand(n, logits.Length).contiguous();
        var rows = Enumerable.Repeat(p, n).ToArray();
        var seeds = Enumerable.Range(0, n).Select(i => varySeedInstead ? seed + (ulong)i : seed).ToArray();
        var steps = Enumerable.Range(0, n).Select(i => varySeedInstead ? 0L : i).ToArray();
        using var ids = Sampler.Sample(batch, rows, seeds, steps);
        var counts = new long[logits.Length];
        foreach (var id in ids.data<long>().ToArray()) counts[id]++;
        return counts;
    }

    private static void AssertMatches(long[] counts, double[] probs)
    {
        double n = counts.Sum();
        double chi = 0;
        int dof = -1;
        for (int i = 0; i < probs.Length; i++)
        {
            if (probs[i] == 0)
            {
                Assert.True(counts[i] == 0, $"token {i} has probability 0 but was drawn {counts[i]} times");
                continue;
            }
            dof++;
            var expected = n * probs[i];
            chi += (counts[i] - expected) * (counts[i] - expected) / expected;
            var sd = Math.Sqrt(probs[i] * (1 - probs[i]) / n);
            Assert.True(Math.Abs(counts[i] / n - probs[i]) < 5 * sd + 1e-9,
                $"token {i}: frequency {counts[i] / n:F4} vs probability {probs[i]:F4} (sd {sd:F4})");
        }
        // Roughly the 1e-5 upper quantile of chi-square(dof) (dof + 8 * sqrt(2 dof) + 6): a wrong temperature or
        // filter gives values in the hundreds or thousands at n = 20000.
        var limit = dof + 8 * Math.Sqrt(2.0 * Math.Max(dof, 1)) + 6;
        Assert.True(chi < limit, $"chi-square {chi:F1} >= {limit:F1} with {dof} dof; counts [{string.Join(", ", counts)}], probs [{string.Join(", ", probs.Select(x => x.ToString("F4")))}]");
    }

    // A fixed 8-token distribution with distinct, unsorted probabilities.
    private static readonly double[] BaseProbs = [0.05, 0.30, 0.10, 0.25, 0.15, 0.08, 0.04, 0.03];
    private static readonly float[] BaseLogits = BaseProbs.Select(p => (float)(Math.Log(p) + 1.7)).ToArray();

    // ---------- greedy ----------

    [Fact]
    public void GreedyRowsReturnTheArgmax()
    {
        var logits = RandomLogits(1, 16, 100);
        var rows = Enumerable.Range(0, 16).Select(i => SamplingParams.Greedy(4) with { TopK = i % 3, TopP = i % 2 == 0 ? 1f : 0.3f }).ToArray();
        var ids = Run(logits, rows, Enumerable.Range(0, 16).Select(i => (ulong)i).ToArray(), new long[16]);
        for (int b = 0; b < 16; b++)
            Assert.Equal(ArgMax(logits[b].Select(x => (double)x).ToArray()), ids[b]);
    }

    /// <summary>logit_bias moves the argmax of the rows that carry it and no other row's; the caller's logits are not
    /// changed (log probabilities are read from them).</summary>
    [Fact]
    public void LogitBiasAppliesToItsRowsOnlyAndLeavesTheLogitsAlone()
    {
        var logits = RandomLogits(7, 3, 50);
        int best = ArgMax(logits[0].Select(x => (double)x).ToArray());
        int forced = (best + 7) % 50;
        var second = logits[1].Select((x, i) => (x, i)).OrderByDescending(t => t.x).Skip(1).First().i;
        var rows = new[]
        {
            SamplingParams.Greedy(4) with { LogitBias = new Dictionary<int, float> { [forced] = 100f } },
            SamplingParams.Greedy(4) with { LogitBias = new Dictionary<int, float> { [ArgMax(logits[1].Select(x => (double)x).ToArray())] = -100f } },
            SamplingParams.Greedy(4),
        };
        using var l = Logits(logits);
        using var before = l.clone();
        using var ids = Sampler.Sample(l, rows, [1, 2, 3], [0, 0, 0]);
        Assert.Equal([forced, second, ArgMax(logits[2].Select(x => (double)x).ToArray())], ids.data<long>().ToArray());
        Assert.True(l.allclose(before, 0, 0));
        Assert.Throws<ArgumentException>(() => Sampler.Sample(l, [SamplingParams.Greedy(1) with { LogitBias = new Dictionary<int, float> { [50] = 1f } }, rows[1], rows[2]], [1, 2, 3], [0, 0, 0]).Dispose());
        Assert.Throws<ArgumentException>(() => (SamplingParams.Greedy(1) with { LogitBias = new Dictionary<int, float> { [3] = 101f } }).Validate());
    }

    /// <summary>min_p keeps only tokens at least min_p times as likely as the most likely (after temperature): over many
    /// draws every token drawn clears that bar, and min_p = 1 always draws the argmax.</summary>
    [Fact]
    public void MinPKeepsOnlyTokensNearTheMostLikely()
    {
        var probs = new[] { 0.40, 0.25, 0.15, 0.10, 0.06, 0.04 };
        var logits = new[] { probs.Select(p => (float)Math.Log(p)).ToArray() };
        var seen = new HashSet<long>();
        for (int step = 0; step < 400; step++)
        {
            seen.Add(Run(logits, [new SamplingParams { Temperature = 1f, MinP = 0.3f }], [11], [step])[0]);
            Assert.Equal(0, Run(logits, [new SamplingParams { Temperature = 1f, MinP = 1f }], [12], [step])[0]);
        }
        // 0.3 x 0.40 = 0.12: tokens 0, 1 and 2 stay, 3, 4 and 5 go.
        Assert.Equal([0L, 1L, 2L], seen.Order());
    }

    /// <summary>When every sampled row keeps a top-k, top-p sorts only the best max-k tokens: the draws are exactly
    /// those of the full sort (forced here by one more row without top-k in the batch), over many steps.</summary>
    [Fact]
    public void TopPWithinTopKDrawsAsTheFullSortDoes()
    {
        const int batch = 8, vocab = 300;
        var logits = RandomLogits(11, batch + 1, vocab, scale: 2f);
        var rows = Enumerable.Range(0, batch).Select(i => i == 3 ? SamplingParams.Greedy(4)
            : new SamplingParams { Temperature = 0.7f + 0.1f * i, TopK = 5 + 7 * i, TopP = 0.5f + 0.06f * i }).ToArray();
        var withFullSort = rows.Append(new SamplingParams { Temperature = 1f, TopP = 0.8f }).ToArray();
        for (int step = 0; step < 200; step++)
        {
            var steps = Enumerable.Repeat((long)step, batch + 1).ToArray();
            var seeds = Enumerable.Range(0, batch + 1).Select(i => (ulong)(i + 100)).ToArray();
            var narrow = Run(logits[..batch], rows, seeds[..batch], steps[..batch]);
            var full = Run(logits, withFullSort, seeds, steps);
            Assert.Equal(full[..batch], narrow);
        }
    }

    [Fact]
    public void GreedyAndSampledRowsMixInOneBatch()
    {
        const int batch = 24, vocab = 64;
        var logits = RandomLogits(2, batch, vocab);
        var rows = Enumerable.Range(0, batch).Select(i => i % 2 == 0
            ? SamplingParams.Greedy(8)
            : new SamplingParams { Temperature = 2.5f, TopK = i % 3 == 0 ? 10 : 0, TopP = i % 5 == 0 ? 0.9f : 1f }).ToArray();
        var seeds = Enumerable.Range(0, batch).Select(i => (ulong)(1000 + i)).ToArray();
        var steps = Enumerable.Range(0, batch).Select(i => (long)i).ToArray();
        var ids = Run(logits, rows, seeds, steps);
        int sampledNotArgmax = 0;
        for (int b = 0; b < batch; b++)
        {
            var argmax = ArgMax(logits[b].Select(x => (double)x).ToArray());
            if (rows[b].IsGreedy)
            {
                Assert.Equal(argmax, ids[b]);
            }
            else
            {
                Assert.Equal(ReferenceDraw(logits[b], rows[b], seeds[b], steps[b]), ids[b]);
                Assert.Equal(Run([logits[b]], [rows[b]], [seeds[b]], [steps[b]])[0], ids[b]);
                if (ids[b] != argmax) sampledNotArgmax++;
            }
        }
        Assert.True(sampledNotArgmax >= 3, "sampled rows at temperature 2.5 should not all pick the argmax");
    }

    // ---------- reproducibility ----------

    [Fact]
    public void ARowDrawsTheSameTokenAloneOrInAnyBatch()
    {
        const int vocab = 50, stepsToCheck = 200;
        var target = RandomLogits(3, 1, vocab, 1.5f)[0];
        var targetParams = new SamplingParams { Temperature = 1.0f, TopK = 40, TopP = 0.95f };
        const ulong targetSeed = 0xFEEDFACE12345678UL;

        var neighbours = RandomLogits(4, 5, vocab);
        SamplingParams[] neighbourParams =
        [
            SamplingParams.Greedy(3),
            new() { Temperature = 0.3f, TopK = 2 },
            new() { Temperature = 1.7f, TopP = 0.5f, PresencePenalty = 1f, FrequencyPenalty = 0.5f },
            new() { Temperature = 1.0f },
            new() { Temperature = 0.8f, TopK = 5, TopP = 0.7f },
        ];
        var neighbourCounts = RandomLogits(5, 5, vocab).Select(r => r.Select(x => (float)Math.Round(Math.Abs(x))).ToArray()).ToArray();

        var alone = new long[stepsToCheck];
        for (long step = 0; step < stepsToCheck; step++)
        {
            alone[step] = Run([target], [targetParams], [targetSeed], [step])[0];
            // Target in the middle of a batch of different rows, with different seeds, steps and penalties.
            float[][] logits = [neighbours[0], neighbours[1], neighbours[2], target, neighbours[3], neighbours[4]];
            SamplingParams[] rows = [neighbourParams[0], neighbourParams[1], neighbourParams[2], targetParams, neighbourParams[3], neighbourParams[4]];
            ulong[] seeds = [1, 2, 3, targetSeed, 5, 6];
            long[] steps = [step + 10, 0, 3 * step, step, 7, step];
            float[][] counts = [neighbourCounts[0], neighbourCounts[1], neighbourCounts[2], new float[vocab], neighbourCounts[3], neighbourCounts[4]];
            var inBatch = Run(logits, rows, seeds, steps, counts);
            Assert.Equal(alone[step], inBatch[3]);
            Assert.Equal(ReferenceDraw(target, targetParams, targetSeed, step), alone[step]);
        }
        Assert.True(alone.Distinct().Count() >= 20, "the target sequence should actually vary with the step");

        // The whole sequence at once, one row per step, gives the same tokens too.
        using var stacked = tensor(target, [1, vocab]).expand(stepsToCheck, vocab).contiguous();
        using var all = Sampler.Sample(stacked, Enumerable.Repeat(targetParams, stepsToCheck).ToArray(),
            Enumerable.Repeat(targetSeed, stepsToCheck).ToArray(), Enumerable.Range(0, stepsToCheck).Select(i => (long)i).ToArray());
        Assert.Equal(alone, all.data<long>().ToArray());
    }

    [Fact]
    public void DifferentSeedsGiveDifferentSequencesAndTheSameSeedRepeats()
    {
        const int vocab = 100, length = 64;
        var flat = new float[vocab]; // uniform distribution: 1% chance two draws agree
        long[] Sequence(ulong seed) => Enumerable.Range(0, length)
            .Select(step => Run([flat], [new SamplingParams()], [seed], [(long)step])[0]).ToArray();
        var a = Sequence(1);
        var b = Sequence(2);
        var a2 = Sequence(1);
        Assert.Equal(a, a2);
        var agreements = a.Zip(b).Count(t => t.First == t.Second);
        Assert.True(agreements <= 6, $"{agreements} of {length} tokens agree between seeds 1 and 2");
        Assert.True(a.Distinct().Count() > 30);
    }

    [Fact]
    public void SampledRowsMatchAnIndependentHostReferenceIncludingPenalties()
    {
        const int batch = 120, vocab = 40;
        var logits = RandomLogits(6, batch, vocab, 2f);
        var countsRng = new Random(7);
        var counts = Enumerable.Range(0, batch).Select(_ => Enumerable.Range(0, vocab).Select(_ => (float)(countsRng.Next(4) == 0 ? countsRng.Next(1, 4) : 0)).ToArray()).ToArray();
        var rows = Enumerable.Range(0, batch).Select(i => new SamplingParams
        {
            Temperature = i % 7 == 0 ? 0f : 0.4f + (i % 5) * 0.3f,
            TopK = i % 3 == 0 ? 0 : 1 + i % 17,
            TopP = i % 4 == 0 ? 1f : 0.35f + (i % 6) * 0.1f,
            PresencePenalty = i % 2 == 0 ? 0f : 0.8f,
            FrequencyPenalty = i % 3 == 1 ? 0.4f : 0f,
        }).ToArray();
        var seeds = Enumerable.Range(0, batch).Select(i => (ulong)(i * 31 + 17)).ToArray();
        var steps = Enumerable.Range(0, batch).Select(i => (long)(i % 9)).ToArray();
        var ids = Run(logits, rows, seeds, steps, counts);
        for (int b = 0; b < batch; b++)
            Assert.Equal(ReferenceDraw(logits[b], rows[b], seeds[b], steps[b], counts[b]), ids[b]);
    }

    // ---------- statistics ----------

    [Theory]
    [InlineData(1.0f, false)]
    [InlineData(0.7f, false)]
    [InlineData(1.8f, false)]
    [InlineData(0.7f, true)]
    public void FrequenciesMatchSoftmaxOfLogitsOverTemperature(float temperature, bool varySeedInstead)
    {
        var p = new SamplingParams { Temperature = temperature };
        var counts = Counts(BaseLogits, p, 20000, varySeedInstead: varySeedInstead);
        var probs = ExpectedProbs(BaseLogits, p);
        // Independent check of the helper itself: at T = 1 the expected probabilities are the base ones.
        if (temperature == 1.0f)
            Assert.Equal(BaseProbs, probs, (x, y) => Math.Abs(x - y) < 1e-6);
        AssertMatches(counts, probs);
    }

    [Fact]
    public void TopKTwoOnlyDrawsTheTwoMostLikelyTokensInRenormalisedProportion()
    {
        var p = new SamplingParams { Temperature = 1f, TopK = 2 };
        var counts = Counts(BaseLogits, p, 20000);
        // The two most likely tokens are 1 (0.30) and 3 (0.25).
        for (int i = 0; i < counts.Length; i++)
        {
            if (i is not (1 or 3)) Assert.Equal(0, counts[i]);
        }
        var expected = new double[8];
        expected[1] = 0.30 / 0.55;
        expected[3] = 0.25 / 0.55;
        AssertMatches(counts, expected);
    }

    [Theory]
    [InlineData(0.29f, new[] { 1 })]          // 0.30 alone reaches 0.29
    [InlineData(0.5f, new[] { 1, 3 })]        // 0.30 < 0.5 <= 0.55
    [InlineData(0.6f, new[] { 1, 3, 4 })]     // 0.55 < 0.6 <= 0.70
    [InlineData(0.85f, new[] { 1, 3, 4, 2, 5 })] // 0.80 < 0.85 <= 0.88
    [InlineData(0.9f, new[] { 1, 3, 4, 2, 5, 0 })] // 0.88 < 0.9 <= 0.93
    public void TopPKeepsExactlyTheMinimalPrefix(float topP, int[] kept)
    {
        var p = new SamplingParams { Temperature = 1f, TopP = topP };
        var counts = Counts(BaseLogits, p, 20000);
        var drawn = Enumerable.Range(0, 8).Where(i => counts[i] > 0).Order().ToArray();
        Assert.Equal(kept.Order().ToArray(), drawn);
        var expected = new double[8];
        var mass = kept.Sum(i => BaseProbs[i]);
        foreach (var i in kept) expected[i] = BaseProbs[i] / mass;
        AssertMatches(counts, expected);
    }

    [Fact]
    public void TopPAppliesToTheTopKRenormalisedDistribution()
    {
        // Top-3 renormalised: 0.30/0.70 = 0.43, 0.25/0.70 = 0.36 (cumulative 0.79 >= 0.75) -> keep 2 tokens.
        // (Without renormalisation the prefix would need 4 tokens, capped to 3 by top-k.)
        var p = new SamplingParams { Temperature = 1f, TopK = 3, TopP = 0.75f };
        var counts = Counts(BaseLogits, p, 20000);
        var expected = new double[8];
        expected[1] = 0.30 / 0.55;
        expected[3] = 0.25 / 0.55;
        AssertMatches(counts, expected);
        Assert.Equal(expected, ExpectedProbs(BaseLogits, p), (x, y) => Math.Abs(x - y) < 1e-6);
    }

    [Fact]
    public void TemperatureAppliesBeforeTopP()
    {
        // At T = 2 the distribution flattens, so top_p = 0.5 needs more tokens than at T = 1.
        var p = new SamplingParams { Temperature = 2f, TopP = 0.5f };
        var probs = ExpectedProbs(BaseLogits, p);
        Assert.True(probs.Count(x => x > 0) >= 3);
        AssertMatches(Counts(BaseLogits, p, 20000), probs);
    }

    [Fact]
    public void TopKAtOrAboveTheVocabularyIsTheSameAsNoTopK()
    {
        var off = Counts(BaseLogits, new SamplingParams { Temperature = 0.9f }, 2000);
        var big = Counts(BaseLogits, new SamplingParams { Temperature = 0.9f, TopK = 8 }, 2000);
        var bigger = Counts(BaseLogits, new SamplingParams { Temperature = 0.9f, TopK = 1000 }, 2000);
        Assert.Equal(off, big);
        Assert.Equal(off, bigger);
    }

    [Fact]
    public void TokensTiedWithTheCutoffAreAllKept()
    {
        // Filtering is by value (as in Hugging Face's top-k warper), so the result never depends on how a sort
        // orders equal logits: with three tokens tied for first, top_k = 1 keeps all three.
        float[] logits = [1f, 0f, 1f, 1f, -1f];
        var counts = Counts(logits, new SamplingParams { TopK = 1 }, 6000);
        AssertMatches(counts, [1.0 / 3, 0, 1.0 / 3, 1.0 / 3, 0]);
        var countsP = Counts(logits, new SamplingParams { TopP = 0.1f }, 6000);
        AssertMatches(countsP, [1.0 / 3, 0, 1.0 / 3, 1.0 / 3, 0]);
    }

    // ---------- dtypes, devices, inputs ----------

    [Theory]
    [InlineData(ScalarType.BFloat16)]
    [InlineData(ScalarType.Float16)]
    [InlineData(ScalarType.Float64)]
    public void LowAndHighPrecisionLogitsSampleLikeTheirFloat32Values(ScalarType dtype)
    {
        const int batch = 32, vocab = 300;
        using var original = Logits(RandomLogits(8, batch, vocab));
        using var typed = original.to_type(dtype);
        using var asFloat = typed.to_type(ScalarType.Float32);
        var rows = Enumerable.Range(0, batch).Select(i => i % 4 == 0 ? SamplingParams.Greedy(1) : new SamplingParams { Temperature = 0.9f, TopK = i % 3 == 0 ? 20 : 0, TopP = 0.9f }).ToArray();
        var seeds = Enumerable.Range(0, batch).Select(i => (ulong)i).ToArray();
        var steps = new long[batch];
        using var a = Sampler.Sample(typed, rows, seeds, steps);
        using var b = Sampler.Sample(asFloat, rows, seeds, steps);
        Assert.Equal(b.data<long>().ToArray(), a.data<long>().ToArray());
        Assert.Equal(typed.device.type, a.device.type);
        Assert.Equal(typed.device.index, a.device.index);
    }

    [Fact]
    public void SampleLeavesItsInputsIntactAndUsable()
    {
        var values = RandomLogits(9, 4, 20);
        using var logits = Logits(values);
        using var counts = ones(4, 20);
        var rows = Enumerable.Repeat(new SamplingParams { PresencePenalty = 1f, TopP = 0.8f }, 4).ToArray();
        using (var ids = Sampler.Sample(logits, rows, [1UL, 2UL, 3UL, 4UL], [0L, 0L, 0L, 0L], counts)) { }
        using (var greedy = Sampler.Sample(logits, Enumerable.Repeat(SamplingParams.Greedy(1), 4).ToArray(), [1UL, 2UL, 3UL, 4UL], [0L, 0L, 0L, 0L])) { }
        Assert.Equal(values.SelectMany(r => r).ToArray(), logits.data<float>().ToArray());
        Assert.Equal(80f, counts.sum().item<float>());
    }

    [Fact]
    public void SampleRejectsMismatchedInputs()
    {
        using var logits = zeros(2, 5);
        var two = new[] { new SamplingParams(), new SamplingParams() };
        Assert.Throws<ArgumentException>(() => Sampler.Sample(logits, [new SamplingParams()], [1UL, 2UL], [0L, 0L]));
        Assert.Throws<ArgumentException>(() => Sampler.Sample(logits, two, [1UL], [0L, 0L]));
        Assert.Throws<ArgumentException>(() => Sampler.Sample(logits, two, [1UL, 2UL], [0L]));
        Assert.Throws<ArgumentException>(() => Sampler.Sample(logits, two, [1UL, 2UL], [0L, -1L]));
        using var counts = zeros(2, 4);
        Assert.Throws<ArgumentException>(() => Sampler.Sample(logits, two, [1UL, 2UL], [0L, 0L], counts));
        using var flat = zeros(5);
        Assert.Throws<ArgumentException>(() => Sampler.Sample(flat, [new SamplingParams()], [1UL], [0L]));
        using var ints = zeros(2, 5, dtype: ScalarType.Int64);
        Assert.Throws<ArgumentException>(() => Sampler.Sample(ints, two, [1UL, 2UL], [0L, 0L]));
        Assert.Throws<ArgumentException>(() => Sampler.Sample(logits, [new SamplingParams(), new SamplingParams { TopP = 0f }], [1UL, 2UL], [0L, 0L]));
    }

    // ---------- penalties ----------

    [Fact]
    public void PenaltiesSubtractPresenceAndFrequencyTimesCount()
    {
        const int batch = 3, vocab = 10;
        var logits = RandomLogits(10, batch, vocab);
        var counts = new float[batch][];
        var rng = new Random(11);
        for (int b = 0; b < batch; b++) counts[b] = Enumerable.Range(0, vocab).Select(_ => (float)rng.Next(0, 4)).ToArray();
        float[] presence = [0f, 0.5f, -1.25f];
        float[] frequency = [0.75f, 0f, 2f];
        using var l = Logits(logits);
        using var c = Logits(counts).to_type(ScalarType.Int32);
        using var pres = tensor(presence).unsqueeze(1);
        using var freq = tensor(frequency).unsqueeze(1);
        using var result = Sampler.ApplyPenalties(l, c, pres, freq);
        var got = result.data<float>().ToArray();
        for (int b = 0; b < batch; b++)
        {
            for (int i = 0; i < vocab; i++)
            {
                var expected = logits[b][i] - presence[b] * (counts[b][i] > 0 ? 1 : 0) - frequency[b] * counts[b][i];
                Assert.Equal(expected, got[b * vocab + i], 5);
            }
        }
    }

    [Fact]
    public void PenaltiesChangeTheGreedyChoice()
    {
        float[] logits = [2.0f, 1.8f, 1.5f, 0f];
        // Token 0 seen once: presence 0.5 drops it to 1.5, so token 1 wins.
        Assert.Equal(1, Run([logits], [SamplingParams.Greedy(1) with { PresencePenalty = 0.5f }], [0UL], [0L], [[1f, 0f, 0f, 0f]])[0]);
        // Frequency 0.35, token 0 seen twice and token 1 once: 2.0 - 0.7 = 1.3, 1.8 - 0.35 = 1.45, 1.5 -> token 2.
        Assert.Equal(2, Run([logits], [SamplingParams.Greedy(1) with { FrequencyPenalty = 0.35f }], [0UL], [0L], [[2f, 1f, 0f, 0f]])[0]);
        // Without counts, or with zero penalties, nothing changes.
        Assert.Equal(0, Run([logits], [SamplingParams.Greedy(1) with { PresencePenalty = 2f }], [0UL], [0L])[0]);
        Assert.Equal(0, Run([logits], [SamplingParams.Greedy(1)], [0UL], [0L], [[5f, 0f, 0f, 0f]])[0]);
        // A negative presence penalty promotes seen tokens.
        Assert.Equal(2, Run([logits], [SamplingParams.Greedy(1) with { PresencePenalty = -2f }], [0UL], [0L], [[0f, 0f, 3f, 0f]])[0]);
    }
}
