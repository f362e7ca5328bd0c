using System.Text.Json;
using PeftServe.Core.Adapters;
using PeftServe.Core.Engine;
using PeftServe.Core.Generation;
using PeftServe.Core.Model;
using PeftServe.Core.SafeTensors;
using PeftServe.Core.Tests.SafeTensors;
using PeftServe.Tests;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Tests.Adapters;

/// <summary>LoRA variants made by Hugging Face PEFT itself (0.21, on the GPU machine, by
/// <c>loadtests/gpu/peft_variants.py make</c>; see tests/fixtures/peft-variants/README.md), served here with
/// the logits PEFT computed for them: DoRA (with rsLoRA and alpha patterns, on a base with biases, on the
/// embedding and the LM head), trained biases, lora_bias, saved lm_head and embed_tokens, LoRA on the
/// embedding and LM head, and the tied-embedding cases with and without ensure_weight_tying. Each alone,
/// and the tiny-base ones mixed in one batch (row i with adapter i), float32 on the CPU, within 1e-4.</summary>
public sealed class PeftMadeVariantTests : IDisposable
{
    private const double Tolerance = 1e-4;
    private static readonly string Dir = Path.Combine(TestData.FixturesDir, "peft-variants");
    private readonly TempDir _models = new();

    public void Dispose() => _models.Dispose();

    private sealed record Variant(string Name, string Base);

    private static (List<Variant> Variants, List<string> Mixed) Manifest()
    {
        using var doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(Dir, "manifest.json")));
        var variants = doc.RootElement.GetProperty("variants").EnumerateArray()
            .Select(v => new Variant(v.GetProperty("name").GetString()!, v.GetProperty("base").GetString()!)).ToList();
        var mixed = doc.RootElement.GetProperty("mixed").EnumerateArray().Select(v => v.GetString()!).ToList();
        return (variants, mixed);
    }

    public static TheoryData<string> Names() => new(Manifest().Variants.Select(v => v.Name));

    /// <summary>The base a variant was made on: the tiny Llama, or a copy of it with PEFT's biases added
    /// (biases.safetensors) or with tied embeddings (no lm_head.weight), as the fixture script built them.</summary>
    private string BaseModel(string name)
    {
        if (name == "tiny") return TestData.TinyLlamaDir;
        var dir = Path.Combine(_models.Path, name);
        if (Directory.Exists(dir)) return dir;
        Directory.CreateDirectory(dir);
        File.Copy(Path.Combine(Dir, "models", name, "config.json"), Path.Combine(dir, "config.json"));
        File.Copy(Path.Combine(TestData.TinyLlamaDir, "tokenizer.json"), Path.Combine(dir, "tokenizer.json"));
        using var scope = torch.NewDisposeScope();
        var tensors = new Dictionary<string, Tensor>();
        using (var tiny = SafeTensorsFile.Open(Path.Combine(TestData.TinyLlamaDir, "model.safetensors")))
            foreach (var t in tiny.Tensors)
                if (!(name == "tied" && t.Name == "lm_head.weight")) tensors[t.Name] = tiny.ToTensor(t.Name);
        var biases = Path.Combine(Dir, "models", name, "biases.safetensors");
        if (File.Exists(biases))
        {
            using var file = SafeTensorsFile.Open(biases);
            foreach (var t in file.Tensors) tensors[t.Name] = file.ToTensor(t.Name);
        }
        SafeTensorsWriter.Write(Path.Combine(dir, "model.safetensors"), tensors);
        return dir;
    }

    private static Tensor Read(string file, string tensor)
    {
        using var f = SafeTensorsFile.Open(Path.Combine(Dir, file));
        return f.ToTensor(tensor);
    }

    /// <summary>PeftServe's logits for <paramref name="input"/> with row r served by adapters[r].</summary>
    private Tensor Logits(string baseName, string input, IReadOnlyList<string> adapters)
    {
        using var model = LlamaModel.Load(BaseModel(baseName), new ModelOptions());
        using var ids = Read(input, "input_ids");
        using var manager = new AdapterManager(model, new AdapterLimits { EmbeddingSlots = Math.Max(1, adapters.Count) }, null, hostCacheBytes: 1L << 28);
        var resident = adapters.Select(a => (ResidentAdapter?)manager.Acquire(Path.Combine(Dir, "adapters", a))).ToList();
        try { return FullLogits.Compute(model, ids, resident.Count == 0 ? null : resident); }
        finally { foreach (var r in resident) manager.Release(r!); }
    }

    [Theory]
    [MemberData(nameof(Names))]
    public void ServedAloneAsPeftComputesIt(string name)
    {
        var variant = Manifest().Variants.Single(v => v.Name == name);
        using var expected = Read(Path.Combine("peft", name + ".safetensors"), "logits");
        using var ours = Logits(variant.Base, "input.safetensors", [name, name]);
        using var baseOnly = Logits(variant.Base, "input.safetensors", []);
        double diff = (ours - expected).abs().max().item<float>();
        double moved = (expected - baseOnly).abs().max().item<float>();
        Assert.True(moved > 100 * Tolerance, $"{name}: the adapter barely changes the logits ({moved:E2}), so the check would be empty");
        Assert.True(diff <= Tolerance, $"{name}: max |ours - PEFT| = {diff:E2} (the adapter moves the logits by {moved:E2})");
    }

    [Fact]
    public void TinyBaseVariantsMixedInOneBatch()
    {
        var mixed = Manifest().Mixed;
        using var ours = Logits("tiny", "mixed_input.safetensors", mixed);
        for (int i = 0; i < mixed.Count; i++)
        {
            using var expected = Read(Path.Combine("peft", mixed[i] + ".safetensors"), "logits");
            double diff = (ours[i] - expected[i % 2]).abs().max().item<float>();
            Assert.True(diff <= Tolerance, $"row {i} ({mixed[i]}): max |ours - PEFT| = {diff:E2}");
        }
    }
}
