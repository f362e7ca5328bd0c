using System.Text.RegularExpressions;
using PeftServe.Core.Kernels;
using PeftServe.Core.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Adapters.BitFit;

/// <summary>The bias terms a BitFit adapter may carry in a decoder layer: one per linear layer, and one
/// after each of the layer's two RMSNorms (which the frozen Llama does not have).</summary>
public enum BitFitBias { Q, K, V, O, Gate, Up, Down, InputNorm, PostAttentionNorm }

/// <summary>A BitFit adapter in host memory: per layer and bias, a float32 vector or null.</summary>
public sealed class BitFitAdapter : Adapter
{
    public override AdapterMethod Method { get; }
    /// <summary>[layer, (int)BitFitBias] -> bias vector, or null where the adapter has none.</summary>
    public Tensor?[,] Biases { get; }
    public override long ByteSize { get; }

    internal BitFitAdapter(AdapterMethod method, Tensor?[,] biases)
    {
        Method = method;
        Biases = biases;
        ByteSize = Bytes(biases.Cast<Tensor?>());
    }

    public static string TensorName(int layer, BitFitBias b) => b switch
    {
        BitFitBias.InputNorm => $"model.layers.{layer}.input_layernorm.bias",
        BitFitBias.PostAttentionNorm => $"model.layers.{layer}.post_attention_layernorm.bias",
        <= BitFitBias.O => $"model.layers.{layer}.self_attn.{b.ToString().ToLowerInvariant()}_proj.bias",
        _ => $"model.layers.{layer}.mlp.{b.ToString().ToLowerInvariant()}_proj.bias",
    };

    public static long Size(BitFitBias b, ModelConfig c) => b switch
    {
        BitFitBias.Q => (long)c.NumHeads * c.HeadDim,
        BitFitBias.K or BitFitBias.V => (long)c.NumKvHeads * c.HeadDim,
        BitFitBias.Gate or BitFitBias.Up => c.IntermediateSize,
        _ => c.HiddenSize, // o, down, and both norms
    };

    public override void Dispose()
    {
        foreach (var t in Biases) t?.Dispose();
    }
}

/// <summary>BitFit (Ben Zaken et al., 2022): only bias terms are trained. The adapter's biases are
/// added to the outputs of the base model's linear layers (for a bias-free Llama they simply are the
/// biases; for a base model that has biases of its own they are the change to them). A bias after an
/// RMSNorm only feeds the next projection, so it is folded exactly into a bias on that projection's
/// output when the adapter is stored on the device: norm(h) + b through W gives W norm(h) + W b.</summary>
public sealed partial class BitFitMethod : AdapterMethod
{
    public override string Name => "bitfit";
    public override IReadOnlyList<string> PeftTypes { get; } = ["BITFIT"];

    private static readonly Dictionary<string, BitFitBias> Modules = new()
    {
        ["self_attn.q_proj"] = BitFitBias.Q, ["self_attn.k_proj"] = BitFitBias.K, ["self_attn.v_proj"] = BitFitBias.V,
        ["self_attn.o_proj"] = BitFitBias.O, ["mlp.gate_proj"] = BitFitBias.Gate, ["mlp.up_proj"] = BitFitBias.Up,
        ["mlp.down_proj"] = BitFitBias.Down, ["input_layernorm"] = BitFitBias.InputNorm,
        ["post_attention_layernorm"] = BitFitBias.PostAttentionNorm,
    };

