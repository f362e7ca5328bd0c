using Microsoft.Extensions.Logging;
using PeftServe.Core.Adapters;
using PeftServe.Core.Cuda;
using PeftServe.Core.Generation;
using PeftServe.Core.Kernels;
using PeftServe.Core.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Engine;

/// <summary>Runs the model over the engine's sequences: prefill chunks (eager) and decode steps. A decode
/// step reads only device tensors filled from one upload (<see cref="DecodeInputs"/>): token ids, KV
/// write slots, block tables, context lengths and per-method adapter slots. On CUDA, with the native
/// helper and our kernels, each (batch-size bucket, adapter methods present) is run eagerly once and
/// then captured as a CUDA graph, and later steps replay it, padded up to the bucket (as vLLM does for
/// 1, 2, 4, 8, 16, 24, 32, ...): one host call instead of a thousand kernel launches, whatever the mix
/// of adapters, since the kernels read every row's adapter through its slot. Everywhere else the same
/// step runs eagerly on the same inputs. Each pass reads the sampled ids back once.</summary>
internal sealed class ModelRunner : IDisposable
{
    private readonly LlamaModel _model;
    private readonly PagedKvCache _cache;
    private readonly ILogger _log;
    private readonly int _maxBlocks;
    private readonly int[] _buckets;
    private readonly Dictionary<int, DecodeInputs> _inputs = [];
    private readonly Dictionary<string, CapturedStep> _graphs = [];
    private readonly PenaltyCounts _penalties;
    private (ulong, ulong) _graphPool;
    private long _tick;

    /// <summary>Why decode steps run eagerly on this device, or null when they are captured as CUDA graphs.</summary>
    public string? GraphsUnavailable { get; }
    public bool UsesGraphs => GraphsUnavailable is null;
    /// <summary>Graphs captured so far, and replays.</summary>
    public long GraphCaptures { get; private set; }
    public long GraphReplays { get; private set; }

    /// <summary>PEFTSERVE_PROFILE=1: each new graph's replay time is measured back to back (GPU time alone), and
    /// the host time of decode steps is summed, both logged: what separates a step from its GPU floor.</summary>
    private static readonly bool Profile = Environment.GetEnvironmentVariable("PEFTSERVE_PROFILE") == "1";
    private long _profiledSteps, _hostTicks, _totalTicks;

    /// <summary>Fault injection for tests: a pass over rows for which this returns true throws, as a pass that runs
    /// out of device memory would.</summary>
    internal Func<IReadOnlyList<Sequence>, bool>? FailPassWhen { get; set; }

    private void MaybeFail(IReadOnlyList<Sequence> rows)
    {
        if (FailPassWhen?.Invoke(rows) == true) throw new InvalidOperationException("injected failure: out of device memory");
    }

    /// <summary>Captured graphs kept at most (least recently used ones are released beyond).</summary>
    private const int MaxGraphs = 96;

    public ModelRunner(LlamaModel model, PagedKvCache cache, int maxBatchSize, int maxColumns, bool cudaGraphs, ILogger log)
    {
        _model = model;
        _cache = cache;
        _log = log;
        _maxBlocks = (maxColumns + cache.BlockSize - 1) / cache.BlockSize;
        _buckets = Buckets(maxBatchSize);
        _penalties = new PenaltyCounts(maxBatchSize + 1, model.Config.VocabSize, model.Device);
        GraphsUnavailable = WhyNoGraphs(model, cudaGraphs);
        if (GraphsUnavailable is null) _graphPool = CudaGraph.NewPool();
        _log.LogInformation("Decode steps: {Mode}", GraphsUnavailable is null
            ? $"CUDA graphs for batch sizes {string.Join(",", _buckets)}" : $"eager ({GraphsUnavailable})");
    }

    /// <summary>Batch sizes graphs are captured for: 1, 2, 4, then every multiple of 8 up to the largest batch.</summary>
    internal static int[] Buckets(int maxBatchSize)
    {
        var sizes = new SortedSet<int> { maxBatchSize };
        foreach (var s in new[] { 1, 2, 4 }) if (s < maxBatchSize) sizes.Add(s);
        for (int s = 8; s < maxBatchSize; s += 8) sizes.Add(s);
        return [.. sizes];
    }

