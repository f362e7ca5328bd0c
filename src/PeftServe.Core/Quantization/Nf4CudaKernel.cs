using System.Runtime.InteropServices;
using System.Text;
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
/// A second kernel dequantizes a whole weight to bf16/fp16 for the plain path (many rows), bit-identical
/// to the tensor-op dequantization (float32 product, one rounding).
/// <para>The source is compiled at first use with NVRTC for the device's compute capability and loaded
/// with the CUDA driver API; it launches on the legacy default stream (stream 0), which is the stream
/// libtorch uses here, so it is ordered with TorchSharp's own work. Needs sm_80 or newer (bf16
/// conversions), K a multiple of 64, at most <see cref="MaxRows"/> rows. Anything else, or any failure
/// to find NVRTC or compile, falls back to the plain path (<see cref="LastError"/> says why).
/// Set PEFTSERVE_NF4_KERNEL=0 to turn it off.</para></summary>
public static class Nf4CudaKernel
{
    /// <summary>Largest number of activation rows (B*T) the kernel takes; more go the plain path.</summary>
    public const int MaxRows = 16;

    /// <summary>Output rows per thread block (one warp each).</summary>
    private const int WarpsPerBlock = 8;

    /// <summary>False when PEFTSERVE_NF4_KERNEL=0 (read once) or after <see cref="Enabled"/> was set false.</summary>
    public static bool Enabled { get; set; } = Environment.GetEnvironmentVariable("PEFTSERVE_NF4_KERNEL") != "0";

    /// <summary>Why the kernel could not be prepared on some device, or null.</summary>
    public static string? LastError { get; private set; }

    /// <summary>Number of launches so far (diagnostics: shows that a forward took the kernel).</summary>
    public static long Launches => Interlocked.Read(ref _launches);
    private static long _launches;

    private static readonly object Gate = new();
    private static readonly Dictionary<int, DeviceKernels?> PerDevice = new();

    /// <summary>x W^T through the fused kernel, or null when it does not apply (then the caller takes
    /// the plain path). x: [..., K] on CUDA, bf16 or fp16; the result has x's dtype and leading shape.</summary>
    internal static Tensor? TryForward(Tensor x, Nf4Weight weight)
    {
        if (!Enabled || x.device.type != DeviceType.CUDA) return null;
        if (x.dtype != ScalarType.BFloat16 && x.dtype != ScalarType.Float16) return null;
        long k = weight.Columns, n = weight.Rows;
        if (k % Nf4.BlockSize != 0 || x.shape[^1] != k || n > int.MaxValue || k > int.MaxValue) return null;
        long rows = x.NumberOfElements / k;
        if (rows < 1 || rows > MaxRows) return null;
        if (weight.Device.type != DeviceType.CUDA || weight.Device.index != x.device.index) return null;
        var kernels = For(x.device.index < 0 ? 0 : x.device.index);
        if (kernels is null) return null;

        using var scope = torch.NewDisposeScope();
        var x2 = x.reshape(rows, k).contiguous();
        if (DataPtr(x2) % 16 != 0) x2 = x2.clone();   // a view at an odd offset: 16-byte loads need alignment
        var absmax = weight.Absmax ?? weight.DoubleQuant!.ToFloat32();
        var y = torch.empty([rows, n], x.dtype, x.device);
        kernels.Launch(x.dtype == ScalarType.BFloat16, (int)rows, DataPtr(x2), DataPtr(weight.Packed), DataPtr(absmax), DataPtr(y), (int)n, (int)k);
        Interlocked.Increment(ref _launches);
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
        if (DataPtr(weight.Packed) % 16 != 0) return null;
        var kernels = For(weight.Device.index < 0 ? 0 : weight.Device.index);
        if (kernels is null) return null;
        using var scope = torch.NewDisposeScope();
        var absmax = weight.Absmax ?? weight.DoubleQuant!.ToFloat32();
        var result = torch.empty([weight.Rows, weight.Columns], dtype, weight.Device);
        kernels.LaunchDequant(dtype == ScalarType.BFloat16, DataPtr(weight.Packed), DataPtr(absmax), DataPtr(result), weight.ElementCount / 32);
        Interlocked.Increment(ref _launches);
        return result.MoveToOuterDisposeScope();
    }

