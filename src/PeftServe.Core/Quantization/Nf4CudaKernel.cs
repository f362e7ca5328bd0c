using PeftServe.Core.Cuda;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Quantization;

/// <summary>The fused NF4 dequantize-and-multiply for decode-shaped batches on CUDA:
/// y[m, n] = sum_k x[m, k] * code[W[n, k]] * absmax[(n*K + k) / 64], reading the packed 4-bit weights
/// directly (no dequantized copy). One warp per output row n (8 per thread block). K is walked in tiles
/// of 1024: the block stages x[:, tile] in shared memory (so the x rows are read from L2 once per block,
/// not once per warp), and each lane takes one 16-byte chunk (32 weights, half of one 64-block) per
/// tile, loaded one tile ahead, so a warp reads 512 contiguous bytes per step; the nibbles are decoded
/// through the code book in shared memory, dotted with the x rows in float32 and scaled by the block's
/// absmax; a warp shuffle reduction ends it. x and y are bf16 or fp16 (the same), absmax float32.
/// For 17 to 32 rows, where that kernel is compute-bound, a tensor-core kernel (mma.sync, K split across
/// blocks so that a row tile's blocks fill the GPU, the last of them adding the partials) does the product.
/// A second kernel dequantizes a whole weight to bf16/fp16 for the plain path (many rows), bit-identical
/// to the tensor-op dequantization (float32 product, one rounding).
/// <para>The source is Kernels/nf4.cu, compiled and launched through <see cref="KernelModule"/> (NVRTC, on
/// libtorch's current stream, so it is ordered with TorchSharp's work and can be captured in a CUDA
/// graph). Needs sm_80 or newer (bf16
/// conversions), K a multiple of 64, at most <see cref="MaxRows"/> rows. Anything else, or any failure
/// to find NVRTC or compile, falls back to the plain path (<see cref="LastError"/> says why).
/// Set PEFTSERVE_NF4_KERNEL=0 to turn it off.</para></summary>
public static class Nf4CudaKernel
{
    /// <summary>Largest number of activation rows (B*T) one launch takes.</summary>
    public const int MaxRows = 16;

    /// <summary>Largest number of rows the fused kernels serve: up to <see cref="MaxRows"/> on CUDA cores, up to this
    /// many on the tensor cores (<c>nf4_mma</c>, K a multiple of 128); more go the plain path. Measured on the H200
    /// (Llama-2-7B shapes, 2026-12-02): 32 rows as two CUDA-core launches of 16 took 32.8 ms a decode step against
    /// 15.4 ms for dequantize-then-matmul (compute-bound), hence the tensor-core kernel for more than 16.</summary>
    public const int MaxSplitRows = 32;

    /// <summary>m-tiles of 16 weight rows per warp of the tensor-core kernel (its MMA_MT; PEFTSERVE_NF4_MMA_MT: 1, 2 or 4).
    /// Measured on the H200, 7B shapes, batch 32 (2026-12-03): 1 gave 2,872 tok/s, 2 gave 2,691, 4 gave 2,008 (more
    /// blocks over the SMs beat more reuse of x per block); the selfcheck passes all three.</summary>
    private static readonly int MmaTiles = Environment.GetEnvironmentVariable("PEFTSERVE_NF4_MMA_MT") switch
    {
        "2" => 2,
        "4" => 4,
        _ => 1,
    };

    /// <summary>Blocks the tensor-core kernel aims for, reached by splitting K: 264 (two per SM of an H100/H200) unless
    /// PEFTSERVE_NF4_MMA_BLOCKS says otherwise (64 to 4,096; for measuring: more splits mean more units of weights in
    /// flight at once but more partials for the finishing block to add).</summary>
    private static readonly int MmaTargetBlocks =
        int.TryParse(Environment.GetEnvironmentVariable("PEFTSERVE_NF4_MMA_BLOCKS"), out var blocks) && blocks is >= 64 and <= 4096 ? blocks : 264;

