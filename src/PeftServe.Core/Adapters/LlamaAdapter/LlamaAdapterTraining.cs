using PeftServe.Core.Adapters.Training;
using PeftServe.Core.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Adapters.LlamaAdapter;

/// <summary>Trains LLaMA-Adapter: in each of the top --adapter-layers layers an adaption prompt
/// [--adapter-len, hidden] (normal init) whose keys and values come from the layer's frozen k/v
/// projections, attended by the queries with a softmax of its own and scaled by a gate initialised at
/// zero (so training starts at the base model). Saved in PEFT's ADAPTION_PROMPT format.</summary>
public sealed class LlamaAdapterTrainingMethod : ITrainingMethod
{
    public string Name => "llama-adapter";
    public string Description => "LLaMA-Adapter: zero-gated adaption prompts (--adapter-len) in the top --adapter-layers layers";
    public TrainableAdapter Create(LlamaModel model, TrainingOptions options) => new LlamaAdapterTrainable(model, options);
}

public sealed class LlamaAdapterTrainable : TrainableAdapter
{
    private readonly Dictionary<int, (Tensor Prompt, Tensor Gate)> _layers = [];
    private readonly TrainingOptions _o;

    public override string Method => "llama-adapter";

    public LlamaAdapterTrainable(LlamaModel model, TrainingOptions o) : base(model)
    {
        _o = o;
        if (o.AdapterLength < 1) throw new ArgumentException($"--adapter-len must be at least 1, not {o.AdapterLength}");
        if (o.AdapterLayers < 1 || o.AdapterLayers > Config.NumLayers)
            throw new ArgumentException($"--adapter-layers must be in 1..{Config.NumLayers}, not {o.AdapterLayers}");
        for (int l = Config.NumLayers - o.AdapterLayers; l < Config.NumLayers; l++)
            _layers[l] = (Parameter($"{l}.adaption_prompt", torch.randn(o.AdapterLength, Config.HiddenSize)),
                          Parameter($"{l}.adaption_gate", torch.zeros(1)));
    }

    public override Tensor? ExtraAttention(int layer, Tensor queries)
    {
        if (!_layers.TryGetValue(layer, out var a)) return null;
        var c = Config;
        long b = queries.shape[0], t = queries.shape[2];
        int nq = c.NumHeads, nkv = c.NumKvHeads, hd = c.HeadDim;
        var (k, v) = Model.ProjectKeysValues(layer, a.Prompt, trainable: true);          // [len,nkv,hd]
        var keys = As(k, queries).permute(1, 0, 2).unsqueeze(0);                        // [1,nkv,len,hd]
        var values = As(v, queries).permute(1, 0, 2).unsqueeze(0);
        var q = queries.reshape(b, nkv, (nq / nkv) * t, hd);
        var scores = torch.matmul(q, keys.transpose(2, 3)) / Math.Sqrt(hd);
        var weights = torch.softmax(scores.to(ScalarType.Float32), -1).to(q.dtype) * As(a.Gate, q);
        return torch.matmul(weights, values).view(b, nq, t, hd).transpose(1, 2).reshape(b, t, nq * hd);
    }

    public override void Save(string dir)
    {
        var tensors = new List<KeyValuePair<string, Tensor>>();
        foreach (var (l, a) in _layers.OrderBy(x => x.Key))
        {
            tensors.Add(new($"base_model.model.model.layers.{l}.self_attn.adaption_prompt", a.Prompt.unsqueeze(0)));
            tensors.Add(new($"base_model.model.model.layers.{l}.self_attn.adaption_gate", a.Gate));
        }
        Write(dir, new Dictionary<string, object?>
        {
            ["peft_type"] = "ADAPTION_PROMPT",
            ["task_type"] = "CAUSAL_LM",
            ["base_model_name_or_path"] = _o.BaseModelName,
            ["adapter_len"] = _o.AdapterLength,
            ["adapter_layers"] = _o.AdapterLayers,
            ["target_modules"] = "self_attn",
            ["inference_mode"] = true,
        }, tensors);
    }
}
