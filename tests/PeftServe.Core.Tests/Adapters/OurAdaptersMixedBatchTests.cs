using PeftServe.Core.Adapters;
using PeftServe.Core.Engine;
using PeftServe.Core.Generation;
using PeftServe.Core.Tests.Model;
using PeftServe.Core.Tests.SafeTensors;
using PeftServe.Tests;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Tests.Adapters;

/// <summary>A bottleneck row, an AdaMix row, a BitFit row, a PEFT LoRA row and a base row in one batch:
/// each row must equal its own single-row result and the reference formula, in one forward pass and
/// through prefill plus KV-cache decode.</summary>
public sealed class OurAdaptersMixedBatchTests : IClassFixture<TinyLlamaFixture>, IDisposable
{
    private const string Lora = "lora-r4-qv";
    private readonly TinyLlamaFixture _f;
    private readonly TempDir _dir = new();
    private readonly AdapterManager _set;
    private readonly BottleneckSpec _bottleneck = BottleneckSpec.Random(41, 8, "both", "gelu");
    private readonly AdaMixSpec _adamix = AdaMixSpec.Random(42, 3, 4, "mlp", "relu");
    private readonly BitFitSpec _bitfit = BitFitSpec.Random(43, ["q_proj", "up_proj", "input_layernorm"], [0, 1, 2]);
    private readonly ResidentAdapter?[] _rows;
    /// <summary>Per row: the reference hooks (null for the LoRA row, which is checked against PEFT's figures).</summary>
    private readonly ReferenceHooks?[] _hooks;

    public OurAdaptersMixedBatchTests(TinyLlamaFixture fixture)
    {
        _f = fixture;
        _set = new AdapterManager(fixture.Model, new AdapterLimits(), null, 1L << 30);
        _rows =
        [
            _set.Acquire(_bottleneck.Write(_dir.Path, "bottleneck")),
            _set.Acquire(_adamix.Write(_dir.Path, "adamix")),
            _set.Acquire(_bitfit.Write(_dir.Path, "bitfit")),
            _set.Acquire(TestData.AdapterDir(Lora)),
            null,
        ];
        _hooks = [_bottleneck.Hooks(), _adamix.Averaged().Hooks(), _bitfit.Hooks(), null, new ReferenceHooks()];
    }

    public void Dispose()
    {
        _set.Dispose();
        _dir.Dispose();
    }

    [Fact]
    public void EachRowEqualsItsSingleRowResultAndItsFormula()
    {
        // Rows alternate the two fixture inputs, so equal inputs meet different adapters.
        using var ids = torch.stack(_rows.Select((_, i) => _f.InputIds[i % 2]).ToArray());
        using var logits = FullLogits.Compute(_f.Model, ids, _rows);
        for (int i = 0; i < _rows.Length; i++)
        {
            using var single = FullLogits.Compute(_f.Model, ids[i..(i + 1)], [_rows[i]]);
            LlamaConformanceTests.AssertClose(single[0], logits[i]);
            if (_hooks[i] is { } hooks)
                OurAdapterTesting.AssertClose(ReferenceLlama.Tiny.Logits(BottleneckAdapterTests.Row(ids, i), hooks), logits[i]);
            else
            {
                using var peft = _f.Expected["logits_" + Lora][i % 2];
                LlamaConformanceTests.AssertClose(peft, logits[i]);
            }
        }
    }

    [Fact]
    public void GreedyDecodingThroughTheKvCacheFollowsTheReferenceArgmax()
    {
        // Prompts of different lengths, so rows are left-padded and adapters also act on padding columns.
        var prompt = _f.Expected["prompt_ids"][0].data<long>().Select(x => (int)x).ToArray();
        var prompts = _rows.Select((_, i) => prompt[..(prompt.Length - i % 3)]).ToArray();
        const int n = 6;
        var tokens = FixedBatch.Generate(_f.Model, prompts, prompts.Select(_ => SamplingParams.Greedy(n)).ToArray(), adapters: _rows).ToList();
        for (int i = 0; i < _rows.Length; i++)
        {
            var row = tokens.Where(t => t.Row == i).Select(t => t.TokenId).ToArray();
            var alone = FixedBatch.Generate(_f.Model, [prompts[i]], [SamplingParams.Greedy(n)], adapters: [_rows[i]])
                .Select(t => t.TokenId).ToArray();
            Assert.Equal(alone, row);
            if (_hooks[i] is { } hooks) Assert.Equal(ReferenceLlama.Tiny.Greedy(prompts[i], n, hooks), row);
        }
        // Each of our adapters must steer generation away from the base model's, or the test says little.
        var baseTokens = tokens.Where(t => t.Row == 4).Select(t => t.TokenId).ToArray();
        for (int i = 0; i < 3; i++)
            Assert.NotEqual(ReferenceLlama.Tiny.Greedy(prompts[i], n), tokens.Where(t => t.Row == i).Select(t => t.TokenId).ToArray());
        Assert.Equal(ReferenceLlama.Tiny.Greedy(prompts[4], n), baseTokens);
    }
}
