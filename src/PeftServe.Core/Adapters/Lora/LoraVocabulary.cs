using PeftServe.Core.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Adapters.Lora;

/// <summary>The vocabulary-sized parts of the LoRA adapters in an embeddings pool's slots (S of them, plus the
/// neutral slot S where it helps):
/// <list type="bullet">
/// <item>LoRA on the embedding: A^T [S+1, V, R] (a row per token id, gathered by id) and (s B)^T [S+1, R, hidden];
/// DoRA's gain over hidden [S+1, hidden].</item>
/// <item>LoRA on the LM head: A [S+1, R, hidden] and (s B)^T [S+1, R, V]; DoRA's gain [S+1, V]; s · lora_B.bias [S+1, V].</item>
/// <item>Saved modules: embedding and LM head replacements [S, V, hidden] each.</item>
/// </list>
/// Gains, as for the decoder linears, are DoRA's scale minus one. Host flags say which slot holds what.</summary>
internal sealed class LoraVocabularySlots : IDisposable
{
    private readonly LlamaModel _model;
    public int Capacity { get; }
    public int Rank { get; }
    public Tensor EmbedA { get; }          // [S+1, V, R]
    public Tensor EmbedB { get; }          // [S+1, R, hidden]
    public Tensor EmbedGain { get; }       // [S+1, hidden]
    public Tensor HeadA { get; }           // [S+1, R, hidden]
    public Tensor HeadB { get; }           // [S+1, R, V]
    public Tensor HeadGain { get; }        // [S+1, V]
    public Tensor HeadOffset { get; }      // [S+1, V]
    public Tensor SavedEmbedding { get; }  // [S, V, hidden]
    public Tensor SavedLmHead { get; }     // [S, V, hidden]
    /// <summary>[S+1] bool: the slot holds a saved embedding / LM head (the neutral slot never does).</summary>
    public Tensor HasSavedEmbedding { get; }
    public Tensor HasSavedLmHead { get; }

    private readonly int[] _embedRank, _headRank;
    private readonly bool[] _embedGain, _headGain, _headOffset, _savedEmbedding, _savedLmHead;

    public LoraVocabularySlots(LlamaModel model, int capacity, int rank)
    {
        _model = model;
        Capacity = capacity;
        Rank = rank;
        var c = model.Config;
        var (dt, dev) = (model.DType, model.Device);
        long v = c.VocabSize, h = c.HiddenSize;
        EmbedA = torch.zeros([capacity + 1, v, rank], dt, dev);
        EmbedB = torch.zeros([capacity + 1, rank, h], dt, dev);
        EmbedGain = torch.zeros([capacity + 1, h], dt, dev);
        HeadA = torch.zeros([capacity + 1, rank, h], dt, dev);
        HeadB = torch.zeros([capacity + 1, rank, v], dt, dev);
        HeadGain = torch.zeros([capacity + 1, v], dt, dev);
        HeadOffset = torch.zeros([capacity + 1, v], dt, dev);
        SavedEmbedding = torch.zeros([capacity, v, h], dt, dev);
        SavedLmHead = torch.zeros([capacity, v, h], dt, dev);
        HasSavedEmbedding = torch.zeros([capacity + 1], ScalarType.Bool, dev);
        HasSavedLmHead = torch.zeros([capacity + 1], ScalarType.Bool, dev);
        _embedRank = new int[capacity + 1];
        _headRank = new int[capacity + 1];
        _embedGain = new bool[capacity + 1];
        _headGain = new bool[capacity + 1];
        _headOffset = new bool[capacity + 1];
        _savedEmbedding = new bool[capacity + 1];
        _savedLmHead = new bool[capacity + 1];
    }

    /// <summary>Device bytes of the tables for <paramref name="capacity"/> slots.</summary>
    public static long Bytes(ModelConfig c, int capacity, int rank, ScalarType dtype)
    {
        long v = c.VocabSize, h = c.HiddenSize;
        long elements = (capacity + 1L) * (v * rank + rank * h + h + rank * h + rank * v + 2 * v) + 2L * capacity * v * h;
        return elements * (dtype == ScalarType.Float32 ? 4 : 2) + 2L * (capacity + 1);
    }

    /// <summary>Refuses an adapter whose saved copy of the base embedding or LM head (PEFT's base_layer.weight beside
    /// LoRA on them) is not the served base model's: PEFT would load that copy under the LoRA.</summary>
    public static void CheckBaseCopies(LlamaModel model, LoraAdapter lora, LoraVariants v)
    {
        foreach (var (copy, served, what) in new[] { (v.EmbeddingCopy, model.EmbeddingWeight, "embedding"), (v.LmHeadCopy, model.LmHeadWeight, "LM head") })
            if (copy?.FirstDifferentRow(served, model.DType) is { } row)
                throw new AdapterException($"adapter '{lora.Name}': its tensor '{copy.TensorName}' differs from the base model's {what} (first at row {row}): " +
                                           "the adapter was saved from another base model or a resized vocabulary");
    }

