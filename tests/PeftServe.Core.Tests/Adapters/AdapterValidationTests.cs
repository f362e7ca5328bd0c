using System.Text.Json.Nodes;
using PeftServe.Core.Adapters;
using PeftServe.Core.Model;
using PeftServe.Core.SafeTensors;
using PeftServe.Tests;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Tests.Adapters;

/// <summary>Bad adapters are refused before anything reaches the device, with the offending tensor or key named.</summary>
public sealed class AdapterValidationTests : IDisposable
{
    private readonly string _tmp = Directory.CreateTempSubdirectory("peftserve-adapters-").FullName;
    private readonly ModelConfig _config = ModelConfig.Load(TestData.TinyLlamaDir);

    public void Dispose() => Directory.Delete(_tmp, true);

    private string Copy(string fixture)
    {
        var dir = Path.Combine(_tmp, fixture + Guid.NewGuid().ToString("N")[..6]);
        Directory.CreateDirectory(dir);
        foreach (var f in Directory.GetFiles(TestData.AdapterDir(fixture))) File.Copy(f, Path.Combine(dir, Path.GetFileName(f)));
        return dir;
    }

    private AdapterException Refused(string dir, AdapterLimits? limits = null) =>
        Assert.Throws<AdapterException>(() => AdapterMethods.Load(dir, "x", _config, limits ?? new AdapterLimits()).Dispose());

    private static void Rewrite(string dir, Func<Dictionary<string, Tensor>, Dictionary<string, Tensor>> change)
    {
        var path = Path.Combine(dir, AdapterFolder.WeightsFile);
        Dictionary<string, Tensor> tensors;
        using (var f = SafeTensorsFile.Open(path)) tensors = f.Tensors.ToDictionary(t => t.Name, t => f.ToTensor(t.Name));
        SafeTensorsWriter.Write(path, change(tensors));
    }

    private static void EditConfig(string dir, Action<JsonObject> change)
    {
        var path = Path.Combine(dir, AdapterFolder.ConfigFile);
        var json = (JsonObject)JsonNode.Parse(File.ReadAllText(path))!;
        change(json);
        File.WriteAllText(path, json.ToJsonString());
    }

    [Fact]
    public void EveryFixtureAdapterLoadsWithItsMethod()
    {
        foreach (var (name, method) in new[] { ("lora-r8-all", "lora"), ("prefix-6", "prefix"), ("prompt-5", "prompt"), ("ptuning-mlp-5", "prompt"), ("ia3", "ia3"), ("llama-adapter-4x2", "llama-adapter") })
        {
            using var a = AdapterMethods.Load(TestData.AdapterDir(name), name, _config, new AdapterLimits());
            Assert.Equal(method, a.Method.Name);
            Assert.True(a.ByteSize > 0);
        }
    }

    [Fact]
    public void LoraRankAboveTheLimitIsRefused() =>
        Assert.Contains("rank 8", Refused(Copy("lora-r8-all"), new AdapterLimits { MaxRank = 4 }).Message);

