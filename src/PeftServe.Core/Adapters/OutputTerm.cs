using PeftServe.Core.Kernels;
using static TorchSharp.torch;

namespace PeftServe.Core.Adapters;

/// <summary>One method's per-row work at a projection's output in a form the batch can apply together with the other
/// methods' in one kernel (row_epilogue in Kernels/bgmv.cu): IA3's scales, BitFit's biases, LoRA's low-rank delta.
/// In a batch that mixes methods, each would otherwise be a launch of its own at every projection of every layer.
/// Ops offer a term only where that kernel runs (CUDA); elsewhere, and in batches of one method, they act in their
/// hooks as before.</summary>
internal abstract record OutputTerm
{
    /// <summary>output[n] ⊙= Table[Index[n / T]] (rows without this method read a neutral slot of ones).</summary>
    public sealed record Scale(Tensor Table, Tensor Index) : OutputTerm;

    /// <summary>output[n] += Table[Index[n / T]] (rows without this method read a neutral slot of zeros).</summary>
    public sealed record Bias(Tensor Table, Tensor Index) : OutputTerm;

    /// <summary>output += the delta's expand (rows without this method have slot -1 and get nothing).</summary>
    public sealed record LowRank(LowRankDelta Delta) : OutputTerm;

    /// <summary>Whether ops offer terms (PEFTSERVE_ROW_EPILOGUE=0: every method launches its own kernels, to compare).</summary>
    public static bool Enabled { get; set; } = Environment.GetEnvironmentVariable("PEFTSERVE_ROW_EPILOGUE") != "0";

    /// <summary>Applies <paramref name="terms"/> to <paramref name="output"/> [B,T,W] (contiguous) in place: at most one
    /// term of each kind per launch of the fused kernel; a lone term through its own method's kernel.</summary>
    public static Tensor Apply(Tensor output, IReadOnlyList<OutputTerm> terms)
    {
        if (!output.is_contiguous()) output = output.contiguous();   // a hook after the offers may have returned a view
        int tokens = (int)output.shape[1];
        var flat = output.view(-1, output.shape[^1]);
        var scales = new Queue<Scale>(terms.OfType<Scale>());
        var biases = new Queue<Bias>(terms.OfType<Bias>());
        var lowRanks = new Queue<LowRank>(terms.OfType<LowRank>());
        while (scales.Count + biases.Count + lowRanks.Count > 0)
        {
            var (scale, bias, lowRank) = (Next(scales), Next(biases), Next(lowRanks));
            int parts = (scale is null ? 0 : 1) + (bias is null ? 0 : 1) + (lowRank is null ? 0 : 1);
            if (parts > 1 && Bgmv.RowEpilogue(flat, tokens, scale is null ? null : (scale.Table, scale.Index),
                    bias is null ? null : (bias.Table, bias.Index), lowRank?.Delta))
                continue;
            if (scale is not null) ApplyAlone(output, tokens, scale.Table, scale.Index, add: false);
            if (bias is not null) ApplyAlone(output, tokens, bias.Table, bias.Index, add: true);
            if (lowRank?.Delta is { } d) Bgmv.Expand(flat, d.RowSlots, tokens, d.D, d.Up, d.Offsets, d.Ranks, d.RankColumn);
        }
        return output;
    }

    private static T? Next<T>(Queue<T> queue) where T : class => queue.Count > 0 ? queue.Dequeue() : null;

    /// <summary>One table term in place: its kernel, or the same gather and product (sum) as tensor ops where it does not run.</summary>
    private static void ApplyAlone(Tensor output, int tokens, Tensor table, Tensor index, bool add)
    {
        if (FusedOps.RowTableApply(output, index, tokens, table, add)) return;
        using var rows = table.index_select(0, index).unsqueeze(1);                             // [B,1,W] over T
        if (add) output.add_(rows);
        else output.mul_(rows);
    }
}
