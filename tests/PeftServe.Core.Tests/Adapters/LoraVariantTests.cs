using PeftServe.Core.Adapters;
using PeftServe.Core.Adapters.Lora;
using PeftServe.Core.Engine;
using PeftServe.Core.Generation;
using PeftServe.Core.Model;
using PeftServe.Core.Tests.Model;
using PeftServe.Core.Tests.SafeTensors;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Tests.Adapters;

/// <summary>The LoRA variants PEFT writes, each served alone: DoRA (also with rsLoRA, alpha and rank patterns,
/// on a base with biases), trained biases, lora_bias, saved lm_head and embed_tokens, LoRA (and DoRA) on the
/// embedding and the LM head, and the tied-embedding cases. Each adapter is written in PEFT's layout and read
/// back through the adapter manager; its logits must match PEFT's formula computed in float64 within 1e-4, and
/// its greedy tokens through the serving engine (prefill, then decode steps) the reference's argmax.</summary>
public sealed class LoraVariantTests : IClassFixture<TinyLlamaFixture>, IClassFixture<VariantModelsFixture>, IDisposable
{
    private readonly TinyLlamaFixture _f;
    private readonly VariantModelsFixture _models;
    private readonly TempDir _dir = new();

    public LoraVariantTests(TinyLlamaFixture f, VariantModelsFixture models)
    {
        _f = f;
        _models = models;
    }

    public void Dispose() => _dir.Dispose();

    private LoraVariantSpec Spec(ReferenceLlama? reference = null, bool dora = false, bool loraBias = false, int rank = 4, double alpha = 8,
        bool rslora = false, string bias = "none", bool ensureTying = false, List<string>? modulesToSave = null,
        Dictionary<string, double>? alphaPattern = null, Dictionary<string, int>? rankPattern = null) => new()
    {
        Base = reference ?? ReferenceLlama.Tiny, UseDora = dora, LoraBias = loraBias, Rank = rank, Alpha = alpha, RsLora = rslora, Bias = bias,
        EnsureWeightTying = ensureTying, ModulesToSave = modulesToSave, AlphaPattern = alphaPattern ?? [], RankPattern = rankPattern ?? [],
    };

    /// <summary>Serves <paramref name="dir"/> on both fixture rows and, through the engine, greedily; checks both
    /// against the reference with <paramref name="hooks"/>. Returns the resident adapter's method.</summary>
    private AdapterMethod Check(string dir, ReferenceHooks hooks, LlamaModel? model = null, ReferenceLlama? reference = null)
    {
        model ??= _f.Model;
        reference ??= ReferenceLlama.Tiny;
        using var manager = new AdapterManager(model, new AdapterLimits(), null, 1L << 30);
        var adapter = manager.Acquire(dir);
        using var logits = FullLogits.Compute(model, _f.InputIds, [adapter, adapter]);
        for (int row = 0; row < 2; row++)
        {
            var ids = BottleneckAdapterTests.Row(_f.InputIds, row);
            var expected = reference.Logits(ids, hooks);
            OurAdapterTesting.AssertAdapterMatters(expected, reference.Logits(ids));
            OurAdapterTesting.AssertClose(expected, logits[row]);
        }
        var prompt = _f.Expected["prompt_ids"][0].data<long>().Select(x => (int)x).ToArray();
        var tokens = FixedBatch.Generate(model, [prompt], [SamplingParams.Greedy(6)], adapters: [dir]).Select(t => t.TokenId).ToArray();
        Assert.Equal(reference.Greedy(prompt, 6, hooks), tokens);
        return adapter.Pool.Method;
    }

    // ---- DoRA ----

    public static TheoryData<string, string[], bool, string?, string?> DoraCases() => new()
    {
        { "qv", ["q_proj", "v_proj"], false, null, null },
        { "all-rslora-alpha-pattern", LoraVariantSpec.Targets, true, "o_proj", null },
        { "rank-pattern", ["q_proj", "k_proj", "down_proj", "up_proj"], false, null, "down_proj" },
    };

    [Theory]
    [MemberData(nameof(DoraCases))]
    public void DoraScalesEachOutputByMagnitudeOverTheNormOfTheAdaptedWeight(string name, string[] targets, bool rslora, string? alphaModule, string? rankModule)
    {
        var spec = Spec(dora: true, rslora: rslora,
            alphaPattern: alphaModule is null ? null : new() { [alphaModule] = 3 },
            rankPattern: rankModule is null ? null : new() { [rankModule] = 2 }).WithLinear(name.Length, targets);
        Assert.Equal("lora", Check(spec.Write(_dir.Path, name), spec.Hooks()).Name);
    }

