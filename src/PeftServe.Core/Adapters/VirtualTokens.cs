using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Adapters;

/// <summary>Where the virtual columns of a chunk's rows are, as flat index tensors for one batched
/// gather and one scatter: entry i says "batch row Rows[i], chunk column Columns[i] takes entry
/// Sources[i] of the pool's [slots * maxTokens, ...] table". Empty in decode steps.</summary>
internal sealed class VirtualTokenIndex : IDisposable
{
    public Tensor? Rows { get; }
    public Tensor? Columns { get; }
    public Tensor? Sources { get; }
    public bool IsEmpty => Rows is null;

    public VirtualTokenIndex(MethodRows rows, int[] tokensPerSlot, int maxTokens)
    {
        var r = new List<long>(); var c = new List<long>(); var s = new List<long>();
        if (rows.Rows is null || rows.Slots is null || rows.VirtualStart is null) return;   // a decode pass: no virtual tokens
        for (int i = 0; i < rows.Rows.Length; i++)
        {
            if (rows.VirtualStart[i] < 0) continue;
            int slot = rows.Slots[i];
            for (int j = 0; j < tokensPerSlot[slot]; j++)
            {
                r.Add(rows.Rows[i]);
                c.Add(rows.VirtualStart[i] + j);
                s.Add((long)slot * maxTokens + j);
            }
        }
        if (r.Count == 0) return;
        Rows = torch.tensor(r.ToArray(), device: rows.Device).DetachFromDisposeScope();
        Columns = torch.tensor(c.ToArray(), device: rows.Device).DetachFromDisposeScope();
        Sources = torch.tensor(s.ToArray(), device: rows.Device).DetachFromDisposeScope();
    }

    /// <summary>target[Rows[i], Columns[i]] = table.flatten(0,1)[Sources[i]], in place; table is [slots, maxTokens, ...].</summary>
    public Tensor Scatter(Tensor target, Tensor table)
    {
        if (IsEmpty) return target;
        var values = table.flatten(0, 1).index_select(0, Sources!);
        return target.index_put_(values, [Rows!, Columns!]);
    }

    public void Dispose()
    {
        Rows?.Dispose();
        Columns?.Dispose();
        Sources?.Dispose();
    }
}
