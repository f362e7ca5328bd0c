using System.Text.Json;
using PeftServe.Core.SafeTensors;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Tests.Adapters;

/// <summary>Helpers for the tests of our own adapter formats: random weights that are exactly
/// representable in float32 (so the float64 reference uses the very values the server reads),
/// adapter folders written as the trainer would, and the formulas computed directly.</summary>
internal static class OurAdapterTesting
{
    public const double Tolerance = 1e-4;

    /// <summary>Largest |expected - actual| over logits [T][V] against a [T,V] tensor.</summary>
    public static double MaxDifference(double[][] expected, Tensor actual)
    {
        Assert.Equal([expected.Length, expected[0].Length], actual.shape);
        var a = actual.to(ScalarType.Float64).cpu().data<double>().ToArray();
        double max = 0;
        for (int t = 0; t < expected.Length; t++)
            for (int v = 0; v < expected[t].Length; v++) max = Math.Max(max, Math.Abs(expected[t][v] - a[t * expected[t].Length + v]));
        return max;
    }

    public static void AssertClose(double[][] expected, Tensor actual, double tolerance = Tolerance)
    {
        var diff = MaxDifference(expected, actual);
        Assert.True(diff <= tolerance, $"max |difference| {diff:G4} exceeds {tolerance}");
    }

    /// <summary>Asserts the adapter changes the logits by more than <paramref name="atLeast"/>, so that
    /// agreeing with the reference says something.</summary>
    public static void AssertAdapterMatters(double[][] withAdapter, double[][] without, double atLeast = 0.05)
    {
        double max = 0;
        for (int t = 0; t < without.Length; t++)
            for (int v = 0; v < without[t].Length; v++) max = Math.Max(max, Math.Abs(withAdapter[t][v] - without[t][v]));
        Assert.True(max > atLeast, $"the adapter changes the logits by at most {max:G4}; the test weights are too weak to check anything");
    }

    /// <summary>Uniform values in [-scale, scale], rounded to float32.</summary>
    public static double[] Random(Random rng, int count, double scale) =>
        Enumerable.Range(0, count).Select(_ => (double)(float)((rng.NextDouble() * 2 - 1) * scale)).ToArray();

    public static double[][] RandomMatrix(Random rng, int rows, int cols, double scale) =>
        Enumerable.Range(0, rows).Select(_ => Random(rng, cols, scale)).ToArray();

    /// <summary>A tensor for the adapter file: name without "base_model.model.", values, shape.</summary>
    public sealed record FileTensor(string Name, double[] Values, long[] Shape)
    {
        public static FileTensor Of(string name, double[] v) => new(name, v, [v.Length]);
        public static FileTensor Of(string name, double[][] m) => new(name, m.SelectMany(r => r).ToArray(), [m.Length, m[0].Length]);
    }

    /// <summary>Writes adapter_config.json and adapter_model.safetensors (float32, names under
    /// "base_model.model.", as PEFT saves them) into a new folder under <paramref name="root"/>.</summary>
    public static string WriteAdapter(string root, string name, object config, IEnumerable<FileTensor> tensors,
        ScalarType dtype = ScalarType.Float32)
    {
        var dir = Path.Combine(root, name);
        Directory.CreateDirectory(dir);
        File.WriteAllText(Path.Combine(dir, "adapter_config.json"), JsonSerializer.Serialize(config));
        var list = tensors.Select(t => new KeyValuePair<string, Tensor>("base_model.model." + t.Name,
            torch.tensor(t.Values.Select(x => (float)x).ToArray(), t.Shape).to(dtype))).ToList();
        try { SafeTensorsWriter.Write(Path.Combine(dir, "adapter_model.safetensors"), list); }
        finally { foreach (var t in list) t.Value.Dispose(); }
        return dir;
    }

    public static double Activation(string name, double x) => name switch
    {
        "relu" => Math.Max(0, x),
        "gelu" => 0.5 * x * (1 + Erf(x / Math.Sqrt(2))),
        "silu" => x / (1 + Math.Exp(-x)),
        "tanh" => Math.Tanh(x),
        _ => throw new ArgumentException(name),
    };

    /// <summary>erf by its Maclaurin series for |x| &lt;= 3 (exact to ~1e-13 there) and by the
    /// continued fraction of erfc beyond.</summary>
    public static double Erf(double x)
    {
        double ax = Math.Abs(x);
        if (ax <= 3)
        {
            double sum = 0, term = ax;   // term = (-1)^n x^(2n+1) / n!
            for (int n = 0; n < 80; n++)
            {
                sum += term / (2 * n + 1);
                term *= -ax * ax / (n + 1);
            }
            return Math.Sign(x) * 2 / Math.Sqrt(Math.PI) * sum;
        }
        // erfc(x) = exp(-x^2)/sqrt(pi) * 1/(x + (1/2)/(x + 1/(x + (3/2)/(x + 2/(x + ...)))))
        double f = ax;
        for (int k = 60; k >= 1; k--) f = ax + k / 2.0 / f;
        return Math.Sign(x) * (1 - Math.Exp(-ax * ax) / Math.Sqrt(Math.PI) / f);
    }
}

