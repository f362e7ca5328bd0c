using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Model;

/// <summary>Where a forward pass keeps and finds keys and values, and how it attends over them. The model
/// calls <see cref="Begin"/> once per forward pass, then <see cref="Attend"/> once per layer.
/// <see cref="ChunkKvCache"/> keeps nothing (one pass over whole sequences: training, full logits); the
/// serving engine's paged cache implements both calls over fixed-size blocks, with a decode path that
/// reads the blocks in place.</summary>
public interface IKvCache
{
    /// <summary>Starts a pass over tokens at <paramref name="positions"/> [B,T] (negative = padding),
    /// computing in <paramref name="dtype"/>.</summary>
    void Begin(Tensor positions, ScalarType dtype);

    /// <summary>Stores a layer's new keys and values [B,kvHeads,T,headDim] and returns the attention output
    /// [B,T,heads*headDim] of <paramref name="queries"/> [B,heads,T,headDim] over every key each query may
    /// see (its row's earlier tokens and itself; never padding).</summary>
    Tensor Attend(int layer, Tensor queries, Tensor keys, Tensor values);
}

/// <summary>A cache that can also rotate a decode step's queries and keys and store the keys and values
/// itself (one kernel on CUDA), from the fused q|k|v projection.</summary>
public interface IRotatingKvCache : IKvCache
{
    /// <summary>For the projection <paramref name="qkv"/> [B,T,(nq+2nkv)*hd] of tokens at <paramref name="positions"/>
    /// [B,T]: rotates queries and keys, stores keys and values, and returns the attention output [B,T,nq*hd]
    /// and the rotated queries [B,nq,T,hd]; null where it cannot (the model then rotates and calls Attend). <paramref name="owed"/>:
    /// adapter row terms the projection still owes, applied as qkv is read (qkv itself is left as it is); null is
    /// returned, with nothing stored, where they cannot be.</summary>
    (Tensor Attention, Tensor Queries)? AttendRotating(int layer, Tensor qkv, Tensor positions, RotaryEmbedding rope, int heads, Kernels.RowEpilogue? owed = null);
}

/// <summary>Masked scaled-dot-product attention with grouped-query heads, shared by the caches that
/// gather keys into [B,kvHeads,S,headDim].</summary>
public static class Attention
{
    /// <summary>The position recorded for a cache slot that holds no token: larger than any query position,
    /// so nothing attends to it.</summary>
    public const long EmptyPosition = long.MaxValue;

    /// <summary>The most negative finite value of <paramref name="dtype"/>: an additive mask entry that blocks attention.</summary>
    public static Scalar MinValue(ScalarType dtype) => dtype switch   // kept alive for the process (Runtime/Scalars.cs)
    {
        ScalarType.Float16 => Runtime.Scalars.Of(-65504.0),
        ScalarType.BFloat16 => Runtime.Scalars.Of(-3.3895313892515355e38),
        ScalarType.Float64 => Runtime.Scalars.Of(double.MinValue),
        _ => Runtime.Scalars.Of(float.MinValue),
    };

    /// <summary>The additive mask [B,1,T,S] letting query t of row b see key s where
    /// keyPositions[b,s] &lt;= queryPositions[b,t] (padding keys hold <see cref="EmptyPosition"/>).</summary>
    public static Tensor Mask(Tensor keyPositions, Tensor queryPositions, ScalarType dtype)
    {
        var visible = keyPositions.unsqueeze(1).le(queryPositions.unsqueeze(-1)).unsqueeze(1);   // [B,1,T,S]
        var zero = torch.zeros(1, dtype, device: queryPositions.device);
        var blocked = torch.full(1, MinValue(dtype), dtype, device: queryPositions.device);
        return torch.where(visible, zero, blocked);
    }

    /// <summary>Attention of <paramref name="queries"/> [B,nq,T,hd] over <paramref name="keys"/> and
    /// <paramref name="values"/> [B,nkv,S,hd] under <paramref name="mask"/> [B,1,T,S]; [B,T,nq*hd]. The G
    /// query heads of each KV head are folded into the sequence axis, so keys and values are never copied
    /// G times (the mask is folded the same way).</summary>
    public static Tensor Sdpa(Tensor queries, Tensor keys, Tensor values, Tensor mask)
    {
        long b = queries.shape[0], nq = queries.shape[1], t = queries.shape[2], hd = queries.shape[3], nkv = keys.shape[1], s = keys.shape[2];
        long groups = nq / nkv;
        var q = queries.reshape(b, nkv, groups * t, hd);
        if (groups > 1) mask = mask.unsqueeze(2).expand(b, 1, groups, t, s).reshape(b, 1, groups * t, s);
        var attn = nn.functional.scaled_dot_product_attention(q, keys, values, mask);
        // reshape, not view: on CUDA the attention kernels may return a non-contiguous layout.
        return attn.reshape(b, nq, t, hd).transpose(1, 2).reshape(b, t, nq * hd);
    }
}
