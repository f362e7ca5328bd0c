using PeftServe.Core.Quantization;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Model;

/// <summary>The training side of the model: how each decoder layer runs when autograd records
/// (its intermediates freed as soon as the layer is done, or the layer checkpointed), the final hidden
/// states a training loss starts from, and that loss through the LM head in chunks.</summary>
public sealed partial class LlamaModel
{
    /// <summary>How <see cref="DecoderStack"/> runs each layer.</summary>
    private enum LayerRun
    {
        /// <summary>Straight through (inference under no_grad: its dispose scope is the caller's).</summary>
        Plain,
        /// <summary>In a dispose scope of its own, so the layer's intermediate tensors are released when it
        /// returns: autograd then holds the only references to what backward needs, and frees each as
        /// backward passes it. (Without this, every layer's every intermediate lived until the whole
        /// forward pass ended.)</summary>
        Scoped,
        /// <summary>Scoped and checkpointed: only the layer's input is kept; backward recomputes the layer.</summary>
        Checkpointed,
    }

    private (Tensor Residual, Tensor? Delta, Kernels.RowEpilogue? Owed) RunLayer(int index, Tensor h, Tensor? delta, Kernels.RowEpilogue? owed,
        IKvCache cache, Tensor positions, Tensor cos, Tensor sin, IAdapterHooks? adapters, LayerRun run)
    {
        var layer = _layers[index];
        if (run == LayerRun.Plain) return layer.Forward(h, delta, owed, index, cache, positions, _rope, cos, sin, Config, adapters);
        // Training: each layer adds its own residual (one tensor in, one out), which is what a checkpoint keeps.
        using var scope = torch.NewDisposeScope();
        Tensor Layer(Tensor x, Tensor p, Tensor c, Tensor s)
        {
            // A cache that keeps nothing is made again from the positions, so the mask it builds lives as long as
            // this call: a checkpoint recomputes the layer in backward, after the forward pass's tensors are gone.
            var layerCache = cache;
            if (cache is ChunkKvCache)
            {
                layerCache = new ChunkKvCache();
                layerCache.Begin(p, DType);
            }
            // Terms are owed only where our kernels run, never while autograd records; settled here all the same.
            var (residual, last, owedByLayer) = layer.Forward(x, null, null, index, layerCache, p, _rope, c, s, Config, adapters);
            return residual + (owedByLayer?.ApplyTo(last) ?? last);
        }
        var output = run == LayerRun.Checkpointed ? LayerCheckpoint.Run(Layer, h, positions, cos, sin) : Layer(h, positions, cos, sin);
        return (output.MoveToOuterDisposeScope(), null, null);
    }

    /// <summary>The final-normed hidden states [B,T,hidden] (compute dtype) of a training forward pass
    /// over <paramref name="inputIds"/> [B,T] at <paramref name="positions"/> [B,T] (negative = padding),
    /// through <paramref name="adapters"/>. Records autograd when grad mode is on (gradients reach only
    /// the parameters the hooks bring in; the frozen weights never require grad). With
    /// <paramref name="checkpointLayers"/> every decoder layer is recomputed in backward instead of
    /// keeping its activations (<see cref="LayerCheckpoint"/>); the result is the same.</summary>
    public Tensor FinalHiddenStates(Tensor inputIds, Tensor positions, IAdapterHooks? adapters, bool checkpointLayers = false)
    {
        using var scope = torch.NewDisposeScope();
        var (h, _, _) = DecoderStack(inputIds, positions, new ChunkKvCache(), adapters, checkpointLayers ? LayerRun.Checkpointed : LayerRun.Scoped);
        return Kernels.FusedOps.RmsNorm(h, _finalNorm, Config.RmsNormEps).MoveToOuterDisposeScope();
    }

    /// <summary>Summed next-token cross-entropy (float32 scalar) of final hidden states
    /// <paramref name="hidden"/> [M,hidden] against <paramref name="targets"/> [M] (int64), through the LM
    /// head <paramref name="chunkRows"/> rows at a time (<see cref="ChunkedLmHeadLoss"/>); equal to
    /// cross_entropy(linear(hidden, lm_head).float(), targets, reduction: sum). <paramref name="lmHead"/> replaces the
    /// base model's LM head (an adapter that trains its own; gradients then reach it too).</summary>
    public Tensor LmHeadLossSum(Tensor hidden, Tensor targets, int chunkRows, Tensor? lmHead = null) =>
        ChunkedLmHeadLoss.Sum(hidden, lmHead ?? _lmHead, targets.to(ScalarType.Int64, Device), chunkRows);

    /// <summary>Rows per loss chunk so that one chunk's float32 logits are about 64 MiB.</summary>
    public int DefaultLossChunkRows => Math.Max(1, (1 << 24) / Config.VocabSize);

    /// <summary>Every weight tensor the model holds (dense or quantized), for checks that none of
    /// them takes part in autograd.</summary>
    internal IEnumerable<Tensor> WeightTensors()
    {
        yield return _embedTokens;
        yield return _lmHead;
        yield return _finalNorm;
        foreach (var l in _layers)
        {
            yield return l.InputNorm;
            yield return l.PostAttentionNorm;
            foreach (var linear in new[] { l.Qkv, l.O, l.GateUp, l.Down })
                switch (linear)
                {
                    case DenseLinear d:
                        yield return d.Weight;
                        if (d.Bias is not null) yield return d.Bias;
                        break;
                    case Nf4Linear q:
                        yield return q.Weight.Packed;
                        if (q.Weight.Absmax is not null) yield return q.Weight.Absmax;
                        if (q.Bias is not null) yield return q.Bias;
                        break;
                }
        }
    }
}
