using PeftServe.Core.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Adapters;

/// <summary>The rows of one forward pass that use one method, with the device slot of each row's
/// adapter and, for virtual-token methods, where its virtual columns sit in this chunk.</summary>
public sealed class MethodRows : IDisposable
{
    /// <summary>Row indices in the batch.</summary>
    public int[] Rows { get; }
    /// <summary>Device slot of each row's adapter.</summary>
    public int[] Slots { get; }
    /// <summary>Per row: the chunk column of its first virtual token, or -1 when this chunk has none.</summary>
    public int[] VirtualStart { get; }
    public Device Device { get; }

    /// <summary>Rows as an int64 tensor on the device.</summary>
    public Tensor RowIndex { get; }
    /// <summary>Slots as an int64 tensor on the device.</summary>
    public Tensor SlotIndex { get; }

    public MethodRows(int[] rows, int[] slots, int[] virtualStart, Device device)
    {
        Rows = rows;
        Slots = slots;
        VirtualStart = virtualStart;
        Device = device;
        // Made once per batch and owned here: they outlive the dispose scopes of the forward passes.
        RowIndex = torch.tensor(rows.Select(r => (long)r).ToArray(), device: device).DetachFromDisposeScope();
        SlotIndex = torch.tensor(slots.Select(s => (long)s).ToArray(), device: device).DetachFromDisposeScope();
    }

    public void Dispose()
    {
        RowIndex.Dispose();
        SlotIndex.Dispose();
    }
}

/// <summary>A method's work on one forward pass. Each hook defaults to "nothing to do"; a method
/// overrides the hooks where it acts.</summary>
public abstract class AdapterBatchOp(MethodRows rows) : IdentityAdapterHooks, IDisposable
{
    protected MethodRows Rows { get; } = rows;

    public virtual void Dispose() => Rows.Dispose();

    /// <summary>Adds <paramref name="delta"/> (one row per entry of Rows) into <paramref name="target"/>'s rows, in place.</summary>
    protected Tensor AddToRows(Tensor target, Tensor delta)
    {
        if (ServesEveryRow(target)) return target.add_(delta);
        return target.index_add_(0, Rows.RowIndex, delta, 1);
    }

    /// <summary>The rows of <paramref name="x"/> this op serves.</summary>
    protected Tensor SelectRows(Tensor x) => ServesEveryRow(x) ? x : x.index_select(0, Rows.RowIndex);

    /// <summary><paramref name="target"/> with this op's rows replaced by <paramref name="values"/> (one per served row).</summary>
    protected Tensor ReplaceRows(Tensor target, Tensor values) =>
        ServesEveryRow(target) ? values : target.index_copy(0, Rows.RowIndex, values);

    /// <summary>Whether this op serves rows 0..B-1 of <paramref name="x"/>, all of them, in order.</summary>
    protected bool ServesEveryRow(Tensor x) => Rows.Rows.Length == x.shape[0] && IsIdentity(Rows.Rows);

    private static bool IsIdentity(int[] rows)
    {
        for (int i = 0; i < rows.Length; i++) if (rows[i] != i) return false;
        return true;
    }
}
