using System.Collections.Concurrent;
using System.Diagnostics;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using PeftServe.Core.Adapters;
using PeftServe.Core.Generation;
using PeftServe.Core.Model;
using PeftServe.Core.Runtime;
using PeftServe.Core.Tokenization;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Engine;

/// <summary>The serving engine: continuous batching over one base model, a paged KV cache and a
/// three-tier adapter cache. One scheduler thread owns the model and the caches. Each iteration it
/// takes in new requests and cancellations, admits waiting requests while the batch and the KV cache
/// have room (a request whose adapter is still loading waits without holding anyone up), runs one
/// prefill pass over the next chunk of the admitted prompts (at most <see cref="EngineOptions.PrefillChunkTokens"/>
/// tokens, so a long prompt never stalls the batch for long) and one decode pass over every sequence
/// that has a token to extend, and streams the sampled tokens. Each pass is one forward over rows with
/// different adapters (or none) and reads the sampled ids back once.</summary>
public sealed class InferenceEngine : IInferenceEngine, IAsyncDisposable, IDisposable
{
    private readonly LlamaModel _model;
    private readonly Tokenizer? _tokenizer;
    private readonly EngineOptions _options;
    private readonly ILogger _log;
    private readonly PagedKvCache _cache;
    private readonly AdapterManager _adapters;
    private readonly ConcurrentQueue<Sequence> _incoming = new();
    private readonly LinkedList<Sequence> _waiting = new();
    private readonly List<Sequence> _running = [];
    private readonly SemaphoreSlim _wake = new(0);
    private readonly Thread _loop;
    private readonly CancellationTokenSource _abort = new();
    private readonly TaskCompletionSource _stopped = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private volatile bool _stopping;
    private int _queued; // requests submitted but not yet admitted (incoming + waiting)
    private long _order, _steps, _finished, _cancelled, _failed, _promptTokens, _generatedTokens, _preemptions;
    private int _lastBatch;

    public InferenceEngine(LlamaModel model, Tokenizer? tokenizer, EngineOptions options, ILogger? log = null)
    {
        options.Validate();
        _model = model;
        _tokenizer = tokenizer;
        _options = options;
        _log = log ?? NullLogger.Instance;
        int blocks = options.KvCacheBlocks ?? SizeKvCache(model, options);
        _cache = new PagedKvCache(model.Config, blocks, options.KvBlockSize, model.DType, model.Device);
        _adapters = new AdapterManager(model, options.AdapterLimits, options.AdapterStore, options.HostCacheBytes);
        _adapters.LoadFinished += () => _wake.Release();
        MaxColumns = Math.Min(_cache.UsableBlocks * options.KvBlockSize, model.Config.MaxPositionEmbeddings);
        _log.LogInformation("KV cache: {Blocks} blocks of {BlockSize} tokens ({MiB:F1} MiB), at most {MaxColumns} tokens per sequence; batch up to {MaxBatch}, queue up to {Queue}",
            blocks, options.KvBlockSize, blocks * _cache.BytesPerBlock / 1048576.0, MaxColumns, options.MaxBatchSize, options.MaxQueueLength);
        _loop = new Thread(Run) { IsBackground = true, Name = "peftserve-engine" };
        _loop.Start();
    }

    public AdapterManager Adapters => _adapters;
    /// <summary>Longest sequence (virtual tokens + prompt + generated) the engine can hold.</summary>
    public int MaxColumns { get; }
    public int KvBlocksFree => Volatile.Read(ref _freeBlocksSnapshot);
    private int _freeBlocksSnapshot;

    /// <summary>Blocks that fit in <see cref="EngineOptions.KvCacheFraction"/> of the memory left after
    /// the model was loaded: the device's free memory on CUDA, the memory the process may still use on
    /// CPU (capped, since there the cache competes with everything else).</summary>
    private static int SizeKvCache(LlamaModel model, EngineOptions options)
    {
        long perBlock = PagedKvCache.BlockBytes(model.Config, options.KvBlockSize, model.DType);
        long free = DeviceMemory.FreeBytes(model.Device);
        long budget = (long)(free * options.KvCacheFraction);
        long cap = options.KvCacheMaxBytes > 0 ? options.KvCacheMaxBytes : model.Device.type == DeviceType.CPU ? 1L << 30 : long.MaxValue;
        budget = Math.Min(budget, cap);
        long blocks = budget / perBlock;
        if (blocks < 2)
            throw new InvalidOperationException($"no room for a KV cache: {budget} bytes for blocks of {perBlock} bytes (free memory {free} bytes); lower the model's size or set KvCacheBlocks");
        return (int)Math.Min(blocks, 1 << 22);
    }

