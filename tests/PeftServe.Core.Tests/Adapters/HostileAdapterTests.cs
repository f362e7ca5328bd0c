using System.Text.Json.Nodes;
using PeftServe.Core.Adapters;
using PeftServe.Core.Model;
using PeftServe.Core.SafeTensors;
using PeftServe.Tests;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Tests.Adapters;

/// <summary>Adapters made to break the loader, as an attacker uploading them would: configs that
/// disagree with their tensors, malformed names and values, hostile patterns. Each must be refused
/// with an <see cref="AdapterException"/> naming the problem (the server's 422), never another
/// exception (a 500), and must leave no tensor or file mapping behind.</summary>
public sealed class HostileAdapterTests : IDisposable
{
    private readonly string _tmp = Directory.CreateTempSubdirectory("peftserve-hostile-").FullName;
    private readonly ModelConfig _config = ModelConfig.Load(TestData.TinyLlamaDir);

    public void Dispose() => Directory.Delete(_tmp, true);

    private string Copy(string fixture)
    {
        var dir = Path.Combine(_tmp, fixture + Guid.NewGuid().ToString("N")[..6]);
        Directory.CreateDirectory(dir);
        foreach (var f in Directory.GetFiles(TestData.AdapterDir(fixture))) File.Copy(f, Path.Combine(dir, Path.GetFileName(f)));
        return dir;
    }

    /// <summary>Both ways of reading an adapter (full load, and the upload's metadata-only check) refuse it alike.</summary>
    private AdapterException Refused(string dir)
    {
        var load = Assert.Throws<AdapterException>(() => AdapterMethods.Load(dir, "x", _config, new AdapterLimits()).Dispose());
        var validate = Assert.Throws<AdapterException>(() => AdapterMethods.Validate(dir, "x", _config, new AdapterLimits()));
        Assert.Equal(load.Message, validate.Message);
        return load;
    }

    private void Accepted(string dir)
    {
        AdapterMethods.Load(dir, "x", _config, new AdapterLimits()).Dispose();
        AdapterMethods.Validate(dir, "x", _config, new AdapterLimits());
    }

    private static void EditConfig(string dir, Action<JsonObject> change)
    {
        var path = Path.Combine(dir, AdapterFolder.ConfigFile);
        var json = (JsonObject)JsonNode.Parse(File.ReadAllText(path))!;
        change(json);
        File.WriteAllText(path, json.ToJsonString());
    }

    private static void Rewrite(string dir, Func<Dictionary<string, Tensor>, Dictionary<string, Tensor>> change)
    {
        var path = Path.Combine(dir, AdapterFolder.WeightsFile);
        Dictionary<string, Tensor> tensors;
        using (var f = SafeTensorsFile.Open(path)) tensors = f.Tensors.ToDictionary(t => t.Name, t => f.ToTensor(t.Name));
        SafeTensorsWriter.Write(path, change(tensors));
        foreach (var t in tensors.Values) t.Dispose();
    }

    /// <summary>Renames one tensor (the name is what the attack is about; the data stays).</summary>
    private static void Rename(string dir, string from, string to) =>
        Rewrite(dir, t => { var x = t[from]; t.Remove(from); t[to] = x; return t; });

    // ---- config against tensors ----

    [Fact]
    public void ALoraRankThatIsNotTheTensorsRankIsRefused()
    {
        var dir = Copy("lora-r4-qv");
        EditConfig(dir, c => c["r"] = 8);
        var e = Refused(dir);
        Assert.Contains("rank 4 in its tensors", e.Message);
        Assert.Contains("rank 8 ('r')", e.Message);

        // rank_pattern decides per module, as in PEFT.
        EditConfig(dir, c => c["rank_pattern"] = new JsonObject { ["q_proj"] = 4, ["v_proj"] = 4 });
        Accepted(dir);
        EditConfig(dir, c => c["rank_pattern"] = new JsonObject { ["layers\\.1\\.self_attn\\.v_proj"] = 2, ["q_proj"] = 4, ["v_proj"] = 4 });
        Assert.Contains("model.layers.1.self_attn.v_proj has rank 4 in its tensors, but the config gives it rank 2 (from 'rank_pattern')", Refused(dir).Message);
    }

