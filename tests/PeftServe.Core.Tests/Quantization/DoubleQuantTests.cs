using PeftServe.Core.Quantization;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Tests.Quantization;

public sealed class DoubleQuantTests
{
    [Fact]
    public void DynamicMapIsTheSignedBitsandbytesShape()
    {
        var map = DynamicQuant8.DynamicMap;
        Assert.Equal(256, map.Count);
        Assert.True(map.Zip(map.Skip(1)).All(p => p.First <= p.Second), "not sorted");
        Assert.Equal(1f, map[^1]);
        Assert.Contains(0f, map);
        // Smallest magnitude: 1e-6 * 0.55 (the one midpoint of the lowest decade); largest below 1:
        // the top decade's last midpoint, 0.1 + 0.9 * 127/128.
        Assert.Equal(0.55e-6, map.Where(v => v > 0).Min(), 1e-12);
        Assert.Equal(0.1 + 0.9 * 127.0 / 128, map[^2], 1e-6);
        Assert.Equal(-(0.1 + 0.9 * 127.0 / 128), map[0], 1e-6);
        // The widest step is in the top decade: 0.9/64.
        Assert.Equal(0.9 / 64, DynamicQuant8.LargestStep(map), 1e-6);
    }

    [Fact]
    public void EightBitBlockwiseRoundTripIsWithinHalfAStep()
    {
        torch.manual_seed(11);
        using var v = torch.randn(1000);
        var (codes, absmax) = DynamicQuant8.Quantize(v);
        using (codes)
        using (absmax)
        using (var map = torch.tensor(DynamicQuant8.DynamicMap.ToArray()))
        using (var back = DynamicQuant8.Dequantize(codes, absmax, map))
        {
            Assert.Equal(4, absmax.NumberOfElements);   // 256 + 256 + 256 + 232
            double halfStep = DynamicQuant8.LargestStep(DynamicQuant8.DynamicMap) / 2;
            using var bound = absmax.repeat_interleave(256).narrow(0, 0, 1000) * (halfStep * (1 + 1e-6)) + 1e-7;
            Assert.True(((back - v).abs() <= bound).all().item<bool>());
        }
    }

    /// <summary>Double quantization leaves the NF4 codes alone and moves each absmax a by at most
    /// s * (largest 8-bit step) / 2, s being the absmax of a's nested block of 256 centred values. A
    /// dequantized weight is code * a with |code| &lt;= 1, so no weight moves further than its block's
    /// absmax. The bound is checked element by element and the extra error must not be zero.</summary>
    [Fact]
    public void DoubleQuantizationAddsBoundedNonZeroError()
    {
        torch.manual_seed(5);
        // Rows of different scales so the absmax values spread out: 4096 NF4 blocks, 16 nested blocks.
        using var scales = torch.linspace(0.01, 0.2, 512).unsqueeze(1);
        using var w = torch.randn(512, 512) * scales;
        using var single = Nf4Weight.Quantize(w);
        using var dbl = Nf4Weight.Quantize(w, doubleQuant: true);
        Assert.True(single.Packed.eq(dbl.Packed).all().item<bool>(), "double quantization changed the NF4 codes");

        var segment = Assert.Single(dbl.DoubleQuant!.Segments);
        Assert.Equal(16, segment.NestedAbsmax.NumberOfElements);
        double halfStep = DynamicQuant8.LargestStep(DynamicQuant8.DynamicMap) / 2;
        Assert.True(halfStep < 1.0 / 128, "the 8-bit step is coarser than expected");

        using var exact = single.AbsmaxFloat32();
        using var restored = dbl.AbsmaxFloat32();
        // float32 rounding of map * s + offset: a few ulps of the absmax itself.
        using var absmaxBound = segment.NestedAbsmax.repeat_interleave(256) * (halfStep * (1 + 1e-6)) + exact.abs() * 1e-6;
        using var absmaxErr = (restored - exact).abs();
        Assert.True((absmaxErr <= absmaxBound).all().item<bool>(), $"absmax error {absmaxErr.max().item<float>()} above its bound");

        using var d1 = single.Dequantize();
        using var d2 = dbl.Dequantize();
        using var extra = (d2 - d1).abs();
        using var elementBound = absmaxBound.repeat_interleave(64).view(512, 512);
        Assert.True((extra <= elementBound).all().item<bool>(), "a weight moved further than its absmax bound");
        Assert.True(extra.max().item<float>() > 0, "double quantization changed nothing");
        // And relative to the absmax values themselves the extra error is small: under 1/128 of the
        // largest centred absmax.
        using var centred = (exact - exact.mean()).abs().max();
        Assert.True(absmaxErr.max().item<float>() <= centred.item<float>() / 128);
    }

