using System.Text;
using System.Text.Json;
using PeftServe.Core.Model;
using PeftServe.Core.SafeTensors;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Quantization;

/// <summary>The tensor layout bitsandbytes (Params4bit / QuantState.as_dict(packed=True)) gives a 4-bit
/// linear weight W when transformers saves a model loaded with load_in_4bit:
/// <list type="bullet">
/// <item><c>W</c>: the packed codes, uint8 [n/2, 1] (n = out*in; first value of a pair in the high nibble).</item>
/// <item><c>W.absmax</c>: float32 [n/blocksize]; with double quantization ("nested") uint8 codes instead.</item>
/// <item><c>W.quant_map</c>: float32 [16], the 4-bit code book.</item>
/// <item><c>W.nested_absmax</c> float32 [ceil(n/blocksize/256)] and <c>W.nested_quant_map</c> float32 [256]
/// (the 8-bit dynamic code): only with double quantization.</item>
/// <item><c>W.quant_state.bitsandbytes__nf4</c> (or <c>__fp4</c>): uint8 bytes of a JSON object with
/// "quant_type", "blocksize", "dtype" (e.g. "bfloat16"), "shape" ([out, in]) and, with double quantization,
/// "nested_blocksize", "nested_dtype", "nested_offset" (the mean subtracted before the 8-bit step).</item>
/// </list>
/// Dequantized: absmax = nested_quant_map[absmax] * nested_absmax[block of 256] + nested_offset, then
/// W = quant_map[code] * absmax[block of blocksize]. Only NF4 with block size 64 is supported.</summary>
public static class BitsAndBytesFormat
{
    public const string QuantStateInfix = ".quant_state.bitsandbytes__";

    /// <summary>The tensors (bitsandbytes names and layout) that store <paramref name="weight"/> as the
    /// linear weight <paramref name="name"/> (e.g. "model.layers.0.mlp.down_proj.weight").
    /// <paramref name="dtypeName"/> is the "dtype" recorded in the quant state (the compute dtype the model
    /// was loaded in: "float32", "bfloat16", "float16"). A fused weight with several double-quantization
    /// segments cannot be written (bitsandbytes keeps one offset per weight).</summary>
    public static List<KeyValuePair<string, Tensor>> ToTensors(string name, Nf4Weight weight, string dtypeName = "float32")
    {
        ArgumentNullException.ThrowIfNull(weight);
        var result = new List<KeyValuePair<string, Tensor>>
        {
            new(name, weight.Packed.reshape(weight.ElementCount / 2, 1)),
        };
        var state = new Dictionary<string, object>
        {
            ["quant_type"] = "nf4",
            ["blocksize"] = Nf4.BlockSize,
            ["dtype"] = dtypeName,
            ["shape"] = new[] { weight.Rows, weight.Columns },
        };
        if (weight.DoubleQuant is { } dq)
        {
            if (dq.Segments.Count != 1)
                throw new NotSupportedException($"'{name}': a fused weight of {dq.Segments.Count} double-quantization segments has no bitsandbytes form");
            var s = dq.Segments[0];
            result.Add(new(name + ".absmax", s.Codes.alias()));
            result.Add(new(name + ".quant_map", Nf4.CodeTable(weight.Device)));
            result.Add(new(name + ".nested_absmax", s.NestedAbsmax.alias()));
            result.Add(new(name + ".nested_quant_map", s.NestedMap.alias()));
            state["nested_blocksize"] = s.NestedBlockSize;
            state["nested_dtype"] = "float32";
            state["nested_offset"] = (double)s.Offset;
        }
        else
        {
            result.Add(new(name + ".absmax", weight.Absmax!.alias()));
            result.Add(new(name + ".quant_map", Nf4.CodeTable(weight.Device)));
        }
        var json = JsonSerializer.SerializeToUtf8Bytes(state);
        result.Add(new(name + QuantStateInfix + "nf4", torch.tensor(json, ScalarType.Byte)));
        return result;
    }
}

/// <summary>Finds and reads bitsandbytes 4-bit weights (<see cref="BitsAndBytesFormat"/>) in a checkpoint,
/// straight into <see cref="Nf4Weight"/> (no float copy of the weight is ever made).</summary>
public sealed class BitsAndBytesReader
{
    private readonly SafeTensorsCheckpoint _checkpoint;
    private readonly Dictionary<string, string> _quantStateOf = new(StringComparer.Ordinal);   // weight name -> quant_state tensor

