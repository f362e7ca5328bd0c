using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Model;

/// <summary>Summed next-token cross-entropy of hidden states [M,hidden] through the frozen LM head
/// [V,hidden], computed a chunk of rows at a time so that the float32 logits of all M rows
/// ([M,V]: 0.5 GB for 4,096 tokens of a 32,000-word vocabulary, 2 GB at 128,256) never exist at once.
/// A custom autograd function because autograd would otherwise keep every chunk's softmax for
/// backward, which is the whole logits again: forward keeps only the hidden states, and backward
/// recomputes each chunk's logits and turns them into that chunk's input gradient at once
/// (one extra LM-head product, small beside the decoder).
///
/// The math is that of linear + float32 cross_entropy (summed): logits in the compute dtype, upcast,
/// loss = logsumexp - logit[target]; gradient (softmax - onehot) * upstream, cast back to the compute
/// dtype, times the LM head. When the LM head itself is trained (an adapter's saved lm_head), backward also
/// gives its gradient, the chunks' (softmax - onehot)^T hidden summed.</summary>
internal sealed class ChunkedLmHeadLoss : torch.autograd.SingleTensorFunction<ChunkedLmHeadLoss>
{
    public override string Name => "ChunkedLmHeadLoss";

    /// <summary>The loss sum (float32 scalar) of <paramref name="hidden"/> [M,hidden] against
    /// <paramref name="targets"/> [M] (int64), <paramref name="chunkRows"/> rows at a time.</summary>
    public static Tensor Sum(Tensor hidden, Tensor lmHead, Tensor targets, int chunkRows)
    {
        if (chunkRows < 1) throw new ArgumentOutOfRangeException(nameof(chunkRows), "a loss chunk holds at least one row");
        if (torch.is_grad_enabled() && (hidden.requires_grad || lmHead.requires_grad)) return apply(hidden, lmHead, targets, chunkRows);
        using var _ = torch.no_grad();
        return LossSum(hidden, lmHead, targets, chunkRows);
    }

    public override Tensor forward(torch.autograd.AutogradContext ctx, params object[] vars)
    {
        var (hidden, lmHead, targets, chunkRows) = ((Tensor)vars[0], (Tensor)vars[1], (Tensor)vars[2], (int)vars[3]);
        ctx.save_for_backward([hidden, lmHead, targets]);
        ctx.save_data("chunkRows", chunkRows);
        return LossSum(hidden, lmHead, targets, chunkRows);
    }

    public override List<Tensor> backward(torch.autograd.AutogradContext ctx, Tensor gradOutput)
    {
        int chunkRows = (int)ctx.get_data("chunkRows");
        Tensor hiddenGrad;
        Tensor? headGrad = null;
        using (var scope = torch.NewDisposeScope())
        {
            var saved = ctx.get_saved_variables();
            var (hidden, lmHead, targets) = (saved[0], saved[1], saved[2]);
            var upstream = gradOutput.to(ScalarType.Float32);
            hiddenGrad = torch.empty_like(hidden);
            if (lmHead.requires_grad) headGrad = torch.zeros(lmHead.shape, ScalarType.Float32, lmHead.device);
            for (long start = 0; start < hidden.shape[0]; start += chunkRows)
            {
                using var chunk = torch.NewDisposeScope();
                long rows = Math.Min(chunkRows, hidden.shape[0] - start);
                var logits = nn.functional.linear(hidden.narrow(0, start, rows), lmHead).to(ScalarType.Float32); // [C,V]
                var grad = torch.softmax(logits, -1).mul_(upstream);
                var t = targets.narrow(0, start, rows).unsqueeze(1);
                grad.scatter_add_(1, t, (-upstream).expand(t.shape));                                             // softmax - onehot
                hiddenGrad.narrow(0, start, rows).copy_(torch.matmul(grad.to(hidden.dtype), lmHead));
                headGrad?.add_(torch.matmul(grad.t(), hidden.narrow(0, start, rows).to(ScalarType.Float32)));
            }
            hiddenGrad.MoveToOuterDisposeScope();
            headGrad = headGrad?.to(lmHead.dtype).MoveToOuterDisposeScope();
        }
        gradOutput.Dispose();
        return AutogradHandoff.Return(hiddenGrad, headGrad, null, null);
    }

    private static Tensor LossSum(Tensor hidden, Tensor lmHead, Tensor targets, int chunkRows)
    {
        using var scope = torch.NewDisposeScope();
        var total = torch.zeros(1, ScalarType.Float32, hidden.device).squeeze();
        for (long start = 0; start < hidden.shape[0]; start += chunkRows)
        {
            using var chunk = torch.NewDisposeScope();
            long rows = Math.Min(chunkRows, hidden.shape[0] - start);
            var logits = nn.functional.linear(hidden.narrow(0, start, rows), lmHead).to(ScalarType.Float32); // [C,V]
            var picked = logits.gather(1, targets.narrow(0, start, rows).unsqueeze(1)).squeeze(1);
            total.add_((logits.logsumexp(-1) - picked).sum());
        }
        return total.MoveToOuterDisposeScope();
    }
}