    /// <summary>Compiles and loads the kernels for CUDA device <paramref name="ordinal"/> (once), or
    /// returns null and sets <see cref="LastError"/>.</summary>
    internal static DeviceKernels? For(int ordinal)
    {
        lock (Gate)
        {
            if (PerDevice.TryGetValue(ordinal, out var cached)) return cached;
            DeviceKernels? kernels = null;
            try
            {
                kernels = DeviceKernels.Create(ordinal);
            }
            catch (Exception e) when (e is CudaException or DllNotFoundException or EntryPointNotFoundException)
            {
                LastError = e.Message;
            }
            PerDevice[ordinal] = kernels;
            return kernels;
        }
    }

    /// <summary>Prepares the kernel for CUDA device <paramref name="ordinal"/> now, throwing (with the
    /// NVRTC log where compilation failed) instead of falling back.</summary>
    public static void EnsureLoaded(int ordinal = 0)
    {
        if (For(ordinal) is null) throw new CudaException($"NF4 CUDA kernel unavailable on cuda:{ordinal}: {LastError}");
    }

    [DllImport("LibTorchSharp")]
    private static extern IntPtr THSTensor_data(IntPtr handle);

    internal static ulong DataPtr(Tensor t) => (ulong)THSTensor_data(t.Handle);

    /// <summary>A CUDA or NVRTC failure, with the call, its status and (for compilation) the log.</summary>
    public sealed class CudaException(string message) : Exception(message);

    /// <summary>The compiled module of one device and its kernel entry points.</summary>
    internal sealed unsafe class DeviceKernels
    {
        private readonly IntPtr _context;
        private readonly IntPtr[] _bf16 = new IntPtr[MaxRows + 1], _f16 = new IntPtr[MaxRows + 1];
        private IntPtr _dequantBf16, _dequantF16;
        public int Major { get; }
        public int Minor { get; }
        public string Target { get; }

        private DeviceKernels(IntPtr context, int major, int minor, string target)
        {
            _context = context;
            Major = major;
            Minor = minor;
            Target = target;
        }

        public static DeviceKernels Create(int ordinal)
        {
            var cu = CudaDriver.Instance;
            cu.Check(cu.Init(0), "cuInit");
            int device;
            cu.Check(cu.DeviceGet(&device, ordinal), "cuDeviceGet");
            int major, minor;
            cu.Check(cu.DeviceGetAttribute(&major, 75, device), "cuDeviceGetAttribute(COMPUTE_CAPABILITY_MAJOR)");
            cu.Check(cu.DeviceGetAttribute(&minor, 76, device), "cuDeviceGetAttribute(COMPUTE_CAPABILITY_MINOR)");
            if (major < 8)
                throw new CudaException($"cuda:{ordinal} is sm_{major}{minor}; the NF4 kernel needs sm_80 or newer");
            IntPtr context;
            cu.Check(cu.DevicePrimaryCtxRetain(&context, device), "cuDevicePrimaryCtxRetain");

            var (image, target) = Nvrtc.Instance.Compile(KernelSource, "nf4_gemv.cu", major, minor);
            var kernels = new DeviceKernels(context, major, minor, target);
            kernels.MakeCurrent();
            IntPtr module;
            fixed (byte* p = image) cu.Check(cu.ModuleLoadData(&module, p), $"cuModuleLoadData({target})");
            for (int m = 1; m <= MaxRows; m++)
            {
                kernels._bf16[m] = cu.GetFunction(module, $"nf4_gemv_bf16_m{m}");
                kernels._f16[m] = cu.GetFunction(module, $"nf4_gemv_f16_m{m}");
            }
            kernels._dequantBf16 = cu.GetFunction(module, "nf4_dequant_bf16");
            kernels._dequantF16 = cu.GetFunction(module, "nf4_dequant_f16");
            return kernels;
        }

        private void MakeCurrent()
        {
            var cu = CudaDriver.Instance;
            IntPtr current;
            cu.Check(cu.CtxGetCurrent(&current), "cuCtxGetCurrent");
            if (current != _context) cu.Check(cu.CtxSetCurrent(_context), "cuCtxSetCurrent");
        }