    [Fact]
    public void LoraShapeMismatchNamesTheTensor()
    {
        var dir = Copy("lora-r4-qv");
        Rewrite(dir, t => { t["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 63); return t; });
        Assert.Contains("layers.1.self_attn.q_proj.lora_A.weight", Refused(dir).Message);
    }

    [Fact]
    public void LoraLayerBeyondTheModelIsRefused()
    {
        var dir = Copy("lora-r4-qv");
        Rewrite(dir, t => { t["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64); return t; });
        Assert.Contains("layer 9", Refused(dir).Message);
    }

    [Fact]
    public void MissingHalfOfALoraPairIsRefused()
    {
        var dir = Copy("lora-r4-qv");
        Rewrite(dir, t => { t.Remove("base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"); return t; });
        Assert.Contains("layers.0.self_attn.v_proj has lora_B.weight missing", Refused(dir).Message);
    }

    [Fact]
    public void NonFiniteWeightsAreRefused()
    {
        var dir = Copy("lora-r4-qv");
        Rewrite(dir, t => { t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] = torch.full(64, 4, float.NaN); return t; });
        Assert.Contains("NaN", Refused(dir).Message);
    }

    [Fact]
    public void UnknownTensorInALoraIsNamed()
    {
        var dir = Copy("lora-r4-qv");
        Rewrite(dir, t => { t["base_model.model.model.norm.lora_A.weight"] = torch.zeros(4, 64); return t; });
        Assert.Contains("model.norm.lora_A.weight", Refused(dir).Message);
    }

    [Fact]
    public void HalfALoraOnTheLmHeadIsNamed()
    {
        var dir = Copy("lora-r4-qv");
        Rewrite(dir, t => { t["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, 64); return t; });
        Assert.Contains("lm_head has lora_B.weight missing", Refused(dir).Message);
    }

    [Fact]
    public void DoraAndUnknownPeftTypeAreRefused()
    {
        var dir = Copy("lora-r4-qv");
        EditConfig(dir, c => c["use_dora"] = true);
        Assert.Contains("use_dora", Refused(dir).Message);
        EditConfig(dir, c => c["peft_type"] = "VERA");
        Assert.Contains("VERA", Refused(dir).Message);
    }

    [Fact]
    public void PrefixForAnotherDepthIsRefused()
    {
        var dir = Copy("prefix-6");
        EditConfig(dir, c => c["num_layers"] = 5);
        Assert.Contains("num_layers", Refused(dir).Message);
        dir = Copy("prefix-6");
        Rewrite(dir, t => { t["prompt_embeddings"] = torch.zeros(6, 100); return t; });
        Assert.Contains("prompt_embeddings", Refused(dir).Message);
    }

    [Fact]
    public void TooManyVirtualTokensAreRefused() =>
        Assert.Contains("num_virtual_tokens", Refused(Copy("prompt-5"), new AdapterLimits { MaxVirtualTokens = 4 }).Message);

    [Fact]
    public void LlamaAdapterPromptOutsideTheTopLayersIsRefused()
    {
        var dir = Copy("llama-adapter-4x2");
        EditConfig(dir, c => c["adapter_layers"] = 1);
        Assert.Contains("layer 1", Refused(dir).Message);
    }

    [Fact]
    public void MissingFilesAndPickleCheckpointsAreExplained()
    {
        var dir = Path.Combine(_tmp, "empty");
        Directory.CreateDirectory(dir);
        Assert.Contains("adapter_config.json", Refused(dir).Message);
        File.Copy(Path.Combine(TestData.AdapterDir("ia3"), AdapterFolder.ConfigFile), Path.Combine(dir, AdapterFolder.ConfigFile));
        File.WriteAllText(Path.Combine(dir, "adapter_model.bin"), "pickle");
        Assert.Contains("pickle", Refused(dir).Message);
    }

    [Fact]
    public void PrefixReparameterizationIsFoldedToThePlainPrefixes()
    {
        // An MLP-form checkpoint whose output equals the fixture's plain prefixes must serve identically.
        var dir = Path.Combine(_tmp, "prefix-mlp");
        using var plain = SafeTensorsFile.Open(Path.Combine(TestData.AdapterDir("prefix-6"), AdapterFolder.WeightsFile));
        using var target = plain.ToTensor(plain.Tensors[0].Name);                    // [6,192]
        var e = torch.eye(6);                                                         // embedding = identity rows
        var w1 = torch.eye(6) * 3; var b1 = torch.zeros(6);                          // tanh(3 e_i)
        var hidden = torch.tanh(torch.eye(6) * 3);
        var w2 = torch.linalg.solve(hidden, target).t().contiguous();                 // W2 tanh(3 I) = target
        SyntheticAdapters.Write(dir, new { peft_type = "PREFIX_TUNING", num_virtual_tokens = 6, num_layers = 3, prefix_projection = true, encoder_hidden_size = 6 },
            [new("base_model.model.prompt_encoder.embedding.weight", e), new("base_model.model.prompt_encoder.transform.0.weight", w1),
             new("base_model.model.prompt_encoder.transform.0.bias", b1), new("base_model.model.prompt_encoder.transform.2.weight", w2),
             new("base_model.model.prompt_encoder.transform.2.bias", torch.zeros(192))]);
        using var folded = (PeftServe.Core.Adapters.Prefix.PrefixAdapter)AdapterMethods.Load(dir, "m", _config, new AdapterLimits());
        using var reference = (PeftServe.Core.Adapters.Prefix.PrefixAdapter)AdapterMethods.Load(TestData.AdapterDir("prefix-6"), "p", _config, new AdapterLimits());
        Assert.True((folded.KeysValues - reference.KeysValues).abs().max().item<float>() < 1e-4f);
    }

    [Fact]
    public void SyntheticAdaptersOfEveryPeftMethodLoad()
    {
        foreach (var dir in new[]
        {
            SyntheticAdapters.Lora(Path.Combine(_tmp, "l"), _config, 16, 1),
            SyntheticAdapters.Prefix(Path.Combine(_tmp, "p"), _config, 7, 2),
            SyntheticAdapters.PromptTuning(Path.Combine(_tmp, "t"), _config, 3, 3),
            SyntheticAdapters.IA3(Path.Combine(_tmp, "i"), _config, 4),
            SyntheticAdapters.LlamaAdapter(Path.Combine(_tmp, "a"), _config, 5, 2, 5),
        })
            AdapterMethods.Load(dir, "s", _config, new AdapterLimits()).Dispose();
    }
}
