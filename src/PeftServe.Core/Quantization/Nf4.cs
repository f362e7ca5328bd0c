using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Quantization;

/// <summary>The QLoRA 4-bit NormalFloat (NF4) codec, as bitsandbytes stores it: a tensor is cut into
/// blocks of <see cref="BlockSize"/> consecutive elements (row-major), each block keeps its absolute
/// maximum (float32), and each element becomes the index (0..15) of the code book value nearest to
/// element / absmax. Two indices share a byte, the FIRST element of the pair in the HIGH nibble.
/// Pure tensor operations: runs on whichever device the input is on.</summary>
public static class Nf4
{
    /// <summary>Elements per absmax block.</summary>
    public const int BlockSize = 64;

    /// <summary>The 16 NF4 values (QLoRA, Dettmers et al. 2023; bitsandbytes' float32 constants).</summary>
    public static IReadOnlyList<float> CodeBook { get; } =
    [
        -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
        -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
        0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
        0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f,
    ];

    /// <summary>Elements quantized at a time: the nearest-code search makes a [chunk, 16] float32
    /// temporary, so large weights are done in slices of this many elements (a multiple of 64).</summary>
    internal const long QuantizeChunkElements = 1L << 20;

    /// <summary>The code book as a float32 tensor [16] on <paramref name="device"/>.</summary>
    public static Tensor CodeTable(Device? device = null) =>
        torch.tensor(CodeBook.ToArray(), ScalarType.Float32, device ?? torch.CPU);

    /// <summary>For each byte value b, the pair (code[b &gt;&gt; 4], code[b &amp; 15]): float32 [256, 2].
    /// Dequantizing is one gather through this table.</summary>
    public static Tensor PairTable(Device? device = null)
    {
        var pairs = new float[512];
        for (int b = 0; b < 256; b++)
        {
            pairs[2 * b] = CodeBook[b >> 4];
            pairs[2 * b + 1] = CodeBook[b & 15];
        }
        return torch.tensor(pairs, [256, 2], ScalarType.Float32, device ?? torch.CPU);
    }

    /// <summary>Throws unless a tensor of <paramref name="elements"/> elements can be NF4-quantized.</summary>
    public static void CheckElementCount(long elements, string what)
    {
        if (elements <= 0 || elements % BlockSize != 0)
            throw new ArgumentException(
                $"{what}: NF4 needs an element count that is a positive multiple of the block size {BlockSize}; it has {elements}");
    }

    /// <summary>Quantizes <paramref name="weight"/> (any shape and float dtype, any device; read as
    /// float32, row-major): absmax float32 [n/64] and the packed codes uint8 [n/2], on the weight's device.
    /// An all-zero block gets absmax 0 and code 7 (the value 0) everywhere.</summary>
    public static (Tensor Packed, Tensor Absmax) Quantize(Tensor weight)
    {
        ArgumentNullException.ThrowIfNull(weight);
        long n = weight.NumberOfElements;
        CheckElementCount(n, $"tensor of shape [{string.Join(",", weight.shape)}]");
        using var _ = torch.no_grad();
        var device = weight.device;
        var packed = torch.empty(n / 2, ScalarType.Byte, device);
        var absmax = torch.empty(n / BlockSize, ScalarType.Float32, device);
        try
        {
            using var scope = torch.NewDisposeScope();
            var flat = weight.reshape(-1);
            var code = CodeTable(device);
            for (long start = 0; start < n; start += QuantizeChunkElements)
            {
                long len = Math.Min(QuantizeChunkElements, n - start);
                using var inner = torch.NewDisposeScope();
                var blocks = flat.narrow(0, start, len).to(ScalarType.Float32).reshape(-1, BlockSize);
                var amax = blocks.abs().amax([1]);
                var chunkPacked = Pack(NearestCodes(blocks, amax, code));
                absmax.narrow(0, start / BlockSize, len / BlockSize).copy_(amax);
                packed.narrow(0, start / 2, len / 2).copy_(chunkPacked);
            }
            return (packed, absmax);
        }
        catch
        {
            packed.Dispose();
            absmax.Dispose();
            throw;
        }
    }

    /// <summary>Nearest code index (uint8, flat) of each element of <paramref name="blocks"/> [nb, 64]
    /// scaled by its block's <paramref name="absmax"/> [nb]: argmin over the 16 codes of |w/absmax - code|,
    /// the first on ties (torch's argmin).</summary>
    internal static Tensor NearestCodes(Tensor blocks, Tensor absmax, Tensor code)
    {
        // Zero blocks divide by 1 instead (every element is 0 there, so every code is 7).
        var divisor = torch.where(absmax.eq(0), torch.ones_like(absmax), absmax);
        var scaled = blocks / divisor.unsqueeze(1);
        return scaled.unsqueeze(-1).sub(code).abs().argmin(-1).to(ScalarType.Byte).reshape(-1);
    }

    /// <summary>Packs code indices (uint8 0..15, even count) two to a byte, first of each pair high.</summary>
    public static Tensor Pack(Tensor codes)
    {
        using var scope = torch.NewDisposeScope();
        var pairs = codes.to(ScalarType.Byte).reshape(-1, 2);
        var packed = pairs[.., 0].mul(16).add(pairs[.., 1]).contiguous();
        return packed.MoveToOuterDisposeScope();
    }

    /// <summary>The code indices (uint8 [2 * packed.numel]) a packed tensor holds.</summary>
    public static Tensor Unpack(Tensor packed)
    {
        using var scope = torch.NewDisposeScope();
        var wide = packed.reshape(-1).to(ScalarType.Int32);
        var hi = wide.div(16, RoundingMode.floor);
        var lo = wide.remainder(16);
        var codes = torch.stack([hi, lo], 1).reshape(-1).to(ScalarType.Byte);
        return codes.MoveToOuterDisposeScope();
    }

    /// <summary>code[index] * absmax[block] for every element, computed in float32 then converted to
    /// <paramref name="dtype"/>; shaped <paramref name="shape"/> (default: flat). Same device as the input.</summary>
    public static Tensor Dequantize(Tensor packed, Tensor absmax, ScalarType dtype = ScalarType.Float32, long[]? shape = null,
        Tensor? pairTable = null)
    {
        ArgumentNullException.ThrowIfNull(packed);
        ArgumentNullException.ThrowIfNull(absmax);
        long n = packed.NumberOfElements * 2;
        if (absmax.NumberOfElements * BlockSize != n)
            throw new ArgumentException($"NF4: {packed.NumberOfElements} packed bytes ({n} values) need {n / BlockSize} absmax values, not {absmax.NumberOfElements}");
        using var scope = torch.NewDisposeScope();
        using var _ = torch.no_grad();
        var table = pairTable ?? PairTable(packed.device);
        var values = table.index_select(0, packed.reshape(-1).to(ScalarType.Int32)).view(-1, BlockSize);
        var result = values.mul(absmax.to(ScalarType.Float32).unsqueeze(1));
        if (dtype != ScalarType.Float32) result = result.to(dtype);
        result = shape is null ? result.reshape(-1) : result.reshape(shape);
        return result.MoveToOuterDisposeScope();
    }
}
