using PeftServe.Core.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Adapters.Prefix;

/// <summary>Prefix tuning (Li and Liang, 2021): every layer attends to n learned key/value pairs put
/// before the sequence. PEFT saves them as <c>prompt_embeddings</c> [n, layers*2*kvHeads*headDim]
/// (per layer: keys, then values). A checkpoint that still holds the reparameterization MLP
/// (embedding -> Linear -> tanh -> Linear) is folded to plain prefixes here, once.</summary>
public sealed class PrefixTuningMethod : AdapterMethod
{
    public override string Name => "prefix";
    public override IReadOnlyList<string> PeftTypes { get; } = ["PREFIX_TUNING"];

    public override Adapter Load(AdapterFolder f, string name, ModelConfig model, AdapterLimits limits)
    {
        var where = $"{f.Path}/{AdapterFolder.ConfigFile}";
        if (f.Int("num_transformer_submodules", 1) != 1) throw new AdapterException($"{where}: num_transformer_submodules must be 1 for a decoder-only model");
        int n = f.Int("num_virtual_tokens");
        if (n < 1 || n > limits.MaxVirtualTokens) throw new AdapterException($"{where}: num_virtual_tokens {n} is outside 1..{limits.MaxVirtualTokens}");
        if (f.Int("num_layers", model.NumLayers) != model.NumLayers)
            throw new AdapterException($"{where}: num_layers {f.Int("num_layers")} does not match the base model's {model.NumLayers} layers");
        long width = 2L * model.NumLayers * model.NumKvHeads * model.HeadDim;

        Tensor prefixes;
        if (f.Contains("prompt_embeddings"))
        {
            Only(f, "prompt_embeddings");
            prefixes = f.Float("prompt_embeddings", n, width);
        }
        else prefixes = FoldReparameterization(f, n, width);
        if (!torch.isfinite(prefixes).all().item<bool>()) throw new AdapterException($"{f.Path}: the prefixes hold NaN or infinite values");
        // [n, L*2*kv*hd] -> [L, 2, n, kv, hd]: per layer, keys then values.
        var perLayer = prefixes.view(n, model.NumLayers, 2, model.NumKvHeads, model.HeadDim).permute(1, 2, 0, 3, 4).contiguous();
        prefixes.Dispose();
        return new PrefixAdapter(this, perLayer) { Name = name, SourcePath = f.Path };
    }

    /// <summary>prefixes = W2 tanh(W1 E + b1) + b2, from the prompt encoder's own tensors.</summary>
    private static Tensor FoldReparameterization(AdapterFolder f, int n, long width)
    {
        string Find(string suffix) => f.TensorNames.SingleOrDefault(t => t.EndsWith(suffix, StringComparison.Ordinal))
            ?? throw new AdapterException($"{f.Path}: neither prompt_embeddings nor the prompt encoder's '{suffix}' found");
        using var scope = torch.NewDisposeScope();
        var e = f.Float(Find("embedding.weight"));
        var w1 = f.Float(Find("transform.0.weight"));
        var b1 = f.Float(Find("transform.0.bias"));
        var w2 = f.Float(Find("transform.2.weight"));
        var b2 = f.Float(Find("transform.2.bias"));
        if (e.dim() != 2 || e.shape[0] < n || w1.shape[1] != e.shape[1] || w2.shape[1] != w1.shape[0] || w2.shape[0] != width)
            throw new AdapterException($"{f.Path}: prompt encoder shapes (embedding [{string.Join(",", e.shape)}], transform.0 [{string.Join(",", w1.shape)}], " +
                $"transform.2 [{string.Join(",", w2.shape)}]) do not give [{n},{width}] prefixes for this base model");
        var hidden = torch.tanh(nn.functional.linear(e[..n], w1, b1));
        return nn.functional.linear(hidden, w2, b2).MoveToOuterDisposeScope();
    }

