using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using PeftServe.Core.SafeTensors;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Adapters;

/// <summary>An adapter folder as PEFT's save_pretrained writes it: adapter_config.json and
/// adapter_model.safetensors. Tensor names lose PEFT's "base_model.model." wrapper prefix.
/// Opened with <c>metadataOnly</c>, the folder hands out shape-only tensors on PyTorch's "meta" device
/// (no memory, no data read), so a method's whole validation runs from the safetensors header alone;
/// <see cref="CheckFiniteValues"/> then scans the raw values without converting them to float32.</summary>
public sealed partial class AdapterFolder : IDisposable
{
    public const string ConfigFile = "adapter_config.json";
    public const string WeightsFile = "adapter_model.safetensors";
    /// <summary>Largest adapter_config.json read (real ones are a few kilobytes).</summary>
    public const int MaxConfigBytes = 1 << 20;
    private const string WrapperPrefix = "base_model.model.";
    private static readonly Device Meta = new(DeviceType.META);

    private readonly SafeTensorsFile _weights;
    private readonly Dictionary<string, string> _names; // short name -> name in the file

    public string Path { get; }
    public JsonObject Config { get; }
    public string PeftType { get; }
    /// <summary>True when tensors are shape-only stand-ins (see the class summary).</summary>
    public bool MetadataOnly { get; }
    /// <summary>Where this folder's tensors live: the CPU, or the meta device in metadata-only mode.</summary>
    public Device TensorDevice => MetadataOnly ? Meta : CPU;
    /// <summary>Tensor names without the "base_model.model." prefix.</summary>
    public IReadOnlyCollection<string> TensorNames => _names.Keys;

    private AdapterFolder(string path, JsonObject config, string peftType, SafeTensorsFile weights, bool metadataOnly)
    {
        Path = path;
        Config = config;
        PeftType = peftType;
        MetadataOnly = metadataOnly;
        _weights = weights;
        _names = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (var t in weights.Tensors)
        {
            var shortName = t.Name.StartsWith(WrapperPrefix, StringComparison.Ordinal) ? t.Name[WrapperPrefix.Length..] : t.Name;
            if (!_names.TryAdd(shortName, t.Name))
                throw new AdapterException($"{path}: tensor '{shortName}' is stored twice (with and without the '{WrapperPrefix}' prefix)");
        }
    }

    /// <summary>Opens an adapter folder; nothing stays open when it is refused.</summary>
    public static AdapterFolder Open(string path, bool metadataOnly = false)
    {
        var configPath = System.IO.Path.Combine(path, ConfigFile);
        var weightsPath = System.IO.Path.Combine(path, WeightsFile);
        if (!Directory.Exists(path)) throw new AdapterException($"adapter folder {path} does not exist");
        if (!File.Exists(configPath)) throw new AdapterException($"{configPath}: not found");
        if (!File.Exists(weightsPath))
            throw new AdapterException(File.Exists(System.IO.Path.Combine(path, "adapter_model.bin"))
                ? $"{path}: adapter_model.bin (pickle) is not read for safety; save the adapter with safe_serialization (adapter_model.safetensors)"
                : $"{weightsPath}: not found");
        if (new FileInfo(configPath).Length > MaxConfigBytes)
            throw new AdapterException($"{configPath}: {new FileInfo(configPath).Length} bytes; an adapter config is at most {MaxConfigBytes} bytes");
        JsonObject config;
        // Duplicate keys are refused (which of two values would count is anyone's guess).
        try { config = JsonNode.Parse(File.ReadAllText(configPath), documentOptions: new JsonDocumentOptions { AllowDuplicateProperties = false }) as JsonObject ?? throw new JsonException("not a JSON object"); }
        catch (JsonException e) { throw new AdapterException($"{configPath}: invalid JSON or a key given twice (line {e.LineNumber + 1}, byte {e.BytePositionInLine + 1})"); }
        var peftType = config["peft_type"] is JsonValue v && v.TryGetValue<string>(out var s) ? s
            : throw new AdapterException($"{configPath}: missing string key 'peft_type'");
        SafeTensorsFile weights;
        try { weights = SafeTensorsFile.Open(weightsPath); }
        catch (SafeTensorsFormatException e) { throw new AdapterException(e.Message, e); }
        try { return new AdapterFolder(path, config, peftType, weights, metadataOnly); }
        catch
        {
            weights.Dispose();   // the mapping would otherwise live until a finalizer ran
            throw;
        }
    }

    public bool Contains(string name) => _names.ContainsKey(name);

    public SafeTensorInfo Info(string name) => _weights.Info(_names[name]);

    /// <summary>A tensor as float32 on the CPU (adapters are validated and prepared on the host), or a
    /// shape-only stand-in on the meta device in metadata-only mode.</summary>
    public Tensor Float(string name)
    {
        if (!MetadataOnly) return _weights.ToTensor(_names[name], dtype: ScalarType.Float32);
        var info = Info(name);
        if (info.DType is not (SafeTensorDType.F32 or SafeTensorDType.F16 or SafeTensorDType.BF16))
            throw new AdapterException($"{Path}: tensor '{name}' has dtype {info.DType}; adapters hold F32, F16 or BF16");
        return torch.empty(info.Shape, ScalarType.Float32, Meta);
    }

