using PeftServe.Core.Quantization;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Model;

/// <summary>Read access to the frozen weights for adapters whose serving form depends on them and is
/// computed once when they are placed on the device: DoRA's weight norms ||W + s B A|| per output, a
/// trained bias as its difference to the base bias, the check that an adapter's saved copy of the
/// embedding is the base model's own. Nothing here is on the per-token path.</summary>
public sealed partial class LlamaModel
{
    private IFrozenLinear Projection(int layer, LinearSite site) => site switch
    {
        LinearSite.Qkv => _layers[layer].Qkv,
        LinearSite.O => _layers[layer].O,
        LinearSite.GateUp => _layers[layer].GateUp,
        _ => _layers[layer].Down,
    };

    /// <summary>Rows [<paramref name="start"/>, start + <paramref name="count"/>) of layer <paramref name="layer"/>'s
    /// fused projection weight [out, in] at <paramref name="site"/> as float32 on the device (NF4 weights
    /// dequantized, a row range at a time where the rows are whole 64-blocks): a new tensor the caller owns.</summary>
    internal Tensor DenseWeightRows(int layer, LinearSite site, long start, long count)
    {
        using var scope = torch.NewDisposeScope();
        using var _ = torch.no_grad();
        Tensor rows;
        switch (Projection(layer, site))
        {
            case DenseLinear d:
                var part = d.Weight.narrow(0, start, count);
                // A copy even in float32 (to() would hand back the model's own rows, and callers write into the result).
                rows = part.dtype == ScalarType.Float32 ? part.clone() : part.to(ScalarType.Float32);
                break;
            case Nf4Linear q:
                long cols = q.Weight.Columns;
                if (start * cols % Nf4.BlockSize == 0 && count * cols % Nf4.BlockSize == 0)
                {
                    var absmax = q.Weight.AbsmaxFloat32();
                    rows = Nf4.Dequantize(q.Weight.Packed.narrow(0, start * cols / 2, count * cols / 2),
                        absmax.narrow(0, start * cols / Nf4.BlockSize, count * cols / Nf4.BlockSize), ScalarType.Float32, [count, cols]);
                }
                else rows = q.Weight.Dequantize().narrow(0, start, count);
                break;
            case var other:
                throw new NotSupportedException($"reading the rows of a {other.GetType().Name} is not implemented");
        }
        return (rows.is_contiguous() ? rows : rows.contiguous()).MoveToOuterDisposeScope();
    }

    /// <summary>The bias [out] of layer <paramref name="layer"/>'s fused projection at <paramref name="site"/>
    /// (compute dtype, the model's own tensor: do not modify), or null when the base model has none.</summary>
    internal Tensor? ProjectionBias(int layer, LinearSite site) => Projection(layer, site) switch
    {
        DenseLinear d => d.Bias,
        Nf4Linear q => q.Bias,
        _ => null,
    };

    /// <summary>W x through layer <paramref name="layer"/>'s fused projection at <paramref name="site"/>, without
    /// its bias (training DoRA with dropout needs the base output of the dropped-out input).</summary>
    internal Tensor ProjectWithoutBias(int layer, LinearSite site, Tensor x)
    {
        var linear = Projection(layer, site);
        var y = linear.Forward(x);
        return ProjectionBias(layer, site) is { } b ? y - b : y;
    }

    /// <summary>The token embedding [V, hidden] (compute dtype, the model's own tensor: do not modify).</summary>
    internal Tensor EmbeddingWeight => _embedTokens;

    /// <summary>The LM head [V, hidden]: the embedding itself when the checkpoint ties them.</summary>
    internal Tensor LmHeadWeight => _lmHead;
}