/// <summary>One bottleneck module's weights: down [r][hidden], down bias [r], up [hidden][r], up bias [hidden].</summary>
internal sealed record BottleneckWeights(double[][] Down, double[] DownBias, double[][] Up, double[] UpBias)
{
    public static BottleneckWeights Random(Random rng, int hidden, int r) => new(
        OurAdapterTesting.RandomMatrix(rng, r, hidden, 0.5),
        OurAdapterTesting.Random(rng, r, 0.5),
        OurAdapterTesting.RandomMatrix(rng, hidden, r, 0.2),
        OurAdapterTesting.Random(rng, hidden, 0.2));

    /// <summary>h + W_up act(W_down h + b_down) + b_up.</summary>
    public double[] Apply(double[] h, string activation)
    {
        var z = ReferenceLlama.Add(ReferenceLlama.MatVec(Down, h), DownBias);
        var a = z.Select(x => OurAdapterTesting.Activation(activation, x)).ToArray();
        return ReferenceLlama.Add(h, ReferenceLlama.Add(ReferenceLlama.MatVec(Up, a), UpBias));
    }

    public IEnumerable<OurAdapterTesting.FileTensor> Tensors(string prefix) =>
    [
        OurAdapterTesting.FileTensor.Of(prefix + "down.weight", Down), OurAdapterTesting.FileTensor.Of(prefix + "down.bias", DownBias),
        OurAdapterTesting.FileTensor.Of(prefix + "up.weight", Up), OurAdapterTesting.FileTensor.Of(prefix + "up.bias", UpBias),
    ];

    /// <summary>The element-wise mean of several modules' weights (AdaMix's merge), in float64.</summary>
    public static BottleneckWeights Mean(IReadOnlyList<BottleneckWeights> experts)
    {
        double[] MeanV(Func<BottleneckWeights, double[]> pick) =>
            Enumerable.Range(0, pick(experts[0]).Length).Select(i => experts.Sum(e => pick(e)[i]) / experts.Count).ToArray();
        double[][] MeanM(Func<BottleneckWeights, double[][]> pick) =>
            Enumerable.Range(0, pick(experts[0]).Length).Select(r => MeanV(e => pick(e)[r])).ToArray();
        return new(MeanM(e => e.Down), MeanV(e => e.DownBias), MeanM(e => e.Up), MeanV(e => e.UpBias));
    }

    /// <summary>The same weights rounded to float32 (what a file holds).</summary>
    public BottleneckWeights ToFloat32() => new(
        Down.Select(R).ToArray(), R(DownBias), Up.Select(R).ToArray(), R(UpBias));

    private static double[] R(double[] v) => v.Select(x => (double)(float)x).ToArray();
}

/// <summary>A bottleneck adapter as the test builds it: config values and per (layer, placement) weights
/// (placement 0 = attention, 1 = mlp).</summary>
internal sealed class BottleneckSpec
{
    public required int ReductionFactor { get; init; }
    public required string Placement { get; init; }
    public required string NonLinearity { get; init; }
    public int[]? Layers { get; init; }
    public Dictionary<(int Layer, int Placement), BottleneckWeights> Modules { get; } = [];

    public static string PlacementPrefix(int layer, int placement) =>
        $"model.layers.{layer}.{(placement == 0 ? "attention" : "mlp")}_adapter.";

    /// <summary>Random modules for every configured layer and placement.</summary>
    public static BottleneckSpec Random(int seed, int reductionFactor, string placement, string nonLinearity, int[]? layers = null)
    {
        var rng = new Random(seed);
        var m = ReferenceLlama.Tiny;
        var spec = new BottleneckSpec { ReductionFactor = reductionFactor, Placement = placement, NonLinearity = nonLinearity, Layers = layers };
        foreach (int layer in layers ?? Enumerable.Range(0, m.Layers).ToArray())
            foreach (int p in spec.PlacementIndices)
                spec.Modules[(layer, p)] = BottleneckWeights.Random(rng, m.Hidden, m.Hidden / reductionFactor);
        return spec;
    }

    public int[] PlacementIndices => Placement switch { "attention" => [0], "mlp" => [1], _ => [0, 1] };

    public Dictionary<string, object> Config(string peftType = "BOTTLENECK")
    {
        var config = new Dictionary<string, object>
        {
            ["peft_type"] = peftType,
            ["reduction_factor"] = ReductionFactor,
            ["placement"] = Placement,
            ["non_linearity"] = NonLinearity,
        };
        if (Layers is not null) config["layers"] = Layers;
        return config;
    }

    public string Write(string root, string name) =>
        OurAdapterTesting.WriteAdapter(root, name, Config(), Modules.SelectMany(kv => kv.Value.Tensors(PlacementPrefix(kv.Key.Layer, kv.Key.Placement))));

    /// <summary>The formula inserted at the attention and MLP block outputs.</summary>
    public ReferenceHooks Hooks() => new()
    {
        AttentionBlockOutput = (layer, h) => Modules.TryGetValue((layer, 0), out var w) ? w.Apply(h, NonLinearity) : h,
        MlpBlockOutput = (layer, h) => Modules.TryGetValue((layer, 1), out var w) ? w.Apply(h, NonLinearity) : h,
    };
}