    public override Adapter Load(AdapterFolder f, string name, ModelConfig model, AdapterLimits limits)
    {
        var biases = new Tensor?[model.NumLayers, Enum.GetValues<BitFitBias>().Length];
        using (var scope = torch.NewDisposeScope())
        {
            foreach (var tensor in f.TensorNames.Order(StringComparer.Ordinal))
            {
                if (tensor == "model.norm.bias")
                    throw new AdapterException($"{f.Path}: tensor 'model.norm.bias' is a bias after the final norm; it would feed the LM head " +
                        "(adding lm_head.weight·b to every logit), where no adapter acts, so it cannot be served. BitFit biases must sit inside " +
                        "the decoder layers (projection biases, or input_layernorm / post_attention_layernorm biases)");
                var m = BiasTensor().Match(tensor);
                if (!m.Success || !Modules.TryGetValue(m.Groups[2].Value, out var which))
                    throw new AdapterException($"{f.Path}: tensor '{tensor}' is not a BitFit bias (expected model.layers.{{i}}.self_attn.{{q,k,v,o}}_proj.bias, " +
                        "model.layers.{i}.mlp.{gate,up,down}_proj.bias, or model.layers.{i}.{input,post_attention}_layernorm.bias)");
                int layer = int.Parse(m.Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture);   // 1-9 ASCII digits
                if (layer >= model.NumLayers) throw new AdapterException($"{f.Path}: tensor '{tensor}' names layer {layer}, the base model has {model.NumLayers} layers");
                var bias = f.Float(tensor, BitFitAdapter.Size(which, model));
                if (!AdapterFolder.AllFinite(bias)) throw new AdapterException($"{f.Path}: tensor '{tensor}' holds NaN or infinite values");
                biases[layer, (int)which] = bias;
            }
            if (biases.Cast<Tensor?>().All(b => b is null)) throw new AdapterException($"{f.Path}: no BitFit bias tensors found");
            foreach (var b in biases) b?.DetachFromDisposeScope();
        }
        return new BitFitAdapter(this, biases) { Name = name, SourcePath = f.Path };
    }

    public override AdapterSlotPool CreatePool(LlamaModel model, AdapterLimits limits) => new BitFitSlotPool(this, model, limits);

    public override long PoolBytes(ModelConfig c, AdapterLimits limits, ScalarType dtype) =>
        (long)c.NumLayers * (limits.SlotsPerMethod + 1) * ((long)(c.NumHeads + 2 * c.NumKvHeads) * c.HeadDim + 2L * c.HiddenSize + 2L * c.IntermediateSize) * ElementBytes(dtype);

    [GeneratedRegex(@"^model\.layers\.([0-9]{1,9})\.(self_attn\.\w+|mlp\.\w+|\w+_layernorm)\.bias$")]
    private static partial Regex BiasTensor();
}

/// <summary>Where the model's hooks add a BitFit bias: the four fused linear outputs of a layer.</summary>
internal enum BitFitSite { Qkv = 0, O = 1, GateUp = 2, Down = 3 }

/// <summary>Per layer, one bias table per fused linear output: q|k|v [S, (nq+2nkv)*hd], o [S, hidden],
/// gate|up [S, 2*inter] and down [S, hidden], with norm biases already folded in. A slot holds zeros
/// where its adapter has no bias.</summary>
public sealed class BitFitSlotPool : AdapterSlotPool
{
    private readonly LlamaModel _model;
    private readonly Tensor[,] _tables;   // [layer, site]
    private readonly bool[,,] _present;   // [slot, layer, site]

    public override AdapterMethod Method { get; }
    public override int Capacity { get; }

    public BitFitSlotPool(AdapterMethod method, LlamaModel model, AdapterLimits limits)
    {
        Method = method;
        Capacity = limits.SlotsPerMethod;
        _model = model;
        var c = model.Config;
        long[] widths = [(long)(c.NumHeads + 2 * c.NumKvHeads) * c.HeadDim, c.HiddenSize, 2L * c.IntermediateSize, c.HiddenSize];
        _tables = new Tensor[c.NumLayers, 4];
        _present = new bool[Capacity, c.NumLayers, 4];
        for (int l = 0; l < c.NumLayers; l++)
            for (int s = 0; s < 4; s++) _tables[l, s] = torch.zeros([Capacity + 1, widths[s]], model.DType, model.Device);   // + the neutral slot (zeros)
    }

    public override void Store(int slot, Adapter adapter)
    {
        var a = (BitFitAdapter)adapter;
        var c = _model.Config;
        using var _ = torch.no_grad();
        using var scope = torch.NewDisposeScope();
        for (int l = 0; l < c.NumLayers; l++)
        {
            Fill(slot, l, BitFitSite.Qkv, a, [BitFitBias.Q, BitFitBias.K, BitFitBias.V], BitFitBias.InputNorm, gateUp: false);
            Fill(slot, l, BitFitSite.O, a, [BitFitBias.O], null, false);
            Fill(slot, l, BitFitSite.GateUp, a, [BitFitBias.Gate, BitFitBias.Up], BitFitBias.PostAttentionNorm, gateUp: true);
            Fill(slot, l, BitFitSite.Down, a, [BitFitBias.Down], null, false);
        }
    }

