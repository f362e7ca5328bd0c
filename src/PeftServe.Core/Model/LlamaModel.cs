using PeftServe.Core.Kernels;
using PeftServe.Core.Quantization;
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
    /// <summary>How the decoder's linear layers (q|k|v, o, gate|up, down) store their weights: dense in the
    /// compute dtype, or NF4 quantized at load time. Embeddings, norms and the LM head stay in the compute
    /// dtype. A checkpoint that is already bitsandbytes 4-bit loads as NF4 whatever this says.</summary>
    public QuantizationMode Quantization { get; init; } = QuantizationMode.None;
    /// <summary>With <see cref="QuantizationMode.Nf4"/>: also quantize the absmax values (QLoRA double
    /// quantization, <see cref="DoubleQuantAbsmax"/>).</summary>
    public bool DoubleQuant { get; init; }
}

/// <summary>A Llama-family decoder (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM): token
/// embedding, N pre-norm blocks of grouped-query attention with rotary positions and a SwiGLU MLP,
/// a final RMSNorm and the LM head. The weights are frozen and live on the device. q/k/v are fused into
/// one projection and gate/up into another, so a block runs four matrix products instead of seven.</summary>
public sealed partial class LlamaModel : IDisposable
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

    /// <summary>Supplies a linear weight stored pre-quantized (bitsandbytes 4-bit) by its name and its
    /// [out, in] shape, on the device, or null when the checkpoint holds it unquantized or not at all.</summary>
    private delegate Nf4Weight? QuantizedSource(string name, long[] shape);

    private LlamaModel(ModelConfig config, ModelOptions options, WeightSource source, QuantizedSource? quantized = null)
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
            long inter = config.IntermediateSize;
            _layers[i] = new DecoderLayer
            {
                InputNorm = Required(p + "input_layernorm.weight", hidden),
                PostAttentionNorm = Required(p + "post_attention_layernorm.weight", hidden),
                Qkv = Linear([p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"], [q, kv, kv], hidden, config.QkvBias),
                O = Linear([p + "self_attn.o_proj"], [hidden], q, config.OutputBias),
                GateUp = Linear([p + "mlp.gate_proj", p + "mlp.up_proj"], [inter, inter], hidden, config.MlpBias),
                Down = Linear([p + "mlp.down_proj"], [hidden], inter, config.MlpBias),
            };
        }
        _finalNorm = Required("model.norm.weight", hidden);
        _lmHead = config.TieWordEmbeddings
            ? _embedTokens
            : source("lm_head.weight", [config.VocabSize, hidden]) ?? throw new ModelLoadException(
                "checkpoint has no tensor 'lm_head.weight' and config.json does not set tie_word_embeddings");
        _rope = new RotaryEmbedding(config.Rope, config.HeadDim, options.Device);

        // One decoder linear layer from the checkpoint's parts PREFIX.weight [outs[i], in] (+ PREFIX.bias),
        // several parts fused along the output axis (q|k|v, gate|up).
        IFrozenLinear Linear(string[] prefixes, long[] outs, long inFeatures, bool hasBias)
        {
            var bias = hasBias ? Cat(prefixes.Select((pre, j) => Required(pre + ".bias", outs[j])).ToArray()) : null;
            try
            {
                var pre = prefixes.Select((pre, j) => quantized?.Invoke(pre + ".weight", [outs[j], inFeatures])).ToArray();
                if (pre.All(w => w is not null)) return new Nf4Linear(Nf4Weight.Concat(pre!), bias);
                if (pre.Any(w => w is not null))
                {
                    foreach (var w in pre) w?.Dispose();
                    throw new ModelLoadException($"'{string.Join("', '", prefixes.Select(x => x + ".weight"))}' are fused into one layer, " +
                        "but only some of them are stored 4-bit quantized");
                }
                if (options.Quantization == QuantizationMode.Nf4)
                    for (int j = 0; j < prefixes.Length; j++)
                        if (outs[j] * inFeatures % Nf4.BlockSize != 0)
                            throw new ModelLoadException($"tensor '{prefixes[j]}.weight' [{outs[j]},{inFeatures}] cannot be NF4-quantized: " +
                                $"its {outs[j] * inFeatures} elements are not a multiple of the block size {Nf4.BlockSize}");
                return MakeLinear(Cat(prefixes.Select((pre, j) => Required(pre + ".weight", outs[j], inFeatures)).ToArray())!, bias);
            }
            catch
            {
                bias?.Dispose();
                throw;
            }
        }
    }

    /// <summary>The parts concatenated along axis 0 (the parts are disposed), or the single part itself.</summary>
    private static Tensor Cat(Tensor[] parts)
    {
        if (parts.Length == 1) return parts[0];
        var all = torch.cat(parts, 0);
        foreach (var t in parts) t.Dispose();
        return all;
    }

    /// <summary>The one place a decoder linear layer is made from its dense weight [out,in] (on the device,
    /// in the compute dtype; the layer takes it over) and optional bias: dense, or NF4-quantized (the dense
    /// weight is then freed; each fused part is a whole number of 64-blocks, so quantizing the fused
    /// weight equals quantizing the parts one by one).</summary>
    private IFrozenLinear MakeLinear(Tensor weight, Tensor? bias)
    {
        if (Options.Quantization != QuantizationMode.Nf4) return new DenseLinear(weight, bias);
        using (weight) return new Nf4Linear(Nf4Weight.Quantize(weight, Options.DoubleQuant), bias);
    }

    /// <summary>Loads a Hugging Face model folder (config.json + model.safetensors or sharded
    /// model.safetensors.index.json). Every tensor is checked against the shape config.json implies.</summary>
    public static LlamaModel Load(string modelDir, ModelOptions options)
    {
        var config = ModelConfig.Load(modelDir);
        using var checkpoint = SafeTensorsCheckpoint.Open(modelDir);
        var bnb = new BitsAndBytesReader(checkpoint);
        return new LlamaModel(config, options, (name, shape) =>
        {
            if (!checkpoint.Contains(name)) return null;
            var info = checkpoint.Info(name);
            if (!info.Shape.SequenceEqual(shape))
                throw new ModelLoadException($"{modelDir}: tensor '{name}' has shape [{string.Join(",", info.Shape)}], config.json implies [{string.Join(",", shape)}]");
            return checkpoint.ToTensor(name, options.Device, options.DType);
        }, (name, shape) => bnb.IsQuantized(name) ? bnb.Read(name, shape, options.Device) : null);
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
    /// <paramref name="adapters"/> applies each row's adapter, if any. With <paramref name="trainable"/>
    /// the pass records autograd (for training adapters: the frozen weights never require grad, so
    /// gradients reach only the parameters the hooks bring in); otherwise it runs under no_grad.</summary>
    public Tensor Forward(Tensor inputIds, Tensor positions, IKvCache cache, bool lastTokenOnly = false, IAdapterHooks? adapters = null, bool trainable = false)
    {
        using var scope = torch.NewDisposeScope();
        using var _ = trainable ? null : torch.no_grad();
        var (h, delta, owed) = DecoderStack(inputIds, positions, cache, adapters, trainable ? LayerRun.Scoped : LayerRun.Plain);
        if (lastTokenOnly && inputIds.shape[1] > 1)
        {
            if (owed is not null) delta = owed.ApplyTo(delta!);   // its row terms are laid out for every column
            owed = null;
            h = h[.., ^1.., ..].contiguous();
            delta = delta?[.., ^1.., ..].contiguous();
        }
        var normed = delta is null ? FusedOps.RmsNorm(h, _finalNorm, Config.RmsNormEps) : FusedOps.AddRmsNorm(h, delta, _finalNorm, Config.RmsNormEps, owed).Normed;
        var logits = nn.functional.linear(normed, _lmHead);
        if (adapters is not null) logits = adapters.Logits(normed, logits);
        return logits.MoveToOuterDisposeScope();
    }

    /// <summary>The embeddings through every decoder layer (before the final norm), each layer run as
    /// <paramref name="run"/> says (see LlamaModel.Training.cs): the residual stream, and the last layer's delta
    /// still to be added (null when the layers added their own) with the adapter terms still owed to it.</summary>
    private (Tensor Residual, Tensor? Delta, RowEpilogue? Owed) DecoderStack(Tensor inputIds, Tensor positions, IKvCache cache, IAdapterHooks? adapters, LayerRun run)
    {
        long b = inputIds.shape[0], t = inputIds.shape[1];
        var h = _embedTokens.index_select(0, inputIds.reshape(-1)).view(b, t, -1);
        if (adapters is not null) h = adapters.Embeddings(adapters.TokenEmbeddings(inputIds, h));
        cache.Begin(positions, DType);
        var (cos, sin) = _rope.Tables(positions.clamp_min(0), DType);

        // Each layer returns the residual stream and the delta it adds last (the MLP output, with any adapter terms
        // still owed to it); the next norm adds it in, so the residual add, the owed terms and the RMSNorm after it
        // are one step (one kernel on CUDA).
        Tensor? delta = null;
        RowEpilogue? owed = null;
        for (int i = 0; i < _layers.Length; i++)
            (h, delta, owed) = RunLayer(i, h, delta, owed, cache, positions, cos, sin, adapters, run);
        return (h, delta, owed);
    }

    /// <summary>Keys and values [n,kvHeads,headDim] that layer <paramref name="layer"/>'s own k and v
    /// projections give for hidden states [n,hidden], without rotary positions (LLaMA-Adapter's
    /// adaption prompts are keyed this way). With <paramref name="trainable"/> autograd is recorded
    /// (training an adaption prompt).</summary>
    public (Tensor Keys, Tensor Values) ProjectKeysValues(int layer, Tensor hidden, bool trainable = false)
    {
        using var scope = torch.NewDisposeScope();
        using var _ = trainable ? null : torch.no_grad();
        var c = Config;
        var qkv = _layers[layer].Qkv.Forward(hidden.to(DType, Device)).view(-1, c.NumHeads + 2 * c.NumKvHeads, c.HeadDim);
        var k = qkv[.., c.NumHeads..(c.NumHeads + c.NumKvHeads)].contiguous();
        var v = qkv[.., (c.NumHeads + c.NumKvHeads)..].contiguous();
        return (k.MoveToOuterDisposeScope(), v.MoveToOuterDisposeScope());
    }

    /// <summary>Token embeddings [n, hidden] of <paramref name="ids"/> (a copy, in the compute dtype on
    /// the device): for initialising prompt-type adapters from text.</summary>
    public Tensor Embed(Tensor ids)
    {
        using var _ = torch.no_grad();
        return _embedTokens.index_select(0, ids.to(ScalarType.Int64, Device).reshape(-1)).clone();
    }

    /// <summary>Standard deviation of the token embedding table (scale for random prompt init).</summary>
    public double EmbeddingStd
    {
        get { using var _ = torch.no_grad(); using var s = _embedTokens.to(ScalarType.Float32).std(); return s.item<float>(); }
    }

    /// <summary>Parameters of the whole model (embedding, decoder, norms, LM head unless tied).</summary>
    public long TotalParameters =>
        _embedTokens.NumberOfElements + (Config.TieWordEmbeddings ? 0 : _lmHead.NumberOfElements) + _finalNorm.NumberOfElements +
        _layers.Sum(l => l.InputNorm.NumberOfElements + l.PostAttentionNorm.NumberOfElements) + DecoderLinearParameters;

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

    /// <summary>Bytes of all weights on the device.</summary>
    public long WeightBytes =>
        Bytes(_embedTokens) + (Config.TieWordEmbeddings ? 0 : Bytes(_lmHead)) + Bytes(_finalNorm) +
        _layers.Sum(l => Bytes(l.InputNorm) + Bytes(l.PostAttentionNorm) + l.Qkv.WeightBytes + l.O.WeightBytes + l.GateUp.WeightBytes + l.Down.WeightBytes);

    private static long Bytes(Tensor t) => t.NumberOfElements * t.ElementSize;

    private IEnumerable<IFrozenLinear> DecoderLinears => _layers.SelectMany(l => new[] { l.Qkv, l.O, l.GateUp, l.Down });

    /// <summary>Weight parameters of the decoder's linear layers (q|k|v, o, gate|up, down; no biases).</summary>
    public long DecoderLinearParameters => DecoderLinears.Sum(l => l.InFeatures * l.OutFeatures);

    /// <summary>Bytes the decoder's linear layers occupy on the device (weights, quantization state, biases).</summary>
    public long DecoderLinearBytes => DecoderLinears.Sum(l => l.WeightBytes);

    /// <summary><see cref="DecoderLinearBytes"/> / <see cref="DecoderLinearParameters"/>: 2 for dense bf16,
    /// about 0.53 for NF4 (0.5 + 4/64), about 0.508 with double quantization.</summary>
    public double DecoderLinearBytesPerParameter => (double)DecoderLinearBytes / Math.Max(1, DecoderLinearParameters);

    /// <summary>How the decoder linears are stored: "NF4", "NF4 (double-quantized absmax)", or the compute dtype.</summary>
    public string DecoderLinearFormat => _layers.Length == 0 ? DType.ToString() : _layers[0].Qkv switch
    {
        Nf4Linear { Weight.DoubleQuant: not null } => "NF4 (double-quantized absmax)",
        Nf4Linear => "NF4",
        _ => DType.ToString(),
    };

    /// <summary>One line for logs: format, parameters, bytes per parameter and memory of the decoder
    /// linears, and the total weight memory.</summary>
    public string WeightSummary =>
        $"decoder linears {DecoderLinearFormat}: {DecoderLinearParameters:N0} parameters, {DecoderLinearBytesPerParameter:F3} bytes/parameter, " +
        $"{DecoderLinearBytes / 1048576.0:F1} MiB; all weights {WeightBytes / 1048576.0:F1} MiB";

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

        /// <summary>One block over the residual stream <paramref name="h"/> [B,T,hidden], with the previous
        /// block's last delta still to be added (null before the first block) and the adapter terms it still owes.
        /// Returns the residual stream and this block's last delta (its MLP output) with the terms it owes. Adapter row
        /// terms of a projection are left to the kernel that next reads its output where that kernel can apply them:
        /// the rotary + KV write for q|k|v, the add + RMSNorm for o and down, SiLU·up for gate|up.</summary>
        public (Tensor Residual, Tensor Delta, RowEpilogue? Owed) Forward(Tensor h, Tensor? delta, RowEpilogue? owed, int index, IKvCache cache,
            Tensor positions, RotaryEmbedding rope, Tensor cos, Tensor sin, ModelConfig c, IAdapterHooks? adapters)
        {
            long b = h.shape[0], t = h.shape[1];
            int hd = c.HeadDim, nq = c.NumHeads, nkv = c.NumKvHeads;

            Tensor x;
            (h, x) = delta is null ? (h, FusedOps.RmsNorm(h, InputNorm, c.RmsNormEps)) : FusedOps.AddRmsNorm(h, delta, InputNorm, c.RmsNormEps, owed);
            adapters?.BeforeLinear(index, LinearSite.Qkv, x);
            var qkv = Qkv.Forward(x);
            RowEpilogue? owedQkv = null;
            if (adapters is not null) (qkv, owedQkv) = adapters.QkvDeferred(index, x, qkv);
            Tensor attn, q;
            if (cache is IRotatingKvCache rotating && adapters?.ChangesKeysValues != true
                && rotating.AttendRotating(index, qkv, positions, rope, nq, owedQkv) is { } fused)
                (attn, q) = fused;
            else
            {
                if (owedQkv is not null) qkv = owedQkv.ApplyTo(qkv);
                var heads = qkv.view(b, t, nq + 2 * nkv, hd);                                   // [B,T,heads,hd]
                // Queries and keys are rotated together in one pass; values are a view of the projection.
                var qk = RotaryEmbedding.Apply(heads[.., .., ..(nq + nkv)], cos, sin);
                var k = qk[.., .., nq..];                                                      // [B,T,nkv,hd]
                var v = heads[.., .., (nq + nkv)..];
                if (adapters is not null) (k, v) = adapters.KeysValues(index, k, v);
                q = qk[.., .., ..nq].transpose(1, 2);                                          // [B,nq,T,hd]
                attn = cache.Attend(index, q, k.transpose(1, 2), v.transpose(1, 2));          // [B,T,nq*hd]
            }
            if (adapters?.ExtraAttention(index, q) is { } extra) attn = attn.add(extra, Runtime.Scalars.One);
            adapters?.BeforeLinear(index, LinearSite.O, attn);
            var o = O.Forward(attn);
            RowEpilogue? owedO = null;
            if (adapters is not null) (o, owedO) = adapters.AttentionOutputDeferred(index, attn, o);

            (h, x) = FusedOps.AddRmsNorm(h, o, PostAttentionNorm, c.RmsNormEps, owedO);
            adapters?.BeforeLinear(index, LinearSite.GateUp, x);
            var gateUp = GateUp.Forward(x);
            RowEpilogue? owedGateUp = null;
            if (adapters is not null) (gateUp, owedGateUp) = adapters.GateUpDeferred(index, x, gateUp);
            var act = FusedOps.SiluMul(gateUp, owedGateUp);
            if (adapters is not null) act = adapters.DownInput(index, act);
            adapters?.BeforeLinear(index, LinearSite.Down, act);
            var down = Down.Forward(act);
            RowEpilogue? owedDown = null;
            if (adapters is not null) (down, owedDown) = adapters.MlpOutputDeferred(index, act, down);
            return (h, down, owedDown);
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
