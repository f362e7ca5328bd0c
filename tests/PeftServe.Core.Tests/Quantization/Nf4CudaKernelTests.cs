using PeftServe.Core.Quantization;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Tests.Quantization;

/// <summary>What can be checked of the CUDA kernel without a GPU: the dispatch stays off the kernel for
/// CPU tensors, and the source defines every entry point the host side looks up. The kernel itself is
/// checked on the GPU machine by <see cref="Nf4KernelSelfCheck"/>.</summary>
public sealed class Nf4CudaKernelTests
{
    [Fact]
    public void CpuTensorsTakeThePlainPath()
    {
        using var w = torch.randn(64, 128);
        using var weight = Nf4Weight.Quantize(w);
        using var x = torch.randn(2, 128).to(ScalarType.BFloat16);
        Assert.Null(Nf4CudaKernel.TryForward(x, weight));
        Assert.Null(Nf4CudaKernel.TryDequantize(weight, ScalarType.BFloat16));
        long before = Nf4CudaKernel.Launches;
        using var layer = new Nf4Linear(Nf4Weight.Quantize(w), null);
        using var y = layer.Forward(x);
        Assert.Equal(before, Nf4CudaKernel.Launches);
        Assert.Equal(ScalarType.BFloat16, y.dtype);
    }

    [Fact]
    public void SourceDefinesEveryEntryPointTheHostLooksUp()
    {
        var src = PeftServe.Core.Cuda.KernelModule.Source("nf4.cu");
        for (int m = 1; m <= Nf4CudaKernel.MaxRows; m++)
            Assert.Contains($"NF4_INSTANTIATE({m})", src);
        Assert.Contains("nf4_gemv_bf16_m##M(", src);
        Assert.Contains("nf4_gemv_f16_m##M(", src);
        // The tensor-core kernel: one instance per 8-token n-tile count up to MaxSplitRows.
        for (int nt = 1; nt <= Nf4CudaKernel.MaxSplitRows / 8; nt++)
            Assert.Contains($"NF4_MMA_INSTANTIATE({nt})", src);
        Assert.Contains("nf4_mma_bf16_n##NT(", src);
        Assert.Contains("nf4_mma_f16_n##NT(", src);
        Assert.Contains("void __launch_bounds__(256) nf4_dequant_bf16(", src);
        Assert.Contains("void __launch_bounds__(256) nf4_dequant_f16(", src);
        // The code book compiled into the kernel is the codec's, constant for constant (as float32).
        int open = src.IndexOf("kNf4Code[16] = {", StringComparison.Ordinal);
        Assert.True(open > 0);
        int close = src.IndexOf('}', open);
        var values = src[(open + "kNf4Code[16] = {".Length)..close]
            .Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries)
            .Select(v => float.Parse(v.TrimEnd('f'), System.Globalization.CultureInfo.InvariantCulture)).ToArray();
        Assert.Equal(Nf4.CodeBook, values);
    }
}
