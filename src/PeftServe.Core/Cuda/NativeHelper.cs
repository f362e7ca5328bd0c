using System.Runtime.InteropServices;
using System.Text;

namespace PeftServe.Core.Cuda;

/// <summary>libpeftserve_cuda.so (native/peftserve_cuda.cpp): CUDA graphs and libtorch's current stream,
/// which TorchSharp 0.107 does not expose. It is built where a CUDA toolchain and libtorch's headers exist
/// (native/build.sh; the Dockerfile's build stage; the GPU machine) and found through PEFTSERVE_NATIVE (the
/// file), beside the application, or in the repository's native/build. Without it everything still runs:
/// decode steps are eager and our kernels launch on the legacy default stream, which libtorch uses then.</summary>
internal static unsafe class NativeHelper
{
    private const int AbiVersion = 1;
    private static readonly Lazy<Api?> Loaded = new(Load);

    /// <summary>Why the helper is not available (not found, wrong version), or null when it is.</summary>
    public static string? Unavailable { get; private set; }

    public static bool IsAvailable => Loaded.Value is not null;

    /// <summary>libtorch's current stream on CUDA device <paramref name="ordinal"/>: IntPtr.Zero (the
    /// legacy default stream) without the helper.</summary>
    public static IntPtr CurrentStream(int ordinal) => Loaded.Value is { } api ? api.CurrentStream(ordinal) : IntPtr.Zero;

    internal static Api Require() => Loaded.Value ?? throw new CudaException($"the native CUDA helper is not available: {Unavailable}");

    private static Api? Load()
    {
        var candidates = new List<string>();
        if (Environment.GetEnvironmentVariable("PEFTSERVE_NATIVE") is { Length: > 0 } explicitPath) candidates.Add(explicitPath);
        candidates.Add(Path.Combine(AppContext.BaseDirectory, "libpeftserve_cuda.so"));
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, "native", "build", "libpeftserve_cuda.so")))
            {
                candidates.Add(Path.Combine(dir.FullName, "native", "build", "libpeftserve_cuda.so"));
                break;
            }
        foreach (var path in candidates)
        {
            if (!File.Exists(path) || !NativeLibrary.TryLoad(path, out var handle)) continue;
            try
            {
                var api = new Api(handle);
                int version = api.AbiVersion();
                if (version == AbiVersion) return api;
                Unavailable = $"{path} has ABI version {version}, this build needs {AbiVersion} (rebuild it with native/build.sh)";
                return null;
            }
            catch (EntryPointNotFoundException e)
            {
                Unavailable = $"{path}: {e.Message}";
                return null;
            }
        }
        Unavailable = $"libpeftserve_cuda.so not found (tried {string.Join(", ", candidates)}); build it with native/build.sh or set PEFTSERVE_NATIVE";
        return null;
    }

    internal sealed class Api
    {
        public readonly delegate* unmanaged<int> AbiVersion;
        private readonly delegate* unmanaged<int, IntPtr> _currentStream;
        public readonly delegate* unmanaged<ulong*, ulong*, void> PoolHandle;
        public readonly delegate* unmanaged<int, IntPtr> GraphNew;
        public readonly delegate* unmanaged<IntPtr, void> GraphFree;
        public readonly delegate* unmanaged<IntPtr, ulong, ulong, byte*, int, int> CaptureBegin;
        public readonly delegate* unmanaged<IntPtr, byte*, int, int> CaptureEnd;
        public readonly delegate* unmanaged<IntPtr, byte*, int, int> Replay;

        public Api(IntPtr lib)
        {
            IntPtr E(string name) => NativeLibrary.GetExport(lib, name);
            AbiVersion = (delegate* unmanaged<int>)E("psc_abi_version");
            _currentStream = (delegate* unmanaged<int, IntPtr>)E("psc_current_stream");
            PoolHandle = (delegate* unmanaged<ulong*, ulong*, void>)E("psc_pool_handle");
            GraphNew = (delegate* unmanaged<int, IntPtr>)E("psc_graph_new");
            GraphFree = (delegate* unmanaged<IntPtr, void>)E("psc_graph_free");
            CaptureBegin = (delegate* unmanaged<IntPtr, ulong, ulong, byte*, int, int>)E("psc_capture_begin");
            CaptureEnd = (delegate* unmanaged<IntPtr, byte*, int, int>)E("psc_capture_end");
            Replay = (delegate* unmanaged<IntPtr, byte*, int, int>)E("psc_replay");
        }

        public IntPtr CurrentStream(int ordinal) => _currentStream(ordinal);

        /// <summary>Runs a helper call that reports failure as a status and a message.</summary>
        public static void Check(string call, Func<IntPtr, int, int> invoke)
        {
            var buffer = Marshal.AllocHGlobal(1024);
            try
            {
                int status = invoke(buffer, 1024);
                if (status != 0) throw new CudaException($"{call} failed: {Marshal.PtrToStringUTF8(buffer)}");
            }
            finally
            {
                Marshal.FreeHGlobal(buffer);
            }
        }
    }
}

