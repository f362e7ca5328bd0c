using PeftServe.Core.Adapters.IA3;
using PeftServe.Core.Adapters.LlamaAdapter;
using PeftServe.Core.Adapters.AdaMix;
using PeftServe.Core.Adapters.BitFit;
using PeftServe.Core.Adapters.Bottleneck;
using PeftServe.Core.Adapters.Lora;
using PeftServe.Core.Adapters.Prefix;
using PeftServe.Core.Adapters.Prompt;

namespace PeftServe.Core.Adapters;

/// <summary>The registry of adapter methods: adding a method is its folder plus one line here.</summary>
public static class AdapterMethods
{
    public static IReadOnlyList<AdapterMethod> All { get; } =
    [
        new LoraMethod(),
        LoraEmbeddingsMethod.Instance,
        new PrefixTuningMethod(),
        new PromptTuningMethod(),
        new IA3Method(),
        new LlamaAdapterMethod(),
        BottleneckMethod.Instance,
        new AdaMixMethod(),
        new BitFitMethod(),
    ];

    /// <summary>The method that reads this peft_type, or an error listing the supported ones.</summary>
    public static AdapterMethod ForPeftType(string peftType, string source) =>
        All.FirstOrDefault(m => m.PeftTypes.Contains(peftType, StringComparer.OrdinalIgnoreCase))
        ?? throw new AdapterException($"{source}: peft_type '{peftType}' is not supported (supported: {string.Join(", ", All.SelectMany(m => m.PeftTypes))})");

    /// <summary>Checks the adapter in <paramref name="path"/> against the base model as <see cref="Load"/>
    /// would, from the config and the safetensors header (names, dtypes, shapes) plus one scan of the raw
    /// values for NaN and infinity, without converting any weight to float32 (uploads use this).
    /// Throws <see cref="AdapterException"/> naming what is wrong; returns the adapter's method.</summary>
    public static AdapterMethod Validate(string path, string name, Model.ModelConfig model, AdapterLimits limits)
    {
        using var folder = AdapterFolder.Open(path, metadataOnly: true);
        var method = ForPeftType(folder.PeftType, Path.Combine(path, AdapterFolder.ConfigFile));
        // The adapter's own method: a LoRA with embedding or LM head parts is served by another pool than plain LoRA.
        using (var adapter = method.Load(folder, name, model, limits)) method = adapter.Method;
        folder.CheckFiniteValues();
        return method;
    }

    /// <summary>Reads and validates the adapter in <paramref name="path"/> against the base model.</summary>
    public static Adapter Load(string path, string name, Model.ModelConfig model, AdapterLimits limits)
    {
        using var folder = AdapterFolder.Open(path);
        var method = ForPeftType(folder.PeftType, Path.Combine(path, AdapterFolder.ConfigFile));
        return method.Load(folder, name, model, limits);
    }
}