    /// <summary>Units (128 columns) of weights each lane of the tensor-core kernel keeps in flight while it multiplies
    /// (its MMA_PREFETCH; PEFTSERVE_NF4_MMA_PREFETCH: 1 to 4, default 2). Measured on the H200 (nf4-check, 32 rows, the
    /// four 7B shapes summed as in one layer, 2026-12-03): 270 us with 1, 252 with 2, 272 with 4; 264 target blocks beat
    /// 528 at 2 and 4. Still far from its bytes: 0.3-0.5 TB/s, twice the time of a dense bf16 matmul of the same shape.</summary>
    private static readonly int MmaPrefetch =
        int.TryParse(Environment.GetEnvironmentVariable("PEFTSERVE_NF4_MMA_PREFETCH"), out var depth) && depth is >= 1 and <= 4 ? depth : 2;

    /// <summary>Whether the tensor-core kernel stages each unit of x in shared memory for the block (its MMA_XSMEM; on
    /// unless PEFTSERVE_NF4_MMA_XSMEM=0) instead of every warp loading its x fragments from global memory, which touch 16
    /// cache lines per instruction. Measured on the H200 (nf4-tune, the four 7B shapes as one layer at 32 rows, one
    /// call, 2026-12-03): 190 us a layer against 257 with x from global memory; NF4 batch 32 went from 2,982 to 3,918
    /// tok/s. The selfcheck compares the two bit for bit.</summary>
    private static readonly bool MmaSharedX = Environment.GetEnvironmentVariable("PEFTSERVE_NF4_MMA_XSMEM") != "0";

    private static readonly bool MmaEnabled = Environment.GetEnvironmentVariable("PEFTSERVE_NF4_MMA") != "0";

    /// <summary>Output rows per thread block (one warp each).</summary>
    private const int WarpsPerBlock = 8;

    /// <summary>Rows of x the whole-row GEMV (<c>nf4_gemv_whole</c>) takes, and the dynamic shared memory it may use
    /// for them (x staged whole, K * 5/2 bytes a row: within the 48 KiB every launch may have without opting in, so
    /// one row of K up to 19,600 and four of K = 4,096). Larger shapes take the tiled kernel.</summary>
    private const int WholeMaxRows = 4, WholeMaxSharedBytes = 48 * 1024 - 256;

    /// <summary>Whether rows of up to <see cref="WholeMaxRows"/> take the whole-row GEMV (PEFTSERVE_NF4_GEMV=tiled: always
    /// the tiled one, to compare).</summary>
    private static readonly bool WholeRowGemv = Environment.GetEnvironmentVariable("PEFTSERVE_NF4_GEMV") != "tiled";

    /// <summary>Whether <paramref name="rows"/> rows of width <paramref name="k"/> fit the whole-row GEMV.</summary>
    internal static bool WholeRowFits(long rows, long k) => rows <= WholeMaxRows && rows * (k / 32) * 80 <= WholeMaxSharedBytes;

    /// <summary>The kernel file.</summary>
    internal const string File = "nf4.cu";

    /// <summary>False when PEFTSERVE_NF4_KERNEL=0 (read once) or after <see cref="Enabled"/> was set false.</summary>
    public static bool Enabled { get; set; } = Environment.GetEnvironmentVariable("PEFTSERVE_NF4_KERNEL") != "0";

    /// <summary>Why the kernel could not be prepared on some device, or null.</summary>
    public static string? LastError => KernelModule.LastError;

    /// <summary>Number of launches so far (diagnostics: shows that a forward took the kernel).</summary>
    public static long Launches => Interlocked.Read(ref _launches);
    private static long _launches;

    /// <summary>x W^T through the fused kernel, or null when it does not apply (then the caller takes
    /// the plain path). x: [..., K] on CUDA, bf16 or fp16; the result has x's dtype and leading shape.</summary>
    internal static Tensor? TryForward(Tensor x, Nf4Weight weight) => TryForward(x, weight, MmaTiles, WholeRowGemv);

