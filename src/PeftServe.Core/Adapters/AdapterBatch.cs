using PeftServe.Core.Kernels;
using PeftServe.Core.Model;
using static TorchSharp.torch;

namespace PeftServe.Core.Adapters;

/// <summary>A resident adapter: which pool and slot hold it on the device.</summary>
public sealed record ResidentAdapter(Adapter Adapter, AdapterSlotPool Pool, int Slot)
{
    public string Name => Adapter.Name;
    public int VirtualTokens => Adapter.VirtualTokens;
}

/// <summary>The adapter work of one forward pass over a batch whose rows each use their own adapter
/// or none: rows are grouped by method and each group is served by one batched op. Rows without an
/// adapter are in no group and cost nothing.</summary>
public sealed class AdapterBatch : IAdapterHooks, IDisposable
{
    private readonly AdapterBatchOp[] _ops;

    private AdapterBatch(AdapterBatchOp[] ops) => _ops = ops;

    /// <summary>An eager pass (prefill chunks, full-sequence logits): null when no row has an adapter.
    /// <paramref name="virtualStart"/> gives, per row, the chunk column where its virtual tokens start (-1
    /// when this chunk holds none, as in decode steps).</summary>
    public static AdapterBatch? Create(IReadOnlyList<ResidentAdapter?> rows, IReadOnlyList<int> virtualStart, Device device)
    {
        var ops = rows.Select((a, row) => (a, row)).Where(x => x.a is not null)
            .GroupBy(x => x.a!.Pool)
            .Select(g => g.Key.CreateBatchOp(new MethodRows(g.Key, rows.Count,
                g.Select(x => x.row).ToArray(),
                g.Select(x => x.a!.Slot).ToArray(),
                g.Select(x => virtualStart[x.row]).ToArray(),
                device)))
            .ToArray();
        return ops.Length == 0 ? null : new AdapterBatch(ops);
    }

    /// <summary>A decode pass whose per-row slots are already on the device: <paramref name="pools"/> lists the
    /// pools that act in decode with their [B] slot tensors (-1 for rows without). With
    /// <paramref name="rows"/> (the batch's adapters) the pass is eager and ops may use what the host knows;
    /// without, it is being captured as a CUDA graph and ops read only the slot tensors.</summary>
    public static AdapterBatch? CreateForDecode(IReadOnlyList<(AdapterSlotPool Pool, Tensor RowSlots)> pools, IReadOnlyList<ResidentAdapter?>? rows)
    {
        var ops = pools.Where(p => p.Pool.ActsInDecode).Select(p =>
        {
            var mine = rows?.Select((a, row) => (a, row)).Where(x => x.a is not null && x.a.Pool == p.Pool).ToArray();
            return p.Pool.CreateBatchOp(new MethodRows(p.Pool, p.RowSlots, mine?.Select(x => x.row).ToArray(), mine?.Select(x => x.a!.Slot).ToArray()));
        }).ToArray();
        return ops.Length == 0 ? null : new AdapterBatch(ops);
    }

    public void BeforeLinear(int layer, LinearSite site, Tensor x)
    {
        foreach (var op in _ops) op.BeforeLinear(layer, site, x);
    }

    public bool ChangesKeysValues => _ops.Any(op => op.ChangesKeysValues);

    public Tensor TokenEmbeddings(Tensor inputIds, Tensor embeddings)
    {
        foreach (var op in _ops) embeddings = op.TokenEmbeddings(inputIds, embeddings);
        return embeddings;
    }

    public Tensor Embeddings(Tensor embeddings)
    {
        foreach (var op in _ops) embeddings = op.Embeddings(embeddings);
        return embeddings;
    }

    public Tensor Qkv(int layer, Tensor x, Tensor qkv) => AtOutput(layer, LinearSite.Qkv, x, qkv);

    public (Tensor Output, RowEpilogue? Owed) QkvDeferred(int layer, Tensor x, Tensor qkv) => AtOutputDeferred(layer, LinearSite.Qkv, x, qkv);

