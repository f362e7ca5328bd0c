using PeftServe.Core.Quantization;
using PeftServe.Core.SafeTensors;
using PeftServe.Tests;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Tests.Quantization;

/// <summary>The NF4 codec against the bitsandbytes-convention fixture tensors, and its properties.</summary>
public sealed class Nf4CodecTests
{
    private static Tensor Fixture(string name)
    {
        using var file = SafeTensorsFile.Open(TestData.ExpectedPath);
        return file.ToTensor(name);
    }

    private static bool BitEqual(Tensor a, Tensor b) =>
        a.dtype == b.dtype && a.shape.SequenceEqual(b.shape) &&
        a.contiguous().bytes.ToArray().AsSpan().SequenceEqual(b.contiguous().bytes.ToArray());

    [Fact]
    public void QuantizeReproducesTheFixtureBitForBit()
    {
        using var source = Fixture("nf4_source");
        using var expectedAbsmax = Fixture("nf4_absmax");
        using var expectedPacked = Fixture("nf4_packed");
        using var expectedDequant = Fixture("nf4_dequant");
        Assert.Equal(ScalarType.Byte, expectedPacked.dtype);

        var (packed, absmax) = Nf4.Quantize(source);
        using (packed)
        using (absmax)
        {
            Assert.True(BitEqual(expectedAbsmax, absmax), "absmax differs from nf4_absmax");
            Assert.True(BitEqual(expectedPacked, packed), "packed codes differ from nf4_packed");
            using var dequant = Nf4.Dequantize(packed, absmax, ScalarType.Float32, source.shape);
            Assert.True(BitEqual(expectedDequant, dequant), "dequantized values differ from nf4_dequant");
        }
    }

    [Fact]
    public void Nf4WeightOfTheFixtureDequantizesToTheFixture()
    {
        using var source = Fixture("nf4_source");
        using var expectedDequant = Fixture("nf4_dequant");
        using var weight = Nf4Weight.Quantize(source);
        using var dequant = weight.Dequantize();
        Assert.True(BitEqual(expectedDequant, dequant));
        Assert.Equal(source.NumberOfElements / 2 + source.NumberOfElements / 64 * 4, weight.Bytes);
    }

    [Fact]
    public void PackPutsTheFirstValueOfAPairInTheHighNibble()
    {
        using var codes = torch.tensor(new byte[] { 1, 2, 15, 0, 7, 9 });
        using var packed = Nf4.Pack(codes);
        Assert.Equal(new byte[] { 0x12, 0xF0, 0x79 }, packed.data<byte>().ToArray());
        using var back = Nf4.Unpack(packed);
        Assert.Equal(new byte[] { 1, 2, 15, 0, 7, 9 }, back.data<byte>().ToArray());
    }

    [Fact]
    public void QuantizedValuesFollowTheCodeBookOrder()
    {
        // One block holding the 16 code values themselves (times 2) and zeros: each must map to its own index.
        var values = new float[64];
        for (int i = 0; i < 16; i++) values[i] = 2 * Nf4.CodeBook[i];
        using var w = torch.tensor(values, [1, 64]);
        var (packed, absmax) = Nf4.Quantize(w);
        using (packed)
        using (absmax)
        {
            Assert.Equal(2f, absmax.item<float>());
            using var codes = Nf4.Unpack(packed);
            var c = codes.data<byte>().ToArray();
            Assert.Equal(Enumerable.Range(0, 16).Select(i => (byte)i), c.Take(16));
            Assert.All(c.Skip(16), x => Assert.Equal((byte)7, x));
        }
    }

    [Fact]
    public void RoundTripErrorIsWithinHalfTheWidestCodeGapAndRequantizingIsStable()
    {
        torch.manual_seed(7);
        using var w = torch.randn(96, 128) * 0.05;
        using var q = Nf4Weight.Quantize(w);
        using var d = q.Dequantize();
        double halfGap = 0;
        for (int i = 1; i < 16; i++) halfGap = Math.Max(halfGap, (Nf4.CodeBook[i] - Nf4.CodeBook[i - 1]) / 2.0);
        using var absmax = q.AbsmaxFloat32();
        using var bound = absmax.repeat_interleave(64).view(96, 128) * (halfGap * (1 + 1e-6));
        using var err = (d - w).abs();
        Assert.True((err <= bound).all().item<bool>(), "an element moved by more than half the widest code gap times its absmax");
        Assert.True(err.max().item<float>() > 0);

        // The extreme of every block is represented exactly, so re-quantizing the dequantized matrix
        // gives the same absmax and the same codes.
        using var again = Nf4Weight.Quantize(d);
        Assert.True(BitEqual(q.Packed, again.Packed));
        Assert.True(BitEqual(q.Absmax!, again.Absmax!));
    }

    [Fact]
    public void AZeroBlockStaysZero()
    {
        using var w = torch.zeros(2, 64);
        w[1, 3] = torch.tensor(-0.5f);
        using var q = Nf4Weight.Quantize(w);
        Assert.Equal(new[] { 0f, 0.5f }, q.Absmax!.data<float>().ToArray());
        Assert.All(q.Packed.data<byte>().ToArray().Take(32), b => Assert.Equal((byte)0x77, b));
        using var d = q.Dequantize();
        Assert.True(BitEqual(w, d));
    }

    [Fact]
    public void ChunkedQuantizationOfALargeMatrixMatchesBlockByBlock()
    {
        // More elements than one quantization chunk: the slices must line up with the blocks.
        torch.manual_seed(3);
        long rows = Nf4.QuantizeChunkElements / 256 + 3;
        using var w = torch.randn(rows, 256);
        using var q = Nf4Weight.Quantize(w);
        using var tail = w[^3.., ..].contiguous();
        using var qTail = Nf4Weight.Quantize(tail);
        using var packedTail = q.Packed[^(3 * 128)..];
        using var absmaxTail = q.Absmax![^(3 * 4)..];
        Assert.True(BitEqual(qTail.Packed, packedTail));
        Assert.True(BitEqual(qTail.Absmax!, absmaxTail));
    }

    [Fact]
    public void ElementCountNotAMultipleOf64IsRejected()
    {
        using var w = torch.randn(3, 20);
        var e = Assert.Throws<ArgumentException>(() => Nf4Weight.Quantize(w));
        Assert.Contains("64", e.Message);
        Assert.Contains("60", e.Message);
    }
}
