using PeftServe.Core.Adapters;
using PeftServe.Core.Model;
using PeftServe.Core.Tests.SafeTensors;
using PeftServe.Tests;
using static PeftServe.Core.Tests.Adapters.OurAdapterTesting;

namespace PeftServe.Core.Tests.Adapters;

/// <summary>Every kind of bad bottleneck, AdaMix or BitFit adapter is refused with an
/// <see cref="AdapterException"/> naming the file and the tensor or key at fault.</summary>
public sealed class OurAdapterValidationTests : IDisposable
{
    private static readonly ModelConfig Model = ModelConfig.Load(TestData.TinyLlamaDir);
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    private static readonly double[] NaNs = [double.NaN];

    /// <summary>Loads the folder and returns the error, asserting it names the folder and each given fragment.</summary>
    private static AdapterException Rejected(string dir, AdapterLimits? limits = null, params string[] fragments)
    {
        var e = Assert.Throws<AdapterException>(() => AdapterMethods.Load(dir, "bad", Model, limits ?? new AdapterLimits()).Dispose());
        Assert.Contains(dir, e.Message);
        foreach (var f in fragments) Assert.Contains(f, e.Message);
        return e;
    }

    // ---- bottleneck ----

    /// <summary>A valid bottleneck adapter (r = 8, both placements, all layers), changed by <paramref name="edit"/>.</summary>
    private string Bottleneck(string name, Action<Dictionary<string, object>, List<FileTensor>>? edit = null, BottleneckSpec? spec = null)
    {
        spec ??= BottleneckSpec.Random(1, 8, "both", "relu");
        var config = spec.Config();
        var tensors = spec.Modules.SelectMany(kv => kv.Value.Tensors(BottleneckSpec.PlacementPrefix(kv.Key.Layer, kv.Key.Placement))).ToList();
        edit?.Invoke(config, tensors);
        return WriteAdapter(_dir.Path, name, config, tensors);
    }

    private static void Replace(List<FileTensor> tensors, string name, Func<FileTensor, FileTensor> change)
    {
        int i = tensors.FindIndex(t => t.Name == name);
        Assert.True(i >= 0, name);
        tensors[i] = change(tensors[i]);
    }

    [Fact]
    public void ValidBottleneckLoads()
    {
        using var adapter = AdapterMethods.Load(Bottleneck("ok"), "ok", Model, new AdapterLimits());
        Assert.Equal("bottleneck", adapter.Method.Name);
    }

    [Fact]
    public void BottleneckUnknownTensor() => Rejected(Bottleneck("x", (_, t) =>
        t.Add(FileTensor.Of("model.layers.0.attention_adapter.gate.weight", [1.0]))), null, "'model.layers.0.attention_adapter.gate.weight'");

    [Fact]
    public void BottleneckForeignTensor() => Rejected(Bottleneck("x", (_, t) =>
        t.Add(FileTensor.Of("model.layers.0.self_attn.q_proj.lora_A.weight", [1.0]))), null, "'model.layers.0.self_attn.q_proj.lora_A.weight'");

    [Fact]
    public void BottleneckLayerOutOfRange() => Rejected(Bottleneck("x", (_, t) =>
        t.Add(FileTensor.Of("model.layers.3.mlp_adapter.up.bias", new double[64]))), null, "'model.layers.3.mlp_adapter.up.bias'", "layer 3");

    [Fact]
    public void BottleneckLayerNotListed() => Rejected(Bottleneck("x", (c, _) => c["layers"] = new[] { 0, 1 }),
        null, "'model.layers.2.", "'layers'");

    [Fact]
    public void BottleneckPlacementLeftOut() => Rejected(Bottleneck("x", (c, _) => c["placement"] = "attention"),
        null, "'model.layers.0.mlp_adapter.", "'placement'");

    [Fact]
    public void BottleneckWrongShape() => Rejected(Bottleneck("x", (_, t) => Replace(t, "model.layers.1.attention_adapter.down.weight",
        w => w with { Values = new double[8 * 65], Shape = [8, 65] })), null, "'model.layers.1.attention_adapter.down.weight'", "[8,65]", "[8,64]");

    [Fact]
    public void BottleneckUpWeightTransposed() => Rejected(Bottleneck("x", (_, t) => Replace(t, "model.layers.0.mlp_adapter.up.weight",
        w => w with { Shape = [8, 64] })), null, "'model.layers.0.mlp_adapter.up.weight'");

    [Fact]
    public void BottleneckNonFinite() => Rejected(Bottleneck("x", (_, t) => Replace(t, "model.layers.2.mlp_adapter.up.bias",
        w => w with { Values = w.Values.Select((v, i) => i == 5 ? double.PositiveInfinity : v).ToArray() })), null, "'model.layers.2.mlp_adapter.up.bias'", "NaN or infinite");