    public GenerationStream Submit(GenerationRequest request, CancellationToken cancellation = default)
    {
        ArgumentNullException.ThrowIfNull(request);
        if (_stopping) throw new EngineStoppedException();
        var prompt = request.PromptIds ?? throw new ArgumentException("prompt token ids are required");
        if (prompt.Count == 0) throw new ArgumentException("the prompt must hold at least one token");
        int vocab = _model.Config.VocabSize;
        foreach (var token in prompt)
            if (token < 0 || token >= vocab) throw new ArgumentException($"token id {token} is outside the vocabulary (0..{vocab - 1})");
        var sampling = (request.Sampling ?? throw new ArgumentException("sampling parameters are required")).WithResolvedSeed();
        sampling.Validate();
        if (prompt.Count + 1 > MaxColumns)
            throw new ArgumentException($"the prompt has {prompt.Count} tokens; this engine holds at most {MaxColumns} tokens per sequence");
        if (request.StopStrings is null || request.StopStrings.Any(s => s is null)) throw new ArgumentException("stop strings must not be null");
        string? adapterPath = string.IsNullOrEmpty(request.Adapter) ? null : _adapters.Resolve(request.Adapter);

        if (Interlocked.Increment(ref _queued) > _options.MaxQueueLength)
        {
            Interlocked.Decrement(ref _queued);
            throw new QueueFullException(_options.MaxQueueLength);
        }
        var id = request.Id ?? $"req-{Guid.NewGuid():N}";
        var stream = new GenerationStream(id, prompt.Count);
        var seq = new Sequence(request, stream, sampling, adapterPath, Interlocked.Increment(ref _order));
        seq.AttachTokenizer(_tokenizer);
        _incoming.Enqueue(seq);
        if (cancellation.CanBeCanceled)
            seq.Registration = cancellation.Register(() => { seq.CancelRequested = true; _wake.Release(); });
        _wake.Release();
        return stream;
    }

    public EngineStats Stats => new()
    {
        Waiting = Math.Max(0, Volatile.Read(ref _queued)),
        Running = Volatile.Read(ref _runningSnapshot),
        QueueCapacity = _options.MaxQueueLength,
        MaxBatchSize = _options.MaxBatchSize,
        KvBlocksTotal = _cache.UsableBlocks,
        KvBlocksFree = Volatile.Read(ref _freeBlocksSnapshot),
        KvBlockSize = _cache.BlockSize,
        LastBatchSize = Volatile.Read(ref _lastBatch),
        Steps = Interlocked.Read(ref _steps),
        RequestsFinished = Interlocked.Read(ref _finished),
        RequestsCancelled = Interlocked.Read(ref _cancelled),
        RequestsFailed = Interlocked.Read(ref _failed),
        PromptTokens = Interlocked.Read(ref _promptTokens),
        GeneratedTokens = Interlocked.Read(ref _generatedTokens),
        Preemptions = Interlocked.Read(ref _preemptions),
        Adapters = _adapters.Stats,
        RunningAdapters = Volatile.Read(ref _adapterNames).Running,
        WaitingAdapters = Volatile.Read(ref _adapterNames).Waiting,
    };
    private int _runningSnapshot;

    /// <summary>An adapter folder in the store was replaced or deleted: later requests read it again;
    /// running sequences finish on the copy they hold.</summary>
    public void InvalidateAdapter(string name) => _adapters.Invalidate(name);

    /// <summary>Stops taking requests, lets queued and running ones finish until
    /// <paramref name="cancellation"/> fires, then cancels what is left and ends the scheduler.</summary>
    public async Task StopAsync(CancellationToken cancellation = default)
    {
        _stopping = true;
        _wake.Release();
        using (cancellation.Register(() => { _abort.Cancel(); _wake.Release(); }))
            await _stopped.Task.ConfigureAwait(false);
    }

    public async ValueTask DisposeAsync()
    {
        if (!_stopped.Task.IsCompleted)
        {
            _abort.Cancel();
            await StopAsync().ConfigureAwait(false);
        }
        _loop.Join();
        _cache.Dispose();
        _adapters.Dispose();
        _wake.Dispose();
        _abort.Dispose();
    }

