using System.Text;
using System.Text.Json.Nodes;
using PeftServe.Core.Model;
using PeftServe.Core.Quantization;
using PeftServe.Core.SafeTensors;
using PeftServe.Core.Tests.Model;
using PeftServe.Core.Tests.SafeTensors;
using PeftServe.Tests;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Tests.Quantization;

/// <summary>Checkpoints as transformers + bitsandbytes save a model loaded with load_in_4bit: written
/// here from the tiny model in that layout, then loaded straight into NF4 layers.</summary>
public sealed class BitsAndBytesCheckpointTests : IClassFixture<Nf4ModelFixture>
{
    private static readonly string[] LinearNames =
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"];

    private readonly Nf4ModelFixture _f;

    public BitsAndBytesCheckpointTests(Nf4ModelFixture fixture) => _f = fixture;

    private static bool IsLinear(string name) =>
        name.StartsWith("model.layers.", StringComparison.Ordinal) && LinearNames.Any(l => name.EndsWith("." + l + ".weight", StringComparison.Ordinal));

    /// <summary>Writes the tiny model into <paramref name="dir"/> with every decoder linear weight in
    /// bitsandbytes 4-bit form (made by <paramref name="quantize"/>) and the rest as is.</summary>
    private static void WriteBnbModel(string dir, Func<Tensor, Nf4Weight> quantize, Action<string, List<KeyValuePair<string, Tensor>>>? tamper = null)
    {
        using var source = SafeTensorsFile.Open(Path.Combine(TestData.TinyLlamaDir, "model.safetensors"));
        var tensors = new List<KeyValuePair<string, Tensor>>();
        var owned = new List<IDisposable>();
        try
        {
            foreach (var info in source.Tensors)
            {
                var t = source.ToTensor(info.Name);
                owned.Add(t);
                if (!IsLinear(info.Name))
                {
                    tensors.Add(new(info.Name, t));
                    continue;
                }
                var q = quantize(t);
                owned.Add(q);
                var entries = BitsAndBytesFormat.ToTensors(info.Name, q, "float32");
                owned.AddRange(entries.Select(e => e.Value));
                tamper?.Invoke(info.Name, entries);
                tensors.AddRange(entries);
            }
            SafeTensorsWriter.Write(Path.Combine(dir, "model.safetensors"), tensors);
        }
        finally
        {
            foreach (var o in owned) o.Dispose();
        }
        var config = JsonNode.Parse(File.ReadAllText(Path.Combine(TestData.TinyLlamaDir, "config.json")))!.AsObject();
        config["quantization_config"] = new JsonObject
        {
            ["quant_method"] = "bitsandbytes", ["load_in_4bit"] = true, ["bnb_4bit_quant_type"] = "nf4",
            ["bnb_4bit_use_double_quant"] = false, ["bnb_4bit_compute_dtype"] = "float32",
        };
        File.WriteAllText(Path.Combine(dir, "config.json"), config.ToJsonString());
    }

