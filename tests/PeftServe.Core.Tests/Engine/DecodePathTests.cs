using PeftServe.Core.Adapters;
using PeftServe.Core.Engine;
using PeftServe.Core.Generation;
using PeftServe.Core.Model;
using PeftServe.Core.Tests.Model;
using PeftServe.Core.Tests.SafeTensors;
using PeftServe.Tests;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Tests.Engine;

/// <summary>The parts of the decode path a CUDA graph relies on that can be checked on the CPU: the adapter ops
/// that read only per-row slot tensors give what the eager ops give, padding rows change nothing, pool sizes
/// reserved for the KV budget are what the pools allocate, and a failing pass ends only its own request.</summary>
public sealed class DecodePathTests(TinyLlamaFixture f) : IClassFixture<TinyLlamaFixture>, IDisposable
{
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    /// <summary>Logits [B,V] of one step over <paramref name="ids"/>, with the adapters of <paramref name="rows"/>
    /// applied either eagerly (host rows known) or as a graph capture sees them (slot tensors only).</summary>
    private Tensor Step(long[] ids, ResidentAdapter?[] rows, bool asCaptured)
    {
        using var scope = torch.NewDisposeScope();
        int b = ids.Length;
        var pools = rows.Where(r => r is not null).Select(r => r!.Pool).Distinct().ToList();
        var slotTensors = pools.Select(p => (p, torch.tensor(rows.Select(r => r is not null && r.Pool == p ? (long)r.Slot : -1L).ToArray()))).ToList();
        using var adapters = AdapterBatch.CreateForDecode(slotTensors, asCaptured ? null : rows);
        var logits = f.Model.Forward(torch.tensor(ids, [b, 1]), torch.zeros([b, 1], ScalarType.Int64), new ChunkKvCache(), adapters: adapters);
        return logits[.., 0, ..].clone().MoveToOuterDisposeScope();
    }

    [Fact]
    public void SlotIndexedOpsServeAnyRowMixLikeTheEagerOps()
    {
        var c = f.Model.Config;
        using var manager = new AdapterManager(f.Model, new AdapterLimits(), null, 1L << 30);
        var ia3 = manager.Acquire(SyntheticAdapters.IA3(Path.Combine(_dir.Path, "ia3"), c, 1));
        var bitfit = manager.Acquire(SyntheticAdapters.BitFit(Path.Combine(_dir.Path, "bitfit"), c, 2));
        var llama = manager.Acquire(SyntheticAdapters.LlamaAdapter(Path.Combine(_dir.Path, "llama"), c, 4, 2, 3));
        ResidentAdapter?[] rows = [ia3, null, bitfit, llama, null, ia3];
        long[] ids = [5, 9, 17, 33, 2, 70];
        using var eager = Step(ids, rows, asCaptured: false);
        using var captured = Step(ids, rows, asCaptured: true);
        LlamaConformanceTests.AssertClose(eager, captured);
        // Rows without an adapter read the neutral slots: exactly the base model's logits.
        using var plain = Step(ids, new ResidentAdapter?[rows.Length], asCaptured: false);
        foreach (int r in new[] { 1, 4 }) Assert.Equal(0f, (captured[r] - plain[r]).abs().max().item<float>());
        foreach (int r in new[] { 0, 2, 3 }) Assert.True((captured[r] - plain[r]).abs().max().item<float>() > 1e-3, $"row {r}'s adapter changed nothing");
    }

    [Fact]
    public void EveryPoolAllocatesWhatTheKvBudgetReservesForIt()
    {
        var limits = new AdapterLimits { SlotsPerMethod = 3, MaxRank = 8, MaxVirtualTokens = 5, MaxBottleneckDim = 16 };
        foreach (var method in AdapterMethods.All)
        {
            if (!method.HasOwnPool)
            {
                // Served by another method's pool (AdaMix: bottleneck slots): nothing of its own is reserved or made.
                Assert.Equal(0, method.PoolBytes(f.Model.Config, limits, f.Model.DType));
                Assert.Throws<InvalidOperationException>(() => method.CreatePool(f.Model, limits));
                continue;
            }
            long before = DisposeScopeManager.Statistics.ThreadTotalLiveCount;
            using var pool = method.CreatePool(f.Model, limits);
            long bytes = PoolTensors(pool).Sum(t => t.NumberOfElements * t.ElementSize);
            Assert.True(bytes > 0, method.Name);
            // The reservation may round up (a few flags and ranks), never down.
            long reserved = method.PoolBytes(f.Model.Config, limits, f.Model.DType);
            Assert.InRange(reserved, bytes - 4096, bytes + 4096);
        }
    }

