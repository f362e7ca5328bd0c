using PeftServe.Core.Adapters;
using PeftServe.Core.Engine;
using PeftServe.Core.Generation;
using PeftServe.Core.Model;
using PeftServe.Core.Tests.Model;
using PeftServe.Core.Tests.SafeTensors;
using PeftServe.Tests;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Tests.Adapters;

/// <summary>Every LoRA variant in one batch with the other methods: DoRA, a saved lm_head, DoRA on the
/// embedding, LoRA with lora_bias on the LM head, PEFT's own LoRA, IA3 and prefix fixtures, a bottleneck
/// and a base row. Each row must equal its single-row result and its formula (PEFT's figures for the
/// fixtures), in one forward pass and through the engine's prefill and decode steps; and the ops a captured
/// decode graph replays (reading only the per-row slot tensors) must give what the eager ones give.</summary>
public sealed class LoraVariantsMixedBatchTests : IClassFixture<TinyLlamaFixture>, IClassFixture<VariantModelsFixture>, IDisposable
{
    private readonly TinyLlamaFixture _f;
    private readonly VariantModelsFixture _models;
    private readonly TempDir _dir = new();
    private static readonly AdapterLimits Limits = new() { EmbeddingSlots = 4 };

    public LoraVariantsMixedBatchTests(TinyLlamaFixture f, VariantModelsFixture models)
    {
        _f = f;
        _models = models;
    }

    public void Dispose() => _dir.Dispose();

    /// <summary>The rows: (adapter folder, reference hooks, or the PEFT fixture tag whose logits are the reference).</summary>
    private List<(string? Dir, ReferenceHooks? Hooks, string? Fixture)> Rows()
    {
        var tiny = ReferenceLlama.Tiny;
        var dora = new LoraVariantSpec { Base = tiny, UseDora = true }.WithLinear(1, LoraVariantSpec.Targets);
        var savedHead = new LoraVariantSpec { Base = tiny, ModulesToSave = ["lm_head"] }.WithLinear(2, ["q_proj", "v_proj"]);
        savedHead.SavedHead = savedHead.TrainedCopyOf("lm_head.weight", 3);
        var embedDora = new LoraVariantSpec { Base = tiny, UseDora = true }.WithEmbedLora(4).WithLinear(5, ["o_proj"]);
        var headBias = new LoraVariantSpec { Base = tiny, LoraBias = true }.WithHeadLora(6).WithLinear(7, ["down_proj"]);
        var bottleneck = BottleneckSpec.Random(8, 8, "both", "gelu");
        return
        [
            (dora.Write(_dir.Path, "dora"), dora.Hooks(), null),
            (savedHead.Write(_dir.Path, "saved-head"), savedHead.Hooks(lmHead: savedHead.SavedHead), null),
            (TestData.AdapterDir("lora-r4-qv"), null, "lora-r4-qv"),
            (embedDora.Write(_dir.Path, "embed-dora"), embedDora.Hooks(), null),
            (TestData.AdapterDir("ia3"), null, "ia3"),
            (headBias.Write(_dir.Path, "head-bias"), headBias.Hooks(), null),
            (bottleneck.Write(_dir.Path, "bottleneck"), bottleneck.Hooks(), null),
            (TestData.AdapterDir("prefix-6"), null, "prefix-6"),
            (null, new ReferenceHooks(), null),
        ];
    }

    [Fact]
    public void EachRowEqualsItsSingleRowResultAndItsFormula()
    {
        var rows = Rows();
        using var manager = new AdapterManager(_f.Model, Limits, null, 1L << 30);
        var adapters = rows.Select(r => r.Dir is null ? null : manager.Acquire(r.Dir)).ToArray();
        using var ids = torch.stack(rows.Select((_, i) => _f.InputIds[i % 2]).ToArray());
        using var logits = FullLogits.Compute(_f.Model, ids, adapters);
        for (int i = 0; i < rows.Count; i++)
        {
            using var single = FullLogits.Compute(_f.Model, ids[i..(i + 1)], [adapters[i]]);
            LlamaConformanceTests.AssertClose(single[0], logits[i]);
            if (rows[i].Fixture is { } tag)
            {
                using var peft = _f.Expected["logits_" + tag][i % 2];
                LlamaConformanceTests.AssertClose(peft, logits[i]);
            }
            else OurAdapterTesting.AssertClose(ReferenceLlama.Tiny.Logits(BottleneckAdapterTests.Row(ids, i), rows[i].Hooks), logits[i]);
        }
    }

    [Fact]
    public void GreedyDecodingThroughTheEngineFollowsEachRowsReference()
    {
        var rows = Rows();
        var prompt = _f.Expected["prompt_ids"][0].data<long>().Select(x => (int)x).ToArray();
        var prompts = rows.Select((_, i) => prompt[..(prompt.Length - i % 3)]).ToArray();   // left-padded rows of different lengths
        const int n = 6;
        var options = new EngineOptions { AdapterLimits = Limits };
        var tokens = FixedBatch.Generate(_f.Model, prompts, prompts.Select(_ => SamplingParams.Greedy(n)).ToArray(), rows.Select(r => r.Dir).ToList(), options: options);
        for (int i = 0; i < rows.Count; i++)
        {
            var row = tokens.Where(t => t.Row == i).Select(t => t.TokenId).ToArray();
            var alone = FixedBatch.Generate(_f.Model, [prompts[i]], [SamplingParams.Greedy(n)], [rows[i].Dir], options: options).Select(t => t.TokenId).ToArray();
            Assert.Equal(alone, row);
            if (rows[i].Hooks is { } hooks) Assert.Equal(ReferenceLlama.Tiny.Greedy(prompts[i], n, hooks), row);
        }
    }

