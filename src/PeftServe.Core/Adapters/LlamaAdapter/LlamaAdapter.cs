using PeftServe.Core.Kernels;
using PeftServe.Core.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Adapters.LlamaAdapter;

/// <summary>LLaMA-Adapter (Zhang et al., 2023; PEFT's ADAPTION_PROMPT): in each of the top L layers,
/// the queries also attend, with a softmax of their own, to keys and values that the layer's frozen
/// k/v projections make from a learned adaption prompt; that output is scaled by a learned gate,
/// initialised at zero so training starts from the base model, and added to the attention output.</summary>
public sealed class LlamaAdapterMethod : AdapterMethod
{
    public override string Name => "llama-adapter";
    public override IReadOnlyList<string> PeftTypes { get; } = ["ADAPTION_PROMPT"];

    public override Adapter Load(AdapterFolder f, string name, ModelConfig model, AdapterLimits limits)
    {
        var where = $"{f.Path}/{AdapterFolder.ConfigFile}";
        int len = f.Int("adapter_len"), layers = f.Int("adapter_layers");
        if (len < 1 || len > limits.MaxVirtualTokens) throw new AdapterException($"{where}: adapter_len {len} is outside 1..{limits.MaxVirtualTokens}");
        if (layers < 1 || layers > model.NumLayers) throw new AdapterException($"{where}: adapter_layers {layers} is outside 1..{model.NumLayers}");
        if (f.String("target_modules") is { } target && target != "self_attn") throw new AdapterException($"{where}: target_modules '{target}' is not supported (self_attn)");
        var prompts = new Dictionary<int, (Tensor Prompt, float Gate)>();
        int first = model.NumLayers - layers;
        // Everything read is disposed if validation fails; what is kept is detached at the end.
        using var scope = torch.NewDisposeScope();
        foreach (var tensor in f.TensorNames)
        {
            if (!TryParse(tensor, out var layer)) throw new AdapterException($"{f.Path}: unexpected tensor '{tensor}' in an adaption-prompt adapter");
            if (layer < first || layer >= model.NumLayers)
                throw new AdapterException($"{f.Path}: tensor '{tensor}' is in layer {layer}, but adapter_layers {layers} means layers {first}..{model.NumLayers - 1}");
        }
        for (int layer = first; layer < model.NumLayers; layer++)
        {
            string p = $"model.layers.{layer}.self_attn.";
            var prompt = f.Float(p + "adaption_prompt", 1, len, model.HiddenSize);
            var gate = f.Float(p + "adaption_gate", 1);
            if (!AdapterFolder.AllFinite(prompt) || !AdapterFolder.AllFinite(gate))
                throw new AdapterException($"{f.Path}: layer {layer}'s adaption prompt or gate holds NaN or infinite values");
            prompts[layer] = (prompt.view(len, model.HiddenSize), AdapterFolder.Scalar(gate));
        }
        foreach (var (prompt, _) in prompts.Values) prompt.DetachFromDisposeScope();
        return new LlamaAdapterAdapter(this, prompts, len) { Name = name, SourcePath = f.Path };
    }

    /// <summary>"model.layers.{i}.self_attn.adaption_prompt" or "...adaption_gate".</summary>
    private static bool TryParse(string tensor, out int layer)
    {
        var parts = tensor.Split('.');
        layer = -1;
        return parts.Length == 5 && parts[0] == "model" && parts[1] == "layers" && parts[2].Length is > 0 and <= 9 && parts[2].All(char.IsAsciiDigit)
            && int.TryParse(parts[2], System.Globalization.CultureInfo.InvariantCulture, out layer) && parts[3] == "self_attn"
            && parts[4] is "adaption_prompt" or "adaption_gate";
    }

    public override AdapterSlotPool CreatePool(LlamaModel model, AdapterLimits limits) => new LlamaAdapterSlotPool(this, model, limits);

    public override long PoolBytes(ModelConfig c, AdapterLimits limits, ScalarType dtype) =>
        (limits.SlotsPerMethod + 1L) * ((2L * c.NumLayers * limits.MaxVirtualTokens * c.NumKvHeads * c.HeadDim) + c.NumLayers + limits.MaxVirtualTokens) * ElementBytes(dtype);
}

public sealed class LlamaAdapterAdapter(AdapterMethod method, Dictionary<int, (Tensor Prompt, float Gate)> layers, int length) : Adapter
{
    public override AdapterMethod Method => method;
    /// <summary>Layer -> (adaption prompt [len, hidden] float32, gate).</summary>
    public IReadOnlyDictionary<int, (Tensor Prompt, float Gate)> Layers => layers;
    public int Length => length;
    public override long ByteSize => Bytes(layers.Values.Select(v => v.Prompt));
    public override void Dispose() { foreach (var v in layers.Values) v.Prompt.Dispose(); }
}

/// <summary>Per layer: the prompts' keys and values as the frozen projections make them (computed once
/// when an adapter is stored, not per step), [slots, maxLen, kvHeads, headDim]; the gate per slot (0
/// where the adapter has no prompt in that layer); and an additive mask hiding each slot's unused
/// prompt columns.</summary>
internal sealed class LlamaAdapterSlotPool : AdapterSlotPool
{
    private readonly LlamaModel _model;
    private readonly int _maxLen;
    private readonly Tensor[] _keys, _values, _gates;
    private readonly Tensor _mask;            // [slots, maxLen]
    private readonly Tensor _lengths;         // int [slots]: each slot's prompt length (the kernel reads no further)
    private readonly bool[,] _uses;           // [slot, layer]