    /// <summary><see cref="TryForward(Tensor, Nf4Weight)"/> with the tensor-core kernel built for <paramref name="mmaTiles"/>
    /// m-tiles per warp, and for up to 4 rows the whole-row GEMV where it fits (<paramref name="wholeRow"/>) or the tiled
    /// one (the selfcheck checks each).</summary>
    internal static Tensor? TryForward(Tensor x, Nf4Weight weight, int mmaTiles, bool wholeRow, bool? sharedX = null)
    {
        if (!Enabled || x.device.type != DeviceType.CUDA) return null;
        if (x.dtype != ScalarType.BFloat16 && x.dtype != ScalarType.Float16) return null;
        long k = weight.Columns, n = weight.Rows;
        if (k % Nf4.BlockSize != 0 || x.shape[^1] != k || n > int.MaxValue || k > int.MaxValue) return null;
        long rows = x.NumberOfElements / k;
        bool mma = rows > MaxRows;
        if (rows < 1 || rows > MaxSplitRows || (mma && (!MmaEnabled || k % 128 != 0))) return null;
        if (weight.Device.type != DeviceType.CUDA || weight.Device.index != x.device.index) return null;
        var module = Module(x.device, mmaTiles, sharedX);
        if (module is null) return null;
        long mmaRows = 8 * 16 * mmaTiles;

        using var scope = torch.NewDisposeScope();
        var x2 = x.reshape(rows, k).contiguous();
        if (KernelModule.Arg.Ptr(x2) % 16 != 0) x2 = x2.clone();   // a view at an odd offset: 16-byte loads need alignment
        var absmax = weight.Absmax ?? weight.DoubleQuant!.ToFloat32();
        var y = torch.empty([rows, n], x.dtype, x.device);
        string type = x.dtype == ScalarType.BFloat16 ? "bf16" : "f16";
        if (mma)
        {
            long tiles = (n + mmaRows - 1) / mmaRows, units = k / 128;
            long splits = Math.Clamp((MmaTargetBlocks + tiles - 1) / tiles, 1, units);
            var work = splits > 1 ? torch.empty([splits, rows, n], ScalarType.Float32, x.device) : null;
            module.Launch($"nf4_mma_{type}_n{(rows + 7) / 8}", ((uint)tiles, (uint)splits, 1), 256, 0,
                KernelModule.Arg.Ptr(x2), KernelModule.Arg.Ptr(weight.Packed), KernelModule.Arg.Ptr(absmax), KernelModule.Arg.Ptr(y),
                KernelModule.Arg.Ptr(work, 0), KernelModule.Arg.Ptr(Counters(x.device, tiles)), KernelModule.Arg.Int(rows),
                KernelModule.Arg.Int(n), KernelModule.Arg.Int(k), KernelModule.Arg.Int(splits));
            Interlocked.Increment(ref _launches);
        }
        else
            for (long first = 0; first < rows; first += MaxRows)
            {
                long count = Math.Min(MaxRows, rows - first);
                bool whole = wholeRow && WholeRowFits(count, k);
                long wholeBytes = count * (k / 32) * 80;                // [count][K/32 chunks][40 halves], as the kernel lays x out
                string name = whole ? $"nf4_gemv_whole_{type}_m{count}" : $"nf4_gemv_{type}_m{count}";
                module.Launch(name, ((uint)((n + WarpsPerBlock - 1) / WarpsPerBlock), 1, 1), 32 * WarpsPerBlock, whole ? (uint)wholeBytes : 0,
                    KernelModule.Arg.Ptr(x2) + (ulong)(first * k * x2.ElementSize), KernelModule.Arg.Ptr(weight.Packed), KernelModule.Arg.Ptr(absmax),
                    KernelModule.Arg.Ptr(y) + (ulong)(first * n * y.ElementSize), KernelModule.Arg.Int(n), KernelModule.Arg.Int(k));
                Interlocked.Increment(ref _launches);
            }
        var shape = x.shape.ToArray();
        shape[^1] = n;
        return y.view(shape).MoveToOuterDisposeScope();
    }