    /// <summary>Writes the adapter's vocabulary parts into <paramref name="slot"/> (zeros for what it lacks).</summary>
    public void Store(int slot, LoraAdapter lora)
    {
        using var scope = torch.NewDisposeScope();
        using var _ = torch.no_grad();
        var v = lora.Variants;
        foreach (var t in new[] { EmbedA[slot], EmbedB[slot], EmbedGain[slot], HeadA[slot], HeadB[slot], HeadGain[slot], HeadOffset[slot] }) t.zero_();
        _embedRank[slot] = _headRank[slot] = 0;
        _embedGain[slot] = _headGain[slot] = _headOffset[slot] = _savedEmbedding[slot] = _savedLmHead[slot] = false;
        var dev = _model.Device;

        if (v?.Embedding is { } e)
        {
            int r = (int)e.AT.shape[1];
            EmbedA[slot].narrow(1, 0, r).copy_(e.AT);
            EmbedB[slot].narrow(0, 0, r).copy_(e.ScaledBT);
            _embedRank[slot] = r;
            if (v.EmbeddingMagnitude is { } m)
            {
                var norms = DoraNorms.Embedding(_model.EmbeddingWeight, EmbedA[slot].narrow(1, 0, r), EmbedB[slot].narrow(0, 0, r));
                EmbedGain[slot].copy_(m.to(ScalarType.Float32, dev) / norms - 1);
                _embedGain[slot] = true;
            }
        }
        if (v?.LmHead is { } head)
        {
            int r = (int)head.A.shape[0];
            HeadA[slot].narrow(0, 0, r).copy_(head.A);
            HeadB[slot].narrow(0, 0, r).copy_(head.ScaledBT);
            _headRank[slot] = r;
            if (v.LmHeadMagnitude is { } m)
            {
                var norms = DoraNorms.Rows(_model.LmHeadWeight, HeadA[slot].narrow(0, 0, r), HeadB[slot].narrow(0, 0, r));
                HeadGain[slot].copy_(m.to(ScalarType.Float32, dev) / norms - 1);
                _headGain[slot] = true;
            }
            if (v.LmHeadLoraBias is { } bias)
            {
                HeadOffset[slot].copy_(bias);
                _headOffset[slot] = true;
            }
        }
        if (v?.SavedEmbedding is { } savedEmbedding)
        {
            SavedEmbedding[slot].copy_(savedEmbedding);
            _savedEmbedding[slot] = true;
        }
        if (v?.SavedLmHead is { } savedHead)
        {
            SavedLmHead[slot].copy_(savedHead);
            _savedLmHead[slot] = true;
        }
        HasSavedEmbedding[slot] = torch.tensor(_savedEmbedding[slot], device: dev);
        HasSavedLmHead[slot] = torch.tensor(_savedLmHead[slot], device: dev);
    }

    public bool AnyEmbedLora(IEnumerable<int> slots) => slots.Any(s => _embedRank[s] > 0);
    public int EmbedRankOf(IEnumerable<int> slots) => slots.Select(s => _embedRank[s]).DefaultIfEmpty(0).Max();
    public bool AnyEmbedGain(IEnumerable<int> slots) => slots.Any(s => _embedGain[s]);
    public bool HasHeadLora(int slot) => _headRank[slot] > 0;
    public int HeadRank(int slot) => _headRank[slot];
    public bool AnyHeadGain(IEnumerable<int> slots) => slots.Any(s => _headGain[s]);
    public bool AnyHeadOffset(IEnumerable<int> slots) => slots.Any(s => _headOffset[s]);
    public bool AnySavedEmbedding(IEnumerable<int> slots) => slots.Any(s => _savedEmbedding[s]);
    public bool HasSavedHead(int slot) => _savedLmHead[slot];

    /// <summary>What a static pass must do: "E" embedding LoRA, "e" its gain, "L" saved embedding, then per slot
    /// whether it has LoRA on the LM head ("H") or a saved one ("S") (a static pass loops over those slots), "h" head gain, "b" head offset.</summary>
    public string Signature
    {
        get
        {
            var all = Enumerable.Range(0, Capacity).ToArray();
            return $"{(AnyEmbedLora(all) ? 'E' : '-')}{(AnyEmbedGain(all) ? 'e' : '-')}{(AnySavedEmbedding(all) ? 'L' : '-')}" +
                   new string(all.Select(s => _headRank[s] > 0 ? 'H' : _savedLmHead[s] ? 'S' : '-').ToArray()) +
                   $"{(AnyHeadGain(all) ? 'h' : '-')}{(AnyHeadOffset(all) ? 'b' : '-')}";
        }
    }

