using static TorchSharp.torch;

namespace PeftServe.Core.Model;

/// <summary>Where a forward pass keeps and finds keys and values. The model calls
/// <see cref="Reserve"/> once per forward pass, then <see cref="Write"/> once per layer.
/// <see cref="KvCache"/> is the contiguous one used for static batches; the serving engine's paged
/// cache implements the same two calls over fixed-size blocks.</summary>
public interface IKvCache
{
    /// <summary>Makes room for the tokens at <paramref name="positions"/> [B,T] (negative = padding)
    /// and returns the additive attention mask [B,1,T,S] in <paramref name="dtype"/> over the S keys
    /// that <see cref="Write"/> will return: 0 where a query may attend, a large negative elsewhere.</summary>
    Tensor Reserve(Tensor positions, ScalarType dtype);

    /// <summary>Stores a layer's new keys and values [B,kvHeads,T,headDim] and returns all keys and
    /// values the batch attends to, [B,kvHeads,S,headDim].</summary>
    (Tensor Keys, Tensor Values) Write(int layer, Tensor keys, Tensor values);
}