    /// <summary>Double quantization exactly: the absmax values restored from the 8-bit codes equal,
    /// bit for bit, what a direct scalar implementation of bitsandbytes' scheme gives (centre on the
    /// mean, blocks of 256, nearest code value first on ties, map[code] * blockAbsmax + offset, in
    /// float32), written here element by element without the codec.</summary>
    [Fact]
    public void DoubleQuantizationRestoresExactlyWhatTheSchemeDefines()
    {
        torch.manual_seed(6);
        using var scales = torch.linspace(0.01, 0.3, 300).unsqueeze(1);
        using var w = torch.randn(300, 128) * scales;          // 600 NF4 blocks: nested blocks of 256, 256 and 88
        using var single = Nf4Weight.Quantize(w);
        using var dbl = Nf4Weight.Quantize(w, doubleQuant: true);
        var absmax = single.AbsmaxFloat32().data<float>().ToArray();
        var segment = Assert.Single(dbl.DoubleQuant!.Segments);

        // The offset is the mean of the absmax values (float32 sums may differ in the last bits).
        double mean = absmax.Select(a => (double)a).Average();
        Assert.Equal(mean, segment.Offset, mean * 1e-6);
        float offset = segment.Offset;
        var map = DynamicQuant8.DynamicMap;
        var expectedCodes = new byte[absmax.Length];
        var expectedRestored = new float[absmax.Length];
        for (int start = 0; start < absmax.Length; start += 256)
        {
            int end = Math.Min(absmax.Length, start + 256);
            float blockMax = 0;
            for (int i = start; i < end; i++) blockMax = Math.Max(blockMax, Math.Abs(absmax[i] - offset));
            for (int i = start; i < end; i++)
            {
                float scaled = (absmax[i] - offset) / blockMax;
                int best = 0;
                for (int c = 1; c < map.Count; c++)
                    if (Math.Abs(scaled - map[c]) < Math.Abs(scaled - map[best])) best = c;
                expectedCodes[i] = (byte)best;
                expectedRestored[i] = map[best] * blockMax + offset;
            }
        }
        Assert.Equal(expectedCodes, segment.Codes.data<byte>().ToArray());
        using var restored = dbl.AbsmaxFloat32();
        Assert.Equal(expectedRestored, restored.data<float>().ToArray());
    }

    [Fact]
    public void DoubleQuantizationSavesMemory()
    {
        torch.manual_seed(1);
        using var w = torch.randn(256, 256);
        using var single = Nf4Weight.Quantize(w);
        using var dbl = Nf4Weight.Quantize(w, doubleQuant: true);
        long n = 256 * 256;
        Assert.Equal(n / 2 + n / 64 * 4, single.Bytes);
        // codes: 1 byte per NF4 block; 4 nested absmax floats; the offset (the 256-entry map is shared).
        Assert.Equal(n / 2 + n / 64 + 4 * 4 + 4, dbl.Bytes);
    }

    [Fact]
    public void ConcatenatedDoubleQuantizedPartsKeepTheirOwnSegments()
    {
        torch.manual_seed(2);
        using var a = torch.randn(64, 64);
        using var b = torch.randn(32, 64) * 3;
        using var expectedA = Nf4Weight.Quantize(a, doubleQuant: true);
        using var expectedB = Nf4Weight.Quantize(b, doubleQuant: true);
        using var da = expectedA.Dequantize();
        using var db = expectedB.Dequantize();
        using var fused = Nf4Weight.Concat([Nf4Weight.Quantize(a, true), Nf4Weight.Quantize(b, true)]);
        Assert.Equal(2, fused.DoubleQuant!.Segments.Count);
        Assert.Equal(96, fused.Rows);
        using var d = fused.Dequantize();
        using var expected = torch.cat([da, db], 0);
        Assert.True(d.eq(expected).all().item<bool>());
    }
}