    [Fact]
    public void BottleneckNaN() => Rejected(Bottleneck("x", (_, t) => Replace(t, "model.layers.0.attention_adapter.down.bias",
        w => w with { Values = NaNs.Concat(w.Values.Skip(1)).ToArray() })), null, "'model.layers.0.attention_adapter.down.bias'");

    [Fact]
    public void BottleneckMissingTensor() => Rejected(Bottleneck("x", (_, t) => t.RemoveAll(x => x.Name == "model.layers.1.mlp_adapter.up.bias")),
        null, "missing tensor 'model.layers.1.mlp_adapter.up.bias'");

    [Theory]
    [InlineData(7, "does not divide")]
    [InlineData(0, "positive")]
    [InlineData(-4, "positive")]
    [InlineData(128, "does not divide")]
    public void BottleneckBadReductionFactor(int factor, string why) =>
        Rejected(Bottleneck("x", (c, _) => c["reduction_factor"] = factor), null, "adapter_config.json", "'reduction_factor'", why);

    [Fact]
    public void BottleneckReductionFactorMissing() =>
        Rejected(Bottleneck("x", (c, _) => c.Remove("reduction_factor")), null, "adapter_config.json", "'reduction_factor'");

    [Fact]
    public void BottleneckReductionFactorNotInteger() =>
        Rejected(Bottleneck("x", (c, _) => c["reduction_factor"] = 2.5), null, "'reduction_factor'");

    [Fact]
    public void BottleneckDimAboveTheConfiguredMaximum() =>
        Rejected(Bottleneck("x"), new AdapterLimits { MaxBottleneckDim = 4 }, "'reduction_factor'", "dimension 8", "maximum of 4");

    [Theory]
    [InlineData("placement", "ffn")]
    [InlineData("placement", "Attention")]
    [InlineData("non_linearity", "swish")]
    [InlineData("non_linearity", "gelu_new")]
    public void BottleneckBadChoice(string key, string value) =>
        Rejected(Bottleneck("x", (c, _) => c[key] = value), null, "adapter_config.json", $"'{key}'", value);

    [Fact]
    public void BottleneckNonLinearityNotAString() =>
        Rejected(Bottleneck("x", (c, _) => c["non_linearity"] = 3), null, "'non_linearity'");

    [Fact]
    public void BottleneckLayersOutOfRange() =>
        Rejected(Bottleneck("x", (c, _) => c["layers"] = new[] { 0, 5 }), null, "adapter_config.json", "'layers'", "layer 5");

    [Fact]
    public void BottleneckLayersRepeated() =>
        Rejected(Bottleneck("x", (c, _) => c["layers"] = new[] { 1, 1 }), null, "'layers'", "twice");

    [Fact]
    public void BottleneckLayersNotAList() =>
        Rejected(Bottleneck("x", (c, _) => c["layers"] = "all"), null, "'layers'");

    // ---- AdaMix ----

    private string AdaMix(string name, Action<Dictionary<string, object>, List<FileTensor>>? edit = null)
    {
        var spec = AdaMixSpec.Random(2, 2, 8, "attention", "gelu");
        var config = spec.Shape.Config("ADAMIX");
        config["num_experts"] = 2;
        var tensors = spec.Experts.SelectMany(kv => kv.Value.SelectMany((w, e) =>
            w.Tensors($"{BottleneckSpec.PlacementPrefix(kv.Key.Layer, kv.Key.Placement)}experts.{e}."))).ToList();
        edit?.Invoke(config, tensors);
        return WriteAdapter(_dir.Path, name, config, tensors);
    }

    [Fact]
    public void ValidAdaMixLoadsAsABottleneckAdapter()
    {
        using var adapter = AdapterMethods.Load(AdaMix("ok"), "ok", Model, new AdapterLimits());
        Assert.Same(Core.Adapters.Bottleneck.BottleneckMethod.Instance, adapter.Method);   // served from the bottleneck slots
        Assert.IsType<Core.Adapters.Bottleneck.BottleneckAdapter>(adapter);
        // Upload validation reports the serving method too; the adapter is still listed by its peft_type.
        Assert.Same(Core.Adapters.Bottleneck.BottleneckMethod.Instance, AdapterMethods.Validate(AdaMix("ok2"), "ok2", Model, new AdapterLimits()));
    }

    [Theory]
    [InlineData(0)]
    [InlineData(-1)]
    [InlineData(65)]
    public void AdaMixBadExpertCount(int experts) =>
        Rejected(AdaMix("x", (c, _) => c["num_experts"] = experts), null, "adapter_config.json", "'num_experts'");

    [Fact]
    public void AdaMixExpertCountMissing() =>
        Rejected(AdaMix("x", (c, _) => c.Remove("num_experts")), null, "'num_experts'");