        public void Launch(bool bf16, int rows, ulong x, ulong w, ulong absmax, ulong y, int n, int k)
        {
            var function = (bf16 ? _bf16 : _f16)[rows];
            MakeCurrent();
            void** args = stackalloc void*[6];
            args[0] = &x;
            args[1] = &w;
            args[2] = &absmax;
            args[3] = &y;
            args[4] = &n;
            args[5] = &k;
            uint blocks = (uint)((n + WarpsPerBlock - 1) / WarpsPerBlock);
            var cu = CudaDriver.Instance;
            cu.Check(cu.LaunchKernel(function, blocks, 1, 1, 32 * WarpsPerBlock, 1, 1, 0, IntPtr.Zero, args, null),
                $"cuLaunchKernel(nf4_gemv_{(bf16 ? "bf16" : "f16")}_m{rows}, N={n}, K={k})");
        }

        public void LaunchDequant(bool bf16, ulong w, ulong absmax, ulong output, long chunks)
        {
            MakeCurrent();
            void** args = stackalloc void*[4];
            args[0] = &w;
            args[1] = &absmax;
            args[2] = &output;
            args[3] = &chunks;
            long blocks = (chunks + 255) / 256;
            if (blocks > int.MaxValue) throw new CudaException($"NF4 dequantization of {chunks * 32} values is too large for one launch");
            var cu = CudaDriver.Instance;
            cu.Check(cu.LaunchKernel(bf16 ? _dequantBf16 : _dequantF16, (uint)blocks, 1, 1, 256, 1, 1, 0, IntPtr.Zero, args, null),
                $"cuLaunchKernel(nf4_dequant_{(bf16 ? "bf16" : "f16")}, {chunks * 32} values)");
        }
    }

    /// <summary>The CUDA driver API entry points used here, from libcuda.so.1.</summary>
    private sealed unsafe class CudaDriver
    {
        private static CudaDriver? _instance;
        public static CudaDriver Instance => _instance ??= new CudaDriver();

        public readonly delegate* unmanaged<uint, int> Init;
        public readonly delegate* unmanaged<int*, int, int> DeviceGet;
        public readonly delegate* unmanaged<int*, int, int, int> DeviceGetAttribute;
        public readonly delegate* unmanaged<IntPtr*, int, int> DevicePrimaryCtxRetain;
        public readonly delegate* unmanaged<IntPtr*, int> CtxGetCurrent;
        public readonly delegate* unmanaged<IntPtr, int> CtxSetCurrent;
        public readonly delegate* unmanaged<IntPtr*, byte*, int> ModuleLoadData;
        public readonly delegate* unmanaged<IntPtr*, IntPtr, byte*, int> ModuleGetFunction;
        public readonly delegate* unmanaged<IntPtr, uint, uint, uint, uint, uint, uint, uint, IntPtr, void**, void**, int> LaunchKernel;
        private readonly delegate* unmanaged<int, byte**, int> _getErrorString;

        private CudaDriver()
        {
            var lib = NativeLoader.Load("CUDA driver", Environment.GetEnvironmentVariable("PEFTSERVE_LIBCUDA"),
                ["libcuda.so.1", "libcuda.so", "nvcuda.dll"], []);
            Init = (delegate* unmanaged<uint, int>)NativeLibrary.GetExport(lib, "cuInit");
            DeviceGet = (delegate* unmanaged<int*, int, int>)NativeLibrary.GetExport(lib, "cuDeviceGet");
            DeviceGetAttribute = (delegate* unmanaged<int*, int, int, int>)NativeLibrary.GetExport(lib, "cuDeviceGetAttribute");
            DevicePrimaryCtxRetain = (delegate* unmanaged<IntPtr*, int, int>)NativeLibrary.GetExport(lib, "cuDevicePrimaryCtxRetain");
            CtxGetCurrent = (delegate* unmanaged<IntPtr*, int>)NativeLibrary.GetExport(lib, "cuCtxGetCurrent");
            CtxSetCurrent = (delegate* unmanaged<IntPtr, int>)NativeLibrary.GetExport(lib, "cuCtxSetCurrent");
            ModuleLoadData = (delegate* unmanaged<IntPtr*, byte*, int>)NativeLibrary.GetExport(lib, "cuModuleLoadData");
            ModuleGetFunction = (delegate* unmanaged<IntPtr*, IntPtr, byte*, int>)NativeLibrary.GetExport(lib, "cuModuleGetFunction");
            LaunchKernel = (delegate* unmanaged<IntPtr, uint, uint, uint, uint, uint, uint, uint, IntPtr, void**, void**, int>)
                NativeLibrary.GetExport(lib, "cuLaunchKernel");
            _getErrorString = (delegate* unmanaged<int, byte**, int>)NativeLibrary.GetExport(lib, "cuGetErrorString");
        }

