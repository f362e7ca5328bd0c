using PeftServe.Core.Adapters.Training;
using PeftServe.Core.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Adapters.Lora;

/// <summary>Trains LoRA: per targeted linear layer W, y = W x + (alpha/r) B A x with A [r,in]
/// initialised like PEFT (Kaiming-uniform, bound 1/sqrt(in)) and B [out,r] zero, so training starts
/// at the base model. Saved in PEFT's format (lora_A / lora_B, unscaled; the config carries r and
/// lora_alpha), which both the server and Hugging Face PEFT load. With --lora-dropout, each target's
/// input is dropped out (its own mask per target, as PEFT's per-module dropout) in training only;
/// the value is recorded as lora_dropout in the config, and serving applies no dropout.
/// With --use-dora each target also trains DoRA's magnitude m [out] (initialised, as PEFT does, to the norms
/// of W's rows): the target's output becomes (m / ||W + s B A||) ⊙ (W x + s B A x) + b, the norm recomputed
/// every step from the current A and B without gradient (PEFT detaches it). With --modules-to-save lm_head
/// and/or embed_tokens, a float32 copy of that whole matrix is trained and saved (PEFT's modules_to_save).</summary>
public sealed class LoraTrainingMethod(bool quantized = false) : ITrainingMethod
{
    public string Name => quantized ? "qlora" : "lora";
    public string Description => quantized
        ? "LoRA on the 4-bit NF4-quantized base (QLoRA); bfloat16 compute on CUDA; saved as a PEFT LoRA adapter"
        : "LoRA: low-rank updates B·A on --lora-targets (default q_proj,v_proj), rank --rank, scale --lora-alpha/rank";
    public bool QuantizedBase => quantized;
    public TrainableAdapter Create(LlamaModel model, TrainingOptions options) => new LoraTrainable(model, options, Name);
}

public sealed class LoraTrainable : TrainableAdapter
{
    private readonly (Tensor A, Tensor B)?[,] _weights;
    private readonly int _rank;
    private readonly double _alpha, _scale, _dropout;
    private readonly string[] _targets;
    private readonly string _method, _baseModel;
    private readonly Tensor?[,] _magnitude;            // [layer, target] DoRA magnitude [out], when training DoRA
    private readonly Tensor? _lmHead, _embedTokens;    // saved modules [V, hidden], when trained

    public override string Method => _method;

    public LoraTrainable(LlamaModel model, TrainingOptions o, string method = "lora") : base(model)
    {
        _method = method;
        _baseModel = o.BaseModelName;
        _rank = o.Rank;
        if (_rank < 1) throw new ArgumentException($"--rank must be at least 1, not {_rank}");
        _alpha = o.Alpha ?? 2.0 * _rank;
        _scale = _alpha / _rank;
        _dropout = o.LoraDropout;
        if (_dropout is < 0 or >= 1) throw new ArgumentException($"--lora-dropout must be in [0, 1), not {_dropout}");
        var known = Enum.GetValues<LoraTarget>().ToDictionary(LoraAdapter.ModuleName);
        _targets = o.LoraTargets.Distinct().ToArray();
        if (_targets.Length == 0) throw new ArgumentException("--lora-targets names no module");
        _weights = new (Tensor, Tensor)?[Config.NumLayers, 7];
        _magnitude = new Tensor?[Config.NumLayers, 7];
        foreach (var module in o.ModulesToSave.Distinct())
            switch (module)
            {
                case "lm_head":
                    _lmHead = Parameter("lm_head.weight", model.LmHeadWeight.to(ScalarType.Float32).clone());
                    break;
                case "embed_tokens":
                    _embedTokens = Parameter("embed_tokens.weight", model.EmbeddingWeight.to(ScalarType.Float32).clone());
                    break;
                default:
                    throw new ArgumentException($"--modules-to-save: '{module}' is not one of lm_head, embed_tokens");
            }
        for (int l = 0; l < Config.NumLayers; l++)
            foreach (var name in _targets)
            {
                if (!known.TryGetValue(name, out var t))
                    throw new ArgumentException($"--lora-targets: unknown module '{name}' (use {string.Join(", ", known.Keys)})");
                var (inF, outF) = LoraAdapter.Shape(t, Config);
                double bound = 1.0 / Math.Sqrt(inF);
                var a = Parameter($"{l}.{name}.lora_A", torch.empty(_rank, inF).uniform_(-bound, bound));
                var b = Parameter($"{l}.{name}.lora_B", torch.zeros(outF, _rank));
                _weights[l, (int)t] = (a, b);
                if (o.UseDora) _magnitude[l, (int)t] = Parameter($"{l}.{name}.lora_magnitude_vector", Norms(l, t, a, b));
            }
    }

    private static int Group(LoraTarget t) => Array.FindIndex(LoraSlotPool.Groups, g => g.Contains(t));

    /// <summary>||W + s B A|| per output row of target <paramref name="t"/> (float32, no gradient).</summary>
    private Tensor Norms(int layer, LoraTarget t, Tensor a, Tensor b)
    {
        using var _ = torch.no_grad();
        int g = Group(t);
        long offset = LoraSlotPool.TargetOffset(g, Array.IndexOf(LoraSlotPool.Groups[g], t), Config);
        using var scaledBT = (b.detach() * _scale).t();
        return DoraNorms.Linear(Model, layer, (LinearSite)g, offset, LoraAdapter.Shape(t, Config).Out, a.detach(), scaledBT);
    }

