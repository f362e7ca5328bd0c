using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Quantization;

/// <summary>Blockwise 8-bit quantization with bitsandbytes' signed "dynamic" code (the one QLoRA's
/// double quantization applies to the NF4 absmax values): each block of <see cref="DefaultBlockSize"/>
/// consecutive values keeps its absolute maximum (float32) and each value becomes the index (uint8) of
/// the code value nearest to value / absmax (first on ties).
/// <para>The code (<see cref="DynamicMap"/>) follows bitsandbytes' create_dynamic_map(signed=True, 7
/// exponent bits, 8 bits): for i = 0..6, the 2^i midpoints of linspace(0.1, 1, 2^i + 1), scaled by
/// 10^(i-6), with both signs; plus 0 and 1; sorted. That is 254 + 2 = 256 values covering [-1, 1] with a
/// relative spacing that is fine near 0 and coarse (about 0.9/64 = 0.014) near ±1. The values here are
/// computed in double and rounded once to float32, so one may differ from bitsandbytes' table (built in
/// float32 arithmetic) in the last bit; a checkpoint brings its own table (nested_quant_map), which is
/// used as stored when loading.</para></summary>
public static class DynamicQuant8
{
    public const int DefaultBlockSize = 256;

    /// <summary>The 256 sorted values of the signed dynamic code.</summary>
    public static IReadOnlyList<float> DynamicMap { get; } = BuildDynamicMap();

    private static float[] BuildDynamicMap()
    {
        const int exponentBits = 7;
        var data = new List<double>(256);
        for (int i = 0; i < exponentBits; i++)
        {
            int fractionItems = (1 << i) + 1;
            double scale = Math.Pow(10, -(exponentBits - 1) + i);
            for (int j = 0; j < fractionItems - 1; j++)
            {
                double lo = 0.1 + 0.9 * j / (fractionItems - 1), hi = 0.1 + 0.9 * (j + 1) / (fractionItems - 1);
                double mean = (lo + hi) / 2;
                data.Add(scale * mean);
                data.Add(-scale * mean);
            }
        }
        data.Add(0);
        data.Add(1);
        if (data.Count != 256) throw new InvalidOperationException($"dynamic map has {data.Count} values");
        return data.Select(v => (float)v).OrderBy(v => v).ToArray();
    }

    private static readonly Dictionary<string, Tensor> SharedMaps = new(StringComparer.Ordinal);

    /// <summary><see cref="DynamicMap"/> as a float32 tensor [256] on <paramref name="device"/>, made once
    /// per device and shared by every double-quantized weight (never dispose it).</summary>
    public static Tensor SharedMap(Device device)
    {
        lock (SharedMaps)
        {
            var key = device.ToString();
            if (!SharedMaps.TryGetValue(key, out var map))
            {
                map = torch.tensor(DynamicMap.ToArray(), ScalarType.Float32, device);
                map.DetachFromDisposeScope();
                SharedMaps.Add(key, map);
            }
            return map;
        }
    }

    /// <summary>Largest distance between neighbouring values of <paramref name="map"/> (sorted ascending):
    /// a value v of a block with absmax A is represented within A * (this / 2) (plus float rounding).</summary>
    public static double LargestStep(IReadOnlyList<float> map)
    {
        double step = 0;
        for (int i = 1; i < map.Count; i++) step = Math.Max(step, (double)map[i] - map[i - 1]);
        return step;
    }

    /// <summary>Quantizes the flat float tensor <paramref name="values"/>: codes uint8 [n] and absmax
    /// float32 [ceil(n / blockSize)] (the last block may be short).</summary>
    public static (Tensor Codes, Tensor Absmax) Quantize(Tensor values, int blockSize = DefaultBlockSize, Tensor? map = null)
    {
        ArgumentNullException.ThrowIfNull(values);
        if (blockSize <= 0) throw new ArgumentOutOfRangeException(nameof(blockSize));
        using var scope = torch.NewDisposeScope();
        using var _ = torch.no_grad();
        var device = values.device;
        var code = map ?? torch.tensor(DynamicMap.ToArray(), ScalarType.Float32, device);
        var flat = values.reshape(-1).to(ScalarType.Float32);
        long n = flat.shape[0], blocks = (n + blockSize - 1) / blockSize, padded = blocks * blockSize;
        var full = padded == n ? flat : torch.cat([flat, torch.zeros(padded - n, ScalarType.Float32, device)]);
        var view = full.view(blocks, blockSize);
        var absmax = view.abs().amax([1]);
        var divisor = torch.where(absmax.eq(0), torch.ones_like(absmax), absmax);
        var scaled = view / divisor.unsqueeze(1);
        var codes = scaled.unsqueeze(-1).sub(code).abs().argmin(-1).to(ScalarType.Byte).reshape(-1).narrow(0, 0, n).contiguous();
        return (codes.MoveToOuterDisposeScope(), absmax.contiguous().MoveToOuterDisposeScope());
    }