    [Fact]
    public void DoraOnABaseWithBiasesLeavesTheBiasOutsideTheScale()
    {
        var spec = Spec(_models.BiasedReference, dora: true).WithLinear(3, LoraVariantSpec.Targets);
        Check(spec.Write(_dir.Path, "dora-biased"), spec.Hooks(), _models.Biased, _models.BiasedReference);
    }

    [Fact]
    public void DoraWithTrainedBiases()
    {
        var spec = Spec(_models.BiasedReference, dora: true, bias: "lora_only").WithLinear(4, ["q_proj", "v_proj", "down_proj"])
            .WithTrainedBiases(5, ["q_proj", "v_proj", "down_proj"]);
        Check(spec.Write(_dir.Path, "dora-bias"), spec.Hooks(), _models.Biased, _models.BiasedReference);
    }

    // ---- biases ----

    [Fact]
    public void TrainedBiasesOfTargetedLayersReplaceTheBaseBiases()
    {
        var spec = Spec(_models.BiasedReference, bias: "lora_only").WithLinear(6, ["q_proj", "v_proj"]).WithTrainedBiases(7, ["q_proj", "v_proj"]);
        Check(spec.Write(_dir.Path, "lora-only"), spec.Hooks(), _models.Biased, _models.BiasedReference);
    }

    [Fact]
    public void BiasAllAlsoReplacesTheBiasesOfLayersWithoutLora()
    {
        // bias "all": PEFT saves every bias, under base_layer.bias for the LoRA-wrapped layers and bias for the others.
        var spec = Spec(_models.BiasedReference, bias: "all").WithLinear(8, ["q_proj", "v_proj"])
            .WithTrainedBiases(9, LoraVariantSpec.Targets);
        Check(spec.Write(_dir.Path, "bias-all"), spec.Hooks(), _models.Biased, _models.BiasedReference);
    }

    [Fact]
    public void LoraBiasAddsTheScaledBiasOfLoraB()
    {
        var spec = Spec(loraBias: true).WithLinear(10, ["q_proj", "o_proj", "up_proj"]);
        Check(spec.Write(_dir.Path, "lora-bias"), spec.Hooks());
    }

    // ---- saved modules ----

    [Fact]
    public void SavedLmHeadReplacesTheLogitsOfItsRows()
    {
        var spec = Spec(modulesToSave: ["lm_head"]).WithLinear(11, ["q_proj", "v_proj"]);
        spec.SavedHead = spec.TrainedCopyOf("lm_head.weight", 12);
        Assert.Equal("lora-embeddings", Check(spec.Write(_dir.Path, "saved-head"), spec.Hooks(lmHead: spec.SavedHead)).Name);
    }

    [Fact]
    public void SavedEmbeddingReplacesTheInputEmbeddingsOfItsRows()
    {
        var spec = Spec(modulesToSave: ["embed_tokens"]).WithLinear(13, ["k_proj"]);
        spec.SavedEmbed = spec.TrainedCopyOf("model.embed_tokens.weight", 14, noise: 1.0);
        Check(spec.Write(_dir.Path, "saved-embed"), spec.Hooks(inputEmbedding: spec.SavedEmbed));
    }

    [Fact]
    public void BothSavedModulesWithoutAnyLora()
    {
        var spec = Spec(modulesToSave: ["embed_tokens", "lm_head"]);
        spec.SavedEmbed = spec.TrainedCopyOf("model.embed_tokens.weight", 15, noise: 1.0);
        spec.SavedHead = spec.TrainedCopyOf("lm_head.weight", 16);
        Check(spec.Write(_dir.Path, "saved-both"), spec.Hooks(inputEmbedding: spec.SavedEmbed, lmHead: spec.SavedHead));
    }

    // ---- LoRA on the embedding and the LM head ----

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void LoraOnTheEmbeddingAddsEachTokensDelta(bool dora)
    {
        var spec = Spec(dora: dora).WithLinear(17, ["v_proj"]).WithEmbedLora(18);
        Assert.Equal("lora-embeddings", Check(spec.Write(_dir.Path, $"embed-lora-{dora}"), spec.Hooks()).Name);
    }

    [Theory]
    [InlineData(false, false)]
    [InlineData(true, false)]
    [InlineData(false, true)]
    public void LoraOnTheLmHead(bool dora, bool loraBias)
    {
        var spec = Spec(dora: dora, loraBias: loraBias).WithHeadLora(19);
        Check(spec.Write(_dir.Path, $"head-lora-{dora}-{loraBias}"), spec.Hooks());
    }

    // ---- tied embeddings ----