    /// <summary>What target <paramref name="t"/> adds to its part <paramref name="part"/> (= W x + b) of the fused output,
    /// or null: (alpha/r) B A dropout(x) for LoRA; for DoRA, with g = m / ||W + s B A|| (no gradient through the norm),
    /// (g - 1) ⊙ W x + g ⊙ s B A dropout(x), as PEFT computes it (with dropout, W applied to the dropped-out input).</summary>
    private Tensor? Delta(int layer, LoraTarget t, Tensor x, Tensor part)
    {
        if (_weights[layer, (int)t] is not { } w) return null;
        var input = Dropout(x, _dropout, layer, (int)t);
        var lora = nn.functional.linear(nn.functional.linear(input, As(w.A, x)), As(w.B, x)) * _scale;
        if (_magnitude[layer, (int)t] is not { } m) return lora;
        int g = Group(t);
        var scale = As(m, x) / Norms(layer, t, w.A, w.B).to(x.dtype);
        Tensor baseTerm;
        if (ReferenceEquals(input, x))
        {
            var b0 = Model.ProjectionBias(layer, (LinearSite)g);
            long offset = LoraSlotPool.TargetOffset(g, Array.IndexOf(LoraSlotPool.Groups[g], t), Config);
            baseTerm = b0 is null ? part : part - b0.narrow(0, offset, part.shape[^1]);
        }
        else
        {
            long offset = LoraSlotPool.TargetOffset(g, Array.IndexOf(LoraSlotPool.Groups[g], t), Config);
            baseTerm = Model.ProjectWithoutBias(layer, (LinearSite)g, input).narrow(-1, offset, part.shape[^1]);
        }
        return (scale - 1) * baseTerm + scale * lora;
    }

    /// <summary>output + the deltas of the fused parts (zeros for parts not targeted).</summary>
    private Tensor AddFused(int layer, Tensor x, Tensor output, params (LoraTarget T, long Width)[] parts)
    {
        long offset = 0;
        var deltas = new Tensor?[parts.Length];
        for (int i = 0; i < parts.Length; i++)
        {
            deltas[i] = Delta(layer, parts[i].T, x, output.narrow(-1, offset, parts[i].Width));
            offset += parts[i].Width;
        }
        if (deltas.All(d => d is null)) return output;
        var shape = output.shape[..^1];
        var full = torch.cat(deltas.Select((d, i) => d ?? torch.zeros([.. shape, parts[i].Width], output.dtype, output.device)).ToArray(), -1);
        return output + full;
    }

    public override Tensor TokenEmbeddings(Tensor inputIds, Tensor embeddings) =>
        _embedTokens is null ? embeddings : As(_embedTokens, embeddings).index_select(0, inputIds.reshape(-1)).view(embeddings.shape);

    public override Tensor Logits(Tensor hidden, Tensor logits) => _lmHead is null ? logits : nn.functional.linear(hidden, As(_lmHead, hidden));

    public override Tensor? LmHead(Tensor like) => _lmHead is null ? null : As(_lmHead, like);

    public override Tensor Qkv(int layer, Tensor x, Tensor qkv)
    {
        long q = (long)Config.NumHeads * Config.HeadDim, kv = (long)Config.NumKvHeads * Config.HeadDim;
        return AddFused(layer, x, qkv, (LoraTarget.Q, q), (LoraTarget.K, kv), (LoraTarget.V, kv));
    }

    public override Tensor AttentionOutput(int layer, Tensor x, Tensor output) => AddFused(layer, x, output, (LoraTarget.O, Config.HiddenSize));

    public override Tensor GateUp(int layer, Tensor x, Tensor gateUp) =>
        AddFused(layer, x, gateUp, (LoraTarget.Gate, Config.IntermediateSize), (LoraTarget.Up, Config.IntermediateSize));

    public override Tensor MlpOutput(int layer, Tensor x, Tensor output) => AddFused(layer, x, output, (LoraTarget.Down, Config.HiddenSize));

    public override void Save(string dir)
    {
        var tensors = new List<KeyValuePair<string, Tensor>>();
        for (int l = 0; l < Config.NumLayers; l++)
            foreach (var t in Enum.GetValues<LoraTarget>())
                if (_weights[l, (int)t] is { } w)
                {
                    var p = $"base_model.model.model.layers.{l}.{(t <= LoraTarget.O ? "self_attn" : "mlp")}.{LoraAdapter.ModuleName(t)}.";
                    tensors.Add(new(p + "lora_A.weight", w.A));
                    tensors.Add(new(p + "lora_B.weight", w.B));
                    if (_magnitude[l, (int)t] is { } m) tensors.Add(new(p + "lora_magnitude_vector", m));
                }
        if (_lmHead is not null) tensors.Add(new("base_model.model.lm_head.weight", _lmHead));
        if (_embedTokens is not null) tensors.Add(new("base_model.model.model.embed_tokens.weight", _embedTokens));
        var saved = new List<string>();
        if (_lmHead is not null) saved.Add("lm_head");
        if (_embedTokens is not null) saved.Add("embed_tokens");
        Write(dir, new Dictionary<string, object?>
        {
            ["peft_type"] = "LORA",
            ["task_type"] = "CAUSAL_LM",
            ["base_model_name_or_path"] = _baseModel,
            ["r"] = _rank,
            ["lora_alpha"] = _alpha,
            ["lora_dropout"] = _dropout,
            ["target_modules"] = _targets,
            ["bias"] = "none",
            ["fan_in_fan_out"] = false,
            ["use_rslora"] = false,
            ["use_dora"] = _magnitude.Cast<Tensor?>().Any(m => m is not null),
            ["init_lora_weights"] = true,
            ["inference_mode"] = true,
            ["modules_to_save"] = saved.Count == 0 ? null : saved,
            ["ensure_weight_tying"] = false,
            ["layers_to_transform"] = null,
            ["rank_pattern"] = new Dictionary<string, object>(),
            ["alpha_pattern"] = new Dictionary<string, object>(),
        }, tensors);
    }
}
