using PeftServe.Core.Adapters;
using PeftServe.Core.Engine;
using PeftServe.Core.Generation;
using PeftServe.Core.Model;
using PeftServe.Core.Tests.Adapters;
using PeftServe.Core.Tests.Model;
using PeftServe.Core.Tokenization;
using PeftServe.Tests;
using TorchSharp;

namespace PeftServe.Core.Tests.Engine;

/// <summary>The engine against the reference: many concurrent requests with mixed adapters give each
/// exactly what PEFT gives for that adapter alone, whatever the batching, chunking, preemption and
/// cache tiers did on the way; and cancellation, preemption, full queues and bad adapters leave the
/// engine holding nothing and serving on.</summary>
public sealed class EngineTests(TinyLlamaFixture f) : IClassFixture<TinyLlamaFixture>
{
    private static readonly string Store = Path.Combine(TestData.FixturesDir, "tiny-llama-adapters");
    private static readonly TimeSpan Patience = TimeSpan.FromSeconds(60);

    /// <summary>An engine on the fixture model whose store is the fixture adapters unless the options name another.</summary>
    private InferenceEngine NewEngine(EngineOptions? options = null, Tokenizer? tokenizer = null)
    {
        options ??= new EngineOptions();
        return new(f.Model, tokenizer, options.AdapterStore == new EngineOptions().AdapterStore ? options with { AdapterStore = Store } : options);
    }

    private int[] Prompt => f.Expected["prompt_ids"][0].data<long>().Select(x => (int)x).ToArray();
    private int[] Expected(string key) => f.Expected[key][0].data<long>().Select(x => (int)x).ToArray();
    private static string ExpectationKey(string? adapter) => "greedy_" + (adapter ?? "base");

    private static async Task<int[]> Ids(GenerationStream s) =>
        (await s.CollectAsync().WaitAsync(Patience)).Ids.ToArray();

    [Fact]
    public async Task ConcurrentRequestsWithEveryAdapterMatchPeftRowByRow()
    {
        await using var engine = NewEngine(new EngineOptions { MaxBatchSize = 6, KvBlockSize = 4 });
        var names = AdapterConformanceTests.FixtureAdapters.Append(null).ToArray();
        // Three rounds of every adapter plus the base, more than one batch holds: requests join and leave the running batch.
        var work = Enumerable.Range(0, 3).SelectMany(_ => names).Select(n => (n, engine.Submit(new GenerationRequest
        {
            PromptIds = Prompt, Adapter = n, Sampling = SamplingParams.Greedy(16),
        }))).ToList();
        foreach (var (name, stream) in work)
            Assert.Equal(Expected(ExpectationKey(name)), await Ids(stream));
        Assert.True(engine.Stats.Steps > 0);
        Assert.Equal(AdapterConformanceTests.FixtureAdapters.Length, engine.Stats.Adapters.DiskLoads);
    }

    [Fact]
    public async Task ChunkedPrefillGivesTheSameTokens()
    {
        await using var engine = NewEngine(new EngineOptions { PrefillChunkTokens = 3, KvBlockSize = 2 });
        var streams = new[] { "lora-r8-all", "prefix-6", null }.Select(n => (n, engine.Submit(new GenerationRequest
        {
            PromptIds = Prompt, Adapter = n, Sampling = SamplingParams.Greedy(16),
        }))).ToList();
        foreach (var (name, stream) in streams)
            Assert.Equal(Expected(ExpectationKey(name)), await Ids(stream));
    }

    [Fact]
    public async Task PreemptionRecomputesAndGivesTheSameTokensAndFreesEveryBlock()
    {
        // 8 sequences of ~16 + 24 tokens want ~80 blocks of 4; the cache has 30 usable: the newest are
        // preempted while others decode, and recomputed later.
        await using var engine = NewEngine(new EngineOptions { KvBlockSize = 4, KvCacheBlocks = 31, MaxBatchSize = 8 });
        int start = engine.Stats.KvBlocksTotal;
        var seeded = new SamplingParams { Temperature = 0.9f, TopP = 0.95f, Seed = 7, MaxTokens = 24 };
        var streams = Enumerable.Range(0, 8).Select(i => engine.Submit(new GenerationRequest
        {
            PromptIds = Prompt, Adapter = i % 2 == 0 ? "lora-r4-qv" : null, Sampling = seeded with { Seed = (ulong)i },
        })).ToList();
        var outputs = new List<int[]>();
        foreach (var s in streams) outputs.Add(await Ids(s));
        Assert.True(engine.Stats.Preemptions > 0, "the cache was sized to force preemption");
        await WaitFor(() => engine.KvBlocksFree == start);

        // Each output is what the request gives alone (counter-based sampling does not depend on the batch).
        await using var alone = NewEngine(new EngineOptions { KvBlockSize = 4 });
        for (int i = 0; i < 8; i++)
        {
            var single = alone.Submit(new GenerationRequest { PromptIds = Prompt, Adapter = i % 2 == 0 ? "lora-r4-qv" : null, Sampling = seeded with { Seed = (ulong)i } });
            Assert.Equal(await Ids(single), outputs[i]);
        }
    }

