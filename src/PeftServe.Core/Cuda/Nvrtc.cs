using System.Runtime.InteropServices;
using System.Text;

namespace PeftServe.Core.Cuda;

/// <summary>NVRTC, from libnvrtc.so (found by name, beside the loaded libtorch, in python's
/// nvidia/*/lib packages, or under /usr/local/cuda; PEFTSERVE_NVRTC names a file directly).</summary>
internal sealed unsafe class Nvrtc
{
    private static readonly Lazy<Nvrtc> Shared = new(() => new Nvrtc());
    public static Nvrtc Instance => Shared.Value;

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

    /// <summary>NVRTC's own version (part of the compiled-kernel cache key).</summary>
    public (int Major, int Minor) Version
    {
        get
        {
            int vMajor, vMinor;
            Check(_version(&vMajor, &vMinor), "nvrtcVersion");
            return (vMajor, vMinor);
        }
    }

    private void Check(int status, string call, string? log = null)
    {
        if (status == 0) return;
        var name = Marshal.PtrToStringUTF8((IntPtr)_getErrorString(status)) ?? "unknown error";
        throw new CudaException($"{call} failed: NVRTC error {status} ({name}) [{LibraryPath}]" + (string.IsNullOrWhiteSpace(log) ? "" : "\n" + log));
    }

    /// <summary>Compiles <paramref name="source"/> to a CUBIN for sm_{major}{minor} when this NVRTC
    /// knows that architecture, else to PTX for the newest older one it knows (the driver finishes it).</summary>
    public (byte[] Image, string Target) Compile(string source, string name, int major, int minor, IEnumerable<string>? extraOptions = null)
    {
        var (vMajor, vMinor) = Version;
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
        string[] options = [$"--gpu-architecture={target}", "--std=c++17", .. extraOptions ?? []];

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
