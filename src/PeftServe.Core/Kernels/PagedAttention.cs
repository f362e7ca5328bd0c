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

    private static KernelModule? Module(Tensor like, long headDim, long group)
    {
        var type = KernelModule.TypeName(like.dtype);
        if (type is null || group > MaxGroup || headDim > MaxHeadDim || headDim % 2 != 0) return null;
        return KernelModule.TryGet(File, like.device, KernelModule.ElementType(like.dtype)!.Value,
            ("HEAD_DIM", headDim.ToString()), ("GROUP", group.ToString()), ("WARPS", AttentionWarps(headDim, group).ToString()));
    }

    /// <summary>Warps per attention block: the most (up to 16) whose partial outputs, merged through shared
    /// memory at the end (warps x group x 32 lanes x ceil(hd/32) floats), fit in 32 KiB.</summary>
    internal static int AttentionWarps(long headDim, long group)
    {
        long perWarp = group * 32 * ((headDim + 31) / 32) * sizeof(float);
        int warps = 16;
        while (warps > 1 && warps * perWarp > 32 * 1024) warps /= 2;
        return warps;
    }

    /// <summary>A decode step's rotary embedding and KV write in one kernel: from the fused projection
    /// <paramref name="qkv"/> [N, (nq+2nkv)*hd] at <paramref name="positions"/> [N], writes the rotated keys and
    /// the values to the pools at <paramref name="writeSlots"/> [N] and returns the rotated queries [N, nq, hd];
    /// null where the kernel does not apply. <paramref name="terms"/>: adapter row terms the projection still owes,
    /// applied as the kernel reads it (qkv itself is never changed; null is returned, with nothing done, where they do
    /// not fit the kernel).</summary>
    public static Tensor? TryRotateAndWrite(Tensor qkv, Tensor positions, Tensor inverseFrequencies, Tensor writeSlots, Tensor keys, Tensor values, int heads,
        RowEpilogue? terms = null)
    {
        if (qkv.device.type != DeviceType.CUDA || torch.is_grad_enabled() || !qkv.is_contiguous() || keys.dtype != qkv.dtype) return null;
        long n = qkv.shape[0], nkv = keys.shape[1], hd = keys.shape[2];
        if (qkv.shape[1] != (heads + 2 * nkv) * hd || heads % nkv != 0 || (terms is not null && !terms.Fits(qkv))) return null;
        // Each thread takes a 16-byte vector of pairs (and its partner half), so half a head must be whole vectors and
        // the rows 16-byte aligned; the cache pools' rows are (whole heads).
        long vec = 16 / qkv.ElementSize;
        if ((hd / 2) % vec != 0 || KernelModule.Arg.Ptr(qkv) % 16 != 0) return null;
        var module = Module(qkv, hd, heads / nkv);
        if (module is null) return null;
        var queries = torch.empty([n, heads, hd], qkv.dtype, qkv.device);
        const int threads = 32;                                // one warp a block: at batch 1 the few threads spread over more SMs
        long lanes = (heads + 2 * nkv) * (hd / 2 / vec);
        module.Launch("rope_write_kv", ((uint)n, (uint)((lanes + threads - 1) / threads), 1), threads, 0,
            [KernelModule.Arg.Ptr(qkv), KernelModule.Arg.Ptr(positions), KernelModule.Arg.Ptr(inverseFrequencies), KernelModule.Arg.Ptr(writeSlots),
            KernelModule.Arg.Ptr(queries), KernelModule.Arg.Ptr(keys), KernelModule.Arg.Ptr(values), KernelModule.Arg.Int(heads), KernelModule.Arg.Int(nkv),
            KernelModule.Arg.Int(terms?.TokensPerRow ?? 1), .. terms?.Args() ?? RowEpilogue.NoArgs]);
        return queries;
    }

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
        if (type is null || keys.dtype != queries.dtype || nq % nkv != 0 || !queries.is_contiguous())
            return null;
        var module = Module(queries, hd, nq / nkv);
        if (module is null) return null;
        var output = torch.empty_like(queries);
        module.Launch("paged_decode_attention", ((uint)b, (uint)nkv, 1), (uint)(32 * AttentionWarps(hd, nq / nkv)), 0,
            KernelModule.Arg.Ptr(queries), KernelModule.Arg.Ptr(keys), KernelModule.Arg.Ptr(values), KernelModule.Arg.Ptr(blockTables),
            KernelModule.Arg.Ptr(contextLengths), KernelModule.Arg.Ptr(output), KernelModule.Arg.Int(nkv), KernelModule.Arg.Int(blockTables.shape[1]),
            KernelModule.Arg.Int(blockSize), KernelModule.Arg.Float((float)(1.0 / Math.Sqrt(hd))));
        return output;
    }
}