    [Fact]
    public async Task SampledRequestsMatchTheFixedBatchGenerator()
    {
        var p = new SamplingParams { Temperature = 0.8f, TopK = 50, TopP = 0.9f, Seed = 1234, MaxTokens = 20 };
        var reference = FixedBatch.Generate(f.Model, [Prompt], [p]).Select(t => t.TokenId).ToArray();
        await using var engine = NewEngine();
        // Other requests in the same batch change nothing for this one.
        var noise = Enumerable.Range(0, 4).Select(i => engine.Submit(new GenerationRequest { PromptIds = [1, 2, 3 + i], Sampling = p with { Seed = (ulong)i } })).ToList();
        var mine = engine.Submit(new GenerationRequest { PromptIds = Prompt, Sampling = p });
        Assert.Equal(reference, await Ids(mine));
        foreach (var n in noise) await Ids(n);
    }

    [Fact]
    public async Task CancellationEndsTheRequestAndFreesItsBlocksAndSlot()
    {
        await using var engine = NewEngine(new EngineOptions { KvBlockSize = 4 });
        int start = engine.Stats.KvBlocksTotal;
        using var cts = new CancellationTokenSource();
        var stream = engine.Submit(new GenerationRequest { PromptIds = Prompt, Adapter = "ia3", Sampling = SamplingParams.Greedy(1000) with { MaxTokens = 100000 } }, cts.Token);
        var other = engine.Submit(new GenerationRequest { PromptIds = Prompt, Sampling = SamplingParams.Greedy(16) });
        int seen = 0;
        FinishReason? finish = null;
        await foreach (var e in stream.WithCancellation(CancellationToken.None))
        {
            if (e.TokenId >= 0 && ++seen == 3) cts.Cancel();
            finish = e.Finish ?? finish;
        }
        Assert.Equal(FinishReason.Cancelled, finish);
        Assert.InRange(stream.CompletionTokens, 3, 200);
        Assert.Equal(Expected("greedy_base"), await Ids(other));   // the batch went on undisturbed
        await WaitFor(() => engine.KvBlocksFree == start && engine.Adapters.HeldSlots == 0);
        Assert.Equal(1, engine.Stats.RequestsCancelled);
    }

    [Fact]
    public async Task AFullQueueRefusesAtOnceAndTheOthersStillFinish()
    {
        await using var engine = NewEngine(new EngineOptions { MaxBatchSize = 1, MaxQueueLength = 2 });
        var accepted = new List<GenerationStream>();
        int refused = 0;
        for (int i = 0; i < 6; i++)
        {
            try { accepted.Add(engine.Submit(new GenerationRequest { PromptIds = Prompt, Sampling = SamplingParams.Greedy(200) })); }
            catch (QueueFullException e) { refused++; Assert.Equal(2, e.Capacity); }
        }
        Assert.True(refused >= 3, $"{refused} of 6 refused with a batch of 1 and a queue of 2");
        foreach (var s in accepted) Assert.Equal(200, (await Ids(s)).Length);
    }

