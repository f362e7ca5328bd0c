using PeftServe.Core.Adapters;
using PeftServe.Core.Engine;
using PeftServe.Core.Generation;
using PeftServe.Core.Tests.Model;
using PeftServe.Tests;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Tests.Adapters;

/// <summary>Every fixture adapter against Hugging Face PEFT's own logits and greedy tokens, alone, all
/// together in one mixed batch, and through prefill plus KV-cache decode.</summary>
public sealed class AdapterConformanceTests : IClassFixture<TinyLlamaFixture>, IDisposable
{
    /// <summary>Fixture adapter folder -> the tag of its expectations.</summary>
    public static readonly string[] FixtureAdapters = ["lora-r8-all", "lora-r4-qv", "prefix-6", "prompt-5", "ptuning-mlp-5", "ia3", "llama-adapter-4x2"];

    private readonly TinyLlamaFixture _f;
    private readonly AdapterManager _set;

    public AdapterConformanceTests(TinyLlamaFixture fixture)
    {
        _f = fixture;
        _set = new AdapterManager(fixture.Model, new AdapterLimits(), Path.Combine(TestData.FixturesDir, "tiny-llama-adapters"), 1L << 30);
    }

    public void Dispose() => _set.Dispose();

    public static TheoryData<string> Adapters() => new(FixtureAdapters);

    [Theory]
    [MemberData(nameof(Adapters))]
    public void AdapterAloneMatchesPeftLogits(string name)
    {
        var adapter = _set.Acquire(name);
        using var logits = FullLogits.Compute(_f.Model, _f.InputIds, [adapter, adapter]);
        LlamaConformanceTests.AssertClose(_f.Expected["logits_" + name], logits);
    }

    [Theory]
    [MemberData(nameof(Adapters))]
    public void AdapterGreedyMatchesPeftTokens(string name)
    {
        var tokens = FixedBatch.Generate(_f.Model, [Prompt], [SamplingParams.Greedy(16)], adapters: [_set.Acquire(name)])
            .Select(t => t.TokenId).ToArray();
        Assert.Equal(Expected("greedy_" + name), tokens);
    }

    [Fact]
    public void OneBatchWithEveryAdapterAndABaseRowMatchesRowByRow()
    {
        // Rows alternate the two fixture input rows, so equal inputs meet different adapters.
        var names = FixtureAdapters.Append(null).ToArray();
        var rowAdapters = names.Select(n => n is null ? null : _set.Acquire(n)).ToArray();
        using var ids = torch.stack(names.Select((_, i) => _f.InputIds[i % 2]).ToArray());
        using var logits = FullLogits.Compute(_f.Model, ids, rowAdapters);
        for (int i = 0; i < names.Length; i++)
        {
            using var expected = _f.Expected["logits_" + (names[i] ?? "base")][i % 2];
            LlamaConformanceTests.AssertClose(expected, logits[i]);
        }
    }

    [Fact]
    public void RowsSharingAFewLoraAdaptersMatchPeft()
    {
        // Four rows over two adapters of different ranks (and a base row): the masked form of the LoRA op,
        // which reads each distinct adapter once, at the batch's effective rank.
        string?[] names = ["lora-r8-all", "lora-r4-qv", "lora-r4-qv", null, "lora-r8-all"];
        using var ids = torch.stack(names.Select((_, i) => _f.InputIds[i % 2]).ToArray());
        using var logits = FullLogits.Compute(_f.Model, ids, names.Select(n => n is null ? null : _set.Acquire(n)).ToArray());
        for (int i = 0; i < names.Length; i++)
        {
            using var expected = _f.Expected["logits_" + (names[i] ?? "base")][i % 2];
            LlamaConformanceTests.AssertClose(expected, logits[i]);
        }
    }

    [Fact]
    public void MixedBatchGreedyThroughKvCacheMatchesEachAdapter()
    {
        var names = FixtureAdapters.Append(null).ToArray();
        var rows = FixedBatch.Generate(_f.Model, 
            names.Select(_ => Prompt).ToArray(),
            names.Select(_ => SamplingParams.Greedy(16)).ToArray(),
            adapters: names.Select(n => n is null ? null : _set.Acquire(n)).ToArray()).ToList();
        for (int i = 0; i < names.Length; i++)
            Assert.Equal(Expected("greedy_" + (names[i] ?? "base")), rows.Where(t => t.Row == i).Select(t => t.TokenId).ToArray());
    }

    private int[] Prompt => _f.Expected["prompt_ids"][0].data<long>().Select(x => (int)x).ToArray();
    private int[] Expected(string key) => _f.Expected[key][0].data<long>().Select(x => (int)x).ToArray();
}
