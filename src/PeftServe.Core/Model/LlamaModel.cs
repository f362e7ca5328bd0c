using PeftServe.Core.SafeTensors;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Model;

/// <summary>Where and how the model runs.</summary>
public sealed record ModelOptions
{
    public Device Device { get; init; } = torch.CPU;
    /// <summary>Compute dtype: float32 on CPU; bfloat16 or float16 on CUDA.</summary>
    public ScalarType DType { get; init; } = ScalarType.Float32;
}

/// <summary>A Llama-family decoder (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM): token
/// embedding, N pre-norm blocks of grouped-query attention with rotary positions and a SwiGLU MLP,
/// a final RMSNorm and the LM head. The weights are frozen and live on the device. q/k/v are fused into
/// one projection and gate/up into another, so a block runs four matrix products instead of seven.</summary>
public sealed class LlamaModel : IDisposable
{
    public ModelConfig Config { get; }
    public ModelOptions Options { get; }
    public Device Device => Options.Device;
    public ScalarType DType => Options.DType;

    private readonly Tensor _embedTokens;   // [V, hidden]
    private readonly DecoderLayer[] _layers;
    private readonly Tensor _finalNorm;     // [hidden]
    private readonly Tensor _lmHead;        // [V, hidden]; the embedding itself when tied
    private readonly RotaryEmbedding _rope;

    /// <summary>Supplies a weight by its Hugging Face name and expected shape, already on the device
    /// in the compute dtype, or null when the checkpoint has no such tensor.</summary>
    private delegate Tensor? WeightSource(string name, long[] shape);

    private LlamaModel(ModelConfig config, ModelOptions options, WeightSource source)
    {
        Config = config;
        Options = options;
        using var _ = torch.no_grad();
        long hidden = config.HiddenSize, q = (long)config.NumHeads * config.HeadDim, kv = (long)config.NumKvHeads * config.HeadDim;
        Tensor Required(string name, params long[] shape) =>
            source(name, shape) ?? throw new ModelLoadException($"checkpoint has no tensor '{name}'");

        _embedTokens = Required("model.embed_tokens.weight", config.VocabSize, hidden);
        _layers = new DecoderLayer[config.NumLayers];
        for (int i = 0; i < config.NumLayers; i++)
        {
            string p = $"model.layers.{i}.";
            Tensor? Bias(string name, long size, bool present) => present ? Required(p + name, size) : null;
            _layers[i] = new DecoderLayer
            {
                InputNorm = Required(p + "input_layernorm.weight", hidden),
                PostAttentionNorm = Required(p + "post_attention_layernorm.weight", hidden),
                Qkv = Fuse(
                    [Required(p + "self_attn.q_proj.weight", q, hidden), Required(p + "self_attn.k_proj.weight", kv, hidden), Required(p + "self_attn.v_proj.weight", kv, hidden)],
                    config.QkvBias ? [Bias("self_attn.q_proj.bias", q, true)!, Bias("self_attn.k_proj.bias", kv, true)!, Bias("self_attn.v_proj.bias", kv, true)!] : null),
                O = MakeLinear(Required(p + "self_attn.o_proj.weight", hidden, q), Bias("self_attn.o_proj.bias", hidden, config.OutputBias)),
                GateUp = Fuse(
                    [Required(p + "mlp.gate_proj.weight", config.IntermediateSize, hidden), Required(p + "mlp.up_proj.weight", config.IntermediateSize, hidden)],
                    config.MlpBias ? [Bias("mlp.gate_proj.bias", config.IntermediateSize, true)!, Bias("mlp.up_proj.bias", config.IntermediateSize, true)!] : null),
                Down = MakeLinear(Required(p + "mlp.down_proj.weight", hidden, config.IntermediateSize), Bias("mlp.down_proj.bias", hidden, config.MlpBias)),
            };
        }
        _finalNorm = Required("model.norm.weight", hidden);
        _lmHead = config.TieWordEmbeddings
            ? _embedTokens
            : source("lm_head.weight", [config.VocabSize, hidden]) ?? throw new ModelLoadException(
                "checkpoint has no tensor 'lm_head.weight' and config.json does not set tie_word_embeddings");
        _rope = new RotaryEmbedding(config.Rope, config.HeadDim, options.Device);
    }

    private IFrozenLinear Fuse(Tensor[] weights, Tensor[]? biases)
    {
        var w = torch.cat(weights, 0);
        var b = biases is null ? null : torch.cat(biases, 0);
        foreach (var t in weights) t.Dispose();
        if (biases is not null) foreach (var t in biases) t.Dispose();
        return MakeLinear(w, b);
    }