    [Fact]
    public async Task AnEvictedAdapterReloadsAndGivesTheSameOutput()
    {
        // One LoRA slot and a host cache too small to keep anything: every switch goes back to disk.
        await using var engine = NewEngine(new EngineOptions { AdapterLimits = new AdapterLimits { SlotsPerMethod = 1 }, HostCacheBytes = 1 });
        foreach (var name in new[] { "lora-r8-all", "lora-r4-qv", "lora-r8-all", "lora-r4-qv" })
        {
            var s = engine.Submit(new GenerationRequest { PromptIds = Prompt, Adapter = name, Sampling = SamplingParams.Greedy(16) });
            Assert.Equal(Expected(ExpectationKey(name)), await Ids(s));
        }
        var stats = engine.Stats.Adapters;
        Assert.Equal(4, stats.DiskLoads);
        Assert.Equal(4, stats.DeviceLoads);
        Assert.Equal(3, stats.DeviceEvictions);

        // With room in host memory, the second round comes from there instead.
        await using var roomy = NewEngine(new EngineOptions { AdapterLimits = new AdapterLimits { SlotsPerMethod = 1 } });
        foreach (var name in new[] { "lora-r8-all", "lora-r4-qv", "lora-r8-all" })
            Assert.Equal(Expected(ExpectationKey(name)), await Ids(roomy.Submit(new GenerationRequest { PromptIds = Prompt, Adapter = name, Sampling = SamplingParams.Greedy(16) })));
        Assert.Equal(2, roomy.Stats.Adapters.DiskLoads);
        Assert.Equal(1, roomy.Stats.Adapters.HostHits);
        Assert.Equal(3, roomy.Stats.Adapters.DeviceLoads);
    }

    [Fact]
    public async Task ConcurrentRequestsForOneColdAdapterLoadItOnce()
    {
        await using var engine = NewEngine();
        var streams = Enumerable.Range(0, 5).Select(_ => engine.Submit(new GenerationRequest { PromptIds = Prompt, Adapter = "llama-adapter-4x2", Sampling = SamplingParams.Greedy(16) })).ToList();
        foreach (var s in streams) Assert.Equal(Expected("greedy_llama-adapter-4x2"), await Ids(s));
        Assert.Equal(1, engine.Stats.Adapters.DiskLoads);
        Assert.Equal(1, engine.Stats.Adapters.Misses);
        Assert.Equal(1, engine.Stats.Adapters.DeviceLoads);
    }

    [Fact]
    public async Task ABrokenAdapterFailsOnlyItsRequests()
    {
        var store = Directory.CreateTempSubdirectory("peftserve-engine-");
        try
        {
            CopyDir(Path.Combine(Store, "lora-r4-qv"), Path.Combine(store.FullName, "good"));
            CopyDir(Path.Combine(Store, "lora-r4-qv"), Path.Combine(store.FullName, "broken"));
            File.WriteAllText(Path.Combine(store.FullName, "broken", "adapter_model.safetensors"), "not a safetensors file");
            await using var engine = NewEngine(new EngineOptions { AdapterStore = store.FullName });
            Assert.Throws<AdapterException>(() => engine.Submit(new GenerationRequest { PromptIds = Prompt, Adapter = "missing" }));
            var bad = engine.Submit(new GenerationRequest { PromptIds = Prompt, Adapter = "broken", Sampling = SamplingParams.Greedy(4) });
            var good = engine.Submit(new GenerationRequest { PromptIds = Prompt, Adapter = "good", Sampling = SamplingParams.Greedy(16) });
            var error = await Assert.ThrowsAsync<AdapterException>(() => bad.CollectAsync().WaitAsync(Patience));
            Assert.Contains("broken", error.Message);
            Assert.Equal(Expected("greedy_lora-r4-qv"), await Ids(good));
        }
        finally { store.Delete(recursive: true); }
    }

    [Fact]
    public async Task StopStringsEndTheTextWhereTheyBegin()
    {
        var tokenizer = Tokenizer.FromDirectory(TestData.TinyLlamaDir);
        await using var engine = NewEngine(tokenizer: tokenizer);
        var full = await engine.Submit(new GenerationRequest { PromptIds = Prompt, Sampling = SamplingParams.Greedy(24) }).CollectAsync();
        Assert.Equal(tokenizer.Decode(full.Ids), full.Text);
        Assert.True(full.Text.Length > 12, $"need some text to cut: '{full.Text}'");
        var stop = full.Text.Substring(8, 3);
        int at = full.Text.IndexOf(stop, StringComparison.Ordinal);
        var cut = await engine.Submit(new GenerationRequest { PromptIds = Prompt, Sampling = SamplingParams.Greedy(24), StopStrings = [stop] }).CollectAsync();
        Assert.Equal(FinishReason.Stop, cut.Finish);
        Assert.Equal(full.Text[..at], cut.Text);
        Assert.True(cut.Ids.Count < full.Ids.Count);
        Assert.Equal(full.Ids.Take(cut.Ids.Count), cut.Ids);
    }

