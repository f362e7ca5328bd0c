using PeftServe.Core.Adapters;
using PeftServe.Core.Engine;
using PeftServe.Core.Generation;
using PeftServe.Core.Tests.Model;
using PeftServe.Core.Tests.SafeTensors;
using TorchSharp;

namespace PeftServe.Core.Tests.Adapters;

/// <summary>An AdaMix adapter as the trainer saves it: E bottleneck experts per module.</summary>
internal sealed class AdaMixSpec
{
    public required BottleneckSpec Shape { get; init; }   // config values; its Modules are unused
    public Dictionary<(int Layer, int Placement), BottleneckWeights[]> Experts { get; } = [];
    public int NumExperts => Experts.Values.First().Length;

    public static AdaMixSpec Random(int seed, int experts, int reductionFactor, string placement, string nonLinearity, int[]? layers = null)
    {
        var rng = new Random(seed);
        var m = ReferenceLlama.Tiny;
        var shape = new BottleneckSpec { ReductionFactor = reductionFactor, Placement = placement, NonLinearity = nonLinearity, Layers = layers };
        var spec = new AdaMixSpec { Shape = shape };
        foreach (int layer in layers ?? Enumerable.Range(0, m.Layers).ToArray())
            foreach (int p in shape.PlacementIndices)
                spec.Experts[(layer, p)] = Enumerable.Range(0, experts).Select(_ => BottleneckWeights.Random(rng, m.Hidden, m.Hidden / reductionFactor)).ToArray();
        return spec;
    }

    public string Write(string root, string name)
    {
        var config = Shape.Config("ADAMIX");
        config["num_experts"] = NumExperts;
        return OurAdapterTesting.WriteAdapter(root, name, config, Experts.SelectMany(kv => kv.Value.SelectMany((w, e) =>
            w.Tensors($"{BottleneckSpec.PlacementPrefix(kv.Key.Layer, kv.Key.Placement)}experts.{e}."))));
    }

    /// <summary>The merged adapter: a bottleneck spec whose weights are the experts' means (float64).</summary>
    public BottleneckSpec Averaged()
    {
        var merged = new BottleneckSpec { ReductionFactor = Shape.ReductionFactor, Placement = Shape.Placement, NonLinearity = Shape.NonLinearity, Layers = Shape.Layers };
        foreach (var (key, experts) in Experts) merged.Modules[key] = BottleneckWeights.Mean(experts);
        return merged;
    }
}

/// <summary>AdaMix served as its averaged adapter (the paper's inference-time merge).</summary>
public sealed class AdaMixAdapterTests : IClassFixture<TinyLlamaFixture>, IDisposable
{
    private readonly TinyLlamaFixture _f;
    private readonly TempDir _dir = new();
    private readonly AdapterManager _set;

    public AdaMixAdapterTests(TinyLlamaFixture fixture)
    {
        _f = fixture;
        _set = new AdapterManager(fixture.Model, new AdapterLimits(), null, 1L << 30);
    }

    public void Dispose()
    {
        _set.Dispose();
        _dir.Dispose();
    }

    [Theory]
    [InlineData(4, "both", "gelu", 8)]
    [InlineData(3, "mlp", "relu", 4)]
    [InlineData(1, "attention", "tanh", 16)]
    public void ServedLogitsMatchTheFormulaWithMeanWeights(int experts, string placement, string nonLinearity, int reductionFactor)
    {
        var spec = AdaMixSpec.Random(experts * 7 + reductionFactor, experts, reductionFactor, placement, nonLinearity);
        var adapter = _set.Acquire(spec.Write(_dir.Path, "adamix"));
        using var logits = FullLogits.Compute(_f.Model, _f.InputIds, [adapter, adapter]);
        var hooks = spec.Averaged().Hooks();
        for (int row = 0; row < 2; row++)
        {
            var ids = BottleneckAdapterTests.Row(_f.InputIds, row);
            var expected = ReferenceLlama.Tiny.Logits(ids, hooks);
            OurAdapterTesting.AssertAdapterMatters(expected, ReferenceLlama.Tiny.Logits(ids));
            OurAdapterTesting.AssertClose(expected, logits[row]);
        }
    }

    [Fact]
    public void EqualsTheBottleneckAdapterMadeFromTheAveragedWeights()
    {
        var spec = AdaMixSpec.Random(11, 3, 4, "both", "silu", [0, 2]);
        var adamix = _set.Acquire(spec.Write(_dir.Path, "adamix"));
        var averaged = spec.Averaged();
        foreach (var key in averaged.Modules.Keys.ToArray()) averaged.Modules[key] = averaged.Modules[key].ToFloat32();
        var bottleneck = _set.Acquire(averaged.Write(_dir.Path, "averaged"));
        // Served as what it is: a bottleneck adapter in the bottleneck method's pool (one batched op for both kinds).
        Assert.Equal("bottleneck", adamix.Adapter.Method.Name);
        Assert.Same(bottleneck.Pool, adamix.Pool);
        Assert.NotEqual(bottleneck.Slot, adamix.Slot);
        using var ids = torch.stack([_f.InputIds[0], _f.InputIds[0], _f.InputIds[1], _f.InputIds[1]]);
        using var logits = FullLogits.Compute(_f.Model, ids, [adamix, bottleneck, bottleneck, adamix]);
        var diff = Math.Max((logits[0] - logits[1]).abs().max().item<float>(), (logits[2] - logits[3]).abs().max().item<float>());
        Assert.True(diff <= 1e-6, $"AdaMix and its averaged bottleneck differ by {diff:G4}");
        // And averaging the weights is not averaging the experts' outputs: a mixture of outputs gives other logits.
        var outputMean = ReferenceLlama.Tiny.Logits(BottleneckAdapterTests.Row(_f.InputIds, 0), new ReferenceHooks
        {
            AttentionBlockOutput = (l, h) => MeanOfOutputs(spec, l, 0, h),
            MlpBlockOutput = (l, h) => MeanOfOutputs(spec, l, 1, h),
        });
        Assert.True(OurAdapterTesting.MaxDifference(outputMean, logits[0]) > 1e-3);
    }

    private static double[] MeanOfOutputs(AdaMixSpec spec, int layer, int placement, double[] h)
    {
        if (!spec.Experts.TryGetValue((layer, placement), out var experts)) return h;
        var outs = experts.Select(e => e.Apply(h, spec.Shape.NonLinearity)).ToArray();
        return Enumerable.Range(0, h.Length).Select(i => outs.Average(o => o[i])).ToArray();
    }
}
