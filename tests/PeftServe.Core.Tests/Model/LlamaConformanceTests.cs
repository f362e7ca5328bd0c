using PeftServe.Core.Engine;
using PeftServe.Core.Generation;
using PeftServe.Core.Model;
using PeftServe.Core.SafeTensors;
using PeftServe.Tests;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Tests.Model;

/// <summary>The tiny Llama against Hugging Face transformers' own logits and greedy tokens.</summary>
public sealed class LlamaConformanceTests : IClassFixture<TinyLlamaFixture>
{
    private const double Tolerance = 1e-4;
    private readonly TinyLlamaFixture _f;

    public LlamaConformanceTests(TinyLlamaFixture fixture) => _f = fixture;

    [Fact]
    public void BatchOfTwoMatchesReferenceLogits()
    {
        using var logits = _f.FullForward(_f.InputIds);
        AssertClose(_f.Expected["logits_base"], logits);
    }

    [Fact]
    public void EachRowAloneMatchesReferenceLogits()
    {
        for (int row = 0; row < _f.InputIds.shape[0]; row++)
        {
            using var ids = _f.InputIds[row..(row + 1)];
            using var logits = _f.FullForward(ids);
            using var expected = _f.Expected["logits_base"][row..(row + 1)];
            AssertClose(expected, logits);
        }
    }

    [Fact]
    public void PrefillThenDecodeThroughThePagedCacheMatchesFullForward()
    {
        // The serving path: a prefill chunk into the rows' blocks, then one decode step at a time reading the
        // blocks through the block tables (the decode view's tensor-op path on CPU).
        var model = _f.Model;
        int b = (int)_f.InputIds.shape[0], t = (int)_f.InputIds.shape[1];
        const int prefill = 5, blockSize = 4;
        using var cache = new PagedKvCache(model.Config, 2 * ((t + blockSize - 1) / blockSize) + 1, blockSize, model.DType, model.Device);
        var tables = Enumerable.Range(0, b).Select(_ => new List<int>()).ToArray();
        foreach (var table in tables)
            while (table.Count * blockSize < t) { Assert.True(cache.TryAllocate(out var block)); table.Add(block); }
        var ids = _f.InputIds.data<long>().ToArray();
        var pieces = new List<Tensor>();
        using (var scope = torch.NewDisposeScope())
        {
            var positions = torch.arange(prefill).unsqueeze(0).expand(b, prefill).contiguous();
            var view = cache.ForPrefill(tables, [0, 0], [prefill, prefill], prefill);
            pieces.Add(model.Forward(_f.InputIds[.., ..prefill], positions, view).MoveToOuterDisposeScope());
        }
        int maxBlocks = tables[0].Count;
        for (int i = prefill; i < t; i++)
        {
            using var scope = torch.NewDisposeScope();
            var write = torch.tensor(tables.Select(table => cache.SlotOf(table, i)).ToArray());
            var blockTable = torch.tensor(tables.SelectMany(table => table.Select(x => (long)x)).ToArray(), [b, maxBlocks]);
            var lengths = torch.full([b], i + 1, ScalarType.Int64);
            var view = cache.ForDecode(write, blockTable, lengths, (i + blockSize) / blockSize);
            var stepIds = torch.tensor(Enumerable.Range(0, b).Select(r => ids[r * t + i]).ToArray(), [b, 1]);
            pieces.Add(model.Forward(stepIds, torch.full([b, 1], i, ScalarType.Int64), view).MoveToOuterDisposeScope());
        }
        using var stitched = torch.cat(pieces, 1);
        foreach (var p in pieces) p.Dispose();
        AssertClose(_f.Expected["logits_base"], stitched);
    }

    [Fact]
    public void LeftPaddedRowsOfDifferentLengthsMatchTheirOwnRuns()
    {
        // Row 0 is cut to 7 tokens and left-padded beside the full row 1: padding must not leak.
        var model = _f.Model;
        var shortRow = _f.InputIds[0, ..7].data<long>().Select(x => (int)x).ToArray();
        var longRow = _f.InputIds[1].data<long>().Select(x => (int)x).ToArray();
        var (ids, positions) = SequenceLayout.Build([shortRow, longRow], [0, 0]).ToTensors(model.Device);
        using var logits = model.Forward(ids, positions, new ChunkKvCache());
        using var expectedLong = _f.Expected["logits_base"][1];
        AssertClose(expectedLong, logits[1]);
        using var expectedShort = _f.FullForward(_f.InputIds[0..1, ..7]);
        AssertClose(expectedShort[0], logits[0, (longRow.Length - 7)..]);
    }