        public void Check(int status, string call)
        {
            if (status == 0) return;
            byte* text = null;
            string name = _getErrorString(status, &text) == 0 && text != null ? Marshal.PtrToStringUTF8((IntPtr)text)! : "unknown error";
            throw new CudaException($"{call} failed: CUDA error {status} ({name})");
        }

        public IntPtr GetFunction(IntPtr module, string name)
        {
            IntPtr function;
            var bytes = Encoding.ASCII.GetBytes(name + "\0");
            fixed (byte* p = bytes) Check(ModuleGetFunction(&function, module, p), $"cuModuleGetFunction({name})");
            return function;
        }
    }

    /// <summary>NVRTC, from libnvrtc.so (found by name, beside the loaded libtorch, in python's
    /// nvidia/*/lib packages, or under /usr/local/cuda; PEFTSERVE_NVRTC names a file directly).</summary>
    private sealed unsafe class Nvrtc
    {
        private static Nvrtc? _instance;
        public static Nvrtc Instance => _instance ??= new Nvrtc();

        private readonly delegate* unmanaged<int*, int*, int> _version;
        private readonly delegate* unmanaged<int*, int> _getNumSupportedArchs;
        private readonly delegate* unmanaged<int*, int> _getSupportedArchs;
        private readonly delegate* unmanaged<IntPtr*, byte*, byte*, int, byte**, byte**, int> _createProgram;
        private readonly delegate* unmanaged<IntPtr, int, byte**, int> _compileProgram;
        private readonly delegate* unmanaged<IntPtr, nuint*, int> _getLogSize;
        private readonly delegate* unmanaged<IntPtr, byte*, int> _getLog;
        private readonly delegate* unmanaged<IntPtr, nuint*, int> _getCubinSize;
        private readonly delegate* unmanaged<IntPtr, byte*, int> _getCubin;
        private readonly delegate* unmanaged<IntPtr, nuint*, int> _getPtxSize;
        private readonly delegate* unmanaged<IntPtr, byte*, int> _getPtx;
        private readonly delegate* unmanaged<IntPtr*, int> _destroyProgram;
        private readonly delegate* unmanaged<int, byte*> _getErrorString;
        public string LibraryPath { get; }

        private Nvrtc()
        {
            var (lib, path) = NativeLoader.LoadWithPath("NVRTC", Environment.GetEnvironmentVariable("PEFTSERVE_NVRTC"),
                ["libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so.11.2"], NvrtcCandidates());
            LibraryPath = path;
            _version = (delegate* unmanaged<int*, int*, int>)NativeLibrary.GetExport(lib, "nvrtcVersion");
            _getNumSupportedArchs = (delegate* unmanaged<int*, int>)NativeLibrary.GetExport(lib, "nvrtcGetNumSupportedArchs");
            _getSupportedArchs = (delegate* unmanaged<int*, int>)NativeLibrary.GetExport(lib, "nvrtcGetSupportedArchs");
            _createProgram = (delegate* unmanaged<IntPtr*, byte*, byte*, int, byte**, byte**, int>)NativeLibrary.GetExport(lib, "nvrtcCreateProgram");
            _compileProgram = (delegate* unmanaged<IntPtr, int, byte**, int>)NativeLibrary.GetExport(lib, "nvrtcCompileProgram");
            _getLogSize = (delegate* unmanaged<IntPtr, nuint*, int>)NativeLibrary.GetExport(lib, "nvrtcGetProgramLogSize");
            _getLog = (delegate* unmanaged<IntPtr, byte*, int>)NativeLibrary.GetExport(lib, "nvrtcGetProgramLog");
            _getCubinSize = (delegate* unmanaged<IntPtr, nuint*, int>)NativeLibrary.GetExport(lib, "nvrtcGetCUBINSize");
            _getCubin = (delegate* unmanaged<IntPtr, byte*, int>)NativeLibrary.GetExport(lib, "nvrtcGetCUBIN");
            _getPtxSize = (delegate* unmanaged<IntPtr, nuint*, int>)NativeLibrary.GetExport(lib, "nvrtcGetPTXSize");
            _getPtx = (delegate* unmanaged<IntPtr, byte*, int>)NativeLibrary.GetExport(lib, "nvrtcGetPTX");
            _destroyProgram = (delegate* unmanaged<IntPtr*, int>)NativeLibrary.GetExport(lib, "nvrtcDestroyProgram");
            _getErrorString = (delegate* unmanaged<int, byte*>)NativeLibrary.GetExport(lib, "nvrtcGetErrorString");
        }

