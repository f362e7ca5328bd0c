using PeftServe.Core.Adapters.Training;
using PeftServe.Core.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Adapters.Bottleneck;

/// <summary>Trains bottleneck (Houlsby) adapters: h -> h + W_up act(W_down h + b_down) + b_up after the
/// attention and/or MLP block. Near-identity init: W_down as a Linear layer, W_up tiny (std 1e-3),
/// biases zero. Saved in our BOTTLENECK format (docs/adapter-format.md, section 1).</summary>
public sealed class BottleneckTrainingMethod : ITrainingMethod
{
    public string Name => "bottleneck";
    public string Description => "bottleneck (Houlsby) adapters: dimension hidden/--reduction-factor, --placement attention|mlp|both, --non-linearity relu|gelu|silu|tanh";
    public TrainableAdapter Create(LlamaModel model, TrainingOptions options) => new BottleneckTrainable(model, options, experts: 1);
}

/// <summary>Bottleneck modules, each a mixture of <c>experts</c> (1 for plain bottleneck adapters;
/// AdaMix has several). With several experts, a training forward pass picks one down and one up
/// expert at random per module (AdaMix's stochastic routing); evaluation uses the experts' averaged
/// weights, which is exactly what the server serves.</summary>
public class BottleneckTrainable : TrainableAdapter
{
    /// <summary>[layer, placement] -> per expert (down W, down b, up W, up b), or null.</summary>
    private readonly (Tensor DW, Tensor DB, Tensor UW, Tensor UB)[]?[,] _modules;
    private readonly TrainingOptions _o;
    private readonly BottleneckActivation _act;
    private readonly int _experts, _dim;
    private readonly bool[] _placements;

    public override string Method => _experts > 1 ? "adamix" : "bottleneck";

    public BottleneckTrainable(LlamaModel model, TrainingOptions o, int experts) : base(model)
    {
        _o = o;
        _experts = experts;
        if (o.ReductionFactor < 1 || Config.HiddenSize % o.ReductionFactor != 0)
            throw new ArgumentException($"--reduction-factor {o.ReductionFactor} must divide the hidden size {Config.HiddenSize}");
        _dim = Config.HiddenSize / o.ReductionFactor;
        _act = o.NonLinearity.ToLowerInvariant() switch
        {
            "relu" => BottleneckActivation.Relu,
            "gelu" => BottleneckActivation.Gelu,
            "silu" => BottleneckActivation.Silu,
            "tanh" => BottleneckActivation.Tanh,
            _ => throw new ArgumentException($"--non-linearity must be relu, gelu, silu or tanh, not '{o.NonLinearity}'"),
        };
        _placements = o.Placement.ToLowerInvariant() switch
        {
            "both" => [true, true],
            "attention" => [true, false],
            "mlp" => [false, true],
            _ => throw new ArgumentException($"--placement must be attention, mlp or both, not '{o.Placement}'"),
        };
        long h = Config.HiddenSize;
        _modules = new (Tensor, Tensor, Tensor, Tensor)[]?[Config.NumLayers, 2];
        for (int l = 0; l < Config.NumLayers; l++)
            for (int p = 0; p < 2; p++)
            {
                if (!_placements[p]) continue;
                var name = $"{l}.{BottleneckReader.PlacementName((BottleneckPlacement)p)}";
                _modules[l, p] = Enumerable.Range(0, experts).Select(e =>
                {
                    var prefix = experts > 1 ? $"{name}.experts.{e}" : name;
                    var (dw, db) = LinearParameters(prefix + ".down", h, _dim);
                    using (torch.no_grad()) db.zero_();
                    var uw = Parameter(prefix + ".up.weight", torch.randn(h, _dim) * 1e-3);
                    var ub = Parameter(prefix + ".up.bias", torch.zeros(h));
                    return (dw, db, uw, ub);
                }).ToArray();
            }
    }

    private Tensor Apply(int layer, BottleneckPlacement p, Tensor output)
    {
        if (_modules[layer, (int)p] is not { } experts) return output;
        Tensor dw, db, uw, ub;
        if (experts.Length == 1) (dw, db, uw, ub) = experts[0];
        else if (Training)
        {
            var random = LayerRandom(layer, (int)p);
            var d = experts[random.Next(experts.Length)];
            var u = experts[random.Next(experts.Length)];
            (dw, db, uw, ub) = (d.DW, d.DB, u.UW, u.UB);
        }
        else
        {
            dw = torch.stack(experts.Select(e => e.DW).ToArray()).mean([0]);
            db = torch.stack(experts.Select(e => e.DB).ToArray()).mean([0]);
            uw = torch.stack(experts.Select(e => e.UW).ToArray()).mean([0]);
            ub = torch.stack(experts.Select(e => e.UB).ToArray()).mean([0]);
        }
        var hidden = BottleneckSlotPool.Activate(_act, nn.functional.linear(output, As(dw, output), As(db, output)));
        // adapter(x) = x + up(act(down(x))): the block's output passes through, plus the bottleneck.
        return output + nn.functional.linear(hidden, As(uw, output), As(ub, output));
    }

    public override Tensor AttentionOutput(int layer, Tensor x, Tensor output) => Apply(layer, BottleneckPlacement.Attention, output);
    public override Tensor MlpOutput(int layer, Tensor x, Tensor output) => Apply(layer, BottleneckPlacement.Mlp, output);

    public override void Save(string dir)
    {
        var tensors = new List<KeyValuePair<string, Tensor>>();
        var layers = new List<int>();
        for (int l = 0; l < Config.NumLayers; l++)
        {
            if (_modules[l, 0] is null && _modules[l, 1] is null) continue;
            layers.Add(l);
            for (int p = 0; p < 2; p++)
                if (_modules[l, p] is { } experts)
                    for (int e = 0; e < experts.Length; e++)
                    {
                        var prefix = $"base_model.model.model.layers.{l}.{BottleneckReader.PlacementName((BottleneckPlacement)p)}." + (_experts > 1 ? $"experts.{e}." : "");
                        tensors.Add(new(prefix + "down.weight", experts[e].DW));
                        tensors.Add(new(prefix + "down.bias", experts[e].DB));
                        tensors.Add(new(prefix + "up.weight", experts[e].UW));
                        tensors.Add(new(prefix + "up.bias", experts[e].UB));
                    }
        }
        var config = new Dictionary<string, object?>
        {
            ["peft_type"] = _experts > 1 ? "ADAMIX" : "BOTTLENECK",
            ["reduction_factor"] = _o.ReductionFactor,
            ["placement"] = _o.Placement.ToLowerInvariant(),
            ["non_linearity"] = _o.NonLinearity.ToLowerInvariant(),
            ["layers"] = layers,
            ["base_model_name_or_path"] = _o.BaseModelName,
        };
        if (_experts > 1) config["num_experts"] = _experts;
        Write(dir, config, tensors);
    }
}
