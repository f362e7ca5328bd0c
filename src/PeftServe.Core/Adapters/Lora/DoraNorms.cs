using PeftServe.Core.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Adapters.Lora;

/// <summary>DoRA's weight norms (Liu et al., 2024; PEFT's lora/dora.py): for a layer W [out, in] with LoRA
/// A [r, in] and B [out, r] at scaling s, the L2 norm of each output row of W + s B A. DoRA scales the
/// layer's output by magnitude / norm; PEFT detaches the norm, so for a loaded adapter it is a constant,
/// computed here once, in float32, a block of rows at a time (the dense W + s B A of a whole layer is never
/// held). The embedding is the exception: PEFT takes its norm over the vocabulary, per hidden unit.</summary>
public static class DoraNorms
{
    /// <summary>Rows per block: bounds the float32 scratch to about 16 MiB per 4,096 input columns.</summary>
    private const long BlockRows = 1024;

    /// <summary>||W[o] + (s B A)[o]|| for the <paramref name="count"/> output rows of layer <paramref name="layer"/>'s
    /// projection at <paramref name="site"/> starting at <paramref name="rowStart"/> (a target's rows in the fused
    /// weight), with <paramref name="a"/> [r, in] and <paramref name="scaledBT"/> = (s B)^T [r, count], any dtype.
    /// Returns [count] float32 on the model's device.</summary>
    public static Tensor Linear(LlamaModel model, int layer, LinearSite site, long rowStart, long count, Tensor a, Tensor scaledBT)
    {
        using var scope = torch.NewDisposeScope();
        using var _ = torch.no_grad();
        var a32 = a.to(ScalarType.Float32, model.Device);
        var bt32 = scaledBT.to(ScalarType.Float32, model.Device);
        var norms = torch.empty(count, ScalarType.Float32, model.Device);
        for (long start = 0; start < count; start += BlockRows)
        {
            using var block = torch.NewDisposeScope();
            long n = Math.Min(BlockRows, count - start);
            var w = model.DenseWeightRows(layer, site, rowStart + start, n)                  // [n, in], a copy
                .add_(torch.matmul(bt32.narrow(1, start, n).t(), a32));                       // + s B A
            norms.narrow(0, start, n).copy_(w.square().sum(1).sqrt());
        }
        return norms.MoveToOuterDisposeScope();
    }

    /// <summary>||W[v] + (s B A)[v]|| for every row v of a [V, hidden] matrix <paramref name="weight"/> (the LM head),
    /// with <paramref name="a"/> [r, hidden] and <paramref name="scaledBT"/> (s B)^T [r, V]. Returns [V] float32.</summary>
    public static Tensor Rows(Tensor weight, Tensor a, Tensor scaledBT)
    {
        using var scope = torch.NewDisposeScope();
        using var _ = torch.no_grad();
        long v = weight.shape[0];
        var a32 = a.to(ScalarType.Float32, weight.device);
        var bt32 = scaledBT.to(ScalarType.Float32, weight.device);
        var norms = torch.empty(v, ScalarType.Float32, weight.device);
        for (long start = 0; start < v; start += BlockRows)
        {
            using var block = torch.NewDisposeScope();
            long n = Math.Min(BlockRows, v - start);
            var w = weight.narrow(0, start, n).to(ScalarType.Float32).add(torch.matmul(bt32.narrow(1, start, n).t(), a32));
            norms.narrow(0, start, n).copy_(w.square().sum(1).sqrt());
        }
        return norms.MoveToOuterDisposeScope();
    }

    /// <summary>The embedding's norms: for E [V, hidden] with LoRA A^T [V, r] and (s B)^T [r, hidden], the norm of
    /// each column j of E + A^T (s B)^T over the vocabulary. Returns [hidden] float32.</summary>
    public static Tensor Embedding(Tensor embedding, Tensor at, Tensor scaledBT)
    {
        using var scope = torch.NewDisposeScope();
        using var _ = torch.no_grad();
        long v = embedding.shape[0];
        var at32 = at.to(ScalarType.Float32, embedding.device);
        var bt32 = scaledBT.to(ScalarType.Float32, embedding.device);
        var squares = torch.zeros(embedding.shape[1], ScalarType.Float64, embedding.device);
        for (long start = 0; start < v; start += BlockRows)
        {
            using var block = torch.NewDisposeScope();
            long n = Math.Min(BlockRows, v - start);
            var e = embedding.narrow(0, start, n).to(ScalarType.Float32).add(torch.matmul(at32.narrow(0, start, n), bt32));
            squares.add_(e.square().sum(dim: 0).to(ScalarType.Float64));   // dim named: a bare 0 would bind to sum(ScalarType)
        }
        return squares.sqrt().to(ScalarType.Float32).MoveToOuterDisposeScope();
    }
}
