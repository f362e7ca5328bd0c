using PeftServe.Core.Kernels;
using static TorchSharp.torch;

namespace PeftServe.Core.Adapters;

/// <summary>One method's per-row work at a projection's output in a form the batch can apply together with the other
/// methods' in one kernel (Kernels/row_terms.cuh): IA3's scales, BitFit's biases, LoRA's low-rank delta. In a batch
/// that mixes methods, each would otherwise be a launch of its own at every projection of every layer; and where the
/// model lets the terms be owed (<see cref="Model.IAdapterHooks.AttentionOutputDeferred"/> and the like), the kernel that
/// next reads the output applies them, with no launch of their own even for one method. Ops offer a term only where
/// those kernels run (CUDA); elsewhere they act in their hooks.</summary>
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

    /// <summary>The terms as row epilogues: at most one term of each kind in each (a lone epilogue when every kind
    /// occurs at most once, as with one pool per method). <paramref name="tokensPerRow"/>: T of the [B,T,W] output.</summary>
    public static List<RowEpilogue> Combine(IReadOnlyList<OutputTerm> terms, int tokensPerRow)
    {
        var scales = new Queue<Scale>(terms.OfType<Scale>());
        var biases = new Queue<Bias>(terms.OfType<Bias>());
        var lowRanks = new Queue<LowRank>(terms.OfType<LowRank>());
        var result = new List<RowEpilogue>();
        while (scales.Count + biases.Count + lowRanks.Count > 0)
        {
            var (scale, bias, lowRank) = (Next(scales), Next(biases), Next(lowRanks));
            result.Add(new RowEpilogue(tokensPerRow, scale is null ? null : (scale.Table, scale.Index), bias is null ? null : (bias.Table, bias.Index), lowRank?.Delta));
        }
        return result;
    }

    /// <summary>Applies <paramref name="terms"/> to <paramref name="output"/> [B,T,W] in place (<see cref="RowEpilogue.ApplyTo"/>).</summary>
    public static Tensor Apply(Tensor output, IReadOnlyList<OutputTerm> terms)
    {
        foreach (var epilogue in Combine(terms, (int)output.shape[1])) output = epilogue.ApplyTo(output);
        return output;
    }

    private static T? Next<T>(Queue<T> queue) where T : class => queue.Count > 0 ? queue.Dequeue() : null;
}
