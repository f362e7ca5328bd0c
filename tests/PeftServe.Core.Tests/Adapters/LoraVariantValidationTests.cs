using System.Text.Json.Nodes;
using PeftServe.Core.Adapters;
using PeftServe.Core.Model;
using PeftServe.Core.Tests.SafeTensors;
using PeftServe.Tests;

namespace PeftServe.Core.Tests.Adapters;

/// <summary>What is still refused, and why: a LoRA variant this server does not compute, or a tensor PEFT itself
/// would not load. The error names the config field or tensor; nothing is served in part.</summary>
public sealed class LoraVariantValidationTests : IDisposable
{
    private readonly TempDir _dir = new();
    private readonly ModelConfig _config = ModelConfig.Load(TestData.TinyLlamaDir);
    private int _count;

    public void Dispose() => _dir.Dispose();

    private static LoraVariantSpec Spec(bool dora = false, bool loraBias = false, List<string>? modulesToSave = null) =>
        new() { Base = ReferenceLlama.Tiny, UseDora = dora, LoraBias = loraBias, ModulesToSave = modulesToSave };

    /// <summary>Writes the spec with its config changed by <paramref name="edit"/> and extra tensors, then loads it.</summary>
    private Adapter Load(LoraVariantSpec spec, Action<Dictionary<string, object?>>? edit = null, IEnumerable<OurAdapterTesting.FileTensor>? extra = null,
        IEnumerable<string>? drop = null, AdapterLimits? limits = null, ModelConfig? config = null)
    {
        var c = spec.Config();
        edit?.Invoke(c);
        var tensors = spec.Tensors().Where(t => drop?.Contains(t.Name) != true).Concat(extra ?? []);
        var dir = OurAdapterTesting.WriteAdapter(_dir.Path, $"a{_count++}", c, tensors);
        return AdapterMethods.Load(dir, "x", config ?? _config, limits ?? new AdapterLimits());
    }

    private AdapterException Refused(LoraVariantSpec spec, Action<Dictionary<string, object?>>? edit = null, IEnumerable<OurAdapterTesting.FileTensor>? extra = null,
        IEnumerable<string>? drop = null, AdapterLimits? limits = null, ModelConfig? config = null) =>
        Assert.Throws<AdapterException>(() => Load(spec, edit, extra, drop, limits, config).Dispose());

    public static TheoryData<string, string> UnsupportedFields() => new()
    {
        { "trainable_token_indices", "[1, 2, 3]" },
        { "layer_replication", "[[0, 2], [1, 3]]" },
        { "target_parameters", "[\"mlp.experts.down_proj\"]" },
        { "alora_invocation_tokens", "[5, 6]" },
        { "use_qalora", "true" },
        { "velora_config", "{\"rank\": 2}" },
        { "kasa_config", "{\"beta\": 1}" },
        { "arrow_config", "{\"top_k\": 2}" },
        { "use_bdlora", "{\"nblocks\": 2}" },
        { "monteclora_config", "{\"num_samples\": 2}" },
        { "init_lora_weights", "\"pissa_niter_4\"" },
        { "init_lora_weights", "\"olora\"" },
        { "init_lora_weights", "\"corda\"" },
        { "init_lora_weights", "\"loftq\"" },
        { "init_lora_weights", "\"lora_ga\"" },
    };

    [Theory]
    [MemberData(nameof(UnsupportedFields))]
    public void AVariantThisServerDoesNotComputeIsRefusedByItsField(string field, string json)
    {
        var e = Refused(Spec().WithLinear(1, ["q_proj"]), c => c[field] = JsonNode.Parse(json));
        Assert.Contains(field, e.Message);
    }

    [Theory]
    [InlineData("true")]
    [InlineData("false")]
    [InlineData("\"gaussian\"")]
    [InlineData("\"eva\"")]
    [InlineData("\"orthogonal\"")]
    [InlineData("\"mica\"")]
    public void InitialisationsThatLeaveTheBaseAloneLoadAsPlainLora(string init)
    {
        using var a = Load(Spec().WithLinear(2, ["q_proj"]), c => c["init_lora_weights"] = JsonNode.Parse(init));
        Assert.Equal("lora", a.Method.Name);
    }

