using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Runtime;

/// <summary>Turns the user's --device / --dtype words into TorchSharp's, initialising CUDA when asked.</summary>
public static class DeviceSelection
{
    /// <summary>"cpu", "cuda" or "cuda:N". CUDA must be initialised before the first tensor.</summary>
    public static Device ParseDevice(string? name)
    {
        name = string.IsNullOrWhiteSpace(name) ? "cpu" : name.Trim().ToLowerInvariant();
        if (name == "cpu") return torch.CPU;
        if (name == "cuda" || name.StartsWith("cuda:", StringComparison.Ordinal))
        {
            try { torch.InitializeDeviceType(DeviceType.CUDA); }
            catch (Exception e) { throw new ArgumentException($"--device {name}: CUDA could not be initialised ({e.Message})"); }
            if (!torch.cuda.is_available())
                throw new ArgumentException($"--device {name}: no CUDA device is available (this build uses TorchSharp's {BuildInfo.TorchBackend} backend)");
            return torch.device(name);
        }
        throw new ArgumentException($"--device must be cpu, cuda or cuda:N, not '{name}'");
    }

    /// <summary>float32, bfloat16 or float16; when not given, float32 on CPU and bfloat16 on CUDA.</summary>
    public static ScalarType ParseDType(string? name, Device device)
    {
        if (string.IsNullOrWhiteSpace(name)) return device.type == DeviceType.CUDA ? ScalarType.BFloat16 : ScalarType.Float32;
        return name.Trim().ToLowerInvariant() switch
        {
            "float32" or "fp32" or "f32" => ScalarType.Float32,
            "bfloat16" or "bf16" => ScalarType.BFloat16,
            "float16" or "fp16" or "f16" or "half" => ScalarType.Float16,
            _ => throw new ArgumentException($"--dtype must be float32, bfloat16 or float16, not '{name}'"),
        };
    }
}

/// <summary>Build-time facts.</summary>
public static class BuildInfo
{
    /// <summary>"cpu" or "cuda": which TorchSharp native bundle this build references.</summary>
    public static string TorchBackend =>
        typeof(BuildInfo).Assembly.GetCustomAttributes(typeof(System.Reflection.AssemblyMetadataAttribute), false)
            .OfType<System.Reflection.AssemblyMetadataAttribute>().FirstOrDefault(a => a.Key == "TorchBackend")?.Value ?? "cpu";
}