    /// <summary>The one place a decoder linear layer is made from its weight [out,in] (on the device,
    /// in the compute dtype) and optional bias.</summary>
    private IFrozenLinear MakeLinear(Tensor weight, Tensor? bias) => new DenseLinear(weight, bias);

    /// <summary>Loads a Hugging Face model folder (config.json + model.safetensors or sharded
    /// model.safetensors.index.json). Every tensor is checked against the shape config.json implies.</summary>
    public static LlamaModel Load(string modelDir, ModelOptions options)
    {
        var config = ModelConfig.Load(modelDir);
        using var checkpoint = SafeTensorsCheckpoint.Open(modelDir);
        return new LlamaModel(config, options, (name, shape) =>
        {
            if (!checkpoint.Contains(name)) return null;
            var info = checkpoint.Info(name);
            if (!info.Shape.SequenceEqual(shape))
                throw new ModelLoadException($"{modelDir}: tensor '{name}' has shape [{string.Join(",", info.Shape)}], config.json implies [{string.Join(",", shape)}]");
            return checkpoint.ToTensor(name, options.Device, options.DType);
        });
    }

    /// <summary>A model with random weights of the given shape, made directly on the device (for
    /// benchmarks at real sizes when no real weights are at hand).</summary>
    public static LlamaModel CreateRandom(ModelConfig config, ModelOptions options, long seed = 0)
    {
        torch.manual_seed(seed);
        if (options.Device.type == DeviceType.CUDA) torch.cuda.manual_seed(seed);
        return new LlamaModel(config, options, (name, shape) =>
            name.EndsWith("norm.weight", StringComparison.Ordinal)
                ? torch.ones(shape, options.DType, options.Device)
                : torch.randn(shape, options.DType, options.Device).mul_(0.02));
    }

    /// <summary>Runs the decoder over <paramref name="inputIds"/> [B,T] at <paramref name="positions"/>
    /// [B,T] (negative = padding), appending to <paramref name="cache"/>. Returns logits [B,T,V] in the
    /// compute dtype, or [B,1,V] for the last column only when <paramref name="lastTokenOnly"/>.
    /// <paramref name="adapters"/> applies each row's adapter, if any.</summary>
    public Tensor Forward(Tensor inputIds, Tensor positions, IKvCache cache, bool lastTokenOnly = false, IAdapterHooks? adapters = null)
    {
        using var scope = torch.NewDisposeScope();
        using var _ = torch.no_grad();
        long b = inputIds.shape[0], t = inputIds.shape[1];
        var h = _embedTokens.index_select(0, inputIds.reshape(-1)).view(b, t, -1);
        if (adapters is not null) h = adapters.Embeddings(h);
        var mask = cache.Reserve(positions, DType);                 // [B,1,T,S]
        // Grouped-query attention runs with the G query heads of each KV head folded into the
        // sequence axis, so keys and values are never copied G times: fold the mask the same way.
        int groups = Config.KvGroups;
        if (groups > 1)
            mask = mask.unsqueeze(2).expand(b, 1, groups, t, mask.shape[^1]).reshape(b, 1, groups * t, mask.shape[^1]);
        var (cos, sin) = _rope.Tables(positions.clamp_min(0), DType);

        for (int i = 0; i < _layers.Length; i++)
            h = _layers[i].Forward(h, i, cache, mask, cos, sin, Config, adapters);

        if (lastTokenOnly) h = h[.., ^1.., ..];
        h = RmsNorm(h, _finalNorm, Config.RmsNormEps);
        var logits = nn.functional.linear(h, _lmHead);
        return logits.MoveToOuterDisposeScope();
    }

    /// <summary>Keys and values [n,kvHeads,headDim] that layer <paramref name="layer"/>'s own k and v
    /// projections give for hidden states [n,hidden], without rotary positions (LLaMA-Adapter's
    /// adaption prompts are keyed this way).</summary>
    public (Tensor Keys, Tensor Values) ProjectKeysValues(int layer, Tensor hidden)
    {
        using var scope = torch.NewDisposeScope();
        using var _ = torch.no_grad();
        var c = Config;
        var qkv = _layers[layer].Qkv.Forward(hidden.to(DType, Device)).view(-1, c.NumHeads + 2 * c.NumKvHeads, c.HeadDim);
        var k = qkv[.., c.NumHeads..(c.NumHeads + c.NumKvHeads)].contiguous();
        var v = qkv[.., (c.NumHeads + c.NumKvHeads)..].contiguous();
        return (k.MoveToOuterDisposeScope(), v.MoveToOuterDisposeScope());
    }