        private void Check(int status, string call, string? log = null)
        {
            if (status == 0) return;
            var name = Marshal.PtrToStringUTF8((IntPtr)_getErrorString(status)) ?? "unknown error";
            throw new CudaException($"{call} failed: NVRTC error {status} ({name}) [{LibraryPath}]" + (string.IsNullOrWhiteSpace(log) ? "" : "\n" + log));
        }

        /// <summary>Compiles <paramref name="source"/> to a CUBIN for sm_{major}{minor} when this NVRTC
        /// knows that architecture, else to PTX for the newest older one it knows (the driver finishes it).</summary>
        public (byte[] Image, string Target) Compile(string source, string name, int major, int minor)
        {
            int vMajor, vMinor;
            Check(_version(&vMajor, &vMinor), "nvrtcVersion");
            int count;
            Check(_getNumSupportedArchs(&count), "nvrtcGetNumSupportedArchs");
            var archs = new int[count];
            fixed (int* a = archs) Check(_getSupportedArchs(a), "nvrtcGetSupportedArchs");
            int want = major * 10 + minor;
            bool cubin = archs.Contains(want);
            int arch = cubin ? want : archs.Where(a => a <= want).DefaultIfEmpty(-1).Max();
            if (arch < 80)
                throw new CudaException($"NVRTC {vMajor}.{vMinor} [{LibraryPath}] supports none of sm_80..sm_{want} ({string.Join(",", archs)})");
            string target = cubin ? $"sm_{arch}" : $"compute_{arch}";
            string[] options = [$"--gpu-architecture={target}", "--std=c++17"];

            IntPtr program;
            var src = Encoding.UTF8.GetBytes(source + "\0");
            var nameBytes = Encoding.UTF8.GetBytes(name + "\0");
            fixed (byte* s = src)
            fixed (byte* nm = nameBytes)
                Check(_createProgram(&program, s, nm, 0, null, null), "nvrtcCreateProgram");
            try
            {
                var optionBytes = options.Select(o => Encoding.UTF8.GetBytes(o + "\0")).ToArray();
                var handles = optionBytes.Select(b => GCHandle.Alloc(b, GCHandleType.Pinned)).ToArray();
                int status;
                try
                {
                    byte** opts = stackalloc byte*[handles.Length];
                    for (int i = 0; i < handles.Length; i++) opts[i] = (byte*)handles[i].AddrOfPinnedObject();
                    status = _compileProgram(program, handles.Length, opts);
                }
                finally
                {
                    foreach (var h in handles) h.Free();
                }
                Check(status, $"nvrtcCompileProgram({name}, {string.Join(" ", options)}) with NVRTC {vMajor}.{vMinor}", ReadLog(program));

                nuint size;
                Check(cubin ? _getCubinSize(program, &size) : _getPtxSize(program, &size), cubin ? "nvrtcGetCUBINSize" : "nvrtcGetPTXSize");
                var image = new byte[(int)size + (cubin ? 0 : 1)];
                fixed (byte* p = image) Check(cubin ? _getCubin(program, p) : _getPtx(program, p), cubin ? "nvrtcGetCUBIN" : "nvrtcGetPTX");
                return (image, $"{target} (NVRTC {vMajor}.{vMinor})");
            }
            finally
            {
                _destroyProgram(&program);
            }
        }

        private string ReadLog(IntPtr program)
        {
            nuint size;
            if (_getLogSize(program, &size) != 0 || size <= 1) return "";
            var log = new byte[(int)size];
            fixed (byte* p = log)
                if (_getLog(program, p) != 0) return "";
            return Encoding.UTF8.GetString(log, 0, log.Length - 1);
        }

