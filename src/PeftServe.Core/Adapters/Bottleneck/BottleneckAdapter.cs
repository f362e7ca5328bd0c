using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using PeftServe.Core.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Adapters.Bottleneck;

/// <summary>Where a bottleneck adapter acts: on the attention block's output (the o_proj result) or
/// on the MLP block's output (the down_proj result), before the residual add.</summary>
public enum BottleneckPlacement { Attention = 0, Mlp = 1 }

/// <summary>The bottleneck's non-linearity. Each maps 0 to 0, which is what lets adapters of
/// different bottleneck dimensions share a batch padded with zero units.</summary>
public enum BottleneckActivation { Relu, Gelu, Silu, Tanh }

/// <summary>One bottleneck adapter module in host memory (float32): h -> h + W_up act(W_down h + b_down) + b_up.</summary>
public sealed class BottleneckModule(Tensor down, Tensor downBias, Tensor up, Tensor upBias) : IDisposable
{
    /// <summary>[r, hidden]</summary>
    public Tensor Down => down;
    /// <summary>[r]</summary>
    public Tensor DownBias => downBias;
    /// <summary>[hidden, r]</summary>
    public Tensor Up => up;
    /// <summary>[hidden]</summary>
    public Tensor UpBias => upBias;
    internal IEnumerable<Tensor> Tensors => [down, downBias, up, upBias];

    public void Dispose()
    {
        down.Dispose();
        downBias.Dispose();
        up.Dispose();
        upBias.Dispose();
    }
}

/// <summary>A bottleneck adapter (Houlsby et al., 2019) in host memory: per layer and placement, one
/// module or none. AdaMix adapters arrive here too, as the average of their experts.</summary>
public sealed class BottleneckAdapter : Adapter
{
    public override AdapterMethod Method { get; }
    public BottleneckActivation Activation { get; }
    /// <summary>The bottleneck dimension r = hidden / reduction_factor.</summary>
    public int Dim { get; }
    /// <summary>[layer, placement] -> module, or null where the adapter does not act.</summary>
    public BottleneckModule?[,] Modules { get; }
    public override long ByteSize { get; }

    internal BottleneckAdapter(AdapterMethod method, BottleneckActivation activation, int dim, BottleneckModule?[,] modules)
    {
        Method = method;
        Activation = activation;
        Dim = dim;
        Modules = modules;
        ByteSize = Bytes(modules.Cast<BottleneckModule?>().Where(m => m is not null).SelectMany(m => m!.Tensors));
    }

    public override void Dispose()
    {
        foreach (var m in Modules) m?.Dispose();
    }
}

/// <summary>The configuration keys bottleneck and AdaMix adapters share (see docs/adapter-format.md).</summary>
internal sealed record BottleneckConfig(int Dim, bool[] Placements, BottleneckActivation Activation, bool[] Layers)
{
    public static BottleneckConfig Read(AdapterFolder f, ModelConfig c, AdapterLimits limits)
    {
        var where = $"{f.Path}/{AdapterFolder.ConfigFile}";
        int factor = f.Int("reduction_factor");
        if (factor < 1) throw new AdapterException($"{where}: 'reduction_factor' must be a positive integer, got {factor}");
        if (c.HiddenSize % factor != 0)
            throw new AdapterException($"{where}: 'reduction_factor' {factor} does not divide the base model's hidden size {c.HiddenSize}");
        int dim = c.HiddenSize / factor;
        if (dim > limits.MaxBottleneckDim)
            throw new AdapterException($"{where}: 'reduction_factor' {factor} gives bottleneck dimension {dim}, above the configured maximum of {limits.MaxBottleneckDim}");

        var placement = f.String("placement") ?? "both";
        bool[] placements = placement switch
        {
            "attention" => [true, false],
            "mlp" => [false, true],
            "both" => [true, true],
            _ => throw new AdapterException($"{where}: 'placement' must be \"attention\", \"mlp\" or \"both\", got \"{placement}\""),
        };

        var nonLinearity = f.String("non_linearity") ?? "relu";
        var activation = nonLinearity switch
        {
            "relu" => BottleneckActivation.Relu,
            "gelu" => BottleneckActivation.Gelu,
            "silu" => BottleneckActivation.Silu,
            "tanh" => BottleneckActivation.Tanh,
            _ => throw new AdapterException($"{where}: 'non_linearity' must be \"relu\", \"gelu\", \"silu\" or \"tanh\", got \"{nonLinearity}\""),
        };

        var layers = new bool[c.NumLayers];
        switch (f.Config["layers"])
        {
            case null:
                Array.Fill(layers, true);
                break;
            case JsonArray list:
                if (list.Count == 0) throw new AdapterException($"{where}: 'layers' is empty (leave it out to adapt every layer)");
                foreach (var item in list)
                {
                    if (item is not JsonValue v || !v.TryGetValue<int>(out var layer))
                        throw new AdapterException($"{where}: 'layers' must be a list of integer layer indices");
                    if (layer < 0 || layer >= c.NumLayers)
                        throw new AdapterException($"{where}: 'layers' names layer {layer}, the base model has layers 0..{c.NumLayers - 1}");
                    if (layers[layer]) throw new AdapterException($"{where}: 'layers' names layer {layer} twice");
                    layers[layer] = true;
                }
                break;
            default:
                throw new AdapterException($"{where}: 'layers' must be a list of integer layer indices");
        }
        return new BottleneckConfig(dim, placements, activation, layers);
    }
}

