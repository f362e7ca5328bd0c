using PeftServe.Core.Cuda;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Kernels;

/// <summary>Host side of Kernels/bgmv.cu: per-token adapter products read in place from a slot pool
/// (see the file's header for the layouts). Every call takes the per-row slot tensor itself, never host
/// copies of it, so a captured CUDA graph serves any assignment of adapters to rows.</summary>
internal static class Bgmv
{
    private const string File = "bgmv.cu";
    /// <summary>Ranks one block of the shrink kernel computes (PEFTSERVE_BGMV_RANKS: 1, 2 or 4).</summary>
    private static readonly int ShrinkRanks = Environment.GetEnvironmentVariable("PEFTSERVE_BGMV_RANKS") switch
    {
        "1" => 1,
        "4" => 4,
        _ => 2,
    };

    /// <summary>Whether LoRA's shrink runs on a side stream beside the base projection (the default; PEFTSERVE_LORA_OVERLAP=0:
    /// after it); its expand stays where it was (owed to the next kernel, or after the projection). Measured on the H200 at
    /// batch 32 (2026-12-03, one call): 1 LoRA 4,008 -> 4,131 tok/s, 32 LoRAs 3,859 -> 3,943.</summary>
    internal static bool Overlap { get; set; } = Environment.GetEnvironmentVariable("PEFTSERVE_LORA_OVERLAP") != "0";

    /// <summary>Whether the kernels can serve activations <paramref name="x"/> [N, in] and pools of x's dtype whose
    /// inner sizes are <paramref name="widths"/> (all must be whole 16-byte vectors; any pool rank).</summary>
    public static bool Supports(Tensor x, params long[] widths)
    {
        if (x.device.type != DeviceType.CUDA || torch.is_grad_enabled()) return false;
        if (KernelModule.TypeName(x.dtype) is null) return false;
        long vec = 16 / x.ElementSize;
        if (x.shape[^1] % vec != 0 || widths.Any(w => w % vec != 0)) return false;
        return Module(x) is not null;
    }

    private static KernelModule? Module(Tensor x) =>
        KernelModule.TryGet(File, x.device, KernelModule.ElementType(x.dtype)!.Value,
            ("SHRINK_RANKS", ShrinkRanks.ToString()));

    /// <summary>d[n, j, r] = x[n] · A[s][j][r] for the K targets of pool <paramref name="a"/> [S, K, R, in],
    /// where s = rowSlots[n / tokensPerRow]; float32 [N, K, R]. With <paramref name="activation"/> (bottleneck adapters,
    /// K = 1: the down-projection's bias [S, R] and each slot's activation code [S] int32, 0 ReLU, 1 GELU, 2 SiLU, 3 tanh)
    /// d[n, 0, r] = act_s(x[n] · A[s][0][r] + bias[s][r]) instead.</summary>
    public static Tensor Shrink(Tensor x, Tensor rowSlots, int tokensPerRow, Tensor a, Tensor ranks, int rankColumn, SideStream? stream = null,
        (Tensor Bias, Tensor Codes)? activation = null)
    {
        var module = Module(x)!;
        long n = x.shape[0], inF = x.shape[1];
        int k = (int)a.shape[1], r = (int)a.shape[2];
        if (a.shape[3] != inF) throw new ArgumentException($"pool rows have {a.shape[3]} inputs, x has {inF}");
        if (activation is { } act && (k != 1 || act.Bias.shape[^1] != r || act.Codes.dtype != ScalarType.Int32))
            throw new ArgumentException("an activation needs one target, its bias [S, R] and its codes int32");
        var xc = AlignedRows(x);
        var d = torch.empty([n, k, r], ScalarType.Float32, x.device);
        module.LaunchOn(stream?.Stream ?? NativeHelper.CurrentStream(module.Ordinal), "bgmv_shrink",
            ((uint)n, (uint)(k * ((r + ShrinkRanks - 1) / ShrinkRanks)), 1), 256, 0,
            KernelModule.Arg.Ptr(xc), KernelModule.Arg.Long(xc.stride(0)), KernelModule.Arg.Ptr(rowSlots), KernelModule.Arg.Int(tokensPerRow),
            KernelModule.Arg.Ptr(a), KernelModule.Arg.Ptr(ranks), KernelModule.Arg.Int(ranks.shape[1]), KernelModule.Arg.Int(rankColumn),
            KernelModule.Arg.Ptr(d), KernelModule.Arg.Int(k), KernelModule.Arg.Int(r), KernelModule.Arg.Int(inF),
            KernelModule.Arg.Ptr(activation?.Bias, 0), KernelModule.Arg.Ptr(activation?.Codes, 0));
        return d;
    }

