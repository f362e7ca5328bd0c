using PeftServe.Core.Cuda;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Kernels;

/// <summary>Host side of Kernels/adaption_prompt.cu: LLaMA-Adapter's gated attention over every row's adaption
/// prompt in one kernel, reading the slot pools in place.</summary>
internal static class AdaptionPromptAttention
{
    private const string File = "adaption_prompt.cu";
    private const int Warps = 4;              // the kernel's AP_WARPS
    private const int MaxHeadDim = 32 * 8;    // 32 lanes x AP_DIMS

    /// <summary>[B, Tq, nq * hd] for queries <paramref name="q"/> [B, nq, Tq, hd] against pools <paramref name="keys"/> and
    /// <paramref name="values"/> [S, L, nkv, hd], <paramref name="mask"/> [S, L] and <paramref name="gate"/> [S], row b
    /// reading slot index[b] up to its prompt length <paramref name="lengths"/>[s] (int32 [S], on the device so that a
    /// captured graph serves any adapters; the mask must hide every position past it); null where the kernel does not
    /// apply (then the caller runs tensor ops).</summary>
    public static Tensor? TryCompute(Tensor q, Tensor keys, Tensor values, Tensor mask, Tensor gate, Tensor lengths, Tensor index)
    {
        if (q.device.type != DeviceType.CUDA || torch.is_grad_enabled() || q.dim() != 4 || q.stride(3) != 1) return null;
        if (keys.dtype != q.dtype || values.dtype != q.dtype || mask.dtype != q.dtype || gate.dtype != q.dtype || index.dtype != ScalarType.Int64) return null;
        if (!keys.is_contiguous() || !values.is_contiguous() || !mask.is_contiguous() || !gate.is_contiguous()) return null;
        if (lengths.dtype != ScalarType.Int32 || !lengths.is_contiguous() || lengths.shape[0] != keys.shape[0]) return null;
        long b = q.shape[0], nq = q.shape[1], tq = q.shape[2], hd = q.shape[3];
        long len = keys.shape[1], nkv = keys.shape[2];
        if (hd > MaxHeadDim || keys.shape[3] != hd || nq % nkv != 0 || len < 1 || b * tq > int.MaxValue) return null;
        if (KernelModule.TypeName(q.dtype) is null) return null;
        var module = KernelModule.TryGet(File, q.device, KernelModule.ElementType(q.dtype)!.Value);
        if (module is null) return null;
        var output = torch.empty([b, tq, nq * hd], q.dtype, q.device);
        module.Launch("adaption_prompt_attention", ((uint)(b * tq), (uint)((nq + Warps - 1) / Warps), 1), 32 * Warps, 0,
            KernelModule.Arg.Ptr(q), KernelModule.Arg.Long(q.stride(0)), KernelModule.Arg.Long(q.stride(1)), KernelModule.Arg.Long(q.stride(2)),
            KernelModule.Arg.Ptr(keys), KernelModule.Arg.Ptr(values), KernelModule.Arg.Ptr(mask), KernelModule.Arg.Ptr(gate),
            KernelModule.Arg.Ptr(lengths), KernelModule.Arg.Ptr(index), KernelModule.Arg.Ptr(output), KernelModule.Arg.Int(tq), KernelModule.Arg.Int(nq),
            KernelModule.Arg.Int(nkv), KernelModule.Arg.Int(hd), KernelModule.Arg.Int(len), KernelModule.Arg.Float((float)(1.0 / Math.Sqrt(hd))));
        return output;
    }
}