        /// <summary>libnvrtc files near the CUDA libraries already loaded into this process (libtorch's
        /// lib folder, and python's site-packages/nvidia/*/lib beside it), then the usual CUDA folders.</summary>
        private static IEnumerable<string> NvrtcCandidates()
        {
            var dirs = new List<string>();
            try
            {
                if (File.Exists("/proc/self/maps"))
                    foreach (var line in File.ReadLines("/proc/self/maps"))
                    {
                        int slash = line.IndexOf('/');
                        if (slash < 0) continue;
                        var path = line[slash..];
                        var file = Path.GetFileName(path);
                        if (file.StartsWith("libtorch", StringComparison.Ordinal) || file.StartsWith("libc10_cuda", StringComparison.Ordinal) ||
                            file.StartsWith("libcudart", StringComparison.Ordinal) || file.StartsWith("libcublas", StringComparison.Ordinal))
                            dirs.Add(Path.GetDirectoryName(path)!);
                    }
            }
            catch (IOException) { }
            foreach (var d in (Environment.GetEnvironmentVariable("LD_LIBRARY_PATH") ?? "").Split(':', StringSplitOptions.RemoveEmptyEntries))
                dirs.Add(d);
            var expanded = new List<string>();
            foreach (var d in dirs.Distinct())
            {
                expanded.Add(d);
                // torch/lib -> site-packages/nvidia/<pkg>/lib (cu13: nvidia/cu13/lib; cu12: nvidia/cuda_nvrtc/lib)
                var sitePackages = Path.GetDirectoryName(Path.GetDirectoryName(d));
                var nvidia = sitePackages is null ? null : Path.Combine(sitePackages, "nvidia");
                if (nvidia is not null && Directory.Exists(nvidia))
                    foreach (var pkg in Directory.GetDirectories(nvidia))
                        expanded.Add(Path.Combine(pkg, "lib"));
            }
            expanded.AddRange(["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib", "/usr/lib/x86_64-linux-gnu"]);
            foreach (var d in expanded.Distinct())
            {
                if (!Directory.Exists(d)) continue;
                string[] files;
                try { files = Directory.GetFiles(d, "libnvrtc.so*"); }
                catch (IOException) { continue; }
                catch (UnauthorizedAccessException) { continue; }
                foreach (var f in files.OrderByDescending(f => f.Length).ThenByDescending(f => f, StringComparer.Ordinal))
                    if (!f.Contains("builtins", StringComparison.Ordinal) && !f.EndsWith(".alt", StringComparison.Ordinal))
                        yield return f;
            }
        }
    }

    private static class NativeLoader
    {
        public static IntPtr Load(string what, string? explicitPath, string[] names, IEnumerable<string> files) =>
            LoadWithPath(what, explicitPath, names, files).Handle;

        public static (IntPtr Handle, string Path) LoadWithPath(string what, string? explicitPath, string[] names, IEnumerable<string> files)
        {
            var tried = new List<string>();
            if (!string.IsNullOrEmpty(explicitPath))
            {
                if (NativeLibrary.TryLoad(explicitPath, out var h)) return (h, explicitPath);
                tried.Add(explicitPath);
            }
            foreach (var n in names)
            {
                if (NativeLibrary.TryLoad(n, out var h)) return (h, n);
                tried.Add(n);
            }
            foreach (var f in files)
            {
                if (NativeLibrary.TryLoad(f, out var h)) return (h, f);
                tried.Add(f);
            }
            throw new DllNotFoundException($"{what} not found; tried {string.Join(", ", tried)}");
        }
    }