    /// <summary>Every tensor field of a pool, found by reflection (pools keep them in fields and arrays of fields, and
    /// in objects of their own that hold more, such as the LoRA pool's vocabulary slots).</summary>
    private static IEnumerable<Tensor> PoolTensors(object pool)
    {
        foreach (var field in pool.GetType().GetFields(System.Reflection.BindingFlags.Instance | System.Reflection.BindingFlags.NonPublic))
            switch (field.GetValue(pool))
            {
                case Tensor t: yield return t; break;
                case Array a:
                    foreach (var item in a) if (item is Tensor u) yield return u;
                    break;
                case IDisposable part when part.GetType().Namespace?.StartsWith("PeftServe.Core.Adapters", StringComparison.Ordinal) == true
                                           && part is not AdapterMethod:
                    foreach (var t in PoolTensors(part)) yield return t;
                    break;
            }
    }

    [Fact]
    public void TheKvBudgetLeavesRoomForEveryPool()
    {
        var options = new EngineOptions { AdapterLimits = new AdapterLimits { SlotsPerMethod = 4 } };
        long pools = AdapterMethods.All.Sum(m => m.PoolBytes(f.Model.Config, options.AdapterLimits, f.Model.DType));
        Assert.Equal(pools, InferenceEngine.ReservedBytes(f.Model, options));   // CPU: no activation reserve
        Assert.True(pools > 0);
    }

    [Fact]
    public void GraphBucketsCoverEveryBatchSize()
    {
        Assert.Equal([1, 2, 4, 8, 16, 24, 32], ModelRunner.Buckets(32));
        Assert.Equal([1, 2, 4, 8, 10], ModelRunner.Buckets(10));
        Assert.Equal([1], ModelRunner.Buckets(1));
    }

    [Fact]
    public async Task APassThatFailsEndsOnlyTheRequestThatFailsAlone()
    {
        var prompt = f.Expected["prompt_ids"][0].data<long>().Select(x => (int)x).ToArray();
        var expected = f.Expected["greedy_base"][0].data<long>().Select(x => (int)x).ToArray();
        await using var engine = new InferenceEngine(f.Model, null, new EngineOptions { AdapterStore = null, KvCacheBlocks = 64 });
        // Any pass that holds the poisoned request fails (as running out of memory on its long prompt would).
        engine.Runner.FailPassWhen = rows => rows.Any(r => r.Stream.Id == "poisoned");
        var good = Enumerable.Range(0, 3).Select(i => engine.Submit(new GenerationRequest { PromptIds = prompt, Sampling = SamplingParams.Greedy(16), Id = $"good-{i}" })).ToList();
        var bad = engine.Submit(new GenerationRequest { PromptIds = prompt, Sampling = SamplingParams.Greedy(16), Id = "poisoned" });
        foreach (var s in good)
            Assert.Equal(expected, (await s.CollectAsync().WaitAsync(TimeSpan.FromSeconds(60))).Ids);
        var error = await Assert.ThrowsAsync<EngineStepException>(() => bad.CollectAsync().WaitAsync(TimeSpan.FromSeconds(60)));
        Assert.Contains("out of device memory", error.Message);
        Assert.Equal(1, engine.Stats.RequestsFailed);
        Assert.Equal(3, engine.Stats.RequestsFinished);
    }
}

/// <summary>The adapter cache when an adapter changes while it is being read.</summary>
public sealed class AdapterInvalidationTests(TinyLlamaFixture f) : IClassFixture<TinyLlamaFixture>, IDisposable
{
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    [Fact]
    public async Task AReadUnderWayWhenTheAdapterChangesIsDiscardedAndTheNextRequestReadsTheNewFiles()
    {
        var c = f.Model.Config;
        using var manager = new AdapterManager(f.Model, new AdapterLimits(), _dir.Path, 1L << 30);
        SyntheticAdapters.Lora(Path.Combine(_dir.Path, "a"), c, 4, seed: 1);
        var path = manager.Resolve("a");
        Assert.Null(manager.TryAcquire(path, firstAttempt: true));        // the read starts
        // The adapter is replaced (rank 8 now) and the cache told so, before anyone took the first read.
        Directory.Delete(Path.Combine(_dir.Path, "a"), recursive: true);
        SyntheticAdapters.Lora(Path.Combine(_dir.Path, "a"), c, 8, seed: 2);
        manager.Invalidate("a");
        var deadline = DateTime.UtcNow.AddSeconds(30);
        while (manager.DiscardedLoads == 0 && DateTime.UtcNow < deadline) await Task.Delay(20);
        Assert.Equal(1, manager.DiscardedLoads);
        var resident = manager.Acquire("a");
        Assert.Equal(8, ((Core.Adapters.Lora.LoraAdapter)resident.Adapter).MaxRank);
        Assert.Equal(2, manager.Stats.DiskLoads);
    }
}
