using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Trainer;

/// <summary>AdamW (Loshchilov and Hutter) with decoupled weight decay, as torch.optim.AdamW computes
/// it; written out so that its state (first and second moments, step count) goes into checkpoints as
/// plain tensors and a resumed run continues bit for bit.</summary>
public sealed class AdamW : IDisposable
{
    private readonly IReadOnlyList<(string Name, Tensor Value)> _params;
    private readonly Tensor[] _m, _v;
    public double Beta1 { get; init; } = 0.9;
    public double Beta2 { get; init; } = 0.999;
    public double Eps { get; init; } = 1e-8;
    public double WeightDecay { get; init; }
    /// <summary>Steps taken.</summary>
    public long Step { get; set; }

    public AdamW(IReadOnlyList<(string Name, Tensor Value)> parameters)
    {
        _params = parameters;
        _m = parameters.Select(p => torch.zeros_like(p.Value).DetachFromDisposeScope()).ToArray();
        _v = parameters.Select(p => torch.zeros_like(p.Value).DetachFromDisposeScope()).ToArray();
    }

    /// <summary>Clips the gradients' global L2 norm to <paramref name="maxNorm"/> (when positive) and returns the norm before clipping.</summary>
    public double ClipGradients(double maxNorm)
    {
        using var scope = torch.NewDisposeScope();
        using var _ = torch.no_grad();
        var grads = _params.Select(p => p.Value.grad).Where(g => g is not null).Select(g => g!).ToArray();
        if (grads.Length == 0) return 0;
        double norm = torch.stack(grads.Select(g => g.to(ScalarType.Float64).pow(2).sum()).ToArray()).sum().sqrt().item<double>();
        if (maxNorm > 0 && norm > maxNorm)
            foreach (var g in grads) g.mul_(maxNorm / (norm + 1e-6));
        return norm;
    }

    public void Update(double lr)
    {
        using var scope = torch.NewDisposeScope();
        using var _ = torch.no_grad();
        Step++;
        double bc1 = 1 - Math.Pow(Beta1, Step), bc2 = 1 - Math.Pow(Beta2, Step);
        for (int i = 0; i < _params.Count; i++)
        {
            var p = _params[i].Value;
            var g = p.grad;
            if (g is null) continue;
            if (WeightDecay != 0) p.mul_(1 - lr * WeightDecay);
            _m[i].mul_(Beta1).add_(g, alpha: 1 - Beta1);
            _v[i].mul_(Beta2).addcmul_(g, g, value: 1 - Beta2);
            var denom = (_v[i] / bc2).sqrt_().add_(Eps);
            p.addcdiv_(_m[i], denom, value: -lr / bc1);
        }
    }

    /// <summary>Drops the gradients (as zero_grad(set_to_none=True)): no buffer is kept or cleared
    /// between steps, and the next backward allocates them afresh.</summary>
    public void ZeroGrad()
    {
        foreach (var (_, p) in _params) p.grad = null;
    }

    /// <summary>Moment tensors by name, for checkpoints.</summary>
    public IEnumerable<KeyValuePair<string, Tensor>> State() =>
        _params.SelectMany((p, i) => new KeyValuePair<string, Tensor>[] { new("adam.m." + p.Name, _m[i]), new("adam.v." + p.Name, _v[i]) });

    public void LoadState(IReadOnlyDictionary<string, Tensor> state, long step)
    {
        using var _ = torch.no_grad();
        for (int i = 0; i < _params.Count; i++)
        {
            var name = _params[i].Name;
            if (!state.TryGetValue("adam.m." + name, out var m) || !state.TryGetValue("adam.v." + name, out var v))
                throw new InvalidDataException($"checkpoint lacks the optimizer state of '{name}'");
            _m[i].copy_(m);
            _v[i].copy_(v);
        }
        Step = step;
    }

    public void Dispose()
    {
        foreach (var t in _m.Concat(_v)) t.Dispose();
    }
}

/// <summary>Learning rate per step: linear warmup from 0 over the first warmup steps, then cosine or
/// linear decay towards 0 (the first decay step has the peak rate, the last one a small fraction of it), or constant.</summary>
public sealed record LrSchedule(double Peak, int WarmupSteps, int TotalSteps, string Kind)
{
    /// <summary>The rate for step <paramref name="step"/> (1-based).</summary>
    public double At(int step)
    {
        if (WarmupSteps > 0 && step <= WarmupSteps) return Peak * step / WarmupSteps;
        int decay = TotalSteps - WarmupSteps;
        double p = decay <= 0 ? 0 : Math.Clamp((double)(step - 1 - WarmupSteps) / decay, 0, 1);
        return Kind switch
        {
            "cosine" => Peak * 0.5 * (1 + Math.Cos(Math.PI * p)),
            "linear" => Peak * (1 - p),
            "constant" => Peak,
            _ => throw new ArgumentException($"--schedule must be cosine, linear or constant, not '{Kind}'"),
        };
    }
}
