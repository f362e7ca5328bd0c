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
    private readonly ModelRunner _runner;
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
        MaxColumns = Math.Min(_cache.UsableBlocks * options.KvBlockSize, model.Config.MaxSequenceLength);
        _runner = new ModelRunner(model, _cache, options.MaxBatchSize, MaxColumns, options.CudaGraphs, _log);
        _log.LogInformation("KV cache: {Blocks} blocks of {BlockSize} tokens ({MiB:F1} MiB), at most {MaxColumns} tokens per sequence; batch up to {MaxBatch}, queue up to {Queue}",
            blocks, options.KvBlockSize, blocks * _cache.BytesPerBlock / 1048576.0, MaxColumns, options.MaxBatchSize, options.MaxQueueLength);
        if (model.Config.SlidingWindow is { } window && window < model.Config.MaxPositionEmbeddings)
            _log.LogWarning("The model uses sliding-window attention ({Window} positions): sequences are capped at the window, where it equals full attention",
                window);
        _loop = new Thread(Run) { IsBackground = true, Name = "peftserve-engine" };
        _loop.Start();
    }

    public AdapterManager Adapters => _adapters;
    internal ModelRunner Runner => _runner;
    /// <summary>How decode steps run: "cuda graphs (captures, replays)" or "eager (why)".</summary>
    public string DecodeMode => (_runner.UsesGraphs ? $"cuda graphs ({_runner.GraphCaptures} captured, {_runner.GraphReplays} replays)" : $"eager ({_runner.GraphsUnavailable})")
        + (Cuda.KernelModule.ProgrammaticLaunch && _model.Device.type == DeviceType.CUDA ? ", programmatic dependent launch" : "");
    /// <summary>Longest sequence (virtual tokens + prompt + generated) the engine can hold.</summary>
    public int MaxColumns { get; }
    public int KvBlocksFree => Volatile.Read(ref _freeBlocksSnapshot);
    private int _freeBlocksSnapshot;

    /// <summary>Blocks that fit in <see cref="EngineOptions.KvCacheFraction"/> of the memory left after the
    /// model was loaded (the device's free memory on CUDA, the memory the process may still use on CPU,
    /// capped there since the cache competes with everything else), once the adapter slot pools of every
    /// method and the decode activations are set aside: those are allocated later, on first use, and must
    /// still fit then.</summary>
    private static int SizeKvCache(LlamaModel model, EngineOptions options)
    {
        long perBlock = PagedKvCache.BlockBytes(model.Config, options.KvBlockSize, model.DType);
        long free = DeviceMemory.FreeBytes(model.Device);
        long reserved = ReservedBytes(model, options);
        long budget = (long)((free - reserved) * options.KvCacheFraction);
        long cap = options.KvCacheMaxBytes > 0 ? options.KvCacheMaxBytes : model.Device.type == DeviceType.CPU ? 1L << 30 : long.MaxValue;
        budget = Math.Min(budget, cap);
        long blocks = budget / perBlock;
        if (blocks < 2)
            throw new InvalidOperationException($"no room for a KV cache: {free / 1048576} MiB free after the model, of which {reserved / 1048576} MiB are " +
                $"set aside for the adapter slot pools ({options.AdapterLimits.SlotsPerMethod} slots per method, LoRA rank up to {options.AdapterLimits.MaxRank}) " +
                "and decode activations; lower SlotsPerMethod or MaxRank, or set KvCacheBlocks");
        return (int)Math.Min(blocks, 1 << 22);
    }

    /// <summary>Device bytes the KV cache must leave: every method's slot pool at the configured limits, and
    /// the activations of the largest decode batch (logits in float32 several times over, plus a margin).</summary>
    internal static long ReservedBytes(LlamaModel model, EngineOptions options)
    {
        long pools = AdapterMethods.All.Sum(m => m.PoolBytes(model.Config, options.AdapterLimits, model.DType));
        long activations = model.Device.type == DeviceType.CUDA
            ? (512L << 20) + 8L * options.MaxBatchSize * model.Config.VocabSize * 4
            : 0;
        return pools + activations;
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
        if (sampling.LogitBias?.Keys.Any(id => id >= vocab) == true)
            throw new ArgumentException($"logit_bias names a token outside the vocabulary (0..{vocab - 1})");
        if (prompt.Count + 1 > MaxColumns)
            throw new ArgumentException($"the prompt has {prompt.Count} tokens; this engine holds at most {MaxColumns} tokens per sequence");
        if (request.StopStrings is null || request.StopStrings.Any(s => s is null)) throw new ArgumentException("stop strings must not be null");
        if (sampling.Json is not null && _tokenizer is null) throw new ArgumentException("guided JSON needs the engine to have the model's tokenizer");
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
        if (sampling.Json is { } schema) seq.Json = new JsonConstraint(JsonVocabulary.For(_tokenizer!), schema, sampling.StopTokenIds);
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
        _runner.Dispose();
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
                worked |= Pass(PrefillRows(), rows => _runner.Prefill(rows));
                worked |= Pass(DecodeRows(), rows => _runner.Decode(rows.Select(r => r.S).ToList()));
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
        _runner.Release(s);
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

    /// <summary>The next prefill pass: the next chunk of every sequence still in its prefill, within the
    /// token budget (oldest first). A sequence under suspicion (see <see cref="Pass"/>) goes alone.</summary>
    private List<(Sequence S, int Count)> PrefillRows()
    {
        var rows = new List<(Sequence S, int Count)>();
        int budget = _options.PrefillChunkTokens;
        foreach (var s in _running.Where(s => s.InPrefill).OrderBy(s => s.Order))
        {
            if (budget <= 0) break;
            if (s.Suspect && rows.Count > 0) continue;
            int n = Math.Min(s.Remaining, budget);
            if (s.Cached == 0) n = Math.Max(n, Math.Min(s.Remaining, s.Virtual + 1)); // virtual columns go in one chunk
            rows.Add((s, n));
            budget -= n;
            if (s.Suspect) break;
        }
        return rows;
    }

    /// <summary>The next decode pass: one column over every sequence ready to extend (a suspect alone). Each
    /// row needs room for one more column; when the cache is full the newest sequences give their blocks back
    /// and wait to be recomputed.</summary>
    private List<(Sequence S, int Count)> DecodeRows()
    {
        var ready = _running.Where(s => !s.InPrefill).OrderBy(s => s.Order).ToList();
        if (ready.FirstOrDefault(s => s.Suspect) is { } suspect) ready = [suspect];
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
        if (ready.Count > 0) Volatile.Write(ref _lastBatch, ready.Count);
        return ready.Select(s => (s, 1)).ToList();
    }

    /// <summary>Runs one forward pass over <paramref name="rows"/> and streams the tokens of the rows that reached
    /// their last column. A pass that throws (out of device memory, say) ends no one at first: its rows become
    /// suspects, which later passes run one at a time, so that only a request that fails alone is failed
    /// (with the error) and everyone else goes on.</summary>
    private bool Pass(List<(Sequence S, int Count)> rows, Func<List<(Sequence S, int Count)>, StepTokens> run)
    {
        if (rows.Count == 0) return false;
        StepTokens sampled;
        try
        {
            sampled = run(rows);
        }
        catch (Exception e) when (e is not OutOfMemoryException and not StackOverflowException)
        {
            if (rows.Count == 1)
            {
                _log.LogError(e, "Forward pass failed for request {Request}; failing it alone", rows[0].S.Stream.Id);
                Retire(rows[0].S, new EngineStepException($"the model could not run this request: {e.Message}", e));
            }
            else
            {
                _log.LogWarning(e, "Forward pass over {Count} requests failed; retrying them one at a time", rows.Count);
                foreach (var (s, _) in rows) s.Suspect = true;
            }
            return true;
        }
        Interlocked.Increment(ref _steps);
        for (int r = 0; r < rows.Count; r++)
        {
            var (s, n) = rows[r];
            s.Suspect = false;
            s.Cached += n;
            if (s.Cached < s.Columns) continue;          // a prompt chunk that is not the last
            Interlocked.Increment(ref _generatedTokens);
            if (s.Accept((int)sampled.Ids[r], MaxColumns, sampled.Logprobs?[r])) Retire(s, null);
        }
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
}
