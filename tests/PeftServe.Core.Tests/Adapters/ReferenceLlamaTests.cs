using PeftServe.Core.Tests.Model;
using static TorchSharp.torch;

namespace PeftServe.Core.Tests.Adapters;

/// <summary>The float64 reference forward must reproduce Hugging Face's own figures before it can
/// judge anything else.</summary>
public sealed class ReferenceLlamaTests : IClassFixture<TinyLlamaFixture>
{
    private readonly TinyLlamaFixture _f;

    public ReferenceLlamaTests(TinyLlamaFixture fixture) => _f = fixture;

    [Fact]
    public void ReproducesFixtureBaseLogits()
    {
        for (int row = 0; row < _f.InputIds.shape[0]; row++)
        {
            var ids = _f.InputIds[row].data<long>().Select(x => (int)x).ToArray();
            using var expected = _f.Expected["logits_base"][row];
            OurAdapterTesting.AssertClose(ReferenceLlama.Tiny.Logits(ids), expected);
        }
    }

    [Fact]
    public void ReproducesFixtureGreedyTokens()
    {
        var prompt = _f.Expected["prompt_ids"][0].data<long>().Select(x => (int)x).ToArray();
        var expected = _f.Expected["greedy_base"][0].data<long>().Select(x => (int)x).ToArray();
        Assert.Equal(expected.Take(6), ReferenceLlama.Tiny.Greedy(prompt, 6));
    }
}