    /// <summary>The kernels' CUDA C++ source (no headers needed: conversions are inline PTX).</summary>
    internal const string KernelSource = """
        // NF4 kernels. Packed weights: row-major, two codes per byte, the first (even k) in the high nibble;
        // absmax float32, one per 64 consecutive weights.
        #define WARPS_PER_BLOCK 8
        #define TILE_K 1024                // x columns staged in shared memory per step: one 32-chunk per lane
        #define CHUNK_STRIDE 40            // 32 values + 8 padding per chunk in shared memory (80 bytes): the
                                           // 16-byte reads of 8 neighbouring lanes then hit distinct banks

        __constant__ float kNf4Code[16] = {
            -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
            -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
            0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
            0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f };

        __device__ __forceinline__ float f16_to_f32(unsigned int h)
        {
            float f;
            asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((unsigned short)h));
            return f;
        }

        template <bool BF16> __device__ __forceinline__ float low_half(unsigned int w)
        {
            if constexpr (BF16) return __uint_as_float(w << 16);
            else return f16_to_f32(w & 0xffffu);
        }

        template <bool BF16> __device__ __forceinline__ float high_half(unsigned int w)
        {
            if constexpr (BF16) return __uint_as_float(w & 0xffff0000u);
            else return f16_to_f32(w >> 16);
        }

        template <bool BF16> __device__ __forceinline__ unsigned short from_f32(float f)
        {
            unsigned short r;
            if constexpr (BF16) asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
            else asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
            return r;
        }

        // The 32 weights of one 16-byte chunk: byte 4i+b holds weights 8i+2b (high nibble) and 8i+2b+1 (low).
        __device__ __forceinline__ void decode_chunk(const uint4 p, const float* code, float w[32])
        {
            const unsigned int pw[4] = { p.x, p.y, p.z, p.w };
            #pragma unroll
            for (int i = 0; i < 4; i++)
            {
                #pragma unroll
                for (int b = 0; b < 4; b++)
                {
                    const unsigned int byte = (pw[i] >> (8 * b)) & 0xffu;
                    w[8 * i + 2 * b] = code[byte >> 4];
                    w[8 * i + 2 * b + 1] = code[byte & 15u];
                }
            }
        }

        // y[m, n] = sum_k x[m, k] * code[q(n, k)] * absmax[(n*K + k) / 64] for M (<= 16) rows of x.
        // One warp per output row n. K is walked in tiles of TILE_K: the block stages x[:, tile] in shared
        // memory, then lane l takes chunk c = tile/32 + l (weights 32c .. 32c+31 of row n, in 64-block
        // n*K/64 + c/2; K is a multiple of 64), whose 16 bytes were loaded one tile ahead.
        template <int M, bool BF16>
        __device__ __forceinline__ void nf4_gemv(const unsigned short* __restrict__ x, const unsigned char* __restrict__ wq,
                                                 const float* __restrict__ absmax, unsigned short* __restrict__ y, int N, int K)
        {
            __shared__ float code[16];
            __shared__ __align__(16) unsigned short xs[M * (TILE_K / 32) * CHUNK_STRIDE];
            if (threadIdx.x < 16) code[threadIdx.x] = kNf4Code[threadIdx.x];

            const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
            const int n = blockIdx.x * WARPS_PER_BLOCK + warp;
            const bool active = n < N;
            const int chunks = K >> 5;
            const uint4* wrow = reinterpret_cast<const uint4*>(wq + (size_t)(active ? n : 0) * (size_t)(K >> 1));
            const float* arow = absmax + (size_t)(active ? n : 0) * (size_t)(K >> 6);

            float acc[M];
            #pragma unroll
            for (int m = 0; m < M; m++) acc[m] = 0.0f;

            int c = lane;
            uint4 p = make_uint4(0u, 0u, 0u, 0u);
            float scale = 0.0f;
            if (active && c < chunks) { p = __ldg(wrow + c); scale = __ldg(arow + (c >> 1)); }

            for (int k0 = 0; k0 < K; k0 += TILE_K)
            {
                const int vecsPerRow = min(TILE_K, K - k0) >> 3;       // 8 values per 16-byte vector
                __syncthreads();                                         // the previous tile is used up
                for (int i = threadIdx.x; i < M * vecsPerRow; i += 32 * WARPS_PER_BLOCK)
                {
                    const int m = i / vecsPerRow, v = i - m * vecsPerRow;
                    const uint4 val = __ldg(reinterpret_cast<const uint4*>(x + (size_t)m * (size_t)K + k0) + v);
                    *reinterpret_cast<uint4*>(xs + (m * (TILE_K / 32) + (v >> 2)) * CHUNK_STRIDE + ((v & 3) << 3)) = val;
                }
                __syncthreads();

                const int cNext = c + 32;                                // this lane's chunk of the next tile
                uint4 pNext = make_uint4(0u, 0u, 0u, 0u);
                float scaleNext = 0.0f;
                if (active && cNext < chunks) { pNext = __ldg(wrow + cNext); scaleNext = __ldg(arow + (cNext >> 1)); }

                if (active && c < chunks)
                {
                    float w[32];
                    decode_chunk(p, code, w);
                    #pragma unroll
                    for (int m = 0; m < M; m++)
                    {
                        const uint4* xr = reinterpret_cast<const uint4*>(xs + (m * (TILE_K / 32) + lane) * CHUNK_STRIDE);
                        float dot = 0.0f;
                        #pragma unroll
                        for (int v = 0; v < 4; v++)
                        {
                            const uint4 q = xr[v];                       // values 8v .. 8v+7 of the chunk
                            const unsigned int qw[4] = { q.x, q.y, q.z, q.w };
                            #pragma unroll
                            for (int j = 0; j < 4; j++)
                            {
                                dot = fmaf(low_half<BF16>(qw[j]), w[8 * v + 2 * j], dot);
                                dot = fmaf(high_half<BF16>(qw[j]), w[8 * v + 2 * j + 1], dot);
                            }
                        }
                        acc[m] = fmaf(dot, scale, acc[m]);
                    }
                }
                c = cNext;
                p = pNext;
                scale = scaleNext;
            }

            if (!active) return;
            #pragma unroll
            for (int m = 0; m < M; m++)
            {
                float v = acc[m];
                #pragma unroll
                for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
                if (lane == 0) y[(size_t)m * (size_t)N + n] = from_f32<BF16>(v);
            }
        }

        #define NF4_INSTANTIATE(M) \
            extern "C" __global__ void __launch_bounds__(32 * WARPS_PER_BLOCK) nf4_gemv_bf16_m##M( \
                const unsigned short* x, const unsigned char* w, const float* absmax, unsigned short* y, int N, int K) \
            { nf4_gemv<M, true>(x, w, absmax, y, N, K); } \
            extern "C" __global__ void __launch_bounds__(32 * WARPS_PER_BLOCK) nf4_gemv_f16_m##M( \
                const unsigned short* x, const unsigned char* w, const float* absmax, unsigned short* y, int N, int K) \
            { nf4_gemv<M, false>(x, w, absmax, y, N, K); }

        NF4_INSTANTIATE(1) NF4_INSTANTIATE(2) NF4_INSTANTIATE(3) NF4_INSTANTIATE(4)
        NF4_INSTANTIATE(5) NF4_INSTANTIATE(6) NF4_INSTANTIATE(7) NF4_INSTANTIATE(8)
        NF4_INSTANTIATE(9) NF4_INSTANTIATE(10) NF4_INSTANTIATE(11) NF4_INSTANTIATE(12)
        NF4_INSTANTIATE(13) NF4_INSTANTIATE(14) NF4_INSTANTIATE(15) NF4_INSTANTIATE(16)

        // Dequantization for the plain path (many rows): out[i] = code[q_i] * absmax[i / 64], computed in
        // float32 and rounded once to the output type, exactly as the tensor-op path does. Each thread
        // decodes one 16-byte chunk (32 values, half a block) and writes 64 bytes.
        template <bool BF16>
        __device__ __forceinline__ void nf4_dequant(const unsigned char* __restrict__ wq, const float* __restrict__ absmax,
                                                    unsigned short* __restrict__ out, long long chunks)
        {
            __shared__ float code[16];
            if (threadIdx.x < 16) code[threadIdx.x] = kNf4Code[threadIdx.x];
            __syncthreads();
            const long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
            if (c >= chunks) return;
            const uint4 p = __ldg(reinterpret_cast<const uint4*>(wq) + c);
            const float scale = __ldg(absmax + (c >> 1));
            float w[32];
            decode_chunk(p, code, w);
            uint4* dst = reinterpret_cast<uint4*>(out + (c << 5));
            #pragma unroll
            for (int v = 0; v < 4; v++)
            {
                unsigned int h[4];
                #pragma unroll
                for (int j = 0; j < 4; j++)
                    h[j] = (unsigned int)from_f32<BF16>(w[8 * v + 2 * j] * scale) |
                           ((unsigned int)from_f32<BF16>(w[8 * v + 2 * j + 1] * scale) << 16);
                dst[v] = make_uint4(h[0], h[1], h[2], h[3]);
            }
        }

        extern "C" __global__ void __launch_bounds__(256) nf4_dequant_bf16(const unsigned char* w, const float* absmax, unsigned short* out, long long chunks)
        { nf4_dequant<true>(w, absmax, out, chunks); }
        extern "C" __global__ void __launch_bounds__(256) nf4_dequant_f16(const unsigned char* w, const float* absmax, unsigned short* out, long long chunks)
        { nf4_dequant<false>(w, absmax, out, chunks); }
        """;
}