    /// <summary>W v through layer <paramref name="layer"/>'s fused q|k|v projection (or, with
    /// <paramref name="gateUp"/>, its fused gate|up projection), without the projection's own bias:
    /// what a bias <paramref name="vector"/> [hidden] added after that layer's input (resp.
    /// post-attention) norm adds to the projection's output. Returns [out] in the compute dtype on the
    /// device. Computed as linear(v) - linear(0) so that it holds for any <see cref="IFrozenLinear"/>.</summary>
    internal Tensor ProjectThroughLayer(int layer, bool gateUp, Tensor vector)
    {
        using var scope = torch.NewDisposeScope();
        using var _ = torch.no_grad();
        var linear = gateUp ? _layers[layer].GateUp : _layers[layer].Qkv;
        var v = vector.to(DType, Device);
        var both = linear.Forward(torch.stack([v, torch.zeros_like(v)]));
        return (both[0] - both[1]).MoveToOuterDisposeScope();
    }

    /// <summary>RMSNorm computed in float32 whatever the compute dtype, as the reference does.</summary>
    internal static Tensor RmsNorm(Tensor x, Tensor weight, double eps)
    {
        var xf = x.to(ScalarType.Float32);
        var normed = xf * torch.rsqrt(xf.pow(2).mean([-1], keepdim: true) + eps);
        return weight * normed.to(x.dtype);
    }

    /// <summary>Bytes of all weights on the device.</summary>
    public long WeightBytes =>
        Bytes(_embedTokens) + (Config.TieWordEmbeddings ? 0 : Bytes(_lmHead)) + Bytes(_finalNorm) +
        _layers.Sum(l => Bytes(l.InputNorm) + Bytes(l.PostAttentionNorm) + l.Qkv.WeightBytes + l.O.WeightBytes + l.GateUp.WeightBytes + l.Down.WeightBytes);

    private static long Bytes(Tensor t) => t.NumberOfElements * t.ElementSize;

    public void Dispose()
    {
        _embedTokens.Dispose();
        if (!Config.TieWordEmbeddings) _lmHead.Dispose();
        _finalNorm.Dispose();
        foreach (var l in _layers) l.Dispose();
        _rope.Dispose();
    }

    private sealed class DecoderLayer : IDisposable
    {
        public required Tensor InputNorm, PostAttentionNorm;
        public required IFrozenLinear Qkv, O, GateUp, Down;

        public Tensor Forward(Tensor h, int index, IKvCache cache, Tensor mask, Tensor cos, Tensor sin, ModelConfig c, IAdapterHooks? adapters)
        {
            long b = h.shape[0], t = h.shape[1];
            int hd = c.HeadDim, nq = c.NumHeads, nkv = c.NumKvHeads;

            var x = RmsNorm(h, InputNorm, c.RmsNormEps);
            var qkv = Qkv.Forward(x);
            if (adapters is not null) qkv = adapters.Qkv(index, x, qkv);
            qkv = qkv.view(b, t, nq + 2 * nkv, hd);                                        // [B,T,heads,hd]
            // Queries and keys are rotated together in one pass; values are a view of the projection.
            var qk = RotaryEmbedding.Apply(qkv[.., .., ..(nq + nkv)], cos, sin);
            var k = qk[.., .., nq..];                                                      // [B,T,nkv,hd]
            var v = qkv[.., .., (nq + nkv)..];
            if (adapters is not null) (k, v) = adapters.KeysValues(index, k, v);
            var q = qk[.., .., ..nq].transpose(1, 2);                                      // [B,nq,T,hd]
            var (keys, values) = cache.Write(index, k.transpose(1, 2), v.transpose(1, 2)); // [B,nkv,S,hd]

            var qGrouped = q.reshape(b, nkv, (nq / nkv) * t, hd);
            var attn = nn.functional.scaled_dot_product_attention(qGrouped, keys, values, mask);
            attn = attn.view(b, nq, t, hd).transpose(1, 2).reshape(b, t, nq * hd);
            if (adapters?.ExtraAttention(index, q) is { } extra) attn = attn + extra;
            var o = O.Forward(attn);
            if (adapters is not null) o = adapters.AttentionOutput(index, attn, o);
            h = h + o;

            x = RmsNorm(h, PostAttentionNorm, c.RmsNormEps);
            var gateUp = GateUp.Forward(x);
            if (adapters is not null) gateUp = adapters.GateUp(index, x, gateUp);
            var halves = gateUp.chunk(2, -1);
            var act = nn.functional.silu(halves[0]) * halves[1];
            if (adapters is not null) act = adapters.DownInput(index, act);
            var down = Down.Forward(act);
            if (adapters is not null) down = adapters.MlpOutput(index, act, down);
            return h + down;
        }

        public void Dispose()
        {
            InputNorm.Dispose();
            PostAttentionNorm.Dispose();
            Qkv.Dispose();
            O.Dispose();
            GateUp.Dispose();
            Down.Dispose();
        }
    }
}