    public void Dispose() => DisposeAsync().AsTask().GetAwaiter().GetResult();

    // ---------------------------------------------------------------- the scheduler thread

    private void Run()
    {
        try
        {
            while (true)
            {
                TakeIncoming();
                if (_abort.IsCancellationRequested) CancelAll();
                HandleCancellations();
                if (_stopping && _waiting.Count == 0 && _running.Count == 0 && _incoming.IsEmpty) break;
                Admit();
                bool worked = false;
                try
                {
                    worked |= PrefillStep();
                    worked |= DecodeStep();
                }
                catch (Exception e)
                {
                    // A failed pass (out of memory, a bad adapter at run time) fails the sequences it held,
                    // not the engine: they are freed and everyone else goes on.
                    _log.LogError(e, "Forward pass failed; failing {Count} running requests", _running.Count);
                    foreach (var s in _running.ToArray()) Retire(s, e);
                }
                Publish();
                if (!worked) _wake.Wait(_waiting.Count > 0 ? 20 : Timeout.Infinite);
            }
        }
        catch (Exception e)
        {
            _log.LogCritical(e, "The engine loop stopped");
            foreach (var s in _running.Concat(_waiting).ToArray()) Retire(s, e);
            while (_incoming.TryDequeue(out var s)) s.Fail(e);
        }
        finally
        {
            Publish();
            _stopped.TrySetResult();
        }
    }

    private void Publish()
    {
        Volatile.Write(ref _runningSnapshot, _running.Count);
        Volatile.Write(ref _freeBlocksSnapshot, _cache.FreeBlocks);
        PublishAdapterNames();
    }

    // --- Adapter-name snapshot for EngineStats (issue 14): written by the scheduler thread after each
    //     iteration, read by any thread. Rebuilt only when the running or waiting set may have changed.
    private sealed record AdapterNameSnapshot(IReadOnlyList<string> Running, IReadOnlyList<string> Waiting);
    private AdapterNameSnapshot _adapterNames = new([], []);
    private (int Running, int Waiting, long Order, long Retired) _adapterNamesKey = (-1, -1, -1, -1);

    private void PublishAdapterNames()
    {
        var key = (_running.Count, Volatile.Read(ref _queued), Interlocked.Read(ref _order),
                   Interlocked.Read(ref _finished) + Interlocked.Read(ref _cancelled) + Interlocked.Read(ref _failed) + Interlocked.Read(ref _preemptions));
        if (key == _adapterNamesKey) return;
        _adapterNamesKey = key;
        static string[] Names(IEnumerable<Sequence> seqs) =>
            seqs.Select(s => s.Request.Adapter).OfType<string>().Where(a => a.Length > 0).Distinct(StringComparer.Ordinal).Order(StringComparer.Ordinal).ToArray();
        Volatile.Write(ref _adapterNames, new AdapterNameSnapshot(Names(_running), Names(_waiting.Concat(_incoming))));
    }
    // --- end of the adapter-name snapshot

    private void TakeIncoming()
    {
        while (_incoming.TryDequeue(out var s)) _waiting.AddLast(s);
    }

    private void CancelAll()
    {
        foreach (var s in _waiting.Concat(_running).ToArray()) s.CancelRequested = true;
    }

    private void HandleCancellations()
    {
        foreach (var s in _waiting.Where(s => s.CancelRequested).ToArray()) Retire(s, null, cancel: true);
        foreach (var s in _running.Where(s => s.CancelRequested).ToArray()) Retire(s, null, cancel: true);
    }

    /// <summary>Ends a sequence (finished, cancelled or failed) and frees its blocks and adapter slot.</summary>
    private void Retire(Sequence s, Exception? error, bool cancel = false)
    {
        bool wasWaiting = _waiting.Remove(s);
        if (wasWaiting) Interlocked.Decrement(ref _queued);
        _running.Remove(s);
        Unload(s);
        if (error is not null) { s.Fail(error); Interlocked.Increment(ref _failed); }
        else if (cancel) { s.Cancel(); Interlocked.Increment(ref _cancelled); }
        else Interlocked.Increment(ref _finished);
    }

    /// <summary>Gives back a sequence's blocks and adapter slot, so it holds nothing.</summary>
    private void Unload(Sequence s)
    {
        _cache.Free(s.Blocks);
        s.Blocks.Clear();
        s.Cached = 0;
        if (s.Adapter is { } a) { _adapters.Release(a); s.Adapter = null; }
    }

