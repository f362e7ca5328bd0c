using System.Runtime.InteropServices;
using System.Text;

namespace PeftServe.Core.Cuda;

/// <summary>A CUDA driver, NVRTC or native-helper failure: the call, its status and (for compilation) the log.</summary>
public sealed class CudaException(string message) : Exception(message);

/// <summary>The CUDA driver API entry points PeftServe uses beside libtorch, from libcuda.so.1: module
/// loading and kernel launch (our NVRTC kernels), streams, events and asynchronous copies (adapter
/// uploads that never stall the compute stream), and the free-memory query. TorchSharp exposes none of
/// these, and the driver API needs no headers or link step, so function pointers are the smallest way in.
/// Everything runs in the device's primary context, the one libtorch uses.</summary>
internal sealed unsafe class CudaDriver
{
    private static readonly Lazy<CudaDriver> Shared = new(() => new CudaDriver());

    /// <summary>The driver, loaded on first use (throws <see cref="DllNotFoundException"/> where there is none).</summary>
    public static CudaDriver Instance => Shared.Value;

    public readonly delegate* unmanaged<uint, int> Init;
    public readonly delegate* unmanaged<int*, int, int> DeviceGet;
    public readonly delegate* unmanaged<int*, int, int, int> DeviceGetAttribute;
    public readonly delegate* unmanaged<IntPtr*, int, int> DevicePrimaryCtxRetain;
    public readonly delegate* unmanaged<IntPtr*, int> CtxGetCurrent;
    public readonly delegate* unmanaged<IntPtr, int> CtxSetCurrent;
    public readonly delegate* unmanaged<IntPtr*, byte*, int> ModuleLoadData;
    public readonly delegate* unmanaged<IntPtr*, IntPtr, byte*, int> ModuleGetFunction;
    public readonly delegate* unmanaged<IntPtr, int, int, int> FuncSetAttribute;
    public readonly delegate* unmanaged<IntPtr, uint, uint, uint, uint, uint, uint, uint, IntPtr, void**, void**, int> LaunchKernel;
    /// <summary>cuLaunchKernelEx (CUDA 11.8+; null on older drivers): a launch with attributes, here programmatic dependent launch.</summary>
    public readonly delegate* unmanaged<LaunchConfig*, IntPtr, void**, void**, int> LaunchKernelEx;
    public readonly delegate* unmanaged<IntPtr*, uint, int> StreamCreate;
    public readonly delegate* unmanaged<IntPtr, IntPtr, uint, int> StreamWaitEvent;
    public readonly delegate* unmanaged<IntPtr, int> StreamSynchronize;
    public readonly delegate* unmanaged<IntPtr*, uint, int> EventCreate;
    public readonly delegate* unmanaged<IntPtr, IntPtr, int> EventRecord;
    public readonly delegate* unmanaged<IntPtr, int> EventQuery;
    public readonly delegate* unmanaged<IntPtr, int> EventSynchronize;
    public readonly delegate* unmanaged<IntPtr, int> EventDestroy;
    public readonly delegate* unmanaged<ulong, void*, nuint, IntPtr, int> MemcpyHtoDAsync;
    public readonly delegate* unmanaged<ulong, byte, nuint, IntPtr, int> MemsetD8Async;
    public readonly delegate* unmanaged<nuint*, nuint*, int> MemGetInfo;
    public readonly delegate* unmanaged<int> ProfilerStart;
    public readonly delegate* unmanaged<int> ProfilerStop;
    private readonly delegate* unmanaged<int, byte**, int> _getErrorString;

    /// <summary>CUDA_ERROR_NOT_READY: an event or stream still has work pending.</summary>
    public const int NotReady = 600;

    /// <summary>CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION: the kernel may start before the one before it in
    /// the stream has finished (it waits for it with griddepcontrol.wait, see Kernels/launch.cuh).</summary>
    public const int LaunchAttributeProgrammaticStreamSerialization = 6;

    /// <summary>cuda.h's CUlaunchAttribute: an id, padding to 8 bytes, and a 64-byte value union.</summary>
    [StructLayout(LayoutKind.Sequential)]
    public struct LaunchAttribute
    {
        public int Id;
        private int _padding;
        public fixed byte Value[64];
    }

    /// <summary>cuda.h's CUlaunchConfig.</summary>
    [StructLayout(LayoutKind.Sequential)]
    public struct LaunchConfig
    {
        public uint GridX, GridY, GridZ, BlockX, BlockY, BlockZ, SharedBytes;
        public IntPtr Stream;
        public LaunchAttribute* Attributes;
        public uint AttributeCount;
    }