    [Fact]
    public void LoraTargetModulesMustMatchTheWeightsBothWays()
    {
        var dir = Copy("lora-r4-qv");   // weights on q_proj and v_proj of every layer
        EditConfig(dir, c => c["target_modules"] = new JsonArray("q_proj"));
        Assert.Contains("the weights include model.layers.0.self_attn.v_proj, which the config does not target (target_modules [\"q_proj\"])", Refused(dir).Message);

        EditConfig(dir, c => c["target_modules"] = new JsonArray("q_proj", "v_proj", "k_proj"));
        Assert.Contains("the config targets model.layers.0.self_attn.k_proj", Refused(dir).Message);

        EditConfig(dir, c => { c["target_modules"] = new JsonArray("q_proj", "v_proj"); c["layers_to_transform"] = new JsonArray(0, 2); });
        Assert.Contains("model.layers.1.self_attn.q_proj, which the config does not target", Refused(dir).Message);

        // A string is a regular expression over the full module name (PEFT's re.fullmatch).
        EditConfig(dir, c => { c.Remove("layers_to_transform"); c["target_modules"] = @"model\.layers\.\d+\.self_attn\.(q|v)_proj"; });
        Accepted(dir);
        EditConfig(dir, c => c["target_modules"] = "q_proj");   // matches no full name
        Assert.Contains("which the config does not target (target_modules \"q_proj\")", Refused(dir).Message);
        EditConfig(dir, c => c["target_modules"] = "all-linear");
        Assert.Contains("the config targets model.layers.0.self_attn.k_proj", Refused(dir).Message);
        EditConfig(dir, c => { c["target_modules"] = "all-linear"; c["exclude_modules"] = new JsonArray("k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"); });
        Accepted(dir);
    }

    [Fact]
    public void Ia3TargetAndFeedForwardModulesMustMatchTheWeights()
    {
        var dir = Copy("ia3");   // k_proj, v_proj (output) and down_proj (input) of every layer
        EditConfig(dir, c => c["target_modules"] = new JsonArray("k_proj", "down_proj"));
        Assert.Contains("the weights include model.layers.0.self_attn.v_proj, which the config does not target", Refused(dir).Message);

        dir = Copy("ia3");
        EditConfig(dir, c => c["feedforward_modules"] = new JsonArray("down_proj", "up_proj"));
        Assert.Contains("feedforward_modules [\"down_proj\", \"up_proj\"] selects model.layers.0.mlp.up_proj, which is not among the targets", Refused(dir).Message);

        dir = Copy("ia3");
        EditConfig(dir, c => c["feedforward_modules"] = new JsonArray());   // down_proj's vector is then an output scale [hidden,1], not [1,inter]
        Assert.Contains("down_proj.ia3_l", Refused(dir).Message);
    }

    [Fact]
    public void PromptLearningConfigsMustMatchTheModel()
    {
        var dir = Copy("prompt-5");
        EditConfig(dir, c => c["token_dim"] = 128);
        Assert.Contains("token_dim 128 does not match the base model's hidden size 64", Refused(dir).Message);

        dir = Copy("prefix-6");
        EditConfig(dir, c => c["token_dim"] = 64);
        Assert.Contains("token_dim 64 does not match the base model's key/value width 32", Refused(dir).Message);
        dir = Copy("prefix-6");
        EditConfig(dir, c => c["num_attention_heads"] = 4);
        Assert.Contains("num_attention_heads 4", Refused(dir).Message);
    }

    // ---- paths that used to end in an unexpected exception (a 500) ----

    [Theory]
    [InlineData("model.layers.\u0663.self_attn.q_proj.lora_A.weight")]           // Arabic-Indic three: \d matched it, int.Parse did not
    [InlineData("model.layers.99999999999.self_attn.q_proj.lora_A.weight")]       // overflowed int.Parse
    public void LayerIndicesThatAreNotSmallAsciiNumbersAreRefused(string name)
    {
        var dir = Copy("lora-r4-qv");
        Rename(dir, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "base_model.model." + name);
        Assert.Contains(name, Refused(dir).Message);
    }