    public override AdapterMethod Method { get; }
    public override int Capacity { get; }

    public LlamaAdapterSlotPool(AdapterMethod method, LlamaModel model, AdapterLimits limits)
    {
        Method = method;
        Capacity = limits.SlotsPerMethod;
        _model = model;
        _maxLen = limits.MaxVirtualTokens;
        var c = model.Config;
        // One slot past the capacity is neutral: zero keys, values and gate, and an open mask (so its softmax
        // is finite), which adds exactly zero; rows without an adapter read it.
        int slots = Capacity + 1;
        _keys = Enumerable.Range(0, c.NumLayers).Select(_ => torch.zeros([slots, _maxLen, c.NumKvHeads, c.HeadDim], model.DType, model.Device)).ToArray();
        _values = Enumerable.Range(0, c.NumLayers).Select(_ => torch.zeros([slots, _maxLen, c.NumKvHeads, c.HeadDim], model.DType, model.Device)).ToArray();
        _gates = Enumerable.Range(0, c.NumLayers).Select(_ => torch.zeros([slots], model.DType, model.Device)).ToArray();
        _mask = torch.zeros([slots, _maxLen], model.DType, model.Device);
        _lengths = torch.ones([slots], ScalarType.Int32, model.Device);
        _uses = new bool[slots, c.NumLayers];
    }

    public override void Store(int slot, Adapter adapter)
    {
        var a = (LlamaAdapterAdapter)adapter;
        using var _ = torch.no_grad();
        _mask[slot].fill_(Attention.MinValue(_model.DType));
        _mask[slot, ..a.Length].fill_(0);
        _lengths[slot].fill_(a.Length);
        for (int l = 0; l < _keys.Length; l++)
        {
            _keys[l][slot].zero_();
            _values[l][slot].zero_();
            _gates[l][slot].fill_(0);
            _uses[slot, l] = a.Layers.TryGetValue(l, out var entry);
            if (!_uses[slot, l]) continue;
            var (k, v) = _model.ProjectKeysValues(l, entry.Prompt);
            _keys[l][slot, ..a.Length] = k;
            _values[l][slot, ..a.Length] = v;
            _gates[l][slot].fill_(entry.Gate);
            k.Dispose();
            v.Dispose();
        }
    }

    public override AdapterBatchOp CreateBatchOp(MethodRows rows) => new Op(rows, this);

    /// <summary>The layers where some slot's adapter has an adaption prompt, as a bit string.</summary>
    public override string Signature => new(Enumerable.Range(0, _keys.Length).Select(l => Enumerable.Range(0, Capacity).Any(s => _uses[s, l]) ? '1' : '0').ToArray());

    public override void Dispose()
    {
        foreach (var t in _keys.Concat(_values).Concat(_gates)) t.Dispose();
        _mask.Dispose();
        _lengths.Dispose();
    }

    /// <summary>Gated attention of every row's queries over its adapter's adaption prompt at this layer;
    /// rows without an adapter read the neutral slot (gate 0), so the op serves any batch.</summary>
    private sealed class Op(MethodRows rows, LlamaAdapterSlotPool pool) : AdapterBatchOp(rows)
    {
        private Tensor? _index;

        public override Tensor? ExtraAttention(int layer, Tensor queries)
        {
            if (!Rows.PossibleSlots.Any(s => pool._uses[s, layer])) return null;
            var c = pool._model.Config;
            long b = queries.shape[0], t = queries.shape[2];
            int nq = c.NumHeads, nkv = c.NumKvHeads, hd = c.HeadDim;
            _index ??= Rows.PoolIndex(pool.Capacity).DetachFromDisposeScope();
            // CUDA: one kernel reads the pools in place.
            if (AdaptionPromptAttention.TryCompute(queries, pool._keys[layer], pool._values[layer], pool._mask, pool._gates[layer], pool._lengths, _index) is { } fused)
                return fused;
            var q = queries.reshape(b, nkv, (nq / nkv) * t, hd);                                 // query heads grouped by their KV head
            var keys = pool._keys[layer].index_select(0, _index).permute(0, 2, 1, 3);            // [B,nkv,len,hd]
            var values = pool._values[layer].index_select(0, _index).permute(0, 2, 1, 3);
            var scores = torch.matmul(q, keys.transpose(2, 3)) / Math.Sqrt(hd)
                         + pool._mask.index_select(0, _index).view(b, 1, 1, -1);
            var weights = torch.softmax(scores.to(ScalarType.Float32), -1).to(q.dtype)
                          * pool._gates[layer].index_select(0, _index).view(b, 1, 1, 1);
            return torch.matmul(weights, values).view(b, nq, t, hd).transpose(1, 2).reshape(b, t, nq * hd);
        }

        public override void Dispose()
        {
            _index?.Dispose();
            base.Dispose();
        }
    }
}
