using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Model;

/// <summary>Gradient checkpointing of one decoder layer: the forward pass runs the layer without
/// recording autograd and keeps only its inputs; backward runs the layer again with autograd and
/// back-propagates through that fresh copy. A layer's activations then live only while backward is
/// inside it, at the cost of a second forward per layer.
///
/// TorchSharp 0.107 has no torch.utils.checkpoint, but it has custom autograd functions
/// (<see cref="torch.autograd.SingleTensorFunction{T}"/>), so this is one, in the reentrant style:
/// backward calls <c>torch.autograd.backward</c> on the recomputed layer, which accumulates the
/// gradients of the adapter's parameters (leaves) directly and yields the gradient of the input.
///
/// What the recomputation must reproduce, the callers guarantee: the layer reads only its inputs
/// (passed through here and saved), the frozen weights and the adapter's leaf parameters; anything
/// random in it is drawn from a seed fixed for the forward pass (TrainableAdapter.ForwardSeed), never
/// from a stream that advances; the KV cache stores nothing (the training ChunkKvCache).
/// backward is called by libtorch's autograd engine (on CUDA, from the engine's device thread): an
/// exception there cannot travel back through the engine and ends the process. Call it inside a
/// dispose scope (the model's per-layer one): TorchSharp's apply keeps an empty_like copy of each output
/// in the graph node (to make zero gradients for outputs that get none), which the scope frees at once;
/// the output always gets a gradient here, so the copy is never needed.</summary>
internal sealed class LayerCheckpoint : torch.autograd.SingleTensorFunction<LayerCheckpoint>
{
    /// <summary>One layer's forward: hidden states [B,T,hidden] in, hidden states out.</summary>
    public delegate Tensor LayerForward(Tensor hidden, Tensor positions, Tensor cos, Tensor sin);

    public override string Name => "DecoderLayerCheckpoint";

    /// <summary>The layer's output; checkpointed when autograd is recording, plain otherwise.</summary>
    public static Tensor Run(LayerForward layer, Tensor hidden, Tensor positions, Tensor cos, Tensor sin)
    {
        if (!torch.is_grad_enabled()) return layer(hidden, positions, cos, sin);
        // The function is part of the graph only if one of its inputs requires grad; the first layer's
        // input is the frozen embedding, so it is made a leaf that does (as transformers'
        // enable_input_require_grads does for its checkpointing), but backward computes no gradient for it.
        bool inputGrad = hidden.requires_grad;
        if (!inputGrad) hidden = hidden.detach().requires_grad_(true);
        return apply(hidden, positions, cos, sin, layer, inputGrad);
    }

    public override Tensor forward(torch.autograd.AutogradContext ctx, params object[] vars)
    {
        // Runs with autograd off (TorchSharp's apply turns it off around forward).
        var (hidden, positions, cos, sin, layer) = ((Tensor)vars[0], (Tensor)vars[1], (Tensor)vars[2], (Tensor)vars[3], (LayerForward)vars[4]);
        ctx.save_for_backward([hidden, positions, cos, sin]);
        ctx.save_data("layer", layer);
        ctx.save_data("inputGrad", vars[5]);
        using var scope = torch.NewDisposeScope();
        return layer(hidden, positions, cos, sin).MoveToOuterDisposeScope();
    }

    public override List<Tensor> backward(torch.autograd.AutogradContext ctx, Tensor gradOutput)
    {
        var layer = (LayerForward)ctx.get_data("layer");
        bool wantInputGrad = (bool)ctx.get_data("inputGrad");
        Tensor? inputGrad = null;
        using (var scope = torch.NewDisposeScope())
        {
            var saved = ctx.get_saved_variables();
            // The engine runs backward with autograd off; the recomputation must record.
            using var _ = torch.enable_grad();
            var hidden = saved[0].detach().requires_grad_(wantInputGrad);
            var output = layer(hidden, saved[1], saved[2], saved[3]);
            // Nothing in it may need a gradient (a layer without adapter parameters, above the embedding).
            if (output.requires_grad) torch.autograd.backward([output], [gradOutput]);
            if (wantInputGrad) inputGrad = hidden.grad!.MoveToOuterDisposeScope();
        }
        // On CUDA the engine calls this from its own thread, where no dispose scope owns the incoming
        // gradient: free it now rather than when the GC gets to it.
        gradOutput.Dispose();
        // One entry per forward argument: the hidden states' gradient; none for the positions, the rotary
        // tables (no gradient), the layer delegate or the flag.
        return AutogradHandoff.Return(inputGrad, null, null, null, null, null);
    }
}