    private int TokensInFlight => _running.Sum(s => s.Columns);

    private enum Admission { Admitted, WaitForAdapter, WaitForMemory, Failed }

    /// <summary>Admits waiting requests in arrival order (preempted ones first) while the batch has
    /// room. A request whose adapter is still loading is passed over, so it holds no one up; one that
    /// does not fit in the KV cache stops admission, so large requests are not starved by small ones.</summary>
    private void Admit()
    {
        foreach (var s in _waiting.ToArray())
        {
            if (_running.Count >= _options.MaxBatchSize) break;
            if (s.Finished) continue;   // failed with its adapter while we went through the list
            var admission = TryAdmit(s);
            if (admission == Admission.Admitted)
            {
                _waiting.Remove(s);
                Interlocked.Decrement(ref _queued);
                _running.Add(s);
            }
            else if (admission == Admission.WaitForMemory) break;
        }
    }

    private Admission TryAdmit(Sequence s)
    {
        if (s.AdapterPath is not null && s.Adapter is null)
        {
            try
            {
                s.Adapter = _adapters.TryAcquire(s.AdapterPath, !s.AdapterAsked);
                s.AdapterAsked = true;
            }
            catch (Exception e)
            {
                // Everyone waiting for this adapter gets the same error.
                var error = e as AdapterException ?? new AdapterException(e.Message);
                _log.LogWarning("Adapter {Adapter} failed to load: {Reason}", s.AdapterPath, error.Message);
                foreach (var w in _waiting.Where(w => w.AdapterPath == s.AdapterPath && w.Adapter is null).ToArray()) Retire(w, error);
                return Admission.Failed;
            }
            if (s.Adapter is null) return Admission.WaitForAdapter; // loading, or no free slot: try again next step
        }
        if (s.Columns + 1 > MaxColumns)
        {
            Retire(s, new ArgumentException($"prompt ({s.PromptLength} tokens) and the adapter's {s.Virtual} virtual tokens exceed the {MaxColumns} tokens a sequence can hold"));
            return Admission.Failed;
        }
        int blocks = BlocksFor(s.Columns + 1);
        bool fits = blocks <= _cache.FreeBlocks &&
                    (_options.MaxTokensInFlight == 0 || TokensInFlight + s.Columns <= _options.MaxTokensInFlight || _running.Count == 0);
        if (!fits)
        {
            // Hold no slot while waiting for memory: another request may need it more.
            if (s.Adapter is { } a) { _adapters.Release(a); s.Adapter = null; }
            return Admission.WaitForMemory;
        }
        for (int i = 0; i < blocks; i++)
        {
            _cache.TryAllocate(out var b);
            s.Blocks.Add(b);
        }
        if (s.Generated == 0) Interlocked.Add(ref _promptTokens, s.PromptLength);
        return Admission.Admitted;
    }

    private int BlocksFor(int columns) => (columns + _cache.BlockSize - 1) / _cache.BlockSize;

    /// <summary>One forward over the next chunk of every sequence still in its prefill, within the
    /// token budget (oldest first); rows whose prompt completes sample their first token.</summary>
    private bool PrefillStep()
    {
        var rows = new List<(Sequence S, int Count)>();
        int budget = _options.PrefillChunkTokens;
        foreach (var s in _running.Where(s => s.InPrefill).OrderBy(s => s.Order))
        {
            if (budget <= 0) break;
            int n = Math.Min(s.Remaining, budget);
            if (s.Cached == 0) n = Math.Max(n, Math.Min(s.Remaining, s.Virtual + 1)); // virtual columns go in one chunk
            rows.Add((s, n));
            budget -= n;
        }
        if (rows.Count == 0) return false;
        Forward(rows);
        return true;
    }

    /// <summary>One forward of one column over every sequence ready to extend.</summary>
    private bool DecodeStep()
    {
        var ready = _running.Where(s => !s.InPrefill).OrderBy(s => s.Order).ToList();
        if (ready.Count == 0) return false;
        // Each row needs room for one more column; when the cache is full the newest sequences give
        // their blocks back and wait to be recomputed.
        foreach (var s in ready.ToArray())
        {
            if (!ready.Contains(s)) continue;
            while (s.Blocks.Count * _cache.BlockSize < s.Columns)
            {
                if (_cache.TryAllocate(out var b)) { s.Blocks.Add(b); continue; }
                var victim = _running.Where(r => r != s).OrderByDescending(r => r.Order).FirstOrDefault();
                if (victim is null || victim.Order < s.Order) victim = s;
                Preempt(victim);
                ready.Remove(victim);
                if (victim == s) break;
            }
        }
        if (ready.Count == 0) return false;
        Forward(ready.Select(s => (s, 1)).ToList());
        Volatile.Write(ref _lastBatch, ready.Count);
        return true;
    }

