using static TorchSharp.torch;

namespace PeftServe.Core.Quantization;

/// <summary>Fused NF4 dequantize-and-multiply for decode-shaped batches on CUDA.</summary>
public static class Nf4CudaKernel
{
    /// <summary>x W^T through the fused kernel, or null when it does not apply (then the caller takes
    /// the plain path).</summary>
    internal static Tensor? TryForward(Tensor x, Nf4Weight weight)
    {
        _ = x;
        _ = weight;
        return null;
    }
}
