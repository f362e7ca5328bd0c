using PeftServe.Core.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Engine;

/// <summary>The engine's KV cache, in fixed-size blocks (vLLM's paged idea): per layer one pool of
/// [blocks * blockSize, kvHeads, headDim] keys and values on the device, and one pool of the position
/// each slot holds. A sequence owns a list of blocks (its block table) that grows a block at a time, so
/// memory is claimed as tokens arrive instead of for a maximum length up front, and a finished or
/// preempted sequence gives its blocks back at once. Block 0 is never handed out: padding columns of a
/// batch write there, and its positions stay "empty", so nothing ever attends to it.</summary>
public sealed class PagedKvCache : IDisposable
{
    private readonly Tensor[] _keys, _values;   // per layer [slots, kvHeads, headDim]
    private readonly Tensor _positions;         // [slots] int64: the position a slot holds, or Empty
    private readonly Stack<int> _free = new();

    public int BlockSize { get; }
    public int TotalBlocks { get; }
    /// <summary>Blocks a sequence can be given (all but the scratch block).</summary>
    public int UsableBlocks => TotalBlocks - 1;
    public int FreeBlocks => _free.Count;
    public long BytesPerBlock { get; }
    internal const int ScratchSlot = 0;

    public PagedKvCache(ModelConfig config, int blocks, int blockSize, ScalarType dtype, Device device)
    {
        if (blocks < 2) throw new ArgumentException($"the KV cache needs at least 2 blocks, not {blocks}");
        BlockSize = blockSize;
        TotalBlocks = blocks;
        BytesPerBlock = BlockBytes(config, blockSize, dtype);
        long slots = (long)blocks * blockSize;
        _keys = new Tensor[config.NumLayers];
        _values = new Tensor[config.NumLayers];
        for (int i = 0; i < config.NumLayers; i++)
        {
            _keys[i] = torch.zeros([slots, config.NumKvHeads, config.HeadDim], dtype, device);
            _values[i] = torch.zeros([slots, config.NumKvHeads, config.HeadDim], dtype, device);
        }
        _positions = torch.full([slots], KvCache.EmptyPosition, ScalarType.Int64, device: device);
        for (int b = blocks - 1; b >= 1; b--) _free.Push(b);
    }

    /// <summary>Device bytes of one block over all layers (keys and values).</summary>
    public static long BlockBytes(ModelConfig config, int blockSize, ScalarType dtype) =>
        2L * config.NumLayers * blockSize * config.NumKvHeads * config.HeadDim * DTypeSize(dtype) + blockSize * sizeof(long);

    private static int DTypeSize(ScalarType dtype) => dtype switch
    {
        ScalarType.Float32 => 4,
        ScalarType.Float64 => 8,
        _ => 2,
    };

    /// <summary>Takes a free block, or returns false when none is left.</summary>
    public bool TryAllocate(out int block) => _free.TryPop(out block);

    /// <summary>Gives blocks back; their slots are marked empty so a later owner never sees old keys.</summary>
    public void Free(IReadOnlyList<int> blocks)
    {
        if (blocks.Count == 0) return;
        using var scope = torch.NewDisposeScope();
        var slots = SlotsOf(blocks);
        _positions.index_fill_(0, torch.tensor(slots, device: _positions.device), KvCache.EmptyPosition);
        foreach (var b in blocks)
        {
            if (b <= 0 || b >= TotalBlocks) throw new ArgumentOutOfRangeException(nameof(blocks), $"block {b} is not a block of this cache");
            _free.Push(b);
        }
    }

    private long[] SlotsOf(IReadOnlyList<int> blocks)
    {
        var slots = new long[blocks.Count * BlockSize];
        for (int i = 0; i < blocks.Count; i++)
            for (int j = 0; j < BlockSize; j++) slots[i * BlockSize + j] = (long)blocks[i] * BlockSize + j;
        return slots;
    }