    /// <summary>Writes the slot's bias for one fused output: the projections' own biases side by side,
    /// plus W b for a bias b after the norm that feeds this projection.</summary>
    private void Fill(int slot, int layer, BitFitSite site, BitFitAdapter a, BitFitBias[] parts, BitFitBias? norm, bool gateUp)
    {
        var row = _tables[layer, (int)site][slot];
        row.zero_();
        bool present = false;
        long offset = 0;
        foreach (var part in parts)
        {
            long size = BitFitAdapter.Size(part, _model.Config);
            if (a.Biases[layer, (int)part] is { } b)
            {
                row.narrow(0, offset, size).copy_(b);
                present = true;
            }
            offset += size;
        }
        if (norm is { } n && a.Biases[layer, (int)n] is { } normBias)
        {
            row.add_(_model.ProjectThroughLayer(layer, gateUp, normBias));
            present = true;
        }
        _present[slot, layer, (int)site] = present;
    }

    public override AdapterBatchOp CreateBatchOp(MethodRows rows) => new BitFitBatchOp(this, rows);

    internal Tensor Table(int layer, BitFitSite site) => _tables[layer, (int)site];
    internal bool AnyPresent(IEnumerable<int> slots, int layer, BitFitSite site) => slots.Any(s => _present[s, layer, (int)site]);

    /// <summary>The (layer, site) pairs where some slot's adapter has a bias, as a bit string.</summary>
    public override string Signature => new(Enumerable.Range(0, NumLayers * 4)
        .Select(i => AnyPresent(Enumerable.Range(0, Capacity), i / 4, (BitFitSite)(i % 4)) ? '1' : '0').ToArray());
    internal int NumLayers => _model.Config.NumLayers;

    public override void Dispose()
    {
        foreach (var t in _tables) t.Dispose();
    }
}

/// <summary>Adds each row's bias (gathered from its slot) to the fused linear outputs; sites no row's
/// adapter touches are skipped.</summary>
internal sealed class BitFitBatchOp : AdapterBatchOp
{
    private readonly BitFitSlotPool _pool;
    private readonly bool[,] _active;   // [layer, site]

    public BitFitBatchOp(BitFitSlotPool pool, MethodRows rows) : base(rows)
    {
        _pool = pool;
        _active = new bool[pool.NumLayers, 4];
        for (int l = 0; l < pool.NumLayers; l++)
            foreach (var s in Enum.GetValues<BitFitSite>()) _active[l, (int)s] = pool.AnyPresent(rows.PossibleSlots, l, s);
    }

    public override Tensor Qkv(int layer, Tensor x, Tensor qkv) => Apply(layer, BitFitSite.Qkv, qkv);
    public override Tensor AttentionOutput(int layer, Tensor x, Tensor output) => Apply(layer, BitFitSite.O, output);
    public override Tensor GateUp(int layer, Tensor x, Tensor gateUp) => Apply(layer, BitFitSite.GateUp, gateUp);
    public override Tensor MlpOutput(int layer, Tensor x, Tensor output) => Apply(layer, BitFitSite.Down, output);

    internal override OutputTerm? OfferOutputTerm(int layer, LinearSite site, Tensor x, Tensor output)
    {
        var at = (BitFitSite)(int)site;   // the four projection sites, in the same order
        if (!_active[layer, (int)at] || output.dim() != 3 || !output.is_contiguous() || !FusedOps.Runs(output)) return null;
        _index ??= Rows.PoolIndex(_pool.Capacity).DetachFromDisposeScope();
        return new OutputTerm.Bias(_pool.Table(layer, at), _index);
    }

    // Every row adds its adapter's bias; rows without a BitFit adapter read the neutral slot (zeros), so the
    // op reads only the per-row slot tensor and serves any batch.
    private Tensor Apply(int layer, BitFitSite site, Tensor output)
    {
        if (!_active[layer, (int)site]) return output;
        _index ??= Rows.PoolIndex(_pool.Capacity).DetachFromDisposeScope();
        var table = _pool.Table(layer, site);
        if (output.dim() == 3 && FusedOps.RowTableApply(output, _index, (int)output.shape[1], table, add: true)) return output;   // CUDA: in place
        return output + table.index_select(0, _index).unsqueeze(1);                            // [B,1,W] broadcast over T
    }

    private Tensor? _index;

    public override void Dispose()
    {
        _index?.Dispose();
        base.Dispose();
    }
}