    private static void Only(AdapterFolder f, string name)
    {
        foreach (var t in f.TensorNames)
            if (t != name) throw new AdapterException($"{f.Path}: unexpected tensor '{t}' beside {name}");
    }

    public override AdapterSlotPool CreatePool(LlamaModel model, AdapterLimits limits) => new PrefixSlotPool(this, model, limits);

    public override long PoolBytes(ModelConfig c, AdapterLimits limits, ScalarType dtype) =>
        2L * c.NumLayers * limits.SlotsPerMethod * limits.MaxVirtualTokens * c.NumKvHeads * c.HeadDim * ElementBytes(dtype);
}

public sealed class PrefixAdapter(AdapterMethod method, Tensor keysValues) : Adapter
{
    public override AdapterMethod Method => method;
    /// <summary>[layers, 2 (keys, values), n, kvHeads, headDim] float32.</summary>
    public Tensor KeysValues => keysValues;
    public override int VirtualTokens => (int)keysValues.shape[2];
    public override long ByteSize => Bytes([keysValues]);
    public override void Dispose() => keysValues.Dispose();
}

/// <summary>Per layer, the prefix keys and values of every slot: [slots, maxTokens, kvHeads, headDim].
/// They are written into the KV cache once, in the virtual columns of a sequence's prefill; decode
/// steps read them from the cache like any other key.</summary>
internal sealed class PrefixSlotPool : AdapterSlotPool
{
    private readonly Tensor[] _keys, _values;
    private readonly int[] _tokens;
    private readonly int _maxTokens;

    public override AdapterMethod Method { get; }
    public override int Capacity { get; }

    public PrefixSlotPool(AdapterMethod method, LlamaModel model, AdapterLimits limits)
    {
        Method = method;
        Capacity = limits.SlotsPerMethod;
        _maxTokens = limits.MaxVirtualTokens;
        _tokens = new int[Capacity];
        var c = model.Config;
        _keys = Enumerable.Range(0, c.NumLayers).Select(_ => torch.zeros([Capacity, _maxTokens, c.NumKvHeads, c.HeadDim], model.DType, model.Device)).ToArray();
        _values = Enumerable.Range(0, c.NumLayers).Select(_ => torch.zeros([Capacity, _maxTokens, c.NumKvHeads, c.HeadDim], model.DType, model.Device)).ToArray();
    }

    public override void Store(int slot, Adapter adapter)
    {
        var p = (PrefixAdapter)adapter;
        int n = p.VirtualTokens;
        using var _ = torch.no_grad();
        for (int l = 0; l < _keys.Length; l++)
        {
            _keys[l][slot].zero_();
            _values[l][slot].zero_();
            _keys[l][slot, ..n] = p.KeysValues[l, 0];
            _values[l][slot, ..n] = p.KeysValues[l, 1];
        }
        _tokens[slot] = n;
    }

    /// <summary>Its virtual tokens enter in the prefill; decode steps only read the KV cache.</summary>
    public override bool ActsInDecode => false;

    public override AdapterBatchOp CreateBatchOp(MethodRows rows) => new PrefixBatchOp(rows, new VirtualTokenIndex(rows, _tokens, _maxTokens), this);

    public override void Dispose()
    {
        foreach (var t in _keys) t.Dispose();
        foreach (var t in _values) t.Dispose();
    }

    private sealed class PrefixBatchOp(MethodRows rows, VirtualTokenIndex index, PrefixSlotPool pool) : AdapterBatchOp(rows)
    {
        public override bool ChangesKeysValues => !index.IsEmpty;

        public override (Tensor Keys, Tensor Values) KeysValues(int layer, Tensor keys, Tensor values) =>
            index.IsEmpty ? (keys, values) : (index.Scatter(keys, pool._keys[layer]), index.Scatter(values, pool._values[layer]));

        public override void Dispose()
        {
            index.Dispose();
            base.Dispose();
        }
    }
}
