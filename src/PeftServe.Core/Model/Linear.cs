using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Model;

/// <summary>A frozen linear layer of the base model, y = x W^T (+ b). Implementations may store W
/// however they like (dense in the compute dtype, 4-bit quantized, ...).</summary>
public interface IFrozenLinear : IDisposable
{
    long InFeatures { get; }
    long OutFeatures { get; }
    Tensor Forward(Tensor x);
    /// <summary>Bytes the weights occupy on the device.</summary>
    long WeightBytes { get; }
}

/// <summary>A dense linear layer: weight [out, in] and optional bias [out] in the compute dtype.</summary>
public sealed class DenseLinear(Tensor weight, Tensor? bias) : IFrozenLinear
{
    public Tensor Weight { get; } = weight;
    public Tensor? Bias { get; } = bias;
    public long InFeatures => Weight.shape[1];
    public long OutFeatures => Weight.shape[0];
    public long WeightBytes => Weight.NumberOfElements * Weight.ElementSize + (Bias is null ? 0 : Bias.NumberOfElements * Bias.ElementSize);

    public Tensor Forward(Tensor x) => nn.functional.linear(x, Weight, Bias);

    public void Dispose()
    {
        Weight.Dispose();
        Bias?.Dispose();
    }
}
