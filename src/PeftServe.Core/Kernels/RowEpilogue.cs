using PeftServe.Core.Cuda;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Kernels;

/// <summary>Per-row adapter terms to apply to one projection's output [.., W] (Kernels/row_terms.cuh): an IA3-style
/// scale table, a BitFit-style bias table and a LoRA low-rank delta whose shrink has run, each optional, for rows of
/// <see cref="TokensPerRow"/> tokens. Applied by one kernel of its own (row_epilogue), or handed by the adapters to the
/// model, whose next kernel applies it on the way (<see cref="FusedOps.AddRmsNorm"/>): one launch fewer.</summary>
public sealed class RowEpilogue
{
    internal (Tensor Table, Tensor Index)? Scale { get; }
    internal (Tensor Table, Tensor Index)? Bias { get; }
    internal LowRankDelta? LowRank { get; }
    internal int TokensPerRow { get; }

    internal RowEpilogue(int tokensPerRow, (Tensor Table, Tensor Index)? scale, (Tensor Table, Tensor Index)? bias, LowRankDelta? lowRank)
    {
        TokensPerRow = tokensPerRow;
        Scale = scale;
        Bias = bias;
        LowRank = lowRank;
    }

    private int Parts => (Scale is null ? 0 : 1) + (Bias is null ? 0 : 1) + (LowRank is null ? 0 : 1);

    /// <summary>Whether the fused kernels can apply these terms to <paramref name="y"/> [N, W] (rows with unit column stride).</summary>
    internal bool Fits(Tensor y)
    {
        long width = y.shape[^1];
        if (y.dim() != 2 || y.stride(1) != 1 || !Bgmv.Supports(y, width)) return false;
        foreach (var table in new[] { Scale, Bias })
            if (table is { } t && (t.Table.dtype != y.dtype || !t.Table.is_contiguous() || t.Table.shape[^1] != width || t.Index.dtype != ScalarType.Int64))
                return false;
        return LowRank is not { } lr
               || (lr.Up.Count is >= 1 and <= 3 && lr.Up.All(b => b.dtype == y.dtype) && lr.D.shape[0] == y.shape[0]
                   && lr.Offsets.Zip(lr.Up, (o, b) => o + b.shape[2]).Max() <= width);
    }

    /// <summary>ROW_TERMS_PARAMS for a kernel that takes terms optionally, when there are none.</summary>
    internal static readonly ulong[] NoArgs = new RowEpilogue(1, null, null, null).Args();

    /// <summary>The kernels' ROW_TERMS_PARAMS arguments (null pointers for absent parts).</summary>
    internal ulong[] Args() =>
    [
        KernelModule.Arg.Ptr(Scale?.Table, 0), KernelModule.Arg.Ptr(Scale?.Index, 0),
        KernelModule.Arg.Ptr(Bias?.Table, 0), KernelModule.Arg.Ptr(Bias?.Index, 0),
        KernelModule.Arg.Ptr(LowRank?.RowSlots, 0), KernelModule.Arg.Ptr(LowRank?.D, 0),
        KernelModule.Arg.Int(LowRank?.D.shape[1] ?? 1), KernelModule.Arg.Int(LowRank?.D.shape[2] ?? 1),
        .. (LowRank is { } l ? Bgmv.TargetArgs(l.Up, l.Offsets) : new ulong[9]),
        KernelModule.Arg.Ptr(LowRank?.Ranks, 0), KernelModule.Arg.Int(LowRank?.Ranks.shape[1] ?? 0), KernelModule.Arg.Int(LowRank?.RankColumn ?? 0),
    ];

    /// <summary>Applies the terms to <paramref name="output"/> [.., W] in place and returns it: several parts in one kernel,
    /// a lone part through its own method's kernel, and the same products and sums as tensor ops where no kernel runs.</summary>
    public Tensor ApplyTo(Tensor output)
    {
        if (!output.is_contiguous()) output = output.contiguous();
        var flat = output.view(-1, output.shape[^1]);
        if (Parts > 1 && Bgmv.RowEpilogue(flat, this)) return output;
        var rows = output.view(-1, TokensPerRow, output.shape[^1]);
        if (Scale is { } s) ApplyTable(rows, s.Table, s.Index, add: false);
        if (Bias is { } b) ApplyTable(rows, b.Table, b.Index, add: true);
        if (LowRank is { } d) Bgmv.Expand(flat, d.RowSlots, TokensPerRow, d.D, d.Up, d.Offsets, d.Ranks, d.RankColumn);
        return output;
    }

    private void ApplyTable(Tensor rows, Tensor table, Tensor index, bool add)
    {
        if (FusedOps.RowTableApply(rows, index, TokensPerRow, table, add)) return;
        using var gathered = table.index_select(0, index).unsqueeze(1);                         // [B,1,W] over T
        if (add) rows.add_(gathered);
        else rows.mul_(gathered);
    }
}