    [Fact]
    public void GreedyDecodingMatchesReferenceTokens()
    {
        var prompt = _f.Expected["prompt_ids"][0].data<long>().Select(x => (int)x).ToArray();
        var expected = _f.Expected["greedy_base"][0].data<long>().Select(x => (int)x).ToArray();
        var tokens = FixedBatch.Generate(_f.Model, [prompt], [SamplingParams.Greedy(expected.Length)])
            .Select(t => t.TokenId).ToArray();
        Assert.Equal(expected, tokens);
    }

    [Fact]
    public void GreedyDecodingInABatchGivesEachRowItsOwnTokens()
    {
        // The fixture prompt beside a longer, different prompt: row 0 must still give greedy_base.
        var prompt = _f.Expected["prompt_ids"][0].data<long>().Select(x => (int)x).ToArray();
        var other = _f.InputIds[1].data<long>().Select(x => (int)x).ToArray();
        var expected = _f.Expected["greedy_base"][0].data<long>().Select(x => (int)x).ToArray();
        var rows = FixedBatch.Generate(_f.Model, [prompt, other], [SamplingParams.Greedy(expected.Length), SamplingParams.Greedy(4)]).ToList();
        Assert.Equal(expected, rows.Where(t => t.Row == 0).Select(t => t.TokenId).ToArray());
        Assert.Equal(4, rows.Count(t => t.Row == 1));
        Assert.Equal(FinishReason.Length, rows.Last(t => t.Row == 1).Finish);
    }

    [Fact]
    public void StopTokenEndsTheRowWithStop()
    {
        var prompt = _f.Expected["prompt_ids"][0].data<long>().Select(x => (int)x).ToArray();
        var expected = _f.Expected["greedy_base"][0].data<long>().Select(x => (int)x).ToArray();
        var stop = expected[3];
        var tokens = FixedBatch.Generate(_f.Model, [prompt], [SamplingParams.Greedy(16) with { StopTokenIds = [stop] }]).ToList();
        Assert.Equal(expected.Take(Array.IndexOf(expected, stop) + 1), tokens.Select(t => t.TokenId));
        Assert.Equal(FinishReason.Stop, tokens[^1].Finish);
    }

    internal static void AssertClose(Tensor expected, Tensor actual)
    {
        Assert.Equal(expected.shape, actual.shape);
        var diff = (expected.to(ScalarType.Float32) - actual.to(ScalarType.Float32)).abs().max().item<float>();
        Assert.True(diff <= Tolerance, $"max |difference| {diff:G4} exceeds {Tolerance}");
    }
}

/// <summary>Loads the tiny model and the reference figures once for all tests in a class.</summary>
public sealed class TinyLlamaFixture : IDisposable
{
    public LlamaModel Model { get; } = LlamaModel.Load(TestData.TinyLlamaDir, new ModelOptions());
    public Dictionary<string, Tensor> Expected { get; }
    public Tensor InputIds => Expected["input_ids"];

    public TinyLlamaFixture()
    {
        using var file = SafeTensorsFile.Open(TestData.ExpectedPath);
        Expected = file.Tensors.ToDictionary(t => t.Name, t => file.ToTensor(t.Name));
    }

    /// <summary>Logits for every position of unpadded ids [B,T], in float32.</summary>
    public Tensor FullForward(Tensor ids)
    {
        long b = ids.shape[0], t = ids.shape[1];
        using var positions = torch.arange(t).unsqueeze(0).expand(b, t).contiguous();
        return Model.Forward(ids, positions, new ChunkKvCache()).to(ScalarType.Float32);
    }

    public void Dispose()
    {
        Model.Dispose();
        foreach (var t in Expected.Values) t.Dispose();
    }
}