    [Fact]
    public void TheWrittenLayoutIsBitsandbytes()
    {
        torch.manual_seed(1);
        using var w = torch.randn(32, 64);
        using var q = Nf4Weight.Quantize(w);
        var entries = BitsAndBytesFormat.ToTensors("x.weight", q, "bfloat16");
        try
        {
            var byName = entries.ToDictionary(e => e.Key, e => e.Value);
            Assert.Equal(["x.weight", "x.weight.absmax", "x.weight.quant_map", "x.weight.quant_state.bitsandbytes__nf4"], byName.Keys.Order());
            Assert.Equal(new long[] { 1024, 1 }, byName["x.weight"].shape);
            Assert.Equal(ScalarType.Byte, byName["x.weight"].dtype);
            Assert.Equal(new long[] { 32 }, byName["x.weight.absmax"].shape);
            Assert.Equal(ScalarType.Float32, byName["x.weight.absmax"].dtype);
            Assert.Equal(Nf4.CodeBook, byName["x.weight.quant_map"].data<float>().ToArray());
            var json = Encoding.UTF8.GetString(byName["x.weight.quant_state.bitsandbytes__nf4"].data<byte>().ToArray());
            var state = JsonNode.Parse(json)!.AsObject();
            Assert.Equal("nf4", (string?)state["quant_type"]);
            Assert.Equal(64, (int?)state["blocksize"]);
            Assert.Equal("bfloat16", (string?)state["dtype"]);
            Assert.Equal("[32,64]", state["shape"]!.ToJsonString());
        }
        finally
        {
            foreach (var e in entries) e.Value.Dispose();
        }

        using var dq = Nf4Weight.Quantize(w, doubleQuant: true);
        var nested = BitsAndBytesFormat.ToTensors("x.weight", dq);
        try
        {
            var byName = nested.ToDictionary(e => e.Key, e => e.Value);
            Assert.Equal(ScalarType.Byte, byName["x.weight.absmax"].dtype);
            Assert.Equal(new long[] { 1 }, byName["x.weight.nested_absmax"].shape);
            Assert.Equal(new long[] { 256 }, byName["x.weight.nested_quant_map"].shape);
            var state = JsonNode.Parse(Encoding.UTF8.GetString(byName["x.weight.quant_state.bitsandbytes__nf4"].data<byte>().ToArray()))!.AsObject();
            Assert.Equal(256, (int?)state["nested_blocksize"]);
            Assert.Equal("float32", (string?)state["nested_dtype"]);
            Assert.Equal(dq.DoubleQuant!.Segments[0].Offset, (float)(double)state["nested_offset"]!);
        }
        finally
        {
            foreach (var e in nested) e.Value.Dispose();
        }
    }

    [Fact]
    public void PreQuantizedCheckpointLoadsAsNf4AndMatchesReferenceLogits()
    {
        using var dir = new TempDir();
        WriteBnbModel(dir.Path, w => Nf4Weight.Quantize(w));
        using (var ck = SafeTensorsCheckpoint.Open(dir.Path))
        {
            Assert.False(ck.Info("model.layers.0.self_attn.q_proj.weight").DType == SafeTensorDType.F32);
            Assert.True(ck.Contains("model.layers.2.mlp.down_proj.weight.quant_state.bitsandbytes__nf4"));
        }
        // No quantization asked for: the checkpoint's own 4-bit weights are used as they are.
        using var model = LlamaModel.Load(dir.Path, new ModelOptions());
        Assert.Equal("NF4", model.DecoderLinearFormat);
        Assert.Equal(0.5625, model.DecoderLinearBytesPerParameter, 12);
        using var logits = _f.FullForward(model, _f.Expected["input_ids"]);
        LlamaConformanceTests.AssertClose(_f.Expected["logits_nf4"], logits);
    }

    [Fact]
    public void DoubleQuantizedCheckpointLoadsToItsOwnDequantizedWeights()
    {
        // The reference: a float checkpoint whose linear weights are the double-quantized round trip.
        using var bnbDir = new TempDir();
        using var floatDir = new TempDir();
        WriteBnbModel(bnbDir.Path, w => Nf4Weight.Quantize(w, doubleQuant: true));
        using (var source = SafeTensorsFile.Open(Path.Combine(TestData.TinyLlamaDir, "model.safetensors")))
        {
            var tensors = source.Tensors.Select(info =>
            {
                using var t = source.ToTensor(info.Name);
                if (!IsLinear(info.Name)) return new KeyValuePair<string, Tensor>(info.Name, t.alias());
                using var q = Nf4Weight.Quantize(t, doubleQuant: true);
                return new KeyValuePair<string, Tensor>(info.Name, q.Dequantize());
            }).ToList();
            SafeTensorsWriter.Write(Path.Combine(floatDir.Path, "model.safetensors"), tensors);
            foreach (var t in tensors) t.Value.Dispose();
        }
        File.Copy(Path.Combine(TestData.TinyLlamaDir, "config.json"), Path.Combine(floatDir.Path, "config.json"));

        using var quantized = LlamaModel.Load(bnbDir.Path, new ModelOptions());
        using var reference = LlamaModel.Load(floatDir.Path, new ModelOptions());
        Assert.Equal("NF4 (double-quantized absmax)", quantized.DecoderLinearFormat);
        using var a = _f.FullForward(quantized, _f.Expected["input_ids"]);
        using var b = _f.FullForward(reference, _f.Expected["input_ids"]);
        Assert.True((a - b).abs().max().item<float>() <= 1e-5f);
        // And double quantization did move the model away from single-level NF4.
        using var diff = (a - _f.Expected["logits_nf4"]).abs().max();
        Assert.True(diff.item<float>() > 1e-6f);
    }