/// <summary>Reads the module tensors of a bottleneck adapter (<c>experts</c> = 0) or of an AdaMix
/// adapter (<c>experts</c> = E: every module has E experts, which are averaged here). <paramref name="method"/>
/// (the method that reads the files) names the adapter kind in errors; either way the result is a bottleneck
/// adapter, served from the bottleneck method's slots.</summary>
internal static partial class BottleneckReader
{
    public static string PlacementName(BottleneckPlacement p) => p == BottleneckPlacement.Attention ? "attention_adapter" : "mlp_adapter";

    public static BottleneckAdapter Read(AdapterMethod method, AdapterFolder f, string name, ModelConfig c, BottleneckConfig cfg, int experts)
    {
        string expected = experts == 0
            ? "model.layers.{i}.{attention,mlp}_adapter.{down,up}.{weight,bias}"
            : "model.layers.{i}.{attention,mlp}_adapter.experts.{e}.{down,up}.{weight,bias}";
        foreach (var tensor in f.TensorNames.Order(StringComparer.Ordinal))
        {
            var m = ModuleTensor().Match(tensor);
            if (!m.Success) throw new AdapterException($"{f.Path}: tensor '{tensor}' is not a weight of a {method.Name} adapter (expected {expected})");
            int layer = int.Parse(m.Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture);   // 1-9 ASCII digits
            var placement = m.Groups[2].Value == "attention" ? BottleneckPlacement.Attention : BottleneckPlacement.Mlp;
            var rest = m.Groups[3].Value;
            if (layer >= c.NumLayers) throw new AdapterException($"{f.Path}: tensor '{tensor}' names layer {layer}, the base model has {c.NumLayers} layers");
            if (!cfg.Layers[layer]) throw new AdapterException($"{f.Path}: tensor '{tensor}' is for layer {layer}, which the config's 'layers' does not list");
            if (!cfg.Placements[(int)placement])
                throw new AdapterException($"{f.Path}: tensor '{tensor}' is an {PlacementName(placement)} weight, but the config's 'placement' leaves that block out");
            if (experts == 0)
            {
                if (!PlainPart().IsMatch(rest)) throw new AdapterException($"{f.Path}: tensor '{tensor}' is not a weight of a {method.Name} adapter (expected {expected})");
            }
            else
            {
                var e = ExpertPart().Match(rest);
                if (!e.Success) throw new AdapterException($"{f.Path}: tensor '{tensor}' is not a weight of a {method.Name} adapter (expected {expected})");
                if (int.Parse(e.Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture) >= experts)
                    throw new AdapterException($"{f.Path}: tensor '{tensor}' names expert {e.Groups[1].Value}, but 'num_experts' is {experts}");
            }
        }

        int r = cfg.Dim;
        long hidden = c.HiddenSize;
        var modules = new BottleneckModule?[c.NumLayers, 2];
        // Everything read is disposed if any tensor fails validation; what is kept is detached from every scope at the end.
        using (var scope = torch.NewDisposeScope())
        {
            for (int layer = 0; layer < c.NumLayers; layer++)
            {
                if (!cfg.Layers[layer]) continue;
                foreach (var placement in Enum.GetValues<BottleneckPlacement>())
                {
                    if (!cfg.Placements[(int)placement]) continue;
                    var prefix = $"model.layers.{layer}.{PlacementName(placement)}.";
                    modules[layer, (int)placement] = experts == 0
                        ? new BottleneckModule(
                            Load(f, prefix + "down.weight", r, hidden), Load(f, prefix + "down.bias", r),
                            Load(f, prefix + "up.weight", hidden, r), Load(f, prefix + "up.bias", hidden))
                        : new BottleneckModule(
                            Average(f, prefix, "down.weight", experts, r, hidden), Average(f, prefix, "down.bias", experts, r),
                            Average(f, prefix, "up.weight", experts, hidden, r), Average(f, prefix, "up.bias", experts, hidden));
                }
            }
            foreach (var m in modules)
                if (m is not null) foreach (var t in m.Tensors) t.DetachFromDisposeScope();
        }
        // Served from the bottleneck method's slots whichever method read it (an AdaMix adapter is its averaged bottleneck).
        return new BottleneckAdapter(BottleneckMethod.Instance, cfg.Activation, r, modules) { Name = name, SourcePath = f.Path };
    }

