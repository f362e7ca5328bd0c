using PeftServe.Core.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Quantization;

/// <summary>A frozen linear layer whose weight [out, in] is stored as NF4 (<see cref="Nf4Weight"/>).
/// Forward dequantizes the weight to the activations' dtype on every call (nothing is cached: the point
/// is the memory saving) and runs one dense product; on CUDA, for decode-shaped inputs (few rows, bf16
/// or fp16), a fused kernel reads the packed weights directly instead, and for larger inputs a kernel
/// does the dequantization (<see cref="Nf4CudaKernel"/>).</summary>
public sealed class Nf4Linear : IFrozenLinear
{
    public Nf4Weight Weight { get; }
    /// <summary>Bias [out] in the compute dtype, or null.</summary>
    public Tensor? Bias { get; }

    public Nf4Linear(Nf4Weight weight, Tensor? bias)
    {
        ArgumentNullException.ThrowIfNull(weight);
        if (bias is not null && bias.NumberOfElements != weight.Rows)
            throw new ArgumentException($"NF4 linear [{weight.Rows},{weight.Columns}]: bias has {bias.NumberOfElements} elements");
        Weight = weight;
        Bias = bias;
    }

    public long InFeatures => Weight.Columns;
    public long OutFeatures => Weight.Rows;
    public long WeightBytes => Weight.Bytes + (Bias is null ? 0 : Bias.NumberOfElements * Bias.ElementSize);

    public Tensor Forward(Tensor x)
    {
        using var scope = torch.NewDisposeScope();
        if (x.requires_grad && torch.is_grad_enabled())
        {
            // Training adapters on the 4-bit base (QLoRA): the weight stays frozen, but gradients
            // must flow through the product to the input, without autograd keeping the dense copy.
            var yt = Nf4TrainingMatMul.Apply(this, x);
            if (Bias is not null) yt = yt.add(Bias);
            return yt.MoveToOuterDisposeScope();
        }
        using var _ = torch.no_grad();
        var y = Nf4CudaKernel.TryForward(x, Weight) ?? PlainForward(x);
        if (Bias is not null) y = y.add(Bias);
        return y.MoveToOuterDisposeScope();
    }

    /// <summary>Dequantize to x's dtype, then one dense product (no bias). On CUDA in bf16/fp16 the
    /// dequantization runs as one kernel (bit-identical to the tensor ops) unless
    /// <paramref name="tensorOpsOnly"/>; the tensor-op path is the reference.</summary>
    internal Tensor PlainForward(Tensor x, bool tensorOpsOnly = false)
    {
        using var scope = torch.NewDisposeScope();
        return nn.functional.linear(x, DenseWeight(x.dtype, tensorOpsOnly)).MoveToOuterDisposeScope();
    }

    /// <summary>The weight [out,in] dequantized to <paramref name="dtype"/> (a new tensor).</summary>
    internal Tensor DenseWeight(ScalarType dtype, bool tensorOpsOnly = false) =>
        (tensorOpsOnly ? null : Nf4CudaKernel.TryDequantize(Weight, dtype)) ?? Weight.Dequantize(dtype, PairTables.For(Weight.Device));

    public void Dispose()
    {
        Weight.Dispose();
        Bias?.Dispose();
    }

    /// <summary>One NF4 pair table per device, made once (it is 2 KiB).</summary>
    private static class PairTables
    {
        private static readonly Dictionary<string, Tensor> Tables = new(StringComparer.Ordinal);

        public static Tensor For(Device device)
        {
            var key = device.ToString();
            lock (Tables)
            {
                if (!Tables.TryGetValue(key, out var table))
                {
                    table = Nf4.PairTable(device);
                    table.DetachFromDisposeScope();
                    Tables.Add(key, table);
                }
                return table;
            }
        }
    }
}