    public (Tensor Keys, Tensor Values) KeysValues(int layer, Tensor keys, Tensor values)
    {
        foreach (var op in _ops) (keys, values) = op.KeysValues(layer, keys, values);
        return (keys, values);
    }

    public Tensor? ExtraAttention(int layer, Tensor queries)
    {
        Tensor? sum = null;
        foreach (var op in _ops)
            if (op.ExtraAttention(layer, queries) is { } extra) sum = sum is null ? extra : sum + extra;
        return sum;
    }

    public Tensor AttentionOutput(int layer, Tensor x, Tensor output) => AtOutput(layer, LinearSite.O, x, output);

    public (Tensor Output, RowEpilogue? Owed) AttentionOutputDeferred(int layer, Tensor x, Tensor output) => AtOutputDeferred(layer, LinearSite.O, x, output);

    public Tensor GateUp(int layer, Tensor x, Tensor gateUp) => AtOutput(layer, LinearSite.GateUp, x, gateUp);

    public (Tensor Output, RowEpilogue? Owed) GateUpDeferred(int layer, Tensor x, Tensor gateUp) => AtOutputDeferred(layer, LinearSite.GateUp, x, gateUp);

    public Tensor DownInput(int layer, Tensor x)
    {
        foreach (var op in _ops) x = op.DownInput(layer, x);
        return x;
    }

    public Tensor MlpOutput(int layer, Tensor x, Tensor output) => AtOutput(layer, LinearSite.Down, x, output);

    public (Tensor Output, RowEpilogue? Owed) MlpOutputDeferred(int layer, Tensor x, Tensor output) => AtOutputDeferred(layer, LinearSite.Down, x, output);

    /// <summary>Every op's work at a projection's output. With several methods in the batch, the ops that can offer
    /// theirs as an <see cref="OutputTerm"/> do, and the terms are applied together (one kernel for a scale, a bias and a
    /// low-rank delta) after the other ops' hooks. A row has one adapter, so the order between methods changes nothing.</summary>
    private Tensor AtOutput(int layer, LinearSite site, Tensor x, Tensor output)
    {
        var (result, terms) = CollectTerms(layer, site, x, output, offer: _ops.Length > 1);
        return terms is null ? result : OutputTerm.Apply(result, terms);
    }

    /// <summary>As <see cref="AtOutput"/>, but when the terms make one row epilogue it is handed back, owed (even with one
    /// method in the batch: the caller's next kernel applies it without a launch of its own).</summary>
    private (Tensor Output, RowEpilogue? Owed) AtOutputDeferred(int layer, LinearSite site, Tensor x, Tensor output)
    {
        var (result, terms) = CollectTerms(layer, site, x, output, offer: true);
        if (terms is null) return (result, null);
        var epilogues = OutputTerm.Combine(terms, (int)result.shape[1]);
        if (epilogues.Count == 1) return (result, epilogues[0]);
        foreach (var epilogue in epilogues) result = epilogue.ApplyTo(result);
        return (result, null);
    }

    /// <summary>Runs the hooks of the ops that do not offer a term here and collects the terms of those that do.</summary>
    private (Tensor Output, List<OutputTerm>? Terms) CollectTerms(int layer, LinearSite site, Tensor x, Tensor output, bool offer)
    {
        List<OutputTerm>? terms = null;
        foreach (var op in _ops)
        {
            if (offer && OutputTerm.Enabled && op.OfferOutputTerm(layer, site, x, output) is { } term) (terms ??= []).Add(term);
            else output = site switch
            {
                LinearSite.Qkv => op.Qkv(layer, x, output),
                LinearSite.O => op.AttentionOutput(layer, x, output),
                LinearSite.GateUp => op.GateUp(layer, x, output),
                _ => op.MlpOutput(layer, x, output),
            };
        }
        return (output, terms);
    }

    public Tensor Logits(Tensor hidden, Tensor logits)
    {
        foreach (var op in _ops) logits = op.Logits(hidden, logits);
        return logits;
    }

    public void Dispose()
    {
        foreach (var op in _ops) op.Dispose();
    }
}