    private CudaDriver()
    {
        var lib = NativeLoader.Load("CUDA driver", Environment.GetEnvironmentVariable("PEFTSERVE_LIBCUDA"),
            ["libcuda.so.1", "libcuda.so", "nvcuda.dll"], []);
        IntPtr E(string name) => NativeLibrary.GetExport(lib, name);
        Init = (delegate* unmanaged<uint, int>)E("cuInit");
        DeviceGet = (delegate* unmanaged<int*, int, int>)E("cuDeviceGet");
        DeviceGetAttribute = (delegate* unmanaged<int*, int, int, int>)E("cuDeviceGetAttribute");
        DevicePrimaryCtxRetain = (delegate* unmanaged<IntPtr*, int, int>)E("cuDevicePrimaryCtxRetain");
        CtxGetCurrent = (delegate* unmanaged<IntPtr*, int>)E("cuCtxGetCurrent");
        CtxSetCurrent = (delegate* unmanaged<IntPtr, int>)E("cuCtxSetCurrent");
        ModuleLoadData = (delegate* unmanaged<IntPtr*, byte*, int>)E("cuModuleLoadData");
        ModuleGetFunction = (delegate* unmanaged<IntPtr*, IntPtr, byte*, int>)E("cuModuleGetFunction");
        FuncSetAttribute = (delegate* unmanaged<IntPtr, int, int, int>)E("cuFuncSetAttribute");
        LaunchKernel = (delegate* unmanaged<IntPtr, uint, uint, uint, uint, uint, uint, uint, IntPtr, void**, void**, int>)E("cuLaunchKernel");
        LaunchKernelEx = NativeLibrary.TryGetExport(lib, "cuLaunchKernelEx", out var launchEx) ? (delegate* unmanaged<LaunchConfig*, IntPtr, void**, void**, int>)launchEx : null;
        StreamCreate = (delegate* unmanaged<IntPtr*, uint, int>)E("cuStreamCreate");
        StreamWaitEvent = (delegate* unmanaged<IntPtr, IntPtr, uint, int>)E("cuStreamWaitEvent");
        StreamSynchronize = (delegate* unmanaged<IntPtr, int>)E("cuStreamSynchronize");
        EventCreate = (delegate* unmanaged<IntPtr*, uint, int>)E("cuEventCreate");
        EventRecord = (delegate* unmanaged<IntPtr, IntPtr, int>)E("cuEventRecord");
        EventQuery = (delegate* unmanaged<IntPtr, int>)E("cuEventQuery");
        EventSynchronize = (delegate* unmanaged<IntPtr, int>)E("cuEventSynchronize");
        EventDestroy = (delegate* unmanaged<IntPtr, int>)E("cuEventDestroy_v2");
        MemcpyHtoDAsync = (delegate* unmanaged<ulong, void*, nuint, IntPtr, int>)E("cuMemcpyHtoDAsync_v2");
        MemsetD8Async = (delegate* unmanaged<ulong, byte, nuint, IntPtr, int>)E("cuMemsetD8Async");
        MemGetInfo = (delegate* unmanaged<nuint*, nuint*, int>)E("cuMemGetInfo_v2");
        ProfilerStart = (delegate* unmanaged<int>)E("cuProfilerStart");
        ProfilerStop = (delegate* unmanaged<int>)E("cuProfilerStop");
        _getErrorString = (delegate* unmanaged<int, byte**, int>)E("cuGetErrorString");
        Check(Init(0), "cuInit");
    }

    public void Check(int status, string call)
    {
        if (status == 0) return;
        byte* text = null;
        string name = _getErrorString(status, &text) == 0 && text != null ? Marshal.PtrToStringUTF8((IntPtr)text)! : "unknown error";
        throw new CudaException($"{call} failed: CUDA error {status} ({name})");
    }

    /// <summary>Makes device <paramref name="ordinal"/>'s primary context (libtorch's) current on this
    /// thread and returns it.</summary>
    public IntPtr UsePrimaryContext(int ordinal)
    {
        int device;
        Check(DeviceGet(&device, ordinal), "cuDeviceGet");
        IntPtr context;
        Check(DevicePrimaryCtxRetain(&context, device), "cuDevicePrimaryCtxRetain");
        MakeCurrent(context);
        return context;
    }

    public void MakeCurrent(IntPtr context)
    {
        IntPtr current;
        Check(CtxGetCurrent(&current), "cuCtxGetCurrent");
        if (current != context) Check(CtxSetCurrent(context), "cuCtxSetCurrent");
    }

    public (int Major, int Minor) ComputeCapability(int ordinal)
    {
        int device, major, minor;
        Check(DeviceGet(&device, ordinal), "cuDeviceGet");
        Check(DeviceGetAttribute(&major, 75, device), "cuDeviceGetAttribute(COMPUTE_CAPABILITY_MAJOR)");
        Check(DeviceGetAttribute(&minor, 76, device), "cuDeviceGetAttribute(COMPUTE_CAPABILITY_MINOR)");
        return (major, minor);
    }

    public IntPtr GetFunction(IntPtr module, string name)
    {
        IntPtr function;
        var bytes = Encoding.ASCII.GetBytes(name + "\0");
        fixed (byte* p = bytes) Check(ModuleGetFunction(&function, module, p), $"cuModuleGetFunction({name})");
        return function;
    }

    /// <summary>Free and total bytes of device <paramref name="ordinal"/>.</summary>
    public (long Free, long Total) MemoryInfo(int ordinal)
    {
        UsePrimaryContext(ordinal);
        nuint free, total;
        Check(MemGetInfo(&free, &total), "cuMemGetInfo");
        return ((long)free, (long)total);
    }
}

/// <summary>Finds a native library by an explicit path, by name, or among candidate files.</summary>
internal static class NativeLoader
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