    [Fact]
    public void BitFitLayerIndicesInOtherDigitsAreRefused()
    {
        var dir = Path.Combine(_tmp, "bitfit");
        SyntheticAdapters.Write(dir, new { peft_type = "BITFIT" }, [new("base_model.model.model.layers.\u0661.mlp.up_proj.bias", torch.zeros(_config.IntermediateSize))]);
        Assert.Contains("is not a BitFit bias", Refused(dir).Message);
    }

    [Theory]
    [InlineData("[\"down_proj\", null]", "holds null")]
    [InlineData("[\"down_proj\", 7]", "holds 7")]
    [InlineData("{\"a\": 1}", "must be a string or a list")]
    public void Ia3FeedForwardModulesOfTheWrongTypeAreRefused(string value, string complaint)
    {
        var dir = Copy("ia3");
        EditConfig(dir, c => c["feedforward_modules"] = JsonNode.Parse(value));
        Assert.Contains(complaint, Refused(dir).Message);
    }

    [Theory]
    [InlineData("{\"q_proj\": null}", "must be a number, but is null")]
    [InlineData("{\"q_proj\": \"16\"}", "must be a number, but is \"16\"")]
    [InlineData("{\"q_proj(\": 16}", "is not a valid regular expression")]
    [InlineData("{\"(q)\\\\1\": 16}", "uses a construct this server does not run")]
    [InlineData("[16]", "must be an object")]
    public void MalformedAlphaPatternsAreRefused(string value, string complaint)
    {
        var dir = Copy("lora-r4-qv");
        EditConfig(dir, c => c["alpha_pattern"] = JsonNode.Parse(value));
        var e = Refused(dir);
        Assert.Contains("alpha_pattern", e.Message);
        Assert.Contains(complaint, e.Message);
    }

    [Fact]
    public async Task APatternKeyThatWouldBacktrackForeverIsMatchedInLinearTime()
    {
        // (\w*\.?)*! against a module name (which has no '!') makes a backtracking engine try every
        // way of splitting the name's ~30 characters: 2^30 paths and more.
        var dir = Copy("lora-r4-qv");
        EditConfig(dir, c => c["alpha_pattern"] = new JsonObject { [@"(\w*\.?)*!"] = 2 });
        var load = Task.Run(() => Accepted(dir));
        Assert.True(await Task.WhenAny(load, Task.Delay(TimeSpan.FromSeconds(60))) == load, "matching the alpha_pattern key did not finish: it backtracks");
        await load;
    }

    [Fact]
    public void APrefixEncoderWithPartlyWrongShapesIsRefusedBeforeAnythingIsComputed()
    {
        TensorPair[] Encoder(Tensor w1, Tensor b1) =>
        [
            new("base_model.model.prompt_encoder.embedding.weight", torch.zeros(6, 6)),
            new("base_model.model.prompt_encoder.transform.0.weight", w1),
            new("base_model.model.prompt_encoder.transform.0.bias", b1),
            new("base_model.model.prompt_encoder.transform.2.weight", torch.zeros(192, 6)),
            new("base_model.model.prompt_encoder.transform.2.bias", torch.zeros(192)),
        ];
        var config = new { peft_type = "PREFIX_TUNING", num_virtual_tokens = 6, num_layers = 3, prefix_projection = true, encoder_hidden_size = 6 };
        // transform.0 as a vector: its second dimension used to be read without a check.
        var dir = SyntheticAdapters.Write(Path.Combine(_tmp, "fold-1d"), config, Encoder(torch.zeros(6), torch.zeros(6)).Select(p => p.Pair));
        Assert.Contains("do not make [6,192] prefixes", Refused(dir).Message);
        // A bias of the wrong length used to fail inside the matrix product.
        dir = SyntheticAdapters.Write(Path.Combine(_tmp, "fold-bias"), config, Encoder(torch.zeros(6, 6), torch.zeros(5)).Select(p => p.Pair));
        Assert.Contains("transform.0 [6,6] + [5]", Refused(dir).Message);
        // prefix_projection false with encoder weights: the config and the tensors disagree.
        dir = SyntheticAdapters.Write(Path.Combine(_tmp, "fold-flag"), config with { prefix_projection = false }, Encoder(torch.zeros(6, 6), torch.zeros(6)).Select(p => p.Pair));
        Assert.Contains("prefix_projection is false", Refused(dir).Message);
    }

