using PeftServe.Core.Adapters.Training;
using PeftServe.Core.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Adapters.IA3;

/// <summary>Trains IA3: learned vectors, initialised to ones (the base model), that rescale the k and
/// v projections' outputs and the down projection's input, as PEFT's default for Llama. Saved in PEFT's
/// format (ia3_l [out,1] for k/v, [1,inter] for the feed-forward down_proj).</summary>
public sealed class IA3TrainingMethod : ITrainingMethod
{
    public string Name => "ia3";
    public string Description => "IA3: learned rescaling of k_proj/v_proj outputs and the down_proj input (initialised to 1)";
    public TrainableAdapter Create(LlamaModel model, TrainingOptions options) => new IA3Trainable(model, options);
}

public sealed class IA3Trainable : TrainableAdapter
{
    private readonly Tensor[] _k, _v, _down;
    private readonly string _baseModel;

    public override string Method => "ia3";

    public IA3Trainable(LlamaModel model, TrainingOptions o) : base(model)
    {
        _baseModel = o.BaseModelName;
        long kv = (long)Config.NumKvHeads * Config.HeadDim;
        _k = Enumerable.Range(0, Config.NumLayers).Select(l => Parameter($"{l}.k_proj", torch.ones(kv))).ToArray();
        _v = Enumerable.Range(0, Config.NumLayers).Select(l => Parameter($"{l}.v_proj", torch.ones(kv))).ToArray();
        _down = Enumerable.Range(0, Config.NumLayers).Select(l => Parameter($"{l}.down_proj", torch.ones(Config.IntermediateSize))).ToArray();
    }

    public override Tensor Qkv(int layer, Tensor x, Tensor qkv)
    {
        long q = (long)Config.NumHeads * Config.HeadDim;
        var ones = torch.ones(q, qkv.dtype, qkv.device);
        return qkv * torch.cat([ones, As(_k[layer], qkv), As(_v[layer], qkv)]);
    }

    public override Tensor DownInput(int layer, Tensor x) => x * As(_down[layer], x);

    public override void Save(string dir)
    {
        var tensors = new List<KeyValuePair<string, Tensor>>();
        for (int l = 0; l < Config.NumLayers; l++)
        {
            var p = $"base_model.model.model.layers.{l}.";
            tensors.Add(new(p + "self_attn.k_proj.ia3_l", _k[l].view(-1, 1)));
            tensors.Add(new(p + "self_attn.v_proj.ia3_l", _v[l].view(-1, 1)));
            tensors.Add(new(p + "mlp.down_proj.ia3_l", _down[l].view(1, -1)));
        }
        Write(dir, new Dictionary<string, object?>
        {
            ["peft_type"] = "IA3",
            ["task_type"] = "CAUSAL_LM",
            ["base_model_name_or_path"] = _baseModel,
            ["target_modules"] = new[] { "k_proj", "v_proj", "down_proj" },
            ["feedforward_modules"] = new[] { "down_proj" },
            ["fan_in_fan_out"] = false,
            ["init_ia3_weights"] = true,
            ["inference_mode"] = true,
            ["modules_to_save"] = null,
        }, tensors);
    }
}
