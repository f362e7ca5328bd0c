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
        // PEFT writes the key/value width per layer: the KV heads times the head size (for a model
        // without grouped-query attention that is the hidden size, with all attention heads).
        int kvWidth = model.NumKvHeads * model.HeadDim;
        if (f.Int("token_dim", kvWidth) != kvWidth)
            throw new AdapterException($"{where}: token_dim {f.Int("token_dim")} does not match the base model's key/value width {kvWidth} ({model.NumKvHeads} KV heads of {model.HeadDim})");
        if (f.Int("num_attention_heads", model.NumKvHeads) != model.NumKvHeads)
            throw new AdapterException($"{where}: num_attention_heads {f.Int("num_attention_heads")} does not match the base model's {model.NumKvHeads} key/value heads");
        long width = 2L * model.NumLayers * kvWidth;

        using var scope = torch.NewDisposeScope();
        Tensor prefixes;
        if (f.Contains("prompt_embeddings"))
        {
            Only(f, "prompt_embeddings");
            prefixes = f.Float("prompt_embeddings", n, width);
        }
        else
        {
            if (!f.Bool("prefix_projection"))
                throw new AdapterException($"{where}: prefix_projection is false, so the weights must hold prompt_embeddings [{n},{width}], and they do not");
            prefixes = FoldReparameterization(f, n, width);
        }
        if (!AdapterFolder.AllFinite(prefixes)) throw new AdapterException($"{f.Path}: the prefixes hold NaN or infinite values");
        // [n, L*2*kv*hd] -> [L, 2, n, kv, hd]: per layer, keys then values.
        var perLayer = prefixes.view(n, model.NumLayers, 2, model.NumKvHeads, model.HeadDim).permute(1, 2, 0, 3, 4).contiguous();
        return new PrefixAdapter(this, perLayer.DetachFromDisposeScope()) { Name = name, SourcePath = f.Path };
    }

    /// <summary>The prompt encoder's tensor names, after the PEFT wrapper: embedding, then Linear -> tanh -> Linear.</summary>
    private static readonly string[] EncoderParts = ["embedding.weight", "transform.0.weight", "transform.0.bias", "transform.2.weight", "transform.2.bias"];

    /// <summary>prefixes = W2 tanh(W1 E + b1) + b2, from the prompt encoder's own tensors. Every shape is
    /// checked against the config before anything is computed.</summary>
    private static Tensor FoldReparameterization(AdapterFolder f, int n, long width)
    {
        string Find(string suffix)
        {
            var matches = f.TensorNames.Where(t => t == suffix || t.EndsWith("." + suffix, StringComparison.Ordinal)).ToList();
            return matches.Count switch
            {
                1 => matches[0],
                0 => throw new AdapterException($"{f.Path}: neither prompt_embeddings nor the prompt encoder's '{suffix}' found"),
                _ => throw new AdapterException($"{f.Path}: the prompt encoder's '{suffix}' is stored {matches.Count} times ({string.Join(", ", matches.Take(3))})"),
            };
        }
        var names = EncoderParts.Select(Find).ToArray();
        foreach (var t in f.TensorNames)
            if (!names.Contains(t)) throw new AdapterException($"{f.Path}: unexpected tensor '{t}' beside the prompt encoder");
        var shapes = names.Select(x => f.Info(x).Shape).ToArray();
        var where = $"{f.Path}/{AdapterFolder.ConfigFile}";
        long hidden = shapes[1] is [var h, _] ? h : -1;
        long embedding = shapes[0] is [_, var d] ? d : -1;
        int encoderHidden = f.Int("encoder_hidden_size", (int)Math.Clamp(hidden, 0, int.MaxValue));
        bool ok = shapes[0] is [var rows, _] && rows >= n && embedding > 0
            && hidden == encoderHidden && hidden > 0 && shapes[1] is [_, var in1] && in1 == embedding
            && shapes[2] is [var nb1] && nb1 == hidden
            && shapes[3] is [var out2, var in2] && out2 == width && in2 == hidden
            && shapes[4] is [var nb2] && nb2 == width;
        if (!ok)
            throw new AdapterException($"{where}: the prompt encoder's shapes (embedding [{Dims(shapes[0])}], transform.0 [{Dims(shapes[1])}] + [{Dims(shapes[2])}], " +
                $"transform.2 [{Dims(shapes[3])}] + [{Dims(shapes[4])}]) do not make [{n},{width}] prefixes for this base model" +
                $" with encoder_hidden_size {encoderHidden} (needed: embedding [>={n},d], transform.0 [{encoderHidden},d] + [{encoderHidden}], transform.2 [{width},{encoderHidden}] + [{width}])");
        using var scope = torch.NewDisposeScope();
        var e = f.Float(names[0]);
        var w1 = f.Float(names[1]);
        var b1 = f.Float(names[2]);
        var w2 = f.Float(names[3]);
        var b2 = f.Float(names[4]);
        var hiddenStates = torch.tanh(nn.functional.linear(e[..n], w1, b1));
        return nn.functional.linear(hiddenStates, w2, b2).MoveToOuterDisposeScope();
    }

    private static string Dims(long[] shape) => string.Join(",", shape);

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