    private static string? WhyNoGraphs(LlamaModel model, bool enabled)
    {
        if (!enabled) return "CUDA graphs are turned off";
        if (model.Device.type != DeviceType.CUDA) return "not on CUDA";
        if (Environment.GetEnvironmentVariable("PEFTSERVE_CUDA_GRAPHS") == "0") return "PEFTSERVE_CUDA_GRAPHS=0";
        if (!CudaGraph.IsSupported) return NativeHelper.Unavailable;
        // A graph must not fall back to gathering the whole block table every step: the paged-attention
        // kernel has to serve this model.
        using var _ = torch.no_grad();
        var c = model.Config;
        using var q = torch.zeros([1, c.NumHeads, c.HeadDim], model.DType, model.Device);
        using var pool = torch.zeros([16, c.NumKvHeads, c.HeadDim], model.DType, model.Device);
        using var tables = torch.zeros([1, 1], ScalarType.Int64, model.Device);
        using var lengths = torch.ones([1], ScalarType.Int64, model.Device);
        using var probe = PagedAttention.TryDecode(q, pool, pool, tables, lengths, 16);
        return probe is null ? $"the paged-attention kernel does not serve this model ({KernelModule.LastError ?? "unsupported shape or dtype"})" : null;
    }

    // ------------------------------------------------------------------ prefill

