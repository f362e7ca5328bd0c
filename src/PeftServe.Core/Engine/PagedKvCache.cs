using PeftServe.Core.Kernels;
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
        _positions = torch.full([slots], Attention.EmptyPosition, ScalarType.Int64, device: device);
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
        _positions.index_fill_(0, torch.tensor(slots, device: _positions.device), Attention.EmptyPosition);
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
    public IKvCache ForPrefill(IReadOnlyList<IReadOnlyList<int>> blockTables, IReadOnlyList<int> cachedBefore, IReadOnlyList<int> newTokens, int chunkLength)
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
        return new PrefillView(this, torch.tensor(write, device: device), torch.tensor(read, device: device), rows, chunkLength, keys);
    }

    /// <summary>The cache as one decode pass sees it: each row adds one token, written to
    /// <paramref name="writeSlots"/> [B], and attends to the first <paramref name="contextLengths"/> [B] tokens
    /// of its block table (<paramref name="blockTables"/> [B, maxBlocks] block ids; padding rows: length 0,
    /// writing to the scratch slot). On CUDA the paged-attention kernel reads the blocks in place; elsewhere
    /// the first <paramref name="gatherBlocks"/> blocks of every row are gathered for SDPA. The tensors may be
    /// views of a CUDA graph's static inputs: nothing here reads them on the host.</summary>
    public IKvCache ForDecode(Tensor writeSlots, Tensor blockTables, Tensor contextLengths, int gatherBlocks) =>
        new DecodeView(this, writeSlots, blockTables, contextLengths, gatherBlocks);

    /// <summary>The cache slot of token <paramref name="tokenIndex"/> of a sequence with block table <paramref name="table"/>.</summary>
    public long SlotOf(IReadOnlyList<int> table, int tokenIndex) => Slot(table, tokenIndex);

    private long Slot(IReadOnlyList<int> table, int tokenIndex) => (long)table[tokenIndex / BlockSize] * BlockSize + tokenIndex % BlockSize;

    public void Dispose()
    {
        foreach (var t in _keys) t.Dispose();
        foreach (var t in _values) t.Dispose();
        _positions.Dispose();
    }

    /// <summary>A prefill pass's view: writes go to the rows' own slots, reads gather the rows' slots into
    /// [B, kvHeads, S, headDim] (one gather per layer; the positions are gathered once, for the mask).</summary>
    private sealed class PrefillView(PagedKvCache cache, Tensor write, Tensor read, int rows, int chunk, int keyCount) : IKvCache
    {
        private Tensor? _mask;

        public void Begin(Tensor positions, ScalarType dtype)
        {
            var flat = positions.reshape(-1);
            // Padding keeps the scratch slot empty: it is written to, but never attended to.
            var stored = torch.where(flat.lt(Runtime.Scalars.Of(0)), torch.full_like(flat, Runtime.Scalars.Of(Attention.EmptyPosition)), flat);
            cache._positions.index_copy_(0, write, stored);
            var keyPositions = cache._positions.index_select(0, read).view(rows, keyCount);
            _mask = Attention.Mask(keyPositions, positions, dtype);
        }

        public Tensor Attend(int layer, Tensor queries, Tensor keys, Tensor values)
        {
            var (gk, gv) = cache.Store(layer, write, keys, values, rows * chunk);
            gk = gk.index_select(0, read).view(rows, keyCount, keys.shape[1], keys.shape[3]).transpose(1, 2);
            gv = gv.index_select(0, read).view(rows, keyCount, values.shape[1], values.shape[3]).transpose(1, 2);
            return Attention.Sdpa(queries, gk, gv, _mask ?? throw new InvalidOperationException("Begin was not called"));
        }
    }

    /// <summary>Writes a layer's new keys and values [B,kvH,T,hd] to <paramref name="write"/> (row-major over
    /// B and T) and returns the layer's pools.</summary>
    private (Tensor Keys, Tensor Values) Store(int layer, Tensor write, Tensor keys, Tensor values, long count)
    {
        var k = keys.transpose(1, 2).reshape(count, keys.shape[1], keys.shape[3]);
        var v = values.transpose(1, 2).reshape(count, values.shape[1], values.shape[3]);
        _keys[layer].index_copy_(0, write, k);
        _values[layer].index_copy_(0, write, v);
        return (_keys[layer], _values[layer]);
    }

    private sealed class DecodeView(PagedKvCache cache, Tensor write, Tensor tables, Tensor lengths, int gatherBlocks) : IRotatingKvCache
    {
        public (Tensor Attention, Tensor Queries)? AttendRotating(int layer, Tensor qkv, Tensor positions, RotaryEmbedding rope, int heads, RowEpilogue? owed = null)
        {
            long b = qkv.shape[0];
            if (qkv.shape[1] != 1) return null;
            var flat = qkv.view(b, qkv.shape[2]);
            var queries = PagedAttention.TryRotateAndWrite(flat, positions.view(b), rope.InverseFrequencies(), write, cache._keys[layer], cache._values[layer], heads, owed);
            if (queries is null) return null;
            var direct = PagedAttention.TryDecode(queries, cache._keys[layer], cache._values[layer], tables, lengths, cache.BlockSize);
            if (direct is null) return null;   // (not reached: both kernels serve the same shapes)
            return (direct.view(b, 1, queries.shape[1] * queries.shape[2]), queries.unsqueeze(2));
        }

        private Tensor? _gatherSlots, _mask;   // the fallback's gather index [B*S] and mask [B,1,1,S], made once per pass
        private ScalarType _dtype;

        public void Begin(Tensor positions, ScalarType dtype) => _dtype = dtype;

        public Tensor Attend(int layer, Tensor queries, Tensor keys, Tensor values)
        {
            long b = queries.shape[0], nq = queries.shape[1], hd = queries.shape[3], nkv = keys.shape[1];
            var (pk, pv) = cache.Store(layer, write, keys, values, b);
            var q = queries.reshape(b, nq, hd).contiguous();
            if (PagedAttention.TryDecode(q, pk, pv, tables, lengths, cache.BlockSize) is { } direct)
                return direct.view(b, 1, nq * hd);

            if (_gatherSlots is null)
            {
                int bs = cache.BlockSize;
                long s = (long)gatherBlocks * bs;
                var within = torch.arange(bs, ScalarType.Int64, device: tables.device);
                _gatherSlots = (tables.narrow(1, 0, gatherBlocks).unsqueeze(-1) * bs + within).reshape(-1);        // [B*S]
                var visible = torch.arange(s, ScalarType.Int64, device: tables.device).unsqueeze(0).lt(lengths.unsqueeze(1));   // [B,S]
                _mask = torch.where(visible, torch.zeros(1, _dtype, device: tables.device), torch.full(1, Attention.MinValue(_dtype), _dtype, device: tables.device))
                    .view(b, 1, 1, s);
            }
            long keyCount = _gatherSlots.shape[0] / b;
            var gk = pk.index_select(0, _gatherSlots).view(b, keyCount, nkv, hd).transpose(1, 2);
            var gv = pv.index_select(0, _gatherSlots).view(b, keyCount, nkv, hd).transpose(1, 2);
            return Attention.Sdpa(queries, gk, gv, _mask!);
        }
    }
}