    [Fact]
    public async Task StopTokensAndInvalidInput()
    {
        await using var engine = NewEngine();
        var expected = Expected("greedy_base");
        var stopped = await engine.Submit(new GenerationRequest { PromptIds = Prompt, Sampling = SamplingParams.Greedy(16) with { StopTokenIds = [expected[4]] } }).CollectAsync();
        Assert.Equal(FinishReason.Stop, stopped.Finish);
        Assert.Equal(expected[..(Array.IndexOf(expected, expected[4]) + 1)], stopped.Ids);
        Assert.Throws<ArgumentException>(() => engine.Submit(new GenerationRequest { PromptIds = [] }));
        Assert.Throws<ArgumentException>(() => engine.Submit(new GenerationRequest { PromptIds = [f.Model.Config.VocabSize] }));
        Assert.Throws<ArgumentException>(() => engine.Submit(new GenerationRequest { PromptIds = [1], Sampling = new SamplingParams { TopP = 0 } }));
        Assert.Throws<ArgumentException>(() => engine.Submit(new GenerationRequest { PromptIds = new int[engine.MaxColumns] }));
    }

    /// <summary>Log probabilities ride with the sampled ids: each token's is the log-softmax of the model's logits at
    /// its position (computed here by a plain full forward), and its best alternatives are the top of that row.
    /// A request that asks for none, in the same batch, gets none.</summary>
    [Fact]
    public async Task LogprobsAreTheModelsLogSoftmaxAtEachGeneratedToken()
    {
        await using var engine = NewEngine();
        var asked = engine.Submit(new GenerationRequest { PromptIds = Prompt, Sampling = new SamplingParams { Temperature = 0.8f, Seed = 3, MaxTokens = 6, Logprobs = 3 } });
        var plain = engine.Submit(new GenerationRequest { PromptIds = Prompt, Sampling = SamplingParams.Greedy(6) });
        var events = new List<GenerationEvent>();
        await foreach (var e in asked) if (e.TokenId >= 0) events.Add(e);
        await foreach (var e in plain) Assert.Null(e.Logprob);
        Assert.Equal(6, events.Count);

        var all = Prompt.Concat(events.Select(e => e.TokenId)).Select(x => (long)x).ToArray();
        using var ids = torch.tensor(all, [1, all.Length]);
        using var logits = FullLogits.Compute(f.Model, ids);
        using var expected = logits[0].log_softmax(1);
        for (int i = 0; i < events.Count; i++)
        {
            var lp = events[i].Logprob!;
            int position = Prompt.Length - 1 + i;   // the logits that predicted token i
            Assert.Equal(events[i].TokenId, lp.TokenId);
            Assert.Equal(expected[position, lp.TokenId].item<float>(), lp.Logprob, 1e-4f);
            Assert.Equal(3, lp.Top.Count);
            var best = expected[position].topk(3).indexes.data<long>().ToArray();
            Assert.Equal(best.Select(x => (int)x), lp.Top.Select(t => t.TokenId));
            foreach (var (id, value) in lp.Top) Assert.Equal(expected[position, id].item<float>(), value, 1e-4f);
            Assert.True(lp.Top[0].Logprob >= lp.Logprob - 1e-6f);
        }
    }

    /// <summary>Prompt log probabilities (what evaluation harnesses score with): token j's is the log-softmax at
    /// position j - 1 of a plain full forward, whatever the prefill chunking; the first token has none.</summary>
    [Theory]
    [InlineData(512)]
    [InlineData(3)]
    public async Task PromptLogprobsAreTheModelsLogSoftmaxOverThePrompt(int chunk)
    {
        await using var engine = NewEngine(new EngineOptions { PrefillChunkTokens = chunk, KvBlockSize = 4 });
        var stream = engine.Submit(new GenerationRequest { PromptIds = Prompt, Sampling = SamplingParams.Greedy(2) with { PromptLogprobs = 2 } });
        await stream.CollectAsync();
        var scored = stream.PromptLogprobs!;
        Assert.Equal(Prompt.Length, scored.Count);
        Assert.Null(scored[0]);

        using var ids = torch.tensor(Prompt.Select(x => (long)x).ToArray(), [1, Prompt.Length]);
        using var logits = FullLogits.Compute(f.Model, ids);
        using var expected = logits[0].log_softmax(1);
        for (int j = 1; j < Prompt.Length; j++)
        {
            var lp = scored[j]!;
            Assert.Equal(Prompt[j], lp.TokenId);
            Assert.Equal(expected[j - 1, Prompt[j]].item<float>(), lp.Logprob, 1e-4f);
            Assert.Equal(expected[j - 1].topk(2).indexes.data<long>().Select(x => (int)x), lp.Top.Select(t => t.TokenId));
        }
    }