    /// <summary>y[n, offsets[j] + o] += Σ_r d[n, j, r] · B_j[s][r][o] (+ bias[s][o] for j = 0), in place.
    /// y: [N, width] with unit column stride; <paramref name="up"/>: up to three pools [S, R, out_j].</summary>
    public static void Expand(Tensor y, Tensor rowSlots, int tokensPerRow, Tensor d, IReadOnlyList<Tensor> up, IReadOnlyList<long> offsets,
        Tensor ranks, int rankColumn, Tensor? bias = null)
    {
        if (y.stride(1) != 1) throw new ArgumentException("y must have contiguous columns");
        if (up.Count is < 1 or > 3) throw new ArgumentException("one to three up-projection pools");
        long n = y.shape[0];
        int k = (int)d.shape[1], r = (int)d.shape[2];
        long vec = 16 / up[0].ElementSize;
        long widest = up.Max(b => b.shape[2]);
        const int threads = 128;
        Module(y)!.Launch("bgmv_expand", ((uint)n, (uint)((widest + threads * vec - 1) / (threads * vec)), (uint)k), threads, 0,
            [KernelModule.Arg.Ptr(y), KernelModule.Arg.Long(y.stride(0)), KernelModule.Arg.Ptr(rowSlots), KernelModule.Arg.Int(tokensPerRow),
            KernelModule.Arg.Ptr(d), KernelModule.Arg.Int(k), KernelModule.Arg.Int(r),
            .. TargetArgs(up, offsets),
            KernelModule.Arg.Ptr(ranks), KernelModule.Arg.Int(ranks.shape[1]), KernelModule.Arg.Int(rankColumn),
            KernelModule.Arg.Ptr(bias, 0)]);
    }

    /// <summary>Several per-row terms at a projection's output <paramref name="y"/> [N, W] in one launch, in place
    /// (row_epilogue in bgmv.cu). False (nothing done) where the kernel does not apply.</summary>
    public static bool RowEpilogue(Tensor y, RowEpilogue terms)
    {
        if (!terms.Fits(y)) return false;
        long width = y.shape[^1], n = y.shape[0];
        const int threads = 128;
        long vec = 16 / y.ElementSize;
        Module(y)!.Launch("row_epilogue", ((uint)n, (uint)((width + threads * vec - 1) / (threads * vec)), 1), threads, 0,
            [KernelModule.Arg.Ptr(y), KernelModule.Arg.Long(y.stride(0)), KernelModule.Arg.Int(width), KernelModule.Arg.Int(terms.TokensPerRow), .. terms.Args()]);
        return true;
    }

    /// <summary>x itself when its rows are 16-byte aligned vectors the kernels can load, else a contiguous copy.</summary>
    private static Tensor AlignedRows(Tensor x) => RowsAligned(x) ? x : x.contiguous();

    /// <summary>Whether the kernels read x [N, in] as it is (no copy made first: a shrink on a side stream needs that,
    /// since a copy on the current stream after the fork would race with it).</summary>
    internal static bool RowsAligned(Tensor x) => x.stride(1) == 1 && KernelModule.Arg.Ptr(x) % 16 == 0 && x.stride(0) * x.ElementSize % 16 == 0;

    /// <summary>The kernels' three up-projection targets as arguments: pools B0..B2 (unused ones repeat the last),
    /// widths out0..out2 and output offsets off0..off2 (0 where unused).</summary>
    internal static ulong[] TargetArgs(IReadOnlyList<Tensor> up, IReadOnlyList<long> offsets) =>
    [
        .. Enumerable.Range(0, 3).Select(j => KernelModule.Arg.Ptr(up[Math.Min(j, up.Count - 1)])),
        .. Enumerable.Range(0, 3).Select(j => KernelModule.Arg.Int(j < up.Count ? up[j].shape[2] : 0)),
        .. Enumerable.Range(0, 3).Select(j => KernelModule.Arg.Int(j < offsets.Count ? offsets[j] : 0)),
    ];
}

/// <summary>A low-rank delta whose shrink has run: the shrink's output <see cref="D"/> [N, K, R] float32 for rows whose slots
/// are <see cref="RowSlots"/>, to be multiplied by the up-projection pools <see cref="Up"/> [S, R, out_j] into output
/// columns starting at <see cref="Offsets"/>, ranks from <see cref="Ranks"/> column <see cref="RankColumn"/> + j (as <see cref="Bgmv.Expand"/>).</summary>
internal sealed record LowRankDelta(Tensor D, Tensor RowSlots, IReadOnlyList<Tensor> Up, IReadOnlyList<long> Offsets, Tensor Ranks, int RankColumn);
