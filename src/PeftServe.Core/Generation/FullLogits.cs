using PeftServe.Core.Adapters;
using PeftServe.Core.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Generation;

/// <summary>Logits at every position of a batch of equal-length token rows, each row with its own
/// adapter or none, in one forward pass. Virtual columns of prompt-type adapters are cut off, so row
/// b's result is always the logits of its own T tokens.</summary>
public static class FullLogits
{
    /// <summary><paramref name="inputIds"/> [B,T] int64 (any device) -> logits [B,T,V] float32 on the CPU.</summary>
    public static Tensor Compute(LlamaModel model, Tensor inputIds, IReadOnlyList<ResidentAdapter?>? adapters = null)
    {
        using var scope = torch.NewDisposeScope();
        long b = inputIds.shape[0], t = inputIds.shape[1];
        var rows = Enumerable.Range(0, (int)b).Select(r => inputIds[r].cpu().data<long>().Select(x => (int)x).ToArray()).ToArray();
        adapters ??= new ResidentAdapter?[b];
        var layout = SequenceLayout.Build(rows, adapters.Select(a => a?.VirtualTokens ?? 0).ToArray());
        var (ids, positions) = layout.ToTensors(model.Device);
        using var adapterBatch = AdapterBatch.Create(adapters, layout.VirtualStart, model.Device);
        var logits = model.Forward(ids, positions, new ChunkKvCache(), adapters: adapterBatch);
        return logits[.., ^(int)t.., ..].to(ScalarType.Float32).cpu().MoveToOuterDisposeScope();
    }
}
