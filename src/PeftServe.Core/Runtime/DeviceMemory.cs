using System.Runtime.InteropServices;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Runtime;

/// <summary>How much memory is free where tensors live, to size the KV cache. TorchSharp exposes no
/// CUDA memory query, so on CUDA this asks the driver (cuMemGetInfo) in the device's primary context,
/// the one libtorch uses; on CPU it reads the kernel's MemAvailable.</summary>
public static unsafe class DeviceMemory
{
    public static long FreeBytes(Device device)
    {
        if (device.type == DeviceType.CUDA) return CudaFreeBytes(device.index < 0 ? 0 : device.index);
        try
        {
            foreach (var line in File.ReadLines("/proc/meminfo"))
                if (line.StartsWith("MemAvailable:", StringComparison.Ordinal))
                    return long.Parse(line.Split(' ', StringSplitOptions.RemoveEmptyEntries)[1]) * 1024;
        }
        catch (IOException) { }
        catch (UnauthorizedAccessException) { }
        return GC.GetGCMemoryInfo().TotalAvailableMemoryBytes;
    }

    private static long CudaFreeBytes(int ordinal)
    {
        var lib = NativeLibrary.Load(OperatingSystem.IsWindows() ? "nvcuda.dll" : "libcuda.so.1");
        var init = (delegate* unmanaged<uint, int>)NativeLibrary.GetExport(lib, "cuInit");
        var deviceGet = (delegate* unmanaged<int*, int, int>)NativeLibrary.GetExport(lib, "cuDeviceGet");
        var retain = (delegate* unmanaged<IntPtr*, int, int>)NativeLibrary.GetExport(lib, "cuDevicePrimaryCtxRetain");
        var release = (delegate* unmanaged<int, int>)NativeLibrary.GetExport(lib, "cuDevicePrimaryCtxRelease_v2");
        var push = (delegate* unmanaged<IntPtr, int>)NativeLibrary.GetExport(lib, "cuCtxPushCurrent_v2");
        var pop = (delegate* unmanaged<IntPtr*, int>)NativeLibrary.GetExport(lib, "cuCtxPopCurrent_v2");
        var memGetInfo = (delegate* unmanaged<nuint*, nuint*, int>)NativeLibrary.GetExport(lib, "cuMemGetInfo_v2");
        void Check(int status, string call)
        {
            if (status != 0) throw new InvalidOperationException($"{call} failed with CUDA error {status}");
        }
        Check(init(0), "cuInit");
        int dev;
        Check(deviceGet(&dev, ordinal), "cuDeviceGet");
        IntPtr ctx;
        Check(retain(&ctx, dev), "cuDevicePrimaryCtxRetain");
        try
        {
            Check(push(ctx), "cuCtxPushCurrent");
            nuint free, total;
            try { Check(memGetInfo(&free, &total), "cuMemGetInfo"); }
            finally { IntPtr popped; pop(&popped); }
            return (long)free;
        }
        finally { release(dev); }
    }
}
