using PeftServe.Core.Adapters;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Tests.Adapters;

/// <summary>How a projection's output terms from several methods are applied (the fused kernel itself runs on CUDA and
/// is checked there by the selfcheck against each method's own kernel): every term exactly once, whatever their number
/// and kinds, with the same result as applying them one by one.</summary>
public sealed class OutputTermTests
{
    [Fact]
    public void EveryTermIsAppliedOnceAsIfOneByOne()
    {
        using var scope = torch.NewDisposeScope();
        torch.manual_seed(5);
        const int b = 4, t = 3, w = 24;
        var y = torch.randn([b, t, w]);
        Tensor Index(params long[] slots) => torch.tensor(slots);
        var scaleA = new OutputTerm.Scale(torch.randn([3, w]), Index(0, 2, 1, 2));
        var scaleB = new OutputTerm.Scale(torch.randn([2, w]), Index(1, 1, 0, 1));
        var bias = new OutputTerm.Bias(torch.randn([3, w]), Index(2, 0, 2, 1));

        var expected = y.clone();
        expected.mul_(scaleA.Table.index_select(0, scaleA.Index).unsqueeze(1));
        expected.add_(bias.Table.index_select(0, bias.Index).unsqueeze(1));
        expected.mul_(scaleB.Table.index_select(0, scaleB.Index).unsqueeze(1));

        var actual = OutputTerm.Apply(y.clone(), [scaleA, bias, scaleB]);
        Assert.True(actual.allclose(expected, rtol: 1e-6, atol: 1e-6));
        // Applying none changes nothing; applying one is that one alone.
        Assert.True(OutputTerm.Apply(y.clone(), []).eq(y).all().item<bool>());
        Assert.True(OutputTerm.Apply(y.clone(), [bias]).eq(y + bias.Table.index_select(0, bias.Index).unsqueeze(1)).all().item<bool>());
    }
}