    private void Preempt(Sequence s)
    {
        _running.Remove(s);
        Unload(s);
        _waiting.AddFirst(s);
        Interlocked.Increment(ref _queued);
        Interlocked.Increment(ref _preemptions);
        _log.LogDebug("Preempted {Request} ({Tokens} tokens) for recomputation: the KV cache is full", s.Stream.Id, s.Columns);
    }

    /// <summary>Runs the model over <paramref name="rows"/> (each with its next Count columns,
    /// right-aligned in one chunk), samples for the rows that reach their last column and streams them.</summary>
    private void Forward(List<(Sequence S, int Count)> rows)
    {
        int b = rows.Count, chunk = rows.Max(r => r.Count);
        var ids = new long[b * chunk];
        var positions = new long[b * chunk];
        var virtualStart = new int[b];
        for (int r = 0; r < b; r++)
        {
            var (s, n) = rows[r];
            int pad = chunk - n, v = s.Virtual;
            virtualStart[r] = s.Cached == 0 && v > 0 ? pad : -1;
            for (int t = 0; t < chunk; t++)
            {
                int col = s.Cached + t - pad;
                ids[r * chunk + t] = t < pad || col < v ? 0 : s.Tokens[col - v];
                positions[r * chunk + t] = t < pad ? -1 : col;
            }
        }
        var sampling = rows.Select(r => r.S.Sampling).ToList();
        var seeds = rows.Select(r => r.S.Seed).ToList();
        var steps = rows.Select(r => (long)r.S.Generated).ToList();
        long[] sampled;
        using (var scope = torch.NewDisposeScope())
        {
            var device = _model.Device;
            var view = _cache.ForBatch(rows.Select(r => (IReadOnlyList<int>)r.S.Blocks).ToList(), rows.Select(r => r.S.Cached).ToList(), rows.Select(r => r.Count).ToList(), chunk);
            using var adapters = AdapterBatch.Create(rows.Select(r => r.S.Adapter).ToList(), virtualStart, device);
            var logits = _model.Forward(torch.tensor(ids, [b, chunk], device: device), torch.tensor(positions, [b, chunk], device: device),
                view, lastTokenOnly: true, adapters)[.., 0, ..];
            var counts = PenaltyCounts(rows.Select(r => r.S).ToList(), device);
            var next = Sampler.Sample(logits, sampling, seeds, steps, counts);
            sampled = next.cpu().data<long>().ToArray();   // the one host sync of the pass
        }
        Interlocked.Increment(ref _steps);
        for (int r = 0; r < b; r++)
        {
            var (s, n) = rows[r];
            s.Cached += n;
            if (s.Cached < s.Columns) continue;          // a prompt chunk that is not the last
            Interlocked.Increment(ref _generatedTokens);
            if (s.Accept((int)sampled[r], MaxColumns)) Retire(s, null);
        }
    }

    /// <summary>Per row, how often each token was generated so far ([B,V] on the device), for the
    /// presence and frequency penalties; null when no row uses them.</summary>
    private Tensor? PenaltyCounts(List<Sequence> rows, Device device)
    {
        if (!rows.Any(s => s.Sampling.PresencePenalty != 0 || s.Sampling.FrequencyPenalty != 0)) return null;
        int b = rows.Count, longest = Math.Max(1, rows.Max(s => s.Generated));
        var ids = new long[b * longest];
        var weight = new float[b * longest];
        for (int r = 0; r < b; r++)
            for (int i = 0; i < rows[r].Generated; i++)
            {
                ids[r * longest + i] = rows[r].Tokens[rows[r].PromptLength + i];
                weight[r * longest + i] = 1;
            }
        var counts = torch.zeros([b, _model.Config.VocabSize], ScalarType.Float32, device);
        return counts.scatter_add_(1, torch.tensor(ids, [b, longest], device: device), torch.tensor(weight, [b, longest], device: device));
    }
}
