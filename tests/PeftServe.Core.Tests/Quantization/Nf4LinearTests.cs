using PeftServe.Core.Quantization;
using PeftServe.Core.SafeTensors;
using PeftServe.Tests;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Tests.Quantization;

public sealed class Nf4LinearTests
{
    /// <summary>The fixture's weight and its NF4 round trip as bitsandbytes computed it: the reference
    /// owes nothing to the code under test.</summary>
    private static (Tensor Source, Tensor Dequant) Fixture()
    {
        using var file = SafeTensorsFile.Open(TestData.ExpectedPath);
        return (file.ToTensor("nf4_source"), file.ToTensor("nf4_dequant"));
    }

    [Fact]
    public void ForwardIsTheDenseProductWithTheDequantizedWeight()
    {
        var (w, dq) = Fixture();
        using var _w = w;
        using var _dq = dq;
        long outF = w.shape[0], inF = w.shape[1];
        torch.manual_seed(9);
        using var bias = torch.randn(outF);
        using var x = torch.randn(2, 5, inF);
        using var layer = new Nf4Linear(Nf4Weight.Quantize(w), bias.alias());
        Assert.Equal(inF, layer.InFeatures);
        Assert.Equal(outF, layer.OutFeatures);
        using var y = layer.Forward(x);
        using var expected = nn.functional.linear(x, dq, bias);
        Assert.Equal(new long[] { 2, 5, outF }, y.shape);
        Assert.True((y - expected).abs().max().item<float>() <= 1e-5f);
        // And it is an approximation of the float layer, not something else.
        using var dense = nn.functional.linear(x, w, bias);
        using var rel = (y - dense).norm() / dense.norm();
        Assert.InRange(rel.item<float>(), 1e-4f, 0.2f);
    }

    [Fact]
    public void GradientsFlowThroughTheFrozenQuantizedWeightToTheInput()
    {
        // QLoRA: the input's gradient is the one of the dense product with the dequantized weight,
        // while the weight, recomputed in backward rather than kept, gets none.
        torch.manual_seed(4);
        using var scope = torch.NewDisposeScope();
        var w = torch.randn(96, 128) * 0.1;
        var bias = torch.randn(96);
        var x = torch.randn(2, 5, 128).requires_grad_(true);
        var upstream = torch.randn(2, 5, 96);
        using var layer = new Nf4Linear(Nf4Weight.Quantize(w), bias.alias());
        var y = layer.Forward(x);
        Assert.True(y.requires_grad);
        y.backward([upstream]);
        var viaNf4 = x.grad!.clone();
        x.grad = null;
        nn.functional.linear(x, layer.Weight.Dequantize(), bias).backward([upstream]);
        Assert.True((viaNf4 - x.grad!).abs().max().item<float>() <= 1e-5f);
        Assert.True((y - nn.functional.linear(x, layer.Weight.Dequantize(), bias)).abs().max().item<float>() <= 1e-5f);
        Assert.False(layer.Weight.Packed.requires_grad);
        Assert.Null(layer.Weight.Packed.grad);
    }

    [Fact]
    public void WeightBytesAreTheRealBytes()
    {
        using var w = torch.randn(64, 256);
        using var bias = torch.zeros(64);
        using var plain = new Nf4Linear(Nf4Weight.Quantize(w), null);
        Assert.Equal(64 * 256 / 2 + 64 * 256 / 64 * 4, plain.WeightBytes);
        using var withBias = new Nf4Linear(Nf4Weight.Quantize(w), bias.alias());
        Assert.Equal(64 * 256 / 2 + 64 * 256 / 64 * 4 + 64 * 4, withBias.WeightBytes);
    }

    [Fact]
    public void ForwardHonoursTheActivationDtype()
    {
        var (w, dqFixture) = Fixture();
        using var _w = w;
        using var dq = dqFixture.to(ScalarType.Float64);
        dqFixture.Dispose();
        torch.manual_seed(4);
        using var x = torch.randn(3, w.shape[1], dtype: ScalarType.Float64);
        using var layer = new Nf4Linear(Nf4Weight.Quantize(w), null);
        using var y = layer.Forward(x);
        Assert.Equal(ScalarType.Float64, y.dtype);
        using var expected = nn.functional.linear(x, dq);
        Assert.True((y - expected).abs().max().item<double>() <= 1e-12);
    }

    [Fact]
    public void ForwardFreesItsTemporaries()
    {
        using var w = torch.randn(64, 128);
        using var x = torch.randn(4, 128);
        using var layer = new Nf4Linear(Nf4Weight.Quantize(w), torch.zeros(64));
        using (layer.Forward(x)) { }
        using var outer = torch.NewDisposeScope();
        var y = layer.Forward(x);
        // Only the result was added to the caller's scope.
        Assert.Equal(1, outer.DisposablesCount);
        y.Dispose();
    }
}