    [Fact]
    public void OnATiedBaseASavedEmbeddingReplacesOnlyTheInputUnlessTheAdapterKeepsTheTie()
    {
        var reference = _models.TiedReference;
        var untied = Spec(reference, modulesToSave: ["embed_tokens"]);
        untied.SavedEmbed = untied.TrainedCopyOf("model.embed_tokens.weight", 20);
        Check(untied.Write(_dir.Path, "tied-untied"), untied.Hooks(inputEmbedding: untied.SavedEmbed), _models.Tied, reference);

        var kept = Spec(reference, modulesToSave: ["embed_tokens"], ensureTying: true);
        kept.SavedEmbed = untied.SavedEmbed;
        Check(kept.Write(_dir.Path, "tied-kept"), kept.Hooks(inputEmbedding: kept.SavedEmbed, lmHead: kept.SavedEmbed), _models.Tied, reference);
    }

    [Fact]
    public void OnATiedBaseAnLmHeadNotInModulesToSaveIsLoadedIntoTheTiedWeight()
    {
        // PEFT loads a saved lm_head.weight that no wrapper claims into the base model's parameter: the tied one.
        var reference = _models.TiedReference;
        var spec = Spec(reference);
        spec.SavedHead = spec.TrainedCopyOf("lm_head.weight", 21);
        Check(spec.Write(_dir.Path, "tied-unlisted"), spec.Hooks(inputEmbedding: spec.SavedHead, lmHead: spec.SavedHead), _models.Tied, reference);
    }

    [Fact]
    public void OnATiedBaseEmbeddingLoraReachesTheLmHeadOnlyWhenTheAdapterKeepsTheTie()
    {
        var reference = _models.TiedReference;
        var untied = Spec(reference).WithEmbedLora(22);
        Check(untied.Write(_dir.Path, "tied-lora"), untied.Hooks(), _models.Tied, reference);

        // ensure_weight_tying: PEFT gives lm_head A = lora_embedding_B^T and B = lora_embedding_A^T.
        var kept = Spec(reference, ensureTying: true).WithEmbedLora(22);
        var (a, b) = kept.EmbedLora!.Value;
        var tiedHead = (Transpose(b), Transpose(a));
        Check(kept.Write(_dir.Path, "tied-lora-kept"), kept.Hooks(headLora: tiedHead), _models.Tied, reference);
    }

    private static double[][] Transpose(double[][] m) =>
        Enumerable.Range(0, m[0].Length).Select(c => m.Select(row => row[c]).ToArray()).ToArray();

    [Fact]
    public void DoraNormsOnAnNf4BaseUseItsDequantizedRows()
    {
        // PEFT dequantizes a 4-bit base layer for the norm; the rows are read a block of rows at a time.
        using var nf4 = LlamaModel.Load(PeftServe.Tests.TestData.TinyLlamaDir, new ModelOptions { Quantization = Core.Quantization.QuantizationMode.Nf4 });
        var c = nf4.Config;
        long q = (long)c.NumHeads * c.HeadDim, kv = (long)c.NumKvHeads * c.HeadDim, inter = c.IntermediateSize;
        foreach (var (site, start, count, inF) in new[] { (LinearSite.Qkv, q, kv, (long)c.HiddenSize), (LinearSite.GateUp, inter, inter, (long)c.HiddenSize), (LinearSite.Down, 0L, (long)c.HiddenSize, inter) })
        {
            using var rows = nf4.DenseWeightRows(1, site, start, count);
            using var all = nf4.DenseWeightRows(1, site, 0, start + count);
            Assert.Equal(0f, (rows - all.narrow(0, start, count)).abs().max().item<float>());
            var rng = new Random(3);
            using var a = torch.tensor(OurAdapterTesting.Random(rng, (int)(4 * inF), 0.3).Select(x => (float)x).ToArray(), [4, inF]);
            using var bt = torch.tensor(OurAdapterTesting.Random(rng, (int)(4 * count), 0.3).Select(x => (float)x).ToArray(), [4, count]);
            using var norms = DoraNorms.Linear(nf4, 1, site, start, count, a, bt);
            using var expected = (rows + torch.matmul(bt.t(), a)).square().sum(1).sqrt();
            Assert.True((norms - expected).abs().max().item<float>() < 1e-5);
        }
    }

    // ---- placement ----

    [Fact]
    public void ASlotReusedByAnotherAdapterKeepsNothingOfTheOld()
    {
        // One slot in each pool: the second adapter of each kind lands where the first was.
        var limits = new AdapterLimits { SlotsPerMethod = 1, EmbeddingSlots = 1 };
        var first = Spec(dora: true, modulesToSave: ["embed_tokens", "lm_head"]).WithLinear(23, LoraVariantSpec.Targets);
        first.SavedEmbed = first.TrainedCopyOf("model.embed_tokens.weight", 24);
        first.SavedHead = first.TrainedCopyOf("lm_head.weight", 25);
        var second = Spec().WithLinear(26, ["v_proj"]).WithEmbedLora(27);
        var firstDora = Spec(dora: true).WithLinear(28, LoraVariantSpec.Targets);
        var secondPlain = Spec(loraBias: true).WithLinear(29, ["q_proj"]);
        using var manager = new AdapterManager(_f.Model, limits, null, 1L << 30);
        foreach (var (a, b, name) in new[] { (first, second, "vocab"), (firstDora, secondPlain, "linear") })
        {
            var one = manager.Acquire(a.Write(_dir.Path, name + "-1"));
            manager.Release(one);
            var two = manager.Acquire(b.Write(_dir.Path, name + "-2"));
            Assert.Equal(one.Slot, two.Slot);
            Assert.Same(one.Pool, two.Pool);
            using var logits = FullLogits.Compute(_f.Model, _f.InputIds[1..2], [two]);
            OurAdapterTesting.AssertClose(ReferenceLlama.Tiny.Logits(BottleneckAdapterTests.Row(_f.InputIds, 1), b.Hooks()), logits[0]);
            manager.Release(two);
        }
    }

