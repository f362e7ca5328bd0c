using System.CommandLine;
using PeftServe.Core.Adapters;
using PeftServe.Core.Model;
using PeftServe.Core.Quantization;
using PeftServe.Core.Runtime;
using PeftServe.Core.SafeTensors;
using PeftServe.Core.Templates;
using PeftServe.Core.Tokenization;

namespace PeftServe.Cli.Commands;

/// <summary>Options several verbs share, and the one place that turns failures into one-line errors.</summary>
internal static class CommonOptions
{
    public static Option<string?> Model() => new("--model")
    {
        Description = "Hugging Face model folder (config.json, *.safetensors, tokenizer.json); default: the built-in tiny Llama",
    };

    public static Option<string> Device() => new("--device")
    {
        Description = "cpu, cuda or cuda:N",
        DefaultValueFactory = _ => "cpu",
    };

    public static Option<string?> DType() => new("--dtype")
    {
        Description = "float32 (CPU default), bfloat16 (CUDA default) or float16",
    };

    public static Option<string> Quantize() => new("--quantize")
    {
        Description = "none, or nf4: store the decoder's linear layers in 4-bit NormalFloat (QLoRA), block 64, float32 absmax",
        DefaultValueFactory = _ => "none",
    };

    public static Option<bool> DoubleQuant() => new("--double-quant")
    {
        Description = "with --quantize nf4: also quantize the absmax values to 8 bits (QLoRA double quantization)",
    };

    /// <summary>The model options that --device, --dtype, --quantize and --double-quant describe.</summary>
    public static ModelOptions ParseModelOptions(string device, string? dtype, string? quantize, bool doubleQuant)
    {
        var dev = DeviceSelection.ParseDevice(device);
        var mode = (quantize ?? "none").Trim().ToLowerInvariant() switch
        {
            "none" or "" => QuantizationMode.None,
            "nf4" => QuantizationMode.Nf4,
            _ => throw new ArgumentException($"--quantize must be none or nf4, not '{quantize}'"),
        };
        if (doubleQuant && mode != QuantizationMode.Nf4) throw new ArgumentException("--double-quant needs --quantize nf4");
        return new ModelOptions { Device = dev, DType = DeviceSelection.ParseDType(dtype, dev), Quantization = mode, DoubleQuant = doubleQuant };
    }

    public static Option<string> AdapterStore() => new("--adapter-store")
    {
        Description = "folder where adapter names are looked up",
        DefaultValueFactory = _ => "adapters",
    };

    /// <summary>Resolves --model (announcing the default model on stderr) and loads it.</summary>
    public static LlamaModel LoadModel(string? modelDir, ModelOptions options)
    {
        var (dir, isDefault) = DefaultModel.Resolve(modelDir);
        if (isDefault) Console.Error.WriteLine("note: " + DefaultModel.Notice);
        if (!Directory.Exists(dir)) throw new ModelLoadException($"--model {dir}: no such folder");
        var model = LlamaModel.Load(dir, options);
        if (options.Quantization != QuantizationMode.None) Console.Error.WriteLine($"weights: {model.WeightSummary}");
        return model;
    }

    public static Tokenizer LoadTokenizer(string? modelDir)
    {
        var (dir, isDefault) = DefaultModel.Resolve(modelDir);
        if (isDefault) Console.Error.WriteLine("note: " + DefaultModel.Notice);
        if (!Directory.Exists(dir)) throw new ModelLoadException($"--model {dir}: no such folder");
        return Tokenizer.FromDirectory(dir);
    }

    /// <summary>Runs a verb; expected failures become "error: ..." on one line and exit code 1.
    /// PEFTSERVE_DEBUG=1 shows the stack trace as well.</summary>
    public static int Run(Func<int> body)
    {
        try { return body(); }
        catch (Exception e) when (e is ModelLoadException or SafeTensorsFormatException or AdapterException or ArgumentException
            or InvalidDataException or IOException or UnauthorizedAccessException or JinjaException
            or System.Text.Json.JsonException or InvalidOperationException or NotSupportedException)
        {
            Console.Out.Flush();
            Console.Error.WriteLine($"error: {e.Message}");
            if (Environment.GetEnvironmentVariable("PEFTSERVE_DEBUG") == "1") Console.Error.WriteLine(e);
            return 1;
        }
    }
}