    [Fact]
    public void ModulesToSaveOtherThanTheEmbeddingAndLmHeadAreNamed()
    {
        var e = Refused(Spec(modulesToSave: ["model.norm"]).WithLinear(3, ["q_proj"]));
        Assert.Contains("modules_to_save 'model.norm'", e.Message);
    }

    [Fact]
    public void AListedModuleWithoutItsTensorIsNamed()
    {
        var e = Refused(Spec(modulesToSave: ["lm_head"]).WithLinear(4, ["q_proj"]));
        Assert.Contains("lists lm_head", e.Message);
        Assert.Contains("lm_head.weight", e.Message);
    }

    [Fact]
    public void AMagnitudeWithoutUseDoraIsRefusedNotIgnored()
    {
        var dora = Spec(dora: true).WithLinear(5, ["v_proj"]);
        var e = Refused(dora, c => c["use_dora"] = false);
        Assert.Contains("lora_magnitude_vector", e.Message);
        Assert.Contains("use_dora is not set", e.Message);
    }

    public static TheoryData<string> Variants() => ["dora", "lora-bias", "saved-head", "saved-embed", "embed-lora", "head-lora-dora", "tied-embed-lora", "everything"];

    /// <summary>Uploads are checked from the safetensors header alone (no float32 copy): that check must accept
    /// every variant the full load accepts, or a valid adapter gets a 422.</summary>
    [Theory]
    [MemberData(nameof(Variants))]
    public void MetadataValidationAcceptsEveryVariantTheFullLoadAccepts(string variant)
    {
        var spec = variant switch
        {
            "dora" => Spec(dora: true).WithLinear(30, LoraVariantSpec.Targets),
            "lora-bias" => Spec(loraBias: true).WithLinear(32, ["o_proj"]),
            "saved-head" => Spec(modulesToSave: ["lm_head"]).WithLinear(35, ["v_proj"]),
            "saved-embed" => Spec(modulesToSave: ["embed_tokens"]).WithLinear(36, ["k_proj"]),
            "embed-lora" => Spec().WithLinear(37, ["v_proj"]).WithEmbedLora(38),
            "head-lora-dora" => Spec(dora: true).WithHeadLora(39),
            "tied-embed-lora" => new LoraVariantSpec { Base = ReferenceLlama.Tiny, EnsureWeightTying = true }.WithEmbedLora(43),
            _ => Spec(dora: true, modulesToSave: ["embed_tokens", "lm_head"]).WithLinear(40, LoraVariantSpec.Targets),
        };
        if (variant is "saved-head" or "everything") spec.SavedHead = Matrix(41, ReferenceLlama.Tiny.Vocab, ReferenceLlama.Tiny.Hidden);
        if (variant is "saved-embed" or "everything") spec.SavedEmbed = Matrix(42, ReferenceLlama.Tiny.Vocab, ReferenceLlama.Tiny.Hidden);
        var dir = spec.Write(_dir.Path, $"v-{variant}");
        using var loaded = AdapterMethods.Load(dir, "x", _config, new AdapterLimits());
        Assert.Equal(loaded.Method, AdapterMethods.Validate(dir, "x", _config, new AdapterLimits()));
    }

    private static double[][] Matrix(int seed, int rows, int cols)
    {
        var rng = new Random(seed);
        return Enumerable.Range(0, rows).Select(_ => Enumerable.Range(0, cols).Select(_ => rng.NextDouble() - 0.5).ToArray()).ToArray();
    }

    [Fact]
    public void UseDoraWithoutAMagnitudeNamesTheModule()
    {
        var dora = Spec(dora: true).WithLinear(6, ["v_proj"], [1]);
        var e = Refused(dora, drop: ["model.layers.1.self_attn.v_proj.lora_magnitude_vector"]);
        Assert.Contains("use_dora is set", e.Message);
        Assert.Contains("model.layers.1.self_attn.v_proj", e.Message);
    }

