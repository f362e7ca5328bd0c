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
/// the value is recorded as lora_dropout in the config, and serving applies no dropout.</summary>
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
            }
    }

    /// <summary>(alpha/r) dropout(x) A^T B^T for one target, or null.</summary>
    private Tensor? Delta(int layer, LoraTarget t, Tensor x)
    {
        if (_weights[layer, (int)t] is not { } w) return null;
        var input = Dropout(x, _dropout, layer, (int)t);
        return nn.functional.linear(nn.functional.linear(input, As(w.A, x)), As(w.B, x)) * _scale;
    }

    /// <summary>output + the deltas of the fused parts (zeros for parts not targeted).</summary>
    private Tensor AddFused(int layer, Tensor x, Tensor output, params (LoraTarget T, long Width)[] parts)
    {
        var deltas = parts.Select(p => Delta(layer, p.T, x)).ToArray();
        if (deltas.All(d => d is null)) return output;
        var shape = output.shape[..^1];
        var full = torch.cat(deltas.Select((d, i) => d ?? torch.zeros([.. shape, parts[i].Width], output.dtype, output.device)).ToArray(), -1);
        return output + full;
    }

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
                }
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
            ["use_dora"] = false,
            ["init_lora_weights"] = true,
            ["inference_mode"] = true,
            ["modules_to_save"] = null,
            ["layers_to_transform"] = null,
            ["rank_pattern"] = new Dictionary<string, object>(),
            ["alpha_pattern"] = new Dictionary<string, object>(),
        }, tensors);
    }
}