    /// <summary>map[codes] * absmax[block], float32 [n].</summary>
    public static Tensor Dequantize(Tensor codes, Tensor absmax, Tensor map, int blockSize = DefaultBlockSize)
    {
        using var scope = torch.NewDisposeScope();
        using var _ = torch.no_grad();
        long n = codes.NumberOfElements, blocks = (n + blockSize - 1) / blockSize;
        if (absmax.NumberOfElements != blocks)
            throw new ArgumentException($"8-bit blockwise: {n} codes in blocks of {blockSize} need {blocks} absmax values, not {absmax.NumberOfElements}");
        var values = map.to(ScalarType.Float32).index_select(0, codes.reshape(-1).to(ScalarType.Int32));
        var scale = absmax.to(ScalarType.Float32).repeat_interleave(blockSize).narrow(0, 0, n);
        return values.mul(scale).MoveToOuterDisposeScope();
    }
}

/// <summary>QLoRA double quantization of NF4 absmax values (bitsandbytes compress_statistics): the
/// mean of all absmax values is subtracted (kept as <see cref="Offset"/>), the centred values are
/// quantized with <see cref="DynamicQuant8"/> in blocks of 256 (uint8 codes + one float32 absmax per
/// block), and restoring is map[code] * nestedAbsmax + offset. Memory per NF4 block drops from 32 bits
/// to 8 + 32/256 bits (the 256-entry map is shared per device, as bitsandbytes shares it). A fused weight (q|k|v) concatenates the double-quantized absmax of its parts,
/// each with its own offset and nested blocks, as <see cref="Segments"/>; nothing is re-quantized.</summary>
public sealed class DoubleQuantAbsmax : IDisposable
{
    /// <summary>One independently double-quantized run of absmax values. <paramref name="MapIsShared"/>:
    /// the map is <see cref="DynamicQuant8.SharedMap"/>, owned by no weight (neither counted nor disposed).</summary>
    public sealed record Segment(Tensor Codes, Tensor NestedAbsmax, Tensor NestedMap, float Offset, int NestedBlockSize, bool MapIsShared = false)
    {
        public long Count => Codes.NumberOfElements;
        public long Bytes => Codes.NumberOfElements + NestedAbsmax.NumberOfElements * 4 + (MapIsShared ? 0 : NestedMap.NumberOfElements * 4) + 4;
        public Tensor ToFloat32() =>
            DynamicQuant8.Dequantize(Codes, NestedAbsmax, NestedMap, NestedBlockSize).add_(Offset);
    }

    public IReadOnlyList<Segment> Segments { get; }

    public DoubleQuantAbsmax(IReadOnlyList<Segment> segments)
    {
        if (segments.Count == 0) throw new ArgumentException("no segments", nameof(segments));
        Segments = segments;
    }

    /// <summary>Number of absmax values represented.</summary>
    public long Count => Segments.Sum(s => s.Count);

    /// <summary>Bytes held (codes, nested absmax, nested maps, offsets).</summary>
    public long Bytes => Segments.Sum(s => s.Bytes);

    /// <summary>Double-quantizes float32 <paramref name="absmax"/> (one segment).</summary>
    public static DoubleQuantAbsmax Quantize(Tensor absmax, int nestedBlockSize = DynamicQuant8.DefaultBlockSize)
    {
        using var _ = torch.no_grad();
        using var scope = torch.NewDisposeScope();
        var a = absmax.reshape(-1).to(ScalarType.Float32);
        float offset = a.mean().item<float>();
        var map = DynamicQuant8.SharedMap(a.device);
        var (codes, nested) = DynamicQuant8.Quantize(a - offset, nestedBlockSize, map);
        var segment = new Segment(codes.MoveToOuterDisposeScope(), nested.MoveToOuterDisposeScope(), map, offset, nestedBlockSize, MapIsShared: true);
        return new DoubleQuantAbsmax([segment]);
    }

    /// <summary>The absmax values restored to float32 [Count].</summary>
    public Tensor ToFloat32()
    {
        if (Segments.Count == 1) return Segments[0].ToFloat32();
        using var scope = torch.NewDisposeScope();
        return torch.cat(Segments.Select(s => s.ToFloat32()).ToArray()).MoveToOuterDisposeScope();
    }

    /// <summary>Moves every tensor to <paramref name="device"/> (a new object; this one keeps its tensors).</summary>
    public DoubleQuantAbsmax To(Device device) => new(Segments.Select(s =>
        new Segment(s.Codes.to(device), s.NestedAbsmax.to(device),
            s.MapIsShared ? DynamicQuant8.SharedMap(device) : s.NestedMap.to(device), s.Offset, s.NestedBlockSize, s.MapIsShared)).ToArray());

    public void Dispose()
    {
        foreach (var s in Segments)
        {
            s.Codes.Dispose();
            s.NestedAbsmax.Dispose();
            if (!s.MapIsShared) s.NestedMap.Dispose();
        }
    }
}
