using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Runtime;

/// <summary>How much memory is free where tensors live, to size the KV cache. TorchSharp exposes no
/// CUDA memory query, so on CUDA this asks the driver (cuMemGetInfo) in the device's primary context,
/// the one libtorch uses; on CPU it reads the kernel's MemAvailable.</summary>
public static class DeviceMemory
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

    private static (long Free, long Total) CudaMemory(int ordinal) => Cuda.CudaDriver.Instance.MemoryInfo(ordinal);
}