    /// <summary>The tensor (which must exist, have this shape and hold only finite values) as float32,
    /// in the caller's dispose scope.</summary>
    private static Tensor Load(AdapterFolder f, string tensor, params long[] shape)
    {
        if (f.Contains(tensor) && !f.Info(tensor).Shape.SequenceEqual(shape))
            throw new AdapterException($"{f.Path}: tensor '{tensor}' has shape [{string.Join(",", f.Info(tensor).Shape)}]; " +
                $"with bottleneck dimension r = hidden / reduction_factor it must be [{string.Join(",", shape)}]");
        var t = f.Float(tensor, shape);
        if (!AdapterFolder.AllFinite(t)) throw new AdapterException($"{f.Path}: tensor '{tensor}' holds NaN or infinite values");
        return t;
    }

    /// <summary>The mean over experts of <c>{prefix}experts.{e}.{part}</c>, summed in float64.</summary>
    private static Tensor Average(AdapterFolder f, string prefix, string part, int experts, params long[] shape)
    {
        using var scope = torch.NewDisposeScope();
        var sum = torch.zeros(shape, ScalarType.Float64, f.TensorDevice);
        for (int e = 0; e < experts; e++) sum.add_(Load(f, $"{prefix}experts.{e}.{part}", shape).to(ScalarType.Float64));
        return sum.div_(experts).to(ScalarType.Float32).MoveToOuterDisposeScope();
    }

    [GeneratedRegex(@"^model\.layers\.([0-9]{1,9})\.(attention|mlp)_adapter\.(.+)$")]
    private static partial Regex ModuleTensor();

    [GeneratedRegex(@"^(down|up)\.(weight|bias)$")]
    private static partial Regex PlainPart();

    [GeneratedRegex(@"^experts\.([0-9]{1,9})\.(down|up)\.(weight|bias)$")]
    private static partial Regex ExpertPart();
}

/// <summary>Bottleneck adapters (Houlsby et al., 2019): h -> h + W_up act(W_down h + b_down) + b_up on
/// the attention block's output and/or the MLP block's output, before the residual add.</summary>
public sealed class BottleneckMethod : AdapterMethod
{
    /// <summary>The registry's instance: it also serves AdaMix adapters (see AdaMixMethod).</summary>
    public static BottleneckMethod Instance { get; } = new();

    private BottleneckMethod() { }

    public override string Name => "bottleneck";
    public override IReadOnlyList<string> PeftTypes { get; } = ["BOTTLENECK"];

    public override Adapter Load(AdapterFolder folder, string name, ModelConfig model, AdapterLimits limits) =>
        BottleneckReader.Read(this, folder, name, model, BottleneckConfig.Read(folder, model, limits), experts: 0);

    public override AdapterSlotPool CreatePool(LlamaModel model, AdapterLimits limits) => new BottleneckSlotPool(this, model, limits);

    public override long PoolBytes(ModelConfig c, AdapterLimits limits, ScalarType dtype) => BottleneckSlotPool.Bytes(c, limits, dtype);
}
