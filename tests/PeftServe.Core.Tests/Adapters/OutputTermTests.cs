using PeftServe.Core.Adapters;
using PeftServe.Core.Kernels;
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

    [Fact]
    public void OwedTermsBecomeOneEpilogueOfEachKind()
    {
        using var scope = torch.NewDisposeScope();
        var table = torch.ones([2, 8]);
        var index = torch.tensor(new long[] { 0, 1 });
        var one = OutputTerm.Combine([new OutputTerm.Scale(table, index), new OutputTerm.Bias(table, index)], 3);
        Assert.Single(one);
        Assert.Equal(3, one[0].TokensPerRow);
        Assert.NotNull(one[0].Scale);
        Assert.NotNull(one[0].Bias);
        Assert.Null(one[0].LowRank);
        Assert.Equal(2, OutputTerm.Combine([new OutputTerm.Bias(table, index), new OutputTerm.Bias(table, index)], 3).Count);
    }

    /// <summary>The residual add + RMSNorm takes the terms a projection's output still owes and applies them to it first
    /// (here through the tensor-op path; on CUDA in the same kernel, which the selfcheck holds bit-equal to this order).</summary>
    [Fact]
    public void AddRmsNormAppliesTheOwedTermsFirst()
    {
        using var scope = torch.NewDisposeScope();
        torch.manual_seed(9);
        const int b = 3, t = 2, w = 16;
        var h = torch.randn([b, t, w]);
        var delta = torch.randn([b, t, w]);
        var weight = torch.randn([w]);
        var scale = (torch.randn([2, w]), torch.tensor(new long[] { 1, 0, 1 }));
        var bias = (torch.randn([3, w]), torch.tensor(new long[] { 2, 2, 0 }));
        var owed = new RowEpilogue(t, scale, bias, null);

        var settled = delta * scale.Item1.index_select(0, scale.Item2).unsqueeze(1) + bias.Item1.index_select(0, bias.Item2).unsqueeze(1);
        var (residual, normed) = FusedOps.AddRmsNorm(h, settled, weight, 1e-6);
        var (residualOwed, normedOwed) = FusedOps.AddRmsNorm(h, delta.clone(), weight, 1e-6, owed);
        Assert.True(residualOwed.allclose(residual, rtol: 1e-6, atol: 1e-6));
        Assert.True(normedOwed.allclose(normed, rtol: 1e-5, atol: 1e-5));
        Assert.False(normedOwed.allclose(FusedOps.AddRmsNorm(h, delta, weight, 1e-6).Normed, rtol: 1e-3, atol: 1e-3));
    }

    [Fact]
    public void SiluMulAppliesTheOwedTermsFirst()
    {
        using var scope = torch.NewDisposeScope();
        torch.manual_seed(10);
        const int b = 2, t = 3, inter = 8;
        var gateUp = torch.randn([b, t, 2 * inter]);
        var scale = (torch.randn([2, 2 * inter]), torch.tensor(new long[] { 1, 0 }));
        var owed = new RowEpilogue(t, scale, null, null);
        var expected = FusedOps.SiluMul(gateUp * scale.Item1.index_select(0, scale.Item2).unsqueeze(1));
        Assert.True(FusedOps.SiluMul(gateUp.clone(), owed).allclose(expected, rtol: 1e-6, atol: 1e-6));
        Assert.False(FusedOps.SiluMul(gateUp).allclose(expected, rtol: 1e-3, atol: 1e-3));
    }
}
