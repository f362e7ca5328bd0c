using PeftServe.Core.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Quantization;

/// <summary>x W^T for an NF4 layer when x needs gradients (training adapters on the quantized base,
/// QLoRA). Plain autograd through linear(x, dequantize(W)) would keep the dense copy of W for
/// backward, layer after layer, so a QLoRA run would hold the whole base in the compute dtype again;
/// this custom autograd function keeps nothing but a reference to the NF4 layer and dequantizes once
/// more in backward (grad_x = grad_y W). The weight is frozen: it gets no gradient.</summary>
internal sealed class Nf4TrainingMatMul : torch.autograd.SingleTensorFunction<Nf4TrainingMatMul>
{
    public override string Name => "Nf4TrainingMatMul";

    /// <summary>x W^T with autograd to x. Call it inside a dispose scope (Nf4Linear.Forward's): TorchSharp's
    /// apply keeps an empty_like copy of the output in the graph node, which the scope frees at once.</summary>
    public static Tensor Apply(Nf4Linear layer, Tensor x) => apply(x, layer);

    public override Tensor forward(torch.autograd.AutogradContext ctx, params object[] vars)
    {
        var (x, layer) = ((Tensor)vars[0], (Nf4Linear)vars[1]);
        ctx.save_data("layer", layer);
        return layer.PlainForward(x);
    }

    public override List<Tensor> backward(torch.autograd.AutogradContext ctx, Tensor gradOutput)
    {
        var layer = (Nf4Linear)ctx.get_data("layer");
        Tensor inputGrad;
        using (var scope = torch.NewDisposeScope())
            inputGrad = torch.matmul(gradOutput, layer.DenseWeight(gradOutput.dtype)).MoveToOuterDisposeScope();
        gradOutput.Dispose();
        return AutogradHandoff.Return(inputGrad, null);
    }
}
