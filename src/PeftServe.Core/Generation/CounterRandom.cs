using PeftServe.Core.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Generation;

/// <summary>
/// Stateless, counter-based random numbers for sampling: the uniform for (seed, step, index) is a pure
/// function of those three integers, so a request's draws never depend on which other requests share
/// its batch, on batch order, or on any global generator state.
/// <para>
/// Construction (SplitMix64 throughout; <c>mix</c> is its 64-bit finalizer, <c>G</c> its golden-ratio increment):
/// <c>rowKey = mix(mix(seed + G) + (step + 1)·G)</c> — the step-th output of a SplitMix64 stream seeded from the
/// request seed — then <c>bits = mix(rowKey + (index + 1)·G)</c>, i.e. the index-th output of a stream keyed by the row.
/// The top 23 bits <c>k</c> become <c>u = (2k + 1) / 2^24</c>: exactly representable in float32 and strictly inside (0, 1)
/// (smallest 2^-24, largest 1 - 2^-24). The resulting Gumbel noise is therefore bounded to about [-2.8, 16.6], so a token
/// less likely than ~e^-19 times the most likely kept token can never be drawn; every other probability is reproduced.
/// </para>
/// <para>
/// The tensor version runs the same integer arithmetic in int64 on the device: multiplications wrap modulo 2^64 exactly
/// like <c>ulong</c> ones (two's complement), and right shifts are made logical by masking off the sign-extended bits,
/// because torch's shift on int64 is arithmetic. <see cref="Uniform(ulong, long, long)"/> is the scalar reference.
/// </para>
/// </summary>
public static class CounterRandom
{
    private const ulong Gamma = 0x9E3779B97F4A7C15UL;
    private const ulong M1 = 0xBF58476D1CE4E5B9UL;
    private const ulong M2 = 0x94D049BB133111EBUL;

    /// <summary>Number of random bits in each uniform.</summary>
    internal const int UniformBits = 23;

    /// <summary>SplitMix64 finalizer (a bijection on 64-bit integers).</summary>
    public static ulong Mix64(ulong z)
    {
        z = (z ^ (z >> 30)) * M1;
        z = (z ^ (z >> 27)) * M2;
        return z ^ (z >> 31);
    }

    /// <summary>Key of one (seed, step): shared by every vocabulary index of that row.</summary>
    public static ulong RowKey(ulong seed, long step) => Mix64(Mix64(seed + Gamma) + unchecked((ulong)(step + 1)) * Gamma);

    /// <summary>Scalar reference: the uniform in (0, 1) for (seed, step, index).</summary>
    public static float Uniform(ulong seed, long step, long index)
    {
        var bits = Mix64(RowKey(seed, step) + unchecked((ulong)(index + 1)) * Gamma);
        var k = bits >> (64 - UniformBits);
        return (2 * k + 1) * (1.0f / (1 << (UniformBits + 1)));
    }

    /// <summary>
    /// Uniforms in (0, 1) for every (row, index): <paramref name="seeds"/> and <paramref name="steps"/> are int64 [B]
    /// (seeds are the ulong seeds reinterpreted), the result is float32 [B, <paramref name="count"/>] on their device.
    /// Element [b, i] equals <see cref="Uniform(ulong, long, long)"/>(seeds[b], steps[b], i) bit for bit.
    /// </summary>
    public static Tensor Uniform(Tensor seeds, Tensor steps, long count)
    {
        if (seeds.dtype != ScalarType.Int64 || steps.dtype != ScalarType.Int64)
            throw new ArgumentException("seeds and steps must be int64 tensors.");
        if (seeds.dim() != 1 || steps.dim() != 1 || seeds.shape[0] != steps.shape[0])
            throw new ArgumentException("seeds and steps must be 1-D tensors of the same length.");

        using var scope = NewDisposeScope();
        var device = seeds.device;
        var ops = new Int64Ops(device);

        // Every tensor mixed below is freshly allocated here, so the mixing runs in place. Numbers go in as Scalars
        // kept alive (Scalars; alpha given): this runs every sampled decode step.
        var one = Scalars.One;
        var rowKey = ops.Mix_(ops.Mix_(seeds.add(ops.Gamma, one)).add_(steps.add(Scalars.Of(1L), one).mul_(ops.Gamma), one)); // [B]
        using var stop = (count + 1L).ToScalar();
        var counters = arange(Scalars.Of(1L), stop, Scalars.Of(1L), ScalarType.Int64, device).mul_(ops.Gamma); // [V]
        var bits = ops.Mix_(rowKey.unsqueeze(1).add(counters.unsqueeze(0), one)); // [B, V]
        var k = ops.ShiftRightLogical(bits, 64 - UniformBits); // top 23 bits: k < 2^23
        // (k + 0.5) / 2^23 = (2k + 1) / 2^24: k and k + 0.5 are exact in float32 (24 significant bits) and the
        // scaling is by a power of two, so u is exact and lies in [2^-24, 1 - 2^-24].
        var u = k.to_type(ScalarType.Float32).add_(Scalars.Of(0.5f), one).mul_(Scalars.Of(1.0f / (1 << UniformBits)));
        return u.MoveToOuterDisposeScope();
    }

    /// <summary>Standard Gumbel noise -log(-log(u)) for every (row, index), float32 [B, count].</summary>
    public static Tensor Gumbel(Tensor seeds, Tensor steps, long count)
    {
        using var scope = NewDisposeScope();
        var u = Uniform(seeds, steps, count);
        return u.log_().neg_().log_().neg_().MoveToOuterDisposeScope();
    }

    /// <summary>Device-resident int64 constants and the SplitMix64 finalizer in tensor ops.</summary>
    private sealed class Int64Ops(Device device)
    {
        public Scalar Gamma { get; } = Scalars.Of(unchecked((long)CounterRandom.Gamma));
        private readonly Scalar _m1 = Scalars.Of(unchecked((long)M1));
        private readonly Scalar _m2 = Scalars.Of(unchecked((long)M2));
        private readonly Dictionary<int, (Tensor Shift, Tensor Mask)> _shifts = [];

        private (Tensor Shift, Tensor Mask) ShiftConstants(int n)
        {
            if (!_shifts.TryGetValue(n, out var c))
            {
                // Created with full() so that no host-to-device copy is needed; freed by the caller's dispose scope.
                var shift = full(Array.Empty<long>(), Scalars.Of((long)n), dtype: ScalarType.Int64, device: device);
                var mask = full(Array.Empty<long>(), Scalars.Of((long)(ulong.MaxValue >> n)), dtype: ScalarType.Int64, device: device);
                c = (shift, mask);
                _shifts[n] = c;
            }
            return c;
        }

        /// <summary>x &gt;&gt;&gt; n on int64 (arithmetic shift, then clear the n sign-extended top bits).</summary>
        public Tensor ShiftRightLogical(Tensor x, int n)
        {
            var (shift, mask) = ShiftConstants(n);
            return x.bitwise_right_shift(shift).bitwise_and_(mask);
        }

        /// <summary>SplitMix64 finalizer, in place on <paramref name="z"/> (which must be a temporary); returns it.</summary>
        public Tensor Mix_(Tensor z)
        {
            z.bitwise_xor_(ShiftRightLogical(z, 30)).mul_(_m1);
            z.bitwise_xor_(ShiftRightLogical(z, 27)).mul_(_m2);
            return z.bitwise_xor_(ShiftRightLogical(z, 31));
        }
    }
}
