using static TorchSharp.torch;
using PeftServe.Core.Adapters.Bottleneck;
using PeftServe.Core.Model;

namespace PeftServe.Core.Adapters.AdaMix;

/// <summary>AdaMix (Wang et al., 2022): a mixture of E bottleneck adapter experts per placement, routed
/// stochastically during training. At inference the paper merges the experts by averaging their
/// weights ("adaptation merging"), so an AdaMix adapter is served as one bottleneck adapter whose
/// down/up weights and biases are the means over the experts: h -> h + mean(W_up) act(mean(W_down) h
/// + mean(b_down)) + mean(b_up). (This is averaging of parameters, not of expert outputs: the two
/// differ because of the non-linearity, and the paper serves the former.)
///
/// Serving reuses the bottleneck slot pool and batched op, but AdaMix gets a pool of its own rather
/// than sharing the bottleneck method's: the registry gives every method its own pool and slot count,
/// so AdaMix adapters neither take bottleneck slots nor depend on the bottleneck method's instance,
/// and slot-exhaustion errors name the method the user loaded. The cost is one more gathered op per
/// hook in a batch that mixes both kinds, which at a handful of layers is small.</summary>
public sealed class AdaMixMethod : AdapterMethod
{
    /// <summary>Upper bound on num_experts (the paper uses 4; anything this large is a mistake).</summary>
    public const int MaxExperts = 64;

    public override string Name => "adamix";
    public override IReadOnlyList<string> PeftTypes { get; } = ["ADAMIX"];

    public override Adapter Load(AdapterFolder folder, string name, ModelConfig model, AdapterLimits limits)
    {
        int experts = folder.Int("num_experts");
        if (experts < 1 || experts > MaxExperts)
            throw new AdapterException($"{folder.Path}/{AdapterFolder.ConfigFile}: 'num_experts' must be between 1 and {MaxExperts}, got {experts}");
        return BottleneckReader.Read(this, folder, name, model, BottleneckConfig.Read(folder, model, limits), experts);
    }

    public override AdapterSlotPool CreatePool(LlamaModel model, AdapterLimits limits) => new BottleneckSlotPool(this, model, limits);

    public override long PoolBytes(ModelConfig c, AdapterLimits limits, ScalarType dtype) => BottleneckSlotPool.Bytes(c, limits, dtype);
}