    [Fact]
    public void AdaMixExpertBeyondTheCount() => Rejected(AdaMix("x", (_, t) =>
        t.Add(FileTensor.Of("model.layers.1.attention_adapter.experts.2.up.bias", new double[64]))), null,
        "'model.layers.1.attention_adapter.experts.2.up.bias'", "'num_experts' is 2");

    [Fact]
    public void AdaMixMissingExpert() =>
        Rejected(AdaMix("x", (c, _) => c["num_experts"] = 3), null, "missing tensor 'model.layers.0.attention_adapter.experts.2.down.weight'");

    [Fact]
    public void AdaMixPlainBottleneckTensor() => Rejected(AdaMix("x", (_, t) =>
        t.Add(FileTensor.Of("model.layers.0.attention_adapter.down.weight", new double[8 * 64]) with { Shape = [8, 64] })), null,
        "'model.layers.0.attention_adapter.down.weight'", "experts.{e}");

    [Fact]
    public void AdaMixExpertWrongShape() => Rejected(AdaMix("x", (_, t) => Replace(t, "model.layers.2.attention_adapter.experts.1.up.weight",
        w => w with { Values = new double[64 * 4], Shape = [64, 4] })), null, "'model.layers.2.attention_adapter.experts.1.up.weight'", "[64,4]");

    [Fact]
    public void AdaMixExpertNaN() => Rejected(AdaMix("x", (_, t) => Replace(t, "model.layers.1.attention_adapter.experts.0.down.weight",
        w => w with { Values = NaNs.Concat(w.Values.Skip(1)).ToArray() })), null, "'model.layers.1.attention_adapter.experts.0.down.weight'");

    [Fact]
    public void AdaMixBadSharedKey() =>
        Rejected(AdaMix("x", (c, _) => c["non_linearity"] = "sigmoid"), null, "'non_linearity'");

    // ---- BitFit ----

    private string BitFit(string name, params FileTensor[] tensors) =>
        WriteAdapter(_dir.Path, name, new Dictionary<string, object> { ["peft_type"] = "BITFIT" },
            tensors.Prepend(FileTensor.Of("model.layers.0.self_attn.q_proj.bias", new double[64])));

    [Fact]
    public void ValidBitFitLoads()
    {
        using var adapter = AdapterMethods.Load(BitFit("ok", FileTensor.Of("model.layers.2.post_attention_layernorm.bias", new double[64])), "ok", Model, new AdapterLimits());
        Assert.Equal("bitfit", adapter.Method.Name);
    }

    [Fact]
    public void BitFitFinalNormBiasIsExplained()
    {
        var e = Rejected(BitFit("x", FileTensor.Of("model.norm.bias", new double[64])), null, "'model.norm.bias'", "final norm", "LM head");
        Assert.Contains("input_layernorm", e.Message);
    }

    [Theory]
    [InlineData("model.layers.0.self_attn.q_proj.weight")]
    [InlineData("model.layers.0.input_layernorm.weight")]
    [InlineData("model.layers.0.self_attn.rotary_emb.bias")]
    [InlineData("model.layers.0.mlp.act_fn.bias")]
    [InlineData("model.embed_tokens.bias")]
    [InlineData("lm_head.bias")]
    public void BitFitUnknownTensor(string name) =>
        Rejected(BitFit("x", FileTensor.Of(name, new double[64])), null, $"'{name}'", "not a BitFit bias");

    [Fact]
    public void BitFitLayerOutOfRange() =>
        Rejected(BitFit("x", FileTensor.Of("model.layers.3.mlp.up_proj.bias", new double[160])), null, "'model.layers.3.mlp.up_proj.bias'", "layer 3");

    [Theory]
    [InlineData("model.layers.0.self_attn.k_proj.bias", 64, "[32]")]
    [InlineData("model.layers.1.mlp.gate_proj.bias", 64, "[160]")]
    [InlineData("model.layers.2.mlp.down_proj.bias", 160, "[64]")]
    [InlineData("model.layers.1.input_layernorm.bias", 65, "[64]")]
    public void BitFitWrongSize(string name, int size, string needs) =>
        Rejected(BitFit("x", FileTensor.Of(name, new double[size])), null, $"'{name}'", needs);

    [Fact]
    public void BitFitNonFinite() => Rejected(BitFit("x", FileTensor.Of("model.layers.1.input_layernorm.bias",
        Enumerable.Repeat(double.NegativeInfinity, 64).ToArray())), null, "'model.layers.1.input_layernorm.bias'", "NaN or infinite");

    [Fact]
    public void BitFitWithoutBiases() =>
        Rejected(WriteAdapter(_dir.Path, "empty", new Dictionary<string, object> { ["peft_type"] = "BITFIT" }, []), null, "no BitFit bias");
}