    /// <summary>One eager forward over the next <c>Count</c> columns of each row (right-aligned in one
    /// chunk). Returns the sampled token of every row (meaningful for rows whose chunk ends their prompt).</summary>
    public StepTokens Prefill(IReadOnlyList<(Sequence S, int Count)> rows)
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
        var sequences = rows.Select(r => r.S).ToList();
        var scored = PromptTargets(rows, chunk);
        MaybeFail(sequences);
        foreach (var (s, n) in rows)
            if (s.UsesPenalties && s.Cached + n >= s.Columns) _penalties.Acquire(s);
        using var scope = torch.NewDisposeScope();
        var device = _model.Device;
        using var sampling = PrepareSampling(sequences);
        var penalties = _penalties.Indices(sequences);
        var view = _cache.ForPrefill(rows.Select(r => (IReadOnlyList<int>)r.S.Blocks).ToList(), rows.Select(r => r.S.Cached).ToList(), rows.Select(r => r.Count).ToList(), chunk);
        using var adapters = AdapterBatch.Create(sequences.Select(s => s.Adapter).ToList(), virtualStart, device);
        var targets = scored is null ? null : torch.tensor(scored.Value.Targets, device: device);
        // Rows that score their prompt need the logits of every column; the others only the last column's.
        var all = _model.Forward(torch.tensor(ids, [b, chunk], device: device), torch.tensor(positions, [b, chunk], device: device),
            view, lastTokenOnly: scored is null, adapters);
        var logits = all[.., -1, ..];
        Tensor? promptPacked = null;
        if (scored is { } p)
        {
            // One packed block for every scored row: [id, log p(id), top ids, top values] per prompt token.
            var parts = p.Spans.Select(span => all[span.Row].narrow(0, span.FirstColumn, span.Count)).ToList();
            promptPacked = Sampler.PackLogprobs(torch.cat(parts, 0), targets!, p.Top);
        }
        var result = Sample(logits, sampling, penalties, sequences, promptPacked);
        if (scored is { } q) StorePromptLogprobs(rows, q, result.Extra!);
        return result;
    }

    /// <summary>Where a prefill chunk's rows that asked for prompt log probabilities find them: for each, the chunk
    /// columns whose logits predict a prompt token (not the first, not a virtual column), and those tokens.</summary>
    private readonly record struct PromptScoring(List<(int Row, int FirstColumn, int FirstToken, int Count)> Spans, long[] Targets, int Top);

    private static PromptScoring? PromptTargets(IReadOnlyList<(Sequence S, int Count)> rows, int chunk)
    {
        var spans = new List<(int, int, int, int)>();
        var targets = new List<long>();
        int top = -1;
        for (int r = 0; r < rows.Count; r++)
        {
            var (s, n) = rows[r];
            if (s.Sampling.PromptLogprobs is not { } k) continue;
            // The logits at column c predict token c + 1 - Virtual; this chunk holds columns Cached .. Cached + n - 1.
            int v = s.Virtual, pad = chunk - n;
            int first = Math.Max(1, s.Cached + 1 - v), last = Math.Min(s.PromptLength - 1, s.Cached + n - v);
            if (first > last) continue;
            spans.Add((r, first - 1 + v - s.Cached + pad, first, last - first + 1));
            for (int j = first; j <= last; j++) targets.Add(s.Tokens[j]);
            top = Math.Max(top, k);
        }
        return spans.Count == 0 ? null : new PromptScoring(spans, targets.ToArray(), top);
    }

    private static void StorePromptLogprobs(IReadOnlyList<(Sequence S, int Count)> rows, PromptScoring scoring, double[] packed)
    {
        int width = 2 + 2 * scoring.Top, o = 0;
        foreach (var (row, _, firstToken, count) in scoring.Spans)
        {
            var s = rows[row].S;
            int k = s.Sampling.PromptLogprobs!.Value;
            for (int i = 0; i < count; i++, o += width)
                s.PromptLogprobs![firstToken + i] = Unpack(packed, o, scoring.Top, k);
        }
    }

    // ------------------------------------------------------------------ decode

    /// <summary>One decode step: every row extends by one token (its last token is at column Cached, its block
    /// table already covers it). Returns each row's sampled token.</summary>
    public StepTokens Decode(IReadOnlyList<Sequence> rows)
    {
        long start = System.Diagnostics.Stopwatch.GetTimestamp();
        MaybeFail(rows);
        int b = rows.Count;
        int size = UsesGraphs ? Bucket(b) : b;
        var inputs = Inputs(size);
        for (int r = 0; r < size; r++)
        {
            if (r >= b) { inputs.SetPadding(r); continue; }
            var s = rows[r];
            int column = s.Cached;
            var adapter = s.Adapter is { Pool.ActsInDecode: true } a ? a : null;
            inputs.SetRow(r, s.Tokens[column - s.Virtual], column, _cache.SlotOf(s.Blocks, column), column + 1, s.Blocks,
                adapter?.Pool.Method, adapter?.Slot ?? -1);
        }
        var pools = rows.Select(s => s.Adapter).Where(a => a is { Pool.ActsInDecode: true }).Select(a => a!.Pool).Distinct()
            .OrderBy(p => DecodeInputs.MethodIndex(p.Method)).ToList();
        using var scope = torch.NewDisposeScope();
        // Everything the step reads from the host goes up before its forward is queued.
        using var sampling = PrepareSampling(rows);
        var penalties = _penalties.Indices(rows);
        inputs.Upload();

        Tensor logits;
        if (UsesGraphs)
        {
            var key = $"{size}|{string.Join(";", pools.Select(p => p.Method.Name + ":" + p.Signature))}";
            if (_graphs.TryGetValue(key, out var step))
            {
                if (Profile) _hostTicks += System.Diagnostics.Stopwatch.GetTimestamp() - start;
                step.Graph.Replay();
                step.LastUsed = ++_tick;
                GraphReplays++;
                logits = step.Logits;
            }
            else
            {
                // The first step of a kind runs eagerly (it also warms up whatever the capture needs), then is captured.
                logits = DecodeForward(inputs, pools, rows, _maxBlocks);
                Capture(key, inputs, pools);
            }
        }
        else
        {
            int longest = rows.Max(s => s.Cached + 1);
            logits = DecodeForward(inputs, pools, rows, (longest + _cache.BlockSize - 1) / _cache.BlockSize);
        }
        var sampled = Sample(logits.narrow(0, 0, b), sampling, penalties, rows);
        if (Profile)
        {
            _totalTicks += System.Diagnostics.Stopwatch.GetTimestamp() - start;
            if (++_profiledSteps % 500 == 0)
                Console.Error.WriteLine($"profile: {_profiledSteps} decode steps, {_totalTicks * 1000.0 / System.Diagnostics.Stopwatch.Frequency / _profiledSteps:F3} ms " +
                    $"per step of which {_hostTicks * 1000.0 / System.Diagnostics.Stopwatch.Frequency / _profiledSteps:F3} ms host work before the replay");
        }
        return sampled;
    }

    /// <summary>The decode forward over <paramref name="inputs"/>: eager with the rows' host-side adapters,
    /// or, without them (<paramref name="rows"/> null), in the form a graph captures.</summary>
    private Tensor DecodeForward(DecodeInputs inputs, IReadOnlyList<AdapterSlotPool> pools, IReadOnlyList<Sequence>? rows, int gatherBlocks)
    {
        var view = _cache.ForDecode(inputs.WriteSlots, inputs.BlockTables, inputs.ContextLengths, gatherBlocks);
        List<ResidentAdapter?>? hostRows = null;
        if (rows is not null)
        {
            hostRows = rows.Select(s => s.Adapter).ToList();
            while (hostRows.Count < inputs.Rows) hostRows.Add(null);
        }
        using var adapters = AdapterBatch.CreateForDecode(pools.Select(p => (p, inputs.AdapterSlots(p.Method))).ToList(), hostRows);
        return _model.Forward(inputs.TokenIds.view(inputs.Rows, 1), inputs.Positions.view(inputs.Rows, 1), view, lastTokenOnly: true, adapters)[.., 0, ..];
    }

    private void Capture(string key, DecodeInputs inputs, IReadOnlyList<AdapterSlotPool> pools)
    {
        if (_graphs.Count >= MaxGraphs)
        {
            var oldest = _graphs.MinBy(g => g.Value.LastUsed);
            oldest.Value.Dispose();
            _graphs.Remove(oldest.Key);
        }
        var graph = new CudaGraph(_model.Device.index < 0 ? 0 : _model.Device.index, _graphPool);
        try
        {
            var logits = graph.Capture(() =>
            {
                using var scope = torch.NewDisposeScope();
                return DecodeForward(inputs, pools, null, _maxBlocks).DetachFromDisposeScope();
            });
            _graphs[key] = new CapturedStep(graph, logits) { LastUsed = ++_tick };
            GraphCaptures++;
            if (Profile)
            {
                torch.cuda.synchronize();
                long t0 = System.Diagnostics.Stopwatch.GetTimestamp();
                for (int i = 0; i < 20; i++) graph.Replay();
                torch.cuda.synchronize();
                Console.Error.WriteLine($"profile: graph {key} replays in " +
                    $"{(System.Diagnostics.Stopwatch.GetTimestamp() - t0) * 1000.0 / System.Diagnostics.Stopwatch.Frequency / 20:F3} ms (GPU, back to back)");
            }
            _log.LogDebug("Captured a decode graph for {Key}", key);
        }
        catch
        {
            graph.Dispose();
            throw;
        }
    }

    private int Bucket(int rows)
    {
        foreach (var size in _buckets) if (size >= rows) return size;
        throw new InvalidOperationException($"a decode batch of {rows} rows exceeds the largest batch size {_buckets[^1]}");
    }

    private DecodeInputs Inputs(int rows)
    {
        if (!_inputs.TryGetValue(rows, out var inputs)) _inputs[rows] = inputs = new DecodeInputs(rows, _maxBlocks, _model.Device);
        return inputs;
    }

    // ------------------------------------------------------------------ sampling

    /// <summary>The rows' sampling parameters on the device. Guided-JSON masks (for rows that have them; a prefill row
    /// whose chunk does not end its prompt gets its mask all the same) are computed on the thread pool while the
    /// forward pass runs, and joined at <see cref="Sample"/>: the host work overlaps the device's.</summary>
    private SamplingBatch PrepareSampling(IReadOnlyList<Sequence> rows)
    {
        var batch = Sampler.Prepare(rows.Select(s => s.Sampling).ToList(), rows.Select(s => s.Seed).ToList(), rows.Select(s => (long)s.Generated).ToList(),
            _model.Config.VocabSize, _model.Device);
        // The recognizers change only when a token is accepted, after this pass: reading them meanwhile is safe.
        if (rows.Any(s => s.Json is not null))
            batch.PendingAllowed = Task.Run(() => (IReadOnlyList<bool[]?>)rows.Select(s => s.Json?.Allowed()).ToList());
        return batch;
    }

    /// <summary>Samples every row, adds the tokens to the penalty counts of the rows that keep some (a
    /// prompt chunk that is not the last holds no row, so its draw is not counted), and reads the ids back:
    /// the one host sync of the pass.</summary>
    private StepTokens Sample(Tensor logits, SamplingBatch sampling, (Tensor Read, Tensor Write)? penalties, IReadOnlyList<Sequence> rows,
        Tensor? extra = null)
    {
        if (sampling.PendingAllowed is { } pending) Sampler.Restrict(sampling, pending.GetAwaiter().GetResult());
        var (counts, prompt) = penalties is { } p ? _penalties.Read(p.Read) : (null, null);
        var next = Sampler.Sample(logits, sampling, counts, prompt);
        if (penalties is { } q) _penalties.Record(q.Write, next);
        int top = rows.Max(s => s.Sampling.Logprobs ?? -1);
        if (top < 0 && extra is null) return new StepTokens(next.cpu().data<long>().ToArray(), null, null);

        // Some row wants log probabilities: they travel with the ids (float64 holds them exactly), still one copy;
        // so does <paramref name="extra"/> (the prompt's log probabilities), after them.
        using var scope = torch.NewDisposeScope();
        var packed = top >= 0 ? Sampler.PackLogprobs(logits, next, top) : next.to_type(ScalarType.Float64).unsqueeze(1);
        var flat = extra is null ? packed.flatten() : torch.cat([packed.flatten(), extra.flatten()]);
        var host = flat.cpu().data<double>().ToArray();
        int width = top >= 0 ? 2 + 2 * top : 1;
        double[]? rest = extra is null ? null : host[(rows.Count * width)..];
        var ids = new long[rows.Count];
        var logprobs = new TokenLogprob?[rows.Count];
        for (int r = 0; r < rows.Count; r++)
        {
            int o = r * width;
            ids[r] = (long)host[o];
            if (rows[r].Sampling.Logprobs is { } k) logprobs[r] = Unpack(host, o, top, k);
        }
        return new StepTokens(ids, top >= 0 ? logprobs : null, rest);
    }

    /// <summary>One row of <see cref="Sampler.PackLogprobs"/>'s output (packed with <paramref name="top"/> alternatives)
    /// at <paramref name="offset"/>, keeping the <paramref name="k"/> its request asked for.</summary>
    private static TokenLogprob Unpack(double[] packed, int offset, int top, int k)
    {
        var best = new (int, float)[k];
        for (int j = 0; j < k; j++) best[j] = ((int)packed[offset + 2 + j], (float)packed[offset + 2 + top + j]);
        return new TokenLogprob((int)packed[offset], (float)packed[offset + 1], best);
    }

    /// <summary>A sequence stops running (finished, cancelled, failed or preempted): its penalty row goes back.</summary>
    public void Release(Sequence s) => _penalties.Release(s);

    public void Dispose()
    {
        foreach (var g in _graphs.Values) g.Dispose();
        _graphs.Clear();
        foreach (var i in _inputs.Values) i.Dispose();
        _penalties.Dispose();
    }

    private sealed class CapturedStep(CudaGraph graph, Tensor logits) : IDisposable
    {
        public CudaGraph Graph { get; } = graph;
        /// <summary>The graph's output logits [rows, V]: overwritten by each replay.</summary>
        public Tensor Logits { get; } = logits;
        public long LastUsed { get; set; }

        public void Dispose()
        {
            Logits.Dispose();
            Graph.Dispose();
        }
    }
}

/// <summary>What one pass sampled: a token per row, and its log probabilities for rows that asked (else null).</summary>
internal sealed record StepTokens(long[] Ids, TokenLogprob?[]? Logprobs, double[]? Extra);