/// <summary>One captured CUDA graph (libtorch's at::cuda::CUDAGraph): the kernels of a decode step,
/// recorded once and replayed with one call. Every tensor the captured work reads or writes must outlive
/// the graph and keep its address; inputs change by copying new values into them.</summary>
public sealed unsafe class CudaGraph : IDisposable
{
    private IntPtr _handle;
    private readonly (ulong, ulong) _pool;

    /// <summary>A memory pool several graphs can share (they must then be replayed one at a time).</summary>
    public static (ulong, ulong) NewPool()
    {
        var api = NativeHelper.Require();
        ulong a, b;
        api.PoolHandle(&a, &b);
        return (a, b);
    }

    public CudaGraph(int deviceOrdinal, (ulong, ulong) pool)
    {
        _handle = NativeHelper.Require().GraphNew(deviceOrdinal);
        if (_handle == IntPtr.Zero) throw new CudaException("could not create a CUDA graph");
        _pool = pool;
    }

    /// <summary>Whether the native helper (and so graph capture) is available in this process.</summary>
    public static bool IsSupported => NativeHelper.IsAvailable;

    public bool Captured { get; private set; }

    /// <summary>Records the CUDA work <paramref name="work"/> issues (it is not executed). The work must not
    /// synchronize with the host. Returns what <paramref name="work"/> returned (its output tensors, which
    /// each replay overwrites).</summary>
    public T Capture<T>(Func<T> work)
    {
        var api = NativeHelper.Require();
        NativeHelper.Api.Check("cuda graph capture_begin", (e, n) => api.CaptureBegin(_handle, _pool.Item1, _pool.Item2, (byte*)e, n));
        T result;
        try
        {
            result = work();
        }
        catch
        {
            // End the capture (its failure is secondary) so the stream is restored before rethrowing.
            try { NativeHelper.Api.Check("cuda graph capture_end", (e, n) => api.CaptureEnd(_handle, (byte*)e, n)); }
            catch (CudaException) { }
            throw;
        }
        NativeHelper.Api.Check("cuda graph capture_end", (e, n) => api.CaptureEnd(_handle, (byte*)e, n));
        Captured = true;
        return result;
    }

    /// <summary>Runs the recorded work again on the current stream.</summary>
    public void Replay()
    {
        if (!Captured) throw new InvalidOperationException("the graph has not been captured");
        var api = NativeHelper.Require();
        NativeHelper.Api.Check("cuda graph replay", (e, n) => api.Replay(_handle, (byte*)e, n));
    }

    public void Dispose()
    {
        if (_handle == IntPtr.Zero) return;
        NativeHelper.Require().GraphFree(_handle);
        _handle = IntPtr.Zero;
    }
}