    /// <summary>The cache as one forward pass over a batch sees it. Row r's chunk holds the tokens at
    /// cached positions cachedBefore[r] .. cachedBefore[r] + newTokens[r] - 1, right-aligned in a chunk of
    /// <paramref name="chunkLength"/> columns (left columns are padding); its block table must already
    /// cover them. Built on the host, uploaded as two index tensors: where each new token goes, and
    /// which slots each row attends to. The index tensors belong to the caller's dispose scope.</summary>
    public IKvCache ForBatch(IReadOnlyList<IReadOnlyList<int>> blockTables, IReadOnlyList<int> cachedBefore, IReadOnlyList<int> newTokens, int chunkLength)
    {
        int rows = blockTables.Count;
        int keys = 0;
        for (int r = 0; r < rows; r++) keys = Math.Max(keys, cachedBefore[r] + newTokens[r]);
        var write = new long[rows * chunkLength];
        var read = new long[rows * keys];
        for (int r = 0; r < rows; r++)
        {
            var table = blockTables[r];
            int total = cachedBefore[r] + newTokens[r];
            if (table.Count * BlockSize < total)
                throw new InvalidOperationException($"row {r}: {table.Count} blocks cannot hold {total} tokens");
            int pad = chunkLength - newTokens[r];
            for (int t = 0; t < chunkLength; t++)
                write[r * chunkLength + t] = t < pad ? ScratchSlot : Slot(table, cachedBefore[r] + t - pad);
            for (int s = 0; s < keys; s++)
                read[r * keys + s] = s < total ? Slot(table, s) : ScratchSlot;
        }
        var device = _positions.device;
        // Uploaded before the forward pass, so the pass itself never waits on the host.
        return new BatchView(this, torch.tensor(write, device: device), torch.tensor(read, device: device), rows, chunkLength, keys);
    }

    private long Slot(IReadOnlyList<int> table, int tokenIndex) => (long)table[tokenIndex / BlockSize] * BlockSize + tokenIndex % BlockSize;

    public void Dispose()
    {
        foreach (var t in _keys) t.Dispose();
        foreach (var t in _values) t.Dispose();
        _positions.Dispose();
    }

    /// <summary>One forward pass's view: writes go to the rows' own slots, reads gather the rows' slots
    /// into [B, kvHeads, S, headDim] (one gather per layer; the positions are gathered once).</summary>
    private sealed class BatchView(PagedKvCache cache, Tensor write, Tensor read, int rows, int chunk, int keyCount) : IKvCache
    {
        public Tensor Reserve(Tensor positions, ScalarType dtype)
        {
            var device = positions.device;
            var flat = positions.reshape(-1);
            // Padding keeps the scratch slot empty: it is written to, but never attended to.
            var stored = torch.where(flat.lt(0), torch.full_like(flat, KvCache.EmptyPosition), flat);
            cache._positions.index_copy_(0, write, stored);
            var keyPositions = cache._positions.index_select(0, read).view(rows, 1, keyCount);   // [B,1,S]
            var visible = keyPositions.le(positions.unsqueeze(-1)).unsqueeze(1);             // [B,1,T,S]
            var zero = torch.zeros(1, dtype, device: device);
            var blocked = torch.full(1, KvCache.MinValue(dtype), dtype, device: device);
            return torch.where(visible, zero, blocked);
        }

        public (Tensor Keys, Tensor Values) Write(int layer, Tensor keys, Tensor values)
        {
            // [B,kvH,T,hd] -> [B*T,kvH,hd] in the same row-major order as the write indices.
            var k = keys.transpose(1, 2).reshape(rows * chunk, keys.shape[1], keys.shape[3]);
            var v = values.transpose(1, 2).reshape(rows * chunk, values.shape[1], values.shape[3]);
            cache._keys[layer].index_copy_(0, write, k);
            cache._values[layer].index_copy_(0, write, v);
            var gk = cache._keys[layer].index_select(0, read).view(rows, keyCount, keys.shape[1], keys.shape[3]).transpose(1, 2);
            var gv = cache._values[layer].index_select(0, read).view(rows, keyCount, values.shape[1], values.shape[3]).transpose(1, 2);
            return (gk, gv);
        }
    }
}