    public void Dispose()
    {
        foreach (var t in new[] { EmbedA, EmbedB, EmbedGain, HeadA, HeadB, HeadGain, HeadOffset, SavedEmbedding, SavedLmHead, HasSavedEmbedding, HasSavedLmHead })
            t.Dispose();
    }
}

/// <summary>The embedding and LM-head work of one pass for the rows of an embeddings pool. Per token, the
/// embedding's LoRA rows and a saved embedding's rows are gathered by (slot, token id), which serves any
/// batch. The LM head's LoRA and saved heads are applied per slot: gathering a [V, hidden] matrix per row
/// would copy far more than the product reads. An eager pass computes them for each slot's own rows only; a
/// static pass (a captured graph) computes each slot that holds one for every row and keeps it for the rows
/// whose slot it is.</summary>
internal sealed class LoraVocabularyOp(LoraVocabularySlots slots, MethodRows rows, Func<Tensor> index) : IDisposable
{
    private readonly int[] _possible = rows.PossibleSlots.Distinct().ToArray();

    public Tensor TokenEmbeddings(Tensor ids, Tensor embeddings)
    {
        bool lora = slots.AnyEmbedLora(_possible), gain = slots.AnyEmbedGain(_possible), saved = slots.AnySavedEmbedding(_possible);
        if (!lora && !gain && !saved) return embeddings;
        long b = ids.shape[0], t = ids.shape[1], v = slots.EmbedA.shape[1], h = embeddings.shape[2];
        var idx = index();
        if (lora)
        {
            // Each token's row of its slot's A^T: a flat gather at slot * V + id.
            int r = rows.IsStatic ? slots.Rank : slots.EmbedRankOf(_possible);
            var flat = (idx.unsqueeze(1) * v + ids).reshape(-1);
            var down = slots.EmbedA.view(-1, slots.Rank).index_select(0, flat).view(b, t, slots.Rank).narrow(2, 0, r);
            var up = slots.EmbedB.index_select(0, idx).narrow(1, 0, r);                      // [B, r, hidden]
            embeddings = embeddings + torch.bmm(down, up);
        }
        if (gain) embeddings = embeddings + embeddings * slots.EmbedGain.index_select(0, idx).unsqueeze(1);
        if (saved)
        {
            // The neutral slot has no table: rows without a saved embedding gather from slot 0 and keep their own.
            var slot = idx.clamp_max(slots.Capacity - 1);
            var flat = (slot.unsqueeze(1) * v + ids).reshape(-1);
            var replaced = slots.SavedEmbedding.view(-1, h).index_select(0, flat).view(b, t, h);
            embeddings = torch.where(slots.HasSavedEmbedding.index_select(0, idx).view(b, 1, 1), replaced, embeddings);
        }
        return embeddings;
    }

    public Tensor Logits(Tensor hidden, Tensor logits)
    {
        var headLora = _possible.Where(slots.HasHeadLora).ToArray();
        var savedHeads = _possible.Where(slots.HasSavedHead).ToArray();
        bool gain = slots.AnyHeadGain(_possible), offset = slots.AnyHeadOffset(_possible);
        if (headLora.Length == 0 && savedHeads.Length == 0 && !gain && !offset) return logits;
        foreach (var s in headLora)
        {
            int r = slots.HeadRank(s);
            logits = ForRowsOf(s, hidden, logits, (x, l) =>
                l + torch.matmul(torch.matmul(x, slots.HeadA[s].narrow(0, 0, r).t()), slots.HeadB[s].narrow(0, 0, r)));
        }
        var idx = index();
        if (gain) logits = logits + logits * slots.HeadGain.index_select(0, idx).unsqueeze(1);
        if (offset) logits = logits + slots.HeadOffset.index_select(0, idx).unsqueeze(1);
        foreach (var s in savedHeads)
            logits = ForRowsOf(s, hidden, logits, (x, _) => nn.functional.linear(x, slots.SavedLmHead[s]));
        return logits;
    }

    /// <summary>Replaces the logits of the rows in slot <paramref name="slot"/> with <paramref name="compute"/>(their
    /// hidden states, their logits): on those rows only in an eager pass, on every row then kept by a mask in a static one.</summary>
    private Tensor ForRowsOf(int slot, Tensor hidden, Tensor logits, Func<Tensor, Tensor, Tensor> compute)
    {
        if (rows.IsStatic)
        {
            var mine = rows.RowSlots.eq(slot).view(-1, 1, 1);
            return torch.where(mine, compute(hidden, logits), logits);
        }
        var which = rows.Rows!.Where((_, i) => rows.Slots![i] == slot).Select(r => (long)r).ToArray();
        if (which.Length == 0) return logits;
        var at = torch.tensor(which, device: logits.device);
        var updated = compute(hidden.index_select(0, at), logits.index_select(0, at));
        return logits.index_copy(0, at, updated.to(logits.dtype));
    }

    public void Dispose() { }
}