    [Fact]
    public void VocabularyAdaptersWaitForTheirFewSlotsAndEvictTheLeastRecentlyUsed()
    {
        var limits = new AdapterLimits { EmbeddingSlots = 2 };
        using var manager = new AdapterManager(_f.Model, limits, null, 1L << 30);
        var specs = Enumerable.Range(0, 3).Select(i =>
        {
            var s = Spec(modulesToSave: ["lm_head"]);
            s.SavedHead = s.TrainedCopyOf("lm_head.weight", 30 + i);
            return s;
        }).ToArray();
        var dirs = specs.Select((s, i) => s.Write(_dir.Path, $"head-{i}")).ToArray();
        var a = manager.Acquire(dirs[0]);
        var b = manager.Acquire(dirs[1]);
        // Both slots held: the third waits (TryAcquire gives nothing; Acquire refuses rather than block).
        Assert.Throws<AdapterException>(() => manager.Acquire(dirs[2]));
        manager.Release(a);
        var c = manager.Acquire(dirs[2]);
        Assert.Equal(a.Slot, c.Slot);
        using var logits = FullLogits.Compute(_f.Model, _f.InputIds, [b, c]);
        for (int row = 0; row < 2; row++)
            OurAdapterTesting.AssertClose(ReferenceLlama.Tiny.Logits(BottleneckAdapterTests.Row(_f.InputIds, row), specs[row + 1].Hooks(lmHead: specs[row + 1].SavedHead)), logits[row]);
    }

    [Fact]
    public void ABaseCopyThatIsNotTheServedBaseIsRefusedWhenPlaced()
    {
        // PEFT would load the copy under the LoRA: another base model's embedding must not be served as ours.
        var spec = Spec().WithEmbedLora(40);
        var dir = spec.Write(_dir.Path, "other-base");
        var other = spec.TrainedCopyOf("model.embed_tokens.weight", 41, noise: 0.01);
        OurAdapterTesting.WriteAdapter(_dir.Path, "other-base", spec.Config(),
            spec.Tensors().Where(t => t.Name != "model.embed_tokens.base_layer.weight")
                .Append(OurAdapterTesting.FileTensor.Of("model.embed_tokens.base_layer.weight", other)));
        using var manager = new AdapterManager(_f.Model, new AdapterLimits(), null, 1L << 30);
        var e = Assert.Throws<AdapterException>(() => manager.Acquire(dir));
        Assert.Contains("model.embed_tokens.base_layer.weight", e.Message);
        Assert.Contains("differs from the base model's embedding", e.Message);
    }

    [Fact]
    public void ABaseCopyInBfloat16IsTheServedFloat32BaseUpToRounding()
    {
        var spec = Spec().WithEmbedLora(42);
        var dir = OurAdapterTesting.WriteAdapter(_dir.Path, "bf16-copy", spec.Config(), spec.Tensors().Where(t => !t.Name.EndsWith("base_layer.weight", StringComparison.Ordinal)));
        OurAdapterTesting.WriteAdapter(_dir.Path, "bf16-copy-file", spec.Config(), spec.Tensors().Where(t => t.Name.EndsWith("base_layer.weight", StringComparison.Ordinal)), ScalarType.BFloat16);
        // One file: the LoRA tensors in float32, the copy in bfloat16 (as a bf16 training run saves it).
        var tensors = new Dictionary<string, Tensor>();
        foreach (var d in new[] { dir, Path.Combine(_dir.Path, "bf16-copy-file") })
            using (var f = Core.SafeTensors.SafeTensorsFile.Open(Path.Combine(d, AdapterFolder.WeightsFile)))
                foreach (var t in f.Tensors) tensors[t.Name] = f.ToTensor(t.Name);
        Core.SafeTensors.SafeTensorsWriter.Write(Path.Combine(dir, AdapterFolder.WeightsFile), tensors);
        foreach (var t in tensors.Values) t.Dispose();
        Check(dir, spec.Hooks());
    }
}
