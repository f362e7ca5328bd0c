using PeftServe.Core.Adapters.AdaMix;
using PeftServe.Core.Adapters.BitFit;
using PeftServe.Core.Adapters.Bottleneck;
using PeftServe.Core.Adapters.IA3;
using PeftServe.Core.Adapters.LlamaAdapter;
using PeftServe.Core.Adapters.Lora;
using PeftServe.Core.Adapters.Prefix;
using PeftServe.Core.Adapters.Prompt;

namespace PeftServe.Core.Adapters.Training;

/// <summary>The registry of trainable methods: adding one is its training module in the method's
/// folder plus one line here.</summary>
public static class TrainingMethods
{
    public static IReadOnlyList<ITrainingMethod> All { get; } =
    [
        new LoraTrainingMethod(),
        new LoraTrainingMethod(quantized: true),
        new PrefixTuningTrainingMethod(),
        new PromptTuningTrainingMethod(),
        new PTuningTrainingMethod(),
        new IA3TrainingMethod(),
        new LlamaAdapterTrainingMethod(),
        new BottleneckTrainingMethod(),
        new AdaMixTrainingMethod(),
        new BitFitTrainingMethod(),
    ];

    public static ITrainingMethod Get(string name) =>
        All.FirstOrDefault(m => string.Equals(m.Name, name, StringComparison.OrdinalIgnoreCase))
        ?? throw new ArgumentException($"--method '{name}' is not known (use {string.Join(", ", All.Select(m => m.Name))})");
}
