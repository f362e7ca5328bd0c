using PeftServe.Core.Cuda;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Kernels;

/// <summary>Host side of Kernels/paged_attention.cu: decode attention that reads keys and values through
/// the block tables, in place in the paged cache.</summary>
internal static class PagedAttention
{
    private const string File = "paged_attention.cu";
    private const int MaxGroup = 16;
    private const int MaxHeadDim = 256;

    /// <summary>Attention output [B, nq, hd] for one query token per row, or null where the kernel does not
    /// apply (CPU, autograd, other dtypes or shapes): the caller then gathers and runs SDPA.</summary>
    /// <param name="queries">[B, nq, hd], contiguous.</param>
    /// <param name="keys">The layer's key pool [slots, nkv, hd].</param>
    /// <param name="values">The layer's value pool [slots, nkv, hd].</param>
    /// <param name="blockTables">[B, maxBlocks] int64 block ids.</param>
    /// <param name="contextLengths">[B] int64: keys each row attends to (0 for padding rows).</param>
    public static Tensor? TryDecode(Tensor queries, Tensor keys, Tensor values, Tensor blockTables, Tensor contextLengths, int blockSize)
    {
        if (queries.device.type != DeviceType.CUDA || torch.is_grad_enabled()) return null;
        var type = KernelModule.TypeName(queries.dtype);
        long b = queries.shape[0], nq = queries.shape[1], hd = queries.shape[2], nkv = keys.shape[1];
        if (type is null || keys.dtype != queries.dtype || nq % nkv != 0 || nq / nkv > MaxGroup || hd > MaxHeadDim || !queries.is_contiguous())
            return null;
        var module = KernelModule.TryGet(File, queries.device,
            ("ELEM_TYPE", type switch { "bf16" => "bf16_t", "f16" => "f16_t", _ => "float" }), ("HEAD_DIM", hd.ToString()), ("GROUP", (nq / nkv).ToString()));
        if (module is null) return null;
        var output = torch.empty_like(queries);
        module.Launch("paged_decode_attention", ((uint)b, (uint)nkv, 1), 128, 0,
            KernelModule.Arg.Ptr(queries), KernelModule.Arg.Ptr(keys), KernelModule.Arg.Ptr(values), KernelModule.Arg.Ptr(blockTables),
            KernelModule.Arg.Ptr(contextLengths), KernelModule.Arg.Ptr(output), KernelModule.Arg.Int(nkv), KernelModule.Arg.Int(blockTables.shape[1]),
            KernelModule.Arg.Int(blockSize), KernelModule.Arg.Float((float)(1.0 / Math.Sqrt(hd))));
        return output;
    }
}
