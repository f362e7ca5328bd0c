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
        if (device.type == DeviceType.CUDA) return CudaMemory(device.index < 0 ? 0 : device.index).Free;
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

    /// <summary>Memory in use where tensors live, for progress reports and peak figures: on CUDA the
    /// device's used memory as the driver reports it (total - free: what nvidia-smi shows, including
    /// the CUDA context, libtorch's cached blocks and any other process on the device); on CPU this
    /// process's working set.</summary>
    public static long UsedBytes(Device device)
    {
        if (device.type == DeviceType.CUDA)
        {
            var (free, total) = CudaMemory(device.index < 0 ? 0 : device.index);
            return total - free;
        }
        return Environment.WorkingSet;
    }

    private static (long Free, long Total) CudaMemory(int ordinal)
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
            return ((long)free, (long)total);
        }
        finally { release(dev); }
    }
}