    /// <summary>The dense weight [Rows, Columns] in <paramref name="dtype"/> (bf16 or fp16) made by the
    /// dequantization kernel, or null when it does not apply (then the caller dequantizes with tensor ops).</summary>
    internal static Tensor? TryDequantize(Nf4Weight weight, ScalarType dtype)
    {
        if (!Enabled || weight.Device.type != DeviceType.CUDA) return null;
        if (dtype != ScalarType.BFloat16 && dtype != ScalarType.Float16) return null;
        if (KernelModule.Arg.Ptr(weight.Packed) % 16 != 0) return null;
        var module = Module(weight.Device);
        if (module is null) return null;
        using var scope = torch.NewDisposeScope();
        var absmax = weight.Absmax ?? weight.DoubleQuant!.ToFloat32();
        var result = torch.empty([weight.Rows, weight.Columns], dtype, weight.Device);
        long chunks = weight.ElementCount / 32;
        long blocks = (chunks + 255) / 256;
        if (blocks > int.MaxValue) throw new CudaException($"NF4 dequantization of {chunks * 32} values is too large for one launch");
        module.Launch(dtype == ScalarType.BFloat16 ? "nf4_dequant_bf16" : "nf4_dequant_f16", ((uint)blocks, 1, 1), 256, 0,
            KernelModule.Arg.Ptr(weight.Packed), KernelModule.Arg.Ptr(absmax), KernelModule.Arg.Ptr(result), KernelModule.Arg.Long(chunks));
        Interlocked.Increment(ref _launches);
        return result.MoveToOuterDisposeScope();
    }

    /// <summary>The tensor-core kernel's per-row-tile arrival counters on a device: zeros, and each launch's last block
    /// of a tile sets its counter back to zero, so one buffer serves every launch (all on one stream, in order).</summary>
    private static Tensor Counters(Device device, long tiles)
    {
        lock (CountersByDevice)
        {
            if (!CountersByDevice.TryGetValue(device.index, out var counters) || counters.shape[0] < tiles)
            {
                // A smaller buffer is replaced, never disposed: a captured CUDA graph may still point at it.
                counters = torch.zeros(Math.Max(tiles, 1024), ScalarType.Int32, device).DetachFromDisposeScope();
                CountersByDevice[device.index] = counters;
            }
            return counters;
        }
    }
    private static readonly Dictionary<int, Tensor> CountersByDevice = [];

    /// <summary>The compiled kernels for CUDA device <paramref name="ordinal"/>, or null (see <see cref="LastError"/>).</summary>
    internal static KernelModule? For(int ordinal) => Module(new Device(DeviceType.CUDA, ordinal));

    /// <summary>The kernels for <paramref name="device"/>, the tensor-core one built for <paramref name="mmaTiles"/> m-tiles
    /// per warp (a block covers 8 warps x 16 x that many weight rows: the kernel's MMA_ROWS).</summary>
    private static KernelModule? Module(Device device, int? mmaTiles = null, bool? sharedX = null) =>
        KernelModule.TryGet(File, device, MmaDefines(mmaTiles, sharedX));

    private static (string, string)[] MmaDefines(int? mmaTiles = null, bool? sharedX = null) =>
        [("MMA_MT", (mmaTiles ?? MmaTiles).ToString()), ("MMA_PREFETCH", MmaPrefetch.ToString()), ("MMA_XSMEM", sharedX ?? MmaSharedX ? "1" : "0")];

    /// <summary>Prepares the kernel for CUDA device <paramref name="ordinal"/> now, throwing (with the
    /// NVRTC log where compilation failed) instead of falling back.</summary>
    public static void EnsureLoaded(int ordinal = 0) => KernelModule.Get(File, new Device(DeviceType.CUDA, ordinal), MmaDefines());
}