    public BitsAndBytesReader(SafeTensorsCheckpoint checkpoint)
    {
        _checkpoint = checkpoint;
        foreach (var name in checkpoint.Names)
        {
            int at = name.IndexOf(".quant_state.", StringComparison.Ordinal);
            if (at > 0) _quantStateOf[name[..at]] = name;
        }
    }

    /// <summary>True when the checkpoint stores <paramref name="weightName"/> 4-bit quantized (it has a
    /// quant_state or an absmax tensor beside it).</summary>
    public bool IsQuantized(string weightName) =>
        _quantStateOf.ContainsKey(weightName) || _checkpoint.Contains(weightName + ".absmax");

    /// <summary>Reads the 4-bit weight <paramref name="weightName"/>, checks it against the expected
    /// [out, in] <paramref name="shape"/>, and puts it on <paramref name="device"/>.</summary>
    public Nf4Weight Read(string weightName, long[] shape, Device device)
    {
        string Where(string detail) => $"{_checkpoint.Path}: 4-bit weight '{weightName}': {detail}";
        if (!_quantStateOf.TryGetValue(weightName, out var stateName))
            throw new ModelLoadException(Where("it has an absmax tensor but no quant_state.bitsandbytes__* tensor"));
        if (!stateName.StartsWith(weightName + BitsAndBytesFormat.QuantStateInfix, StringComparison.Ordinal))
            throw new ModelLoadException(Where($"unrecognised quant state tensor '{stateName}'"));
        var kind = stateName[(weightName.Length + BitsAndBytesFormat.QuantStateInfix.Length)..];
        if (kind != "nf4")
            throw new ModelLoadException(Where($"quant_type '{kind}' (tensor '{stateName}') is not supported; only nf4 is"));

        using var doc = ParseState(stateName, Where);
        var root = doc.RootElement;
        string quantType = GetString(root, "quant_type", Where);
        if (quantType != "nf4")
            throw new ModelLoadException(Where($"quant_type '{quantType}' is not supported; only nf4 is"));
        long blocksize = GetLong(root, "blocksize", Where);
        if (blocksize != Nf4.BlockSize)
            throw new ModelLoadException(Where($"blocksize {blocksize} is not supported; only {Nf4.BlockSize} is"));
        if (!root.TryGetProperty("shape", out var shapeElement) || shapeElement.ValueKind != JsonValueKind.Array)
            throw new ModelLoadException(Where("its quant state has no \"shape\" array"));
        var stored = shapeElement.EnumerateArray().Select(e => e.GetInt64()).ToArray();
        if (!stored.SequenceEqual(shape))
            throw new ModelLoadException(Where($"quant state shape [{string.Join(",", stored)}], config.json implies [{string.Join(",", shape)}]"));
        long n = shape[0] * shape[1];
        if (n % Nf4.BlockSize != 0)
            throw new ModelLoadException(Where($"{n} elements are not a multiple of the block size {Nf4.BlockSize}"));
        long blocks = n / Nf4.BlockSize;

        CheckTensor(weightName, SafeTensorDType.U8, n / 2, Where);
        CheckTensor(weightName + ".quant_map", SafeTensorDType.F32, 16, Where);
        using (var map = _checkpoint.ToTensor(weightName + ".quant_map"))
        {
            var values = map.data<float>().ToArray();
            for (int i = 0; i < 16; i++)
                if (Math.Abs(values[i] - Nf4.CodeBook[i]) > 1e-6)
                    throw new ModelLoadException(Where($"quant_map[{i}] = {values[i]} is not the NF4 code book's {Nf4.CodeBook[i]}"));
        }

        bool nested = root.TryGetProperty("nested_offset", out _) || _checkpoint.Contains(weightName + ".nested_absmax");
        var packed = _checkpoint.ToTensor(weightName, device).reshape(-1);
        try
        {
            if (!nested)
            {
                CheckTensor(weightName + ".absmax", null, blocks, Where);
                var absmax = _checkpoint.ToTensor(weightName + ".absmax", device, ScalarType.Float32).reshape(-1);
                return new Nf4Weight(shape[0], shape[1], packed, absmax, null);
            }
            long nestedBlock = GetLong(root, "nested_blocksize", Where);
            if (nestedBlock <= 0 || nestedBlock > int.MaxValue)
                throw new ModelLoadException(Where($"nested_blocksize {nestedBlock} is not a positive block size"));
            double offset = root.TryGetProperty("nested_offset", out var off) && off.ValueKind == JsonValueKind.Number
                ? off.GetDouble() : throw new ModelLoadException(Where("double-quantized, but its quant state has no numeric \"nested_offset\""));
            CheckTensor(weightName + ".absmax", SafeTensorDType.U8, blocks, Where);
            CheckTensor(weightName + ".nested_absmax", null, (blocks + nestedBlock - 1) / nestedBlock, Where);
            CheckTensor(weightName + ".nested_quant_map", SafeTensorDType.F32, 256, Where);
            // The stored map is used as stored; where it is the standard one, the per-device copy is shared.
            var map = _checkpoint.ToTensor(weightName + ".nested_quant_map").reshape(-1);
            bool standard = map.data<float>().ToArray().SequenceEqual(DynamicQuant8.DynamicMap);
            if (standard) map.Dispose();
            else if (device.type != DeviceType.CPU)
            {
                var moved = map.to(device);
                map.Dispose();
                map = moved;
            }
            var segment = new DoubleQuantAbsmax.Segment(
                _checkpoint.ToTensor(weightName + ".absmax", device).reshape(-1),
                _checkpoint.ToTensor(weightName + ".nested_absmax", device, ScalarType.Float32).reshape(-1),
                standard ? DynamicQuant8.SharedMap(device) : map,
                (float)offset, (int)nestedBlock, MapIsShared: standard);
            return new Nf4Weight(shape[0], shape[1], packed, null, new DoubleQuantAbsmax([segment]));
        }
        catch
        {
            packed.Dispose();
            throw;
        }
    }