    /// <summary>Whether every value of <paramref name="t"/> is finite. A meta stand-in counts as finite
    /// here: its real values are checked by <see cref="CheckFiniteValues"/>.</summary>
    public static bool AllFinite(Tensor t)
    {
        if (t.device_type == DeviceType.META) return true;
        using var each = torch.isfinite(t);
        using var all = each.all();
        return all.item<bool>();
    }

    /// <summary>A one-element tensor's value (0 for a meta stand-in).</summary>
    public static float Scalar(Tensor t) => t.device_type == DeviceType.META ? 0f : t.item<float>();

    /// <summary>Refuses the adapter if any stored value is NaN or infinite, reading the file's raw
    /// values (no float32 copy); for <see cref="MetadataOnly"/> validation.</summary>
    public void CheckFiniteValues()
    {
        foreach (var (shortName, stored) in _names)
            if (!_weights.AllFinite(stored)) throw new AdapterException($"{Path}: tensor '{shortName}' holds NaN or infinite values");
    }

    /// <summary>The tensor, which must exist and have this shape (else an error naming it).</summary>
    public Tensor Float(string name, params long[] shape)
    {
        if (!Contains(name)) throw new AdapterException($"{Path}: missing tensor '{name}'");
        var info = Info(name);
        if (!info.Shape.SequenceEqual(shape))
            throw new AdapterException($"{Path}: tensor '{name}' has shape [{string.Join(",", info.Shape)}], the base model needs [{string.Join(",", shape)}]");
        if (info.DType is not (SafeTensorDType.F32 or SafeTensorDType.F16 or SafeTensorDType.BF16))
            throw new AdapterException($"{Path}: tensor '{name}' has dtype {info.DType}; adapters hold F32, F16 or BF16");
        return Float(name);
    }

    /// <summary>The tensor's real values as float32 on the CPU, also in metadata-only mode: for the few checks
    /// that compare values (a saved copy of a base weight, tied matrices), where the header cannot answer.</summary>
    public Tensor Values(string name, params long[] shape)
    {
        var t = Float(name, shape);
        if (t.device_type != DeviceType.META) return t;
        t.Dispose();
        return _weights.ToTensor(_names[name], dtype: ScalarType.Float32);
    }

    // ---- config helpers: every bad value names the file and key ----

    public int Int(string key, int? fallback = null) => Config[key] switch
    {
        JsonValue v when v.TryGetValue<int>(out var i) => i,
        JsonValue v when v.TryGetValue<double>(out var d) && d == Math.Floor(d) && d is >= int.MinValue and <= int.MaxValue => (int)d,
        null when fallback.HasValue => fallback.Value,
        null => throw new AdapterException($"{Path}/{ConfigFile}: missing integer key '{key}'"),
        _ => throw new AdapterException($"{Path}/{ConfigFile}: '{key}' must be an integer"),
    };

    public double Double(string key, double fallback) => Config[key] switch
    {
        JsonValue v when v.TryGetValue<double>(out var d) => d,
        null => fallback,
        _ => throw new AdapterException($"{Path}/{ConfigFile}: '{key}' must be a number"),
    };

    public bool Bool(string key, bool fallback = false) => Config[key] switch
    {
        JsonValue v when v.TryGetValue<bool>(out var b) => b,
        null => fallback,
        _ => throw new AdapterException($"{Path}/{ConfigFile}: '{key}' must be true or false"),
    };

    public string? String(string key) => Config[key] switch
    {
        JsonValue v when v.TryGetValue<string>(out var s) => s,
        null => null,
        _ => throw new AdapterException($"{Path}/{ConfigFile}: '{key}' must be a string"),
    };

    /// <summary>Splits "model.layers.7.self_attn.q_proj.lora_A.weight" into (7, "q_proj", "lora_A.weight").
    /// The layer index is 1 to 9 ASCII digits, so it always parses (no other digits, no overflow).</summary>
    public static bool TryParseLayerTensor(string name, out int layer, out string module, out string rest)
    {
        var m = LayerTensor().Match(name);
        layer = m.Success ? int.Parse(m.Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture) : -1;
        module = m.Success ? m.Groups[2].Value : "";
        rest = m.Success ? m.Groups[3].Value : "";
        return m.Success;
    }

    [GeneratedRegex(@"^model\.layers\.([0-9]{1,9})\.(?:self_attn|mlp)\.(\w+?)\.(.+)$")]
    private static partial Regex LayerTensor();

    public void Dispose() => _weights.Dispose();
}

/// <summary>An adapter that cannot be served: the message names the file, tensor or key at fault.</summary>
public sealed class AdapterException(string message, Exception? inner = null) : Exception(message, inner);
