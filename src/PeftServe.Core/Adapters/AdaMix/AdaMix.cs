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
/// Served exactly so: the averaged adapter is a bottleneck adapter and takes a slot of the bottleneck method's
/// pool, so a batch that mixes bottleneck and AdaMix rows runs one shrink and one expand per placement for both
/// (with a pool of its own, AdaMix rows cost two more launches per placement and layer: on the H200 every such
/// launch was several microseconds of a decode step). The two kinds share the bottleneck slots
/// (--slots-per-method); the files, errors and API still call an AdaMix adapter by its peft_type.</summary>
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

    /// <summary>AdaMix adapters live in the bottleneck method's pool; this method has none of its own.</summary>
    public override bool HasOwnPool => false;

    public override AdapterSlotPool CreatePool(LlamaModel model, AdapterLimits limits) =>
        throw new InvalidOperationException("AdaMix adapters are served from the bottleneck method's slots");

    public override long PoolBytes(ModelConfig c, AdapterLimits limits, ScalarType dtype) => 0;
}
