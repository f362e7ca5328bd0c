using PeftServe.Core.Generation;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Tests.Generation;

public class CounterRandomTests
{
    [Fact]
    public void Mix64ReproducesPublishedSplitMix64Outputs()
    {
        // Reference outputs of Vigna's splitmix64.c (state += 0x9E3779B97F4A7C15; return mix(state)) seeded with 1234567.
        ulong[] expected = [6457827717110365317UL, 3203168211198807973UL, 9817491932198370423UL, 4593380528125082431UL, 16408922859458223821UL];
        ulong state = 1234567;
        foreach (var e in expected)
        {
            state += 0x9E3779B97F4A7C15UL;
            Assert.Equal(e, CounterRandom.Mix64(state));
        }
    }

    [Fact]
    public void TensorUniformsMatchTheScalarReferenceBitForBit()
    {
        // Seeds chosen to exercise sign bits and wrap-around in int64 (top bit set, all ones, zero).
        ulong[] seeds = [0UL, 1UL, 42UL, ulong.MaxValue, 0x8000000000000000UL, 0xDEADBEEFCAFEBABEUL];
        long[] steps = [0L, 1L, 7L, 123456789L, long.MaxValue - 1, 3L];
        const long count = 2000;
        using var t = CounterRandom.Uniform(tensor(seeds.Select(s => unchecked((long)s)).ToArray()), tensor(steps), count);
        Assert.Equal(ScalarType.Float32, t.dtype);
        Assert.Equal(new long[] { seeds.Length, count }, t.shape);
        var values = t.data<float>().ToArray();
        for (int b = 0; b < seeds.Length; b++)
        {
            for (long i = 0; i < count; i++)
                Assert.Equal(CounterRandom.Uniform(seeds[b], steps[b], i), values[b * count + i]);
        }
    }

    [Fact]
    public void UniformsAreStrictlyInsideTheUnitIntervalWithTheRightMoments()
    {
        const int rows = 64, count = 16384; // ~1M values
        var seeds = Enumerable.Range(0, rows).Select(i => (long)(i * 7919 + 3)).ToArray();
        var steps = Enumerable.Range(0, rows).Select(i => (long)(i % 5)).ToArray();
        using var t = CounterRandom.Uniform(tensor(seeds), tensor(steps), count);
        var u = t.data<float>().ToArray();
        double n = u.Length, sum = 0, sumSq = 0, lagProduct = 0;
        float min = 1, max = 0;
        var bins = new long[16];
        for (int k = 0; k < u.Length; k++)
        {
            sum += u[k];
            sumSq += (double)u[k] * u[k];
            min = Math.Min(min, u[k]);
            max = Math.Max(max, u[k]);
            bins[(int)(u[k] * 16)]++;
            if (k % count != 0) lagProduct += (u[k] - 0.5) * (u[k - 1] - 0.5);
        }
        var mean = sum / n;
        var variance = sumSq / n - mean * mean;
        Assert.True(min > 0f, $"min {min}");
        Assert.True(max < 1f, $"max {max}");
        Assert.InRange(mean, 0.5 - 0.0015, 0.5 + 0.0015);          // sd of the mean: 0.29/1024 = 0.00028
        Assert.InRange(variance, 1.0 / 12 - 0.001, 1.0 / 12 + 0.001);
        Assert.InRange(lagProduct / (n * variance), -0.005, 0.005);   // neighbouring vocabulary indices uncorrelated
        var chi = bins.Sum(c => Math.Pow(c - n / 16, 2) / (n / 16));
        Assert.True(chi < 50, $"16-bin chi-square {chi:F1} (15 dof)");
    }

    [Fact]
    public void UniformDependsOnlyOnSeedStepAndIndex()
    {
        // The same (seed, step) gives the same row wherever it sits and whatever else is computed with it.
        using var alone = CounterRandom.Uniform(tensor(new long[] { 99 }), tensor(new long[] { 5 }), 64);
        using var batch = CounterRandom.Uniform(tensor(new long[] { 1, 2, 99, 3 }), tensor(new long[] { 0, 9, 5, 5 }), 64);
        using var otherStep = CounterRandom.Uniform(tensor(new long[] { 99 }), tensor(new long[] { 6 }), 64);
        Assert.Equal(Row(alone, 0), Row(batch, 2));
        Assert.NotEqual(Row(batch, 2), Row(batch, 3));     // different seed, same step
        Assert.NotEqual(Row(batch, 0), Row(batch, 1));
        Assert.NotEqual(Row(alone, 0), Row(otherStep, 0)); // same seed, next step
    }

    private static float[] Row(Tensor t, long i)
    {
        using var r = t[i];
        return r.data<float>().ToArray();
    }

    [Fact]
    public void GumbelIsMinusLogMinusLogOfTheUniform()
    {
        var seeds = tensor(new long[] { 11, 12 });
        var steps = tensor(new long[] { 0, 4 });
        using var g = CounterRandom.Gumbel(seeds, steps, 500);
        var gv = g.data<float>().ToArray();
        for (int b = 0; b < 2; b++)
        {
            for (int i = 0; i < 500; i++)
            {
                double u = CounterRandom.Uniform((ulong)(11 + b), b == 0 ? 0 : 4, i);
                Assert.Equal(-Math.Log(-Math.Log(u)), gv[b * 500 + i], 4);
            }
        }
        Assert.True(float.IsFinite(gv.Min()) && float.IsFinite(gv.Max()));
    }
}