    private static void SetState(List<KeyValuePair<string, Tensor>> entries, string name, Func<string, string> edit, string? newKey = null)
    {
        int i = entries.FindIndex(e => e.Key.Contains(".quant_state.", StringComparison.Ordinal));
        var json = edit(Encoding.UTF8.GetString(entries[i].Value.data<byte>().ToArray()));
        entries[i] = new(newKey ?? entries[i].Key, torch.tensor(Encoding.UTF8.GetBytes(json), ScalarType.Byte));
        _ = name;
    }

    [Fact]
    public void Fp4IsRejectedNamingTheTensor()
    {
        using var dir = new TempDir();
        WriteBnbModel(dir.Path, w => Nf4Weight.Quantize(w), (name, entries) =>
        {
            if (name == "model.layers.1.mlp.up_proj.weight")
                SetState(entries, name, j => j.Replace("\"nf4\"", "\"fp4\""), name + ".quant_state.bitsandbytes__fp4");
        });
        var e = Assert.Throws<ModelLoadException>(() => LlamaModel.Load(dir.Path, new ModelOptions()).Dispose());
        Assert.Contains("model.layers.1.mlp.up_proj.weight", e.Message);
        Assert.Contains("fp4", e.Message);
    }

    [Fact]
    public void OtherBlockSizesAreRejectedNamingTheTensor()
    {
        using var dir = new TempDir();
        WriteBnbModel(dir.Path, w => Nf4Weight.Quantize(w), (name, entries) =>
        {
            if (name == "model.layers.0.self_attn.o_proj.weight")
                SetState(entries, name, j => j.Replace("\"blocksize\":64", "\"blocksize\":128"));
        });
        var e = Assert.Throws<ModelLoadException>(() => LlamaModel.Load(dir.Path, new ModelOptions()).Dispose());
        Assert.Contains("model.layers.0.self_attn.o_proj.weight", e.Message);
        Assert.Contains("blocksize 128", e.Message);
    }

    [Fact]
    public void AShapeThatDisagreesWithTheConfigIsRejected()
    {
        using var dir = new TempDir();
        WriteBnbModel(dir.Path, w => Nf4Weight.Quantize(w), (name, entries) =>
        {
            if (name == "model.layers.0.mlp.down_proj.weight")
                SetState(entries, name, j => j.Replace("\"shape\":[64,160]", "\"shape\":[160,64]"));
        });
        var e = Assert.Throws<ModelLoadException>(() => LlamaModel.Load(dir.Path, new ModelOptions()).Dispose());
        Assert.Contains("model.layers.0.mlp.down_proj.weight", e.Message);
        Assert.Contains("[160,64]", e.Message);
    }

    [Fact]
    public void FusedPartsMustAllBeQuantized()
    {
        // k_proj stored as float beside 4-bit q_proj and v_proj.
        using var dir = new TempDir();
        using var source = SafeTensorsFile.Open(Path.Combine(TestData.TinyLlamaDir, "model.safetensors"));
        WriteBnbModel(dir.Path, w => Nf4Weight.Quantize(w), (name, entries) =>
        {
            if (name != "model.layers.0.self_attn.k_proj.weight") return;
            foreach (var e in entries) e.Value.Dispose();
            entries.Clear();
            entries.Add(new(name, source.ToTensor(name)));
        });
        var e = Assert.Throws<ModelLoadException>(() => LlamaModel.Load(dir.Path, new ModelOptions()).Dispose());
        Assert.Contains("model.layers.0.self_attn.q_proj.weight", e.Message);
        Assert.Contains("only some", e.Message);
    }
}