    /// <summary>With virtual tokens (prompt tuning) the prompt is scored after them, the same whether the prefill
    /// runs in one chunk or in many; a request that asks for nothing gets nothing.</summary>
    [Fact]
    public async Task PromptLogprobsWithVirtualTokensDoNotDependOnChunking()
    {
        async Task<IReadOnlyList<TokenLogprob?>?> Score(int chunk, int? k)
        {
            await using var engine = NewEngine(new EngineOptions { PrefillChunkTokens = chunk, KvBlockSize = 4 });
            var stream = engine.Submit(new GenerationRequest { PromptIds = Prompt, Adapter = "prompt-5", Sampling = SamplingParams.Greedy(1) with { PromptLogprobs = k } });
            await stream.CollectAsync();
            return stream.PromptLogprobs;
        }
        var whole = (await Score(512, 1))!;
        var pieces = (await Score(2, 1))!;
        Assert.Null(await Score(512, null));
        Assert.Null(whole[0]);
        for (int j = 1; j < Prompt.Length; j++)
        {
            Assert.Equal(whole[j]!.TokenId, pieces[j]!.TokenId);
            Assert.Equal(whole[j]!.Logprob, pieces[j]!.Logprob, 1e-4f);
        }
    }

    /// <summary>Repetition penalty as Hugging Face applies it (logits of tokens seen in the prompt or the output divided
    /// when positive, multiplied when negative): the engine's greedy tokens equal a step-by-step reference built on
    /// full forwards, and differ from plain greedy decoding.</summary>
    [Fact]
    public async Task RepetitionPenaltyMatchesAStepByStepReference()
    {
        const float penalty = 1.8f;
        await using var engine = NewEngine();
        var got = (await engine.Submit(new GenerationRequest { PromptIds = Prompt, Sampling = SamplingParams.Greedy(8) with { RepetitionPenalty = penalty } }).CollectAsync()).Ids;
        var plain = (await engine.Submit(new GenerationRequest { PromptIds = Prompt, Sampling = SamplingParams.Greedy(8) }).CollectAsync()).Ids;

        var tokens = Prompt.ToList();
        for (int step = 0; step < 8; step++)
        {
            using var ids = torch.tensor(tokens.Select(x => (long)x).ToArray(), [1, tokens.Count]);
            using var logits = FullLogits.Compute(f.Model, ids);
            var last = logits[0, -1].data<float>().ToArray();
            foreach (var seen in tokens.Distinct()) last[seen] = last[seen] > 0 ? last[seen] / penalty : last[seen] * penalty;
            tokens.Add(Array.IndexOf(last, last.Max()));
        }
        Assert.Equal(tokens.Skip(Prompt.Length), got);
        Assert.NotEqual(plain, got);
    }

    /// <summary>min_tokens holds the stop ids back until that many tokens exist: a stop id the model would pick first
    /// ends a plain request at once, but not one with min_tokens.</summary>
    [Fact]
    public async Task MinTokensHoldsTheStopIdsBack()
    {
        await using var engine = NewEngine();
        var greedy = Expected("greedy_base");
        var stopAtOnce = await engine.Submit(new GenerationRequest { PromptIds = Prompt, Sampling = SamplingParams.Greedy(8) with { StopTokenIds = [greedy[0]] } }).CollectAsync();
        Assert.Equal([greedy[0]], stopAtOnce.Ids);
        var held = await engine.Submit(new GenerationRequest { PromptIds = Prompt, Sampling = SamplingParams.Greedy(8) with { StopTokenIds = [greedy[0]], MinTokens = 3 } }).CollectAsync();
        Assert.True(held.Ids.Count >= 3);
        Assert.DoesNotContain(greedy[0], held.Ids.Take(3));
        Assert.Throws<ArgumentException>(() => engine.Submit(new GenerationRequest { PromptIds = Prompt, Sampling = SamplingParams.Greedy(2) with { MinTokens = 3 } }));
    }