    private JsonDocument ParseState(string stateName, Func<string, string> where)
    {
        var info = _checkpoint.Info(stateName);
        if (info.DType != SafeTensorDType.U8)
            throw new ModelLoadException(where($"quant state '{stateName}' is {info.DType.HeaderName()}, not U8 JSON bytes"));
        try
        {
            var text = new UTF8Encoding(false, true).GetString(_checkpoint.GetBytes(stateName));
            var doc = JsonDocument.Parse(text);
            if (doc.RootElement.ValueKind != JsonValueKind.Object)
            {
                doc.Dispose();
                throw new ModelLoadException(where($"quant state '{stateName}' is not a JSON object"));
            }
            return doc;
        }
        catch (Exception e) when (e is JsonException or DecoderFallbackException)
        {
            throw new ModelLoadException(where($"quant state '{stateName}' is not UTF-8 JSON: {e.Message}"), e);
        }
    }

    private void CheckTensor(string name, SafeTensorDType? dtype, long elements, Func<string, string> where)
    {
        if (!_checkpoint.Contains(name))
            throw new ModelLoadException(where($"the checkpoint has no tensor '{name}'"));
        var info = _checkpoint.Info(name);
        if (dtype is { } d && info.DType != d)
            throw new ModelLoadException(where($"tensor '{name}' is {info.DType.HeaderName()}, expected {d.HeaderName()}"));
        if (dtype is null && info.DType is not (SafeTensorDType.F32 or SafeTensorDType.F16 or SafeTensorDType.BF16))
            throw new ModelLoadException(where($"tensor '{name}' is {info.DType.HeaderName()}, expected a float type"));
        if (info.ElementCount != elements)
            throw new ModelLoadException(where($"tensor '{name}' [{string.Join(",", info.Shape)}] has {info.ElementCount} elements, expected {elements}"));
    }

    private static string GetString(JsonElement root, string key, Func<string, string> where) =>
        root.TryGetProperty(key, out var v) && v.ValueKind == JsonValueKind.String
            ? v.GetString()!
            : throw new ModelLoadException(where($"its quant state has no string \"{key}\""));

    private static long GetLong(JsonElement root, string key, Func<string, string> where) =>
        root.TryGetProperty(key, out var v) && v.ValueKind == JsonValueKind.Number && v.TryGetInt64(out var x)
            ? x
            : throw new ModelLoadException(where($"its quant state has no integer \"{key}\""));
}