    /// <summary>Logits [B,V] of one decode-shaped step over <paramref name="ids"/>, the adapters applied eagerly or
    /// as a graph capture sees them (slot tensors only).</summary>
    private static Tensor Step(LlamaModel model, long[] ids, ResidentAdapter?[] rows, bool asCaptured)
    {
        using var scope = torch.NewDisposeScope();
        int b = ids.Length;
        var pools = rows.Where(r => r is not null).Select(r => r!.Pool).Distinct().ToList();
        var slotTensors = pools.Select(p => (p, torch.tensor(rows.Select(r => r is not null && r.Pool == p ? (long)r.Slot : -1L).ToArray()))).ToList();
        using var adapters = AdapterBatch.CreateForDecode(slotTensors, asCaptured ? null : rows);
        var logits = model.Forward(torch.tensor(ids, [b, 1]), torch.zeros([b, 1], ScalarType.Int64), new ChunkKvCache(), adapters: adapters);
        return logits[.., 0, ..].clone().MoveToOuterDisposeScope();
    }

    private static void AssertSameAsEagerAndNeutralForBaseRows(LlamaModel model, long[] ids, ResidentAdapter?[] rows)
    {
        using var eager = Step(model, ids, rows, asCaptured: false);
        using var captured = Step(model, ids, rows, asCaptured: true);
        LlamaConformanceTests.AssertClose(eager, captured);
        using var plain = Step(model, ids, new ResidentAdapter?[rows.Length], asCaptured: false);
        for (int r = 0; r < rows.Length; r++)
        {
            float diff = (captured[r] - plain[r]).abs().max().item<float>();
            if (rows[r] is null) Assert.Equal(0f, diff);
            else Assert.True(diff > 1e-3, $"row {r}'s adapter changed nothing");
        }
    }

    [Fact]
    public void SlotIndexedVocabularyOpsServeAnyRowMixLikeTheEagerOps()
    {
        // Adapters without decoder LoRA (the CPU has no BGMV kernels for a captured LoRA delta): the embedding and
        // LM-head parts alone, each in its own slot of the embeddings pool.
        var tiny = ReferenceLlama.Tiny;
        var saved = new LoraVariantSpec { Base = tiny, ModulesToSave = ["embed_tokens", "lm_head"] };
        saved.SavedEmbed = saved.TrainedCopyOf("model.embed_tokens.weight", 10);
        saved.SavedHead = saved.TrainedCopyOf("lm_head.weight", 11);
        var embed = new LoraVariantSpec { Base = tiny, UseDora = true }.WithEmbedLora(12);
        var head = new LoraVariantSpec { Base = tiny, UseDora = true }.WithHeadLora(13);
        var headBias = new LoraVariantSpec { Base = tiny, LoraBias = true }.WithHeadLora(14);
        using var manager = new AdapterManager(_f.Model, Limits, null, 1L << 30);
        var a = manager.Acquire(saved.Write(_dir.Path, "s-saved"));
        var b = manager.Acquire(embed.Write(_dir.Path, "s-embed"));
        var c = manager.Acquire(head.Write(_dir.Path, "s-head"));
        var d = manager.Acquire(headBias.Write(_dir.Path, "s-head-bias"));
        AssertSameAsEagerAndNeutralForBaseRows(_f.Model, [5, 9, 17, 33, 2, 70, 101], [a, null, b, c, d, null, a]);
    }

    [Fact]
    public void SlotIndexedBiasOpsServeAnyRowMixLikeTheEagerOps()
    {
        // Trained biases without LoRA (bias "all" on layers LoRA does not wrap) on the base with biases.
        var reference = _models.BiasedReference;
        var one = new LoraVariantSpec { Base = reference, Bias = "all" }.WithTrainedBiases(15, ["k_proj", "down_proj"]);
        var two = new LoraVariantSpec { Base = reference, Bias = "all" }.WithTrainedBiases(16, ["q_proj", "o_proj", "gate_proj"], [1]);
        using var manager = new AdapterManager(_models.Biased, Limits, null, 1L << 30);
        var a = manager.Acquire(one.Write(_dir.Path, "b-one"));
        var b = manager.Acquire(two.Write(_dir.Path, "b-two"));
        AssertSameAsEagerAndNeutralForBaseRows(_models.Biased, [5, 9, 17, 33], [a, null, b, a]);
        // And the served logits are the formula's.
        using var logits = FullLogits.Compute(_models.Biased, _f.InputIds, [a, b]);
        for (int row = 0; row < 2; row++)
            OurAdapterTesting.AssertClose(reference.Logits(BottleneckAdapterTests.Row(_f.InputIds, row), (row == 0 ? one : two).Hooks()), logits[row]);
    }
}
