using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Model;

/// <summary>The cache of a training forward pass: one chunk holds the whole sequence, so nothing is
/// stored and <see cref="Write"/> hands back the chunk's own keys and values (autograd flows through
/// them untouched). The mask follows <see cref="KvCache"/>'s rule: a query at position p sees the
/// keys at positions 0..p of its row; padding (negative positions) is never seen.</summary>
public sealed class ChunkKvCache : IKvCache
{
    public Tensor Reserve(Tensor positions, ScalarType dtype)
    {
        var keys = torch.where(positions.lt(0), torch.full_like(positions, KvCache.EmptyPosition), positions).unsqueeze(1); // [B,1,S]
        var visible = keys.le(positions.unsqueeze(-1)).unsqueeze(1);                                                      // [B,1,T,S]
        var zero = torch.zeros(1, dtype, device: positions.device);
        var blocked = torch.full(1, KvCache.MinValue(dtype), dtype, device: positions.device);
        return torch.where(visible, zero, blocked);
    }

    public (Tensor Keys, Tensor Values) Write(int layer, Tensor keys, Tensor values) => (keys, values);
}
