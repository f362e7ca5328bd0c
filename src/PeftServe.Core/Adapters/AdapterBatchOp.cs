using PeftServe.Core.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Adapters;

/// <summary>The rows of one forward pass, as one method's batched op sees them. The device tensor
/// <see cref="RowSlots"/> gives, for every row of the batch, the slot of its adapter in this method's
/// pool, or -1 when the row has none of this method; ops that read only it serve any assignment of
/// adapters to rows, which is what a captured CUDA graph replays. The host arrays (which rows, which
/// slots, where virtual tokens sit) are there for eager passes only: absent while a graph is captured, so
/// nothing about one batch can be baked into a graph that later serves another.</summary>
public sealed class MethodRows : IDisposable
{
    private Tensor? _rowIndex, _slotIndex;
    private readonly AdapterSlotPool _pool;

    /// <summary>Rows in the batch (B).</summary>
    public int BatchSize { get; }
    public Device Device { get; }
    /// <summary>[B] int64: each row's slot in this pool, -1 for rows without an adapter of this method.</summary>
    public Tensor RowSlots { get; }
    /// <summary>Row indices that use this method (eager passes only).</summary>
    public int[]? Rows { get; }
    /// <summary>Device slot of each of <see cref="Rows"/> (eager passes only).</summary>
    public int[]? Slots { get; }
    /// <summary>Per entry of <see cref="Rows"/>: the chunk column of its first virtual token, or -1 when this chunk has none.</summary>
    public int[]? VirtualStart { get; }

    /// <summary>Whether this pass may be replayed for other batches (a CUDA graph capture): only <see cref="RowSlots"/> may be used.</summary>
    public bool IsStatic => Rows is null;

    /// <summary>An eager pass: the rows using this pool with their slots; <see cref="RowSlots"/> is made and uploaded here.</summary>
    public MethodRows(AdapterSlotPool pool, int batchSize, int[] rows, int[] slots, int[] virtualStart, Device device)
    {
        _pool = pool;
        BatchSize = batchSize;
        Rows = rows;
        Slots = slots;
        VirtualStart = virtualStart;
        Device = device;
        var all = new long[batchSize];
        Array.Fill(all, -1L);
        for (int i = 0; i < rows.Length; i++) all[rows[i]] = slots[i];
        // Made once per batch and owned here: they outlive the dispose scopes of the forward passes.
        RowSlots = torch.tensor(all, device: device).DetachFromDisposeScope();
    }

    /// <summary>A pass over rows whose slots are already in <paramref name="rowSlots"/> [B] (a view of a decode
    /// step's uploaded inputs), with the host arrays for eager passes, or without them for a graph capture.</summary>
    public MethodRows(AdapterSlotPool pool, Tensor rowSlots, int[]? rows, int[]? slots)
    {
        _pool = pool;
        BatchSize = (int)rowSlots.shape[0];
        Device = rowSlots.device;
        RowSlots = rowSlots.alias().DetachFromDisposeScope();
        Rows = rows;
        Slots = slots;
        VirtualStart = rows is null ? null : Enumerable.Repeat(-1, rows.Length).ToArray();
    }

    /// <summary>The slots whose adapters can be in this pass: the batch's own in an eager pass, every slot of
    /// the pool in a static one. Ops skip work that none of them needs.</summary>
    public IEnumerable<int> PossibleSlots => Slots ?? Enumerable.Range(0, _pool.Capacity);

    /// <summary>[B] int64: each row's slot, with rows without an adapter sent to the pool's neutral slot
    /// <paramref name="neutralSlot"/> (whose parameters change nothing). Made in the caller's dispose scope
    /// (ops keep it for their lifetime with DetachFromDisposeScope and dispose it themselves).</summary>
    public Tensor PoolIndex(int neutralSlot) => torch.where(RowSlots.lt(0), torch.full_like(RowSlots, neutralSlot), RowSlots);

    /// <summary><see cref="Rows"/> as an int64 tensor on the device (eager passes only).</summary>
    public Tensor RowIndex => _rowIndex ??= torch.tensor(Host(Rows).Select(r => (long)r).ToArray(), device: Device).DetachFromDisposeScope();

    /// <summary><see cref="Slots"/> as an int64 tensor on the device (eager passes only).</summary>
    public Tensor SlotIndex => _slotIndex ??= torch.tensor(Host(Slots).Select(s => (long)s).ToArray(), device: Device).DetachFromDisposeScope();

    private static int[] Host(int[]? values) =>
        values ?? throw new InvalidOperationException("this pass is being captured for replay with other batches; only RowSlots may be used");

    public void Dispose()
    {
        RowSlots.Dispose();
        _rowIndex?.Dispose();
        _slotIndex?.Dispose();
    }
}

/// <summary>A method's work on one forward pass. Each hook defaults to "nothing to do"; a method
/// overrides the hooks where it acts.</summary>
public abstract class AdapterBatchOp(MethodRows rows) : IdentityAdapterHooks, IDisposable
{
    protected MethodRows Rows { get; } = rows;

    public virtual void Dispose() => Rows.Dispose();

    /// <summary>This op's work at the output of layer <paramref name="layer"/>'s projection <paramref name="site"/> (input
    /// <paramref name="x"/>, result <paramref name="output"/>) as a term the batch applies together with other methods'
    /// (<see cref="OutputTerm"/>), or null to be called through its hook instead. An op that offers a term must leave
    /// everything else at that output undone: its hook is not called there.</summary>
    internal virtual OutputTerm? OfferOutputTerm(int layer, LinearSite site, Tensor x, Tensor output) => null;

    /// <summary>Adds <paramref name="delta"/> (one row per entry of Rows) into <paramref name="target"/>'s rows, in place.</summary>
    protected Tensor AddToRows(Tensor target, Tensor delta)
    {
        if (ServesEveryRow(target)) return target.add_(delta);
        return target.index_add_(0, Rows.RowIndex, delta, 1);
    }

    /// <summary>The rows of <paramref name="x"/> this op serves.</summary>
    protected Tensor SelectRows(Tensor x) => ServesEveryRow(x) ? x : x.index_select(0, Rows.RowIndex);

    /// <summary>Whether this op serves rows 0..B-1 of <paramref name="x"/>, all of them, in order.</summary>
    protected bool ServesEveryRow(Tensor x) => Rows.Rows is { } rows && rows.Length == x.shape[0] && IsIdentity(rows);

    private static bool IsIdentity(int[] rows)
    {
        for (int i = 0; i < rows.Length; i++) if (rows[i] != i) return false;
        return true;
    }
}
