using PeftServe.Core.Adapters.Bottleneck;
using PeftServe.Core.Adapters.Training;
using PeftServe.Core.Model;

namespace PeftServe.Core.Adapters.AdaMix;

/// <summary>Trains AdaMix: --num-experts bottleneck experts per module; each training forward pass
/// routes every module through one randomly chosen down expert and one up expert; evaluation and the
/// saved adapter use the average of the experts' weights (the paper's adaptation merging). Saved with
/// every expert in our ADAMIX format (docs/adapter-format.md, section 2); the server averages them.</summary>
public sealed class AdaMixTrainingMethod : ITrainingMethod
{
    public string Name => "adamix";
    public string Description => "AdaMix: --num-experts bottleneck experts per module, stochastic routing in training, averaged when served";
    public TrainableAdapter Create(LlamaModel model, TrainingOptions options)
    {
        if (options.NumExperts < 2 || options.NumExperts > AdaMixMethod.MaxExperts)
            throw new ArgumentException($"--num-experts must be between 2 and {AdaMixMethod.MaxExperts}, not {options.NumExperts}");
        return new BottleneckTrainable(model, options, options.NumExperts);
    }
}
