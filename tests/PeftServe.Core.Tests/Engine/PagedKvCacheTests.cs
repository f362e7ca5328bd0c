using PeftServe.Core.Engine;
using PeftServe.Core.Model;
using PeftServe.Core.Tests.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Tests.Engine;

public sealed class PagedKvCacheTests(TinyLlamaFixture f) : IClassFixture<TinyLlamaFixture>
{
    [Fact]
    public void BlocksAreHandedOutOnceAndComeBack()
    {
        using var cache = new PagedKvCache(f.Model.Config, 5, 4, ScalarType.Float32, torch.CPU);
        Assert.Equal(4, cache.UsableBlocks);
        var taken = new List<int>();
        while (cache.TryAllocate(out var b)) taken.Add(b);
        Assert.Equal([1, 2, 3, 4], taken.Order());   // block 0 is the scratch block, never handed out
        Assert.Equal(0, cache.FreeBlocks);
        cache.Free(taken);
        Assert.Equal(4, cache.FreeBlocks);
        Assert.Throws<ArgumentOutOfRangeException>(() => cache.Free([0]));
    }

    [Fact]
    public void ScatteredBlocksGiveTheSameLogitsAsAContiguousCache()
    {
        // Two rows of different lengths, prefilled in two chunks, in blocks taken out of order.
        using var cache = new PagedKvCache(f.Model.Config, 16, 2, ScalarType.Float32, torch.CPU);
        var blocks = new List<int>();
        while (cache.TryAllocate(out var b)) blocks.Add(b);
        var rng = new Random(3);
        var shuffled = blocks.OrderBy(_ => rng.Next()).ToList();
        List<int>[] tables = [shuffled.Take(5).ToList(), shuffled.Skip(5).Take(5).ToList()];
        long[][] tokens = [[5, 9, 17, 33, 2, 8, 71, 4], [12, 40, 6, 3, 90]];

        Tensor Pass(int[] cached, int[] count)
        {
            int chunk = count.Max();
            var ids = new long[2 * chunk];
            var pos = new long[2 * chunk];
            for (int r = 0; r < 2; r++)
                for (int t = 0; t < chunk; t++)
                {
                    int pad = chunk - count[r], col = cached[r] + t - pad;
                    ids[r * chunk + t] = t < pad ? 0 : tokens[r][col];
                    pos[r * chunk + t] = t < pad ? -1 : col;
                }
            using var scope = torch.NewDisposeScope();
            var view = cache.ForPrefill(tables, cached, count, chunk);
            return f.Model.Forward(torch.tensor(ids, [2, chunk]), torch.tensor(pos, [2, chunk]), view).MoveToOuterDisposeScope();
        }

        using var first = Pass([0, 0], [5, 2]);
        using var second = Pass([5, 2], [3, 3]);
        for (int r = 0; r < 2; r++)
        {
            using var ids = torch.tensor(tokens[r], [1, tokens[r].Length]);
            using var expected = f.FullForward(ids);
            int split = r == 0 ? 5 : 2, n = tokens[r].Length;
            LlamaConformanceTests.AssertClose(expected[0, ..split], first[r, ^split..]);
            LlamaConformanceTests.AssertClose(expected[0, split..], second[r, ^(n - split)..]);
        }
        Assert.Throws<InvalidOperationException>(() => cache.ForPrefill([tables[0].Take(1).ToList()], [0], [3], 3));
    }
}