    [Fact]
    public void DoraWithLoraBiasIsRefusedAsPeftRefusesIt()
    {
        var e = Refused(Spec(dora: true).WithLinear(7, ["q_proj"]), c => c["lora_bias"] = true);
        Assert.Contains("use_dora and lora_bias", e.Message);
    }

    [Fact]
    public void ALoraBBiasWithoutLoraBiasIsRefused()
    {
        var e = Refused(Spec(loraBias: true).WithLinear(8, ["q_proj"]), c => c["lora_bias"] = false);
        Assert.Contains("lora_B.bias", e.Message);
    }

    [Fact]
    public void ATrainedBiasForALayerTheBaseHasNoBiasOnIsRefused()
    {
        // The tiny model has no biases: PEFT would find no parameter to load this into.
        var spec = Spec().WithLinear(9, ["q_proj"]);
        var e = Refused(spec, c => c["bias"] = "all", [OurAdapterTesting.FileTensor.Of("model.layers.0.self_attn.q_proj.base_layer.bias", new double[64])]);
        Assert.Contains("has no bias", e.Message);
    }

    [Fact]
    public void ABiasUnderTheWrongKeyIsRefused()
    {
        // On the base with biases: a LoRA-wrapped layer's bias lives under base_layer.bias in PEFT's state dict.
        var biased = _config with { QkvBias = true, OutputBias = true, MlpBias = true };
        var spec = Spec().WithLinear(10, ["q_proj"]);
        var e = Refused(spec, c => c["bias"] = "lora_only", [OurAdapterTesting.FileTensor.Of("model.layers.0.self_attn.q_proj.bias", new double[64])], config: biased);
        Assert.Contains("base_layer.bias", e.Message);
    }

    [Fact]
    public void AnUnknownBiasSettingIsRefused() =>
        Assert.Contains("bias 'some'", Refused(Spec().WithLinear(11, ["q_proj"]), c => c["bias"] = "some").Message);

    [Fact]
    public void WithoutVocabularySlotsTheVocabularyVariantsAreRefusedAndPlainLoraIsNot()
    {
        var limits = new AdapterLimits { EmbeddingSlots = 0 };
        var e = Refused(Spec().WithEmbedLora(12), limits: limits);
        Assert.Contains("EmbeddingSlots is 0", e.Message);
        using var plain = Load(Spec(dora: true).WithLinear(13, ["q_proj"]), limits: limits);
        Assert.Equal("lora", plain.Method.Name);
    }

    [Fact]
    public void AnEmbeddingLoraWithMismatchedRanksIsNamed()
    {
        var spec = Spec().WithEmbedLora(14);
        var e = Refused(spec, drop: ["model.embed_tokens.lora_embedding_B"],
            extra: [OurAdapterTesting.FileTensor.Of("model.embed_tokens.lora_embedding_B", OurAdapterTesting.RandomMatrix(new Random(1), 64, 3, 0.1))]);
        Assert.Contains("lora_embedding_B has rank 3", e.Message);
    }

    [Fact]
    public void AnUnknownPartOfALoraLayerIsNamed()
    {
        var e = Refused(Spec().WithLinear(15, ["q_proj"]), extra: [OurAdapterTesting.FileTensor.Of("model.layers.0.self_attn.q_proj.lora_C.weight", new double[4])]);
        Assert.Contains("q_proj.lora_C.weight", e.Message);
    }

    [Fact]
    public void EveryVariantReportsItsBytesAndFreesThem()
    {
        var spec = Spec(dora: true, modulesToSave: ["lm_head"]).WithLinear(16, ["q_proj"]).WithEmbedLora(17);
        spec.SavedHead = spec.TrainedCopyOf("lm_head.weight", 18);
        using var a = Load(spec);
        // Decoder LoRA + magnitudes, embedding LoRA (A^T, s B^T, magnitude) and the saved head, in float32.
        long v = _config.VocabSize, h = _config.HiddenSize;
        long expected = 4L * (_config.NumLayers * (4 * 64 + 64 * 4 + 64) + (v * 4 + 4 * h + h) + v * h);
        Assert.Equal(expected, a.ByteSize);
        Assert.Equal("lora-embeddings", a.Method.Name);
    }
}