    [Fact]
    public void LogprobsBeyondTwentyAreRefused() =>
        Assert.Throws<ArgumentException>(() => new SamplingParams { Logprobs = 21 }.Validate());

    /// <summary>A model with a sliding attention window holds sequences up to the window: a prompt that fits is
    /// served and stops at the window (finish "length"), a longer one is refused.</summary>
    [Fact]
    public async Task ASlidingWindowCapsTheSequence()
    {
        using var windowed = LlamaModel.CreateRandom(f.Model.Config with { SlidingWindow = 12 }, new ModelOptions(), seed: 3);
        await using var engine = new InferenceEngine(windowed, null, new EngineOptions { KvBlockSize = 4 });
        Assert.Equal(12, engine.MaxColumns);
        var result = await engine.Submit(new GenerationRequest { PromptIds = [1, 5, 9, 13, 17, 21, 25, 29], Sampling = SamplingParams.Greedy(32) }).CollectAsync();
        Assert.Equal(FinishReason.Length, result.Finish);
        Assert.Equal(12 - 8, result.Ids.Count);
        Assert.Throws<ArgumentException>(() => engine.Submit(new GenerationRequest { PromptIds = new int[12] }));
    }

    [Fact]
    public async Task ShutdownFinishesWhatRunsAndRefusesNewRequests()
    {
        var engine = NewEngine();
        var running = engine.Submit(new GenerationRequest { PromptIds = Prompt, Sampling = SamplingParams.Greedy(16) });
        var stop = engine.StopAsync();
        Assert.Throws<EngineStoppedException>(() => engine.Submit(new GenerationRequest { PromptIds = Prompt }));
        Assert.Equal(Expected("greedy_base"), await Ids(running));
        await stop.WaitAsync(Patience);

        // A shutdown whose grace period is over cancels what still runs.
        var second = NewEngine();
        var endless = second.Submit(new GenerationRequest { PromptIds = Prompt, Sampling = SamplingParams.Greedy(100000) });
        await using var events = endless.GetAsyncEnumerator();
        Assert.True(await events.MoveNextAsync());
        await second.StopAsync(new CancellationToken(canceled: true)).WaitAsync(Patience);
        FinishReason? finish = null;
        while (await events.MoveNextAsync()) finish = events.Current.Finish ?? finish;
        Assert.Equal(FinishReason.Cancelled, finish);
        await engine.DisposeAsync();
        await second.DisposeAsync();
    }

    [Fact]
    public async Task PresenceAndFrequencyPenaltiesFollowTheirFormula()
    {
        // Reference: greedy on logits - presence * [count > 0] - frequency * count over generated tokens,
        // recomputed from a full forward over the whole sequence at every step.
        const float presence = 0.7f, frequency = 1.3f;
        var tokens = Prompt.ToList();
        var counts = new Dictionary<int, int>();
        var reference = new List<int>();
        for (int step = 0; step < 12; step++)
        {
            using var ids = torch.tensor(tokens.Select(t => (long)t).ToArray(), [1, tokens.Count]);
            using var logits = f.FullForward(ids);
            var last = logits[0, -1].data<float>().ToArray();
            foreach (var (id, n) in counts) last[id] -= presence + frequency * n;
            int next = Array.IndexOf(last, last.Max());
            reference.Add(next);
            tokens.Add(next);
            counts[next] = counts.GetValueOrDefault(next) + 1;
        }
        await using var engine = NewEngine();
        var penalised = engine.Submit(new GenerationRequest
        {
            PromptIds = Prompt, Sampling = SamplingParams.Greedy(12) with { PresencePenalty = presence, FrequencyPenalty = frequency },
        });
        var plain = engine.Submit(new GenerationRequest { PromptIds = Prompt, Sampling = SamplingParams.Greedy(12) });
        Assert.Equal(reference, await Ids(penalised));
        Assert.NotEqual(reference, await Ids(plain));
    }

    private static async Task WaitFor(Func<bool> condition)
    {
        var until = DateTime.UtcNow + Patience;
        while (!condition())
        {
            if (DateTime.UtcNow > until) Assert.Fail("condition not reached in time");
            await Task.Delay(10);
        }
    }

    private static void CopyDir(string from, string to)
    {
        Directory.CreateDirectory(to);
        foreach (var file in Directory.GetFiles(from)) File.Copy(file, Path.Combine(to, Path.GetFileName(file)));
    }
}