    private sealed record TensorPair(string Name, Tensor Tensor)
    {
        public KeyValuePair<string, Tensor> Pair => new(Name, Tensor);
    }

    [Fact]
    public void ATensorStoredWithAndWithoutThePrefixIsRefusedAndTheFileIsUnmapped()
    {
        var dir = Copy("lora-r4-qv");
        Rewrite(dir, t => { t["model.layers.0.self_attn.q_proj.lora_A.weight"] = t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].clone(); return t; });
        Assert.Contains("stored twice", Refused(dir).Message);
        // The mapping is released at once, not when a finalizer runs.
        var weights = Path.Combine(dir, AdapterFolder.WeightsFile);
        Assert.DoesNotContain(File.ReadAllLines("/proc/self/maps"), line => line.EndsWith(weights, StringComparison.Ordinal));
    }

    // ---- nothing left behind ----

    [Fact]
    public void TensorsReadBeforeAValidationFailureAreDisposed()
    {
        // Each fails only after tensors were read: LoRA and IA3 on a config check made once all
        // weights are in, LLaMA-Adapter on a non-finite gate in its last layer.
        var lora = Copy("lora-r4-qv");
        EditConfig(lora, c => c["r"] = 8);
        var ia3 = Copy("ia3");
        EditConfig(ia3, c => c["target_modules"] = new JsonArray("k_proj", "v_proj", "down_proj", "q_proj"));
        var llama = Copy("llama-adapter-4x2");
        Rewrite(llama, t => { t["base_model.model.model.layers.2.self_attn.adaption_gate"] = torch.tensor(new[] { float.NaN }); return t; });
        foreach (var dir in new[] { lora, ia3, llama })
        {
            long before = DisposeScopeManager.Statistics.ThreadTotalLiveCount;
            Assert.Throws<AdapterException>(() => AdapterMethods.Load(dir, "x", _config, new AdapterLimits()).Dispose());
            Assert.True(before == DisposeScopeManager.Statistics.ThreadTotalLiveCount, $"{Path.GetFileName(dir)}: {DisposeScopeManager.Statistics.ThreadTotalLiveCount - before} tensors left alive");
        }
    }

    [Fact]
    public void NonFiniteValuesAreFoundByTheRawScanInEveryFloatFormat()
    {
        foreach (var dtype in new[] { ScalarType.Float32, ScalarType.Float16, ScalarType.BFloat16 })
        {
            var dir = Copy("lora-r4-qv");
            Rewrite(dir, t =>
            {
                var b = t["base_model.model.model.layers.2.self_attn.v_proj.lora_B.weight"].clone();
                b[5, 1] = torch.tensor(float.PositiveInfinity);
                t = t.ToDictionary(p => p.Key, p => p.Value.to(dtype));
                t["base_model.model.model.layers.2.self_attn.v_proj.lora_B.weight"] = b.to(dtype);
                return t;
            });
            var e = Assert.Throws<AdapterException>(() => AdapterMethods.Validate(dir, "x", _config, new AdapterLimits()));
            Assert.Contains("layers.2.self_attn.v_proj.lora_B.weight' holds NaN or infinite values", e.Message);
        }
    }

    [Fact]
    public void MetadataValidationAcceptsWhatTheFullLoadAcceptsAndKeepsNoTensor()
    {
        var adapters = Directory.GetDirectories(Path.Combine(TestData.RepoRoot, "adapters")).Where(d => File.Exists(Path.Combine(d, AdapterFolder.ConfigFile)));
        foreach (var dir in adapters)
        {
            long before = DisposeScopeManager.Statistics.ThreadTotalLiveCount;
            using (var loaded = AdapterMethods.Load(dir, "x", _config, new AdapterLimits()))
                Assert.Equal(loaded.Method, AdapterMethods.Validate(dir, "x", _config, new AdapterLimits()));
            Assert.True(before == DisposeScopeManager.Statistics.ThreadTotalLiveCount, $"{Path.GetFileName(dir)}: {DisposeScopeManager.Statistics.ThreadTotalLiveCount - before} tensors left alive");
        }
    }
}
