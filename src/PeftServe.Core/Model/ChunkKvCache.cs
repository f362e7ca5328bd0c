using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Model;

/// <summary>A cache that keeps nothing: each pass attends within its own chunk only (causally, by
/// position). For passes over whole sequences (training, full-sequence logits).</summary>
public sealed class ChunkKvCache : IKvCache
{
    private Tensor? _mask;

    public void Begin(Tensor positions, ScalarType dtype)
    {
        var keys = torch.where(positions.lt(0), torch.full_like(positions, Attention.EmptyPosition), positions);   // [B,S]
        _mask = Attention.Mask(keys, positions, dtype);
    }

    public Tensor Attend(int layer, Tensor queries, Tensor keys, Tensor values) =>
        Attention.Sdpa(queries, keys, values, _mask ?? throw new InvalidOperationException("Begin was not called"));
}
