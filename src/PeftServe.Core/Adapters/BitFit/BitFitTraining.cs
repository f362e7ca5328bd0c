using PeftServe.Core.Adapters.Training;
using PeftServe.Core.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Adapters.BitFit;

/// <summary>Trains BitFit: only bias terms, zero-initialised, on every projection of every layer
/// ("all") or only on the query and MLP-up projections ("query-mlp", the paper's small subset).
/// Saved in our BITFIT format (docs/adapter-format.md, section 3).</summary>
public sealed class BitFitTrainingMethod : ITrainingMethod
{
    public string Name => "bitfit";
    public string Description => "BitFit: biases only (--bitfit-subset all = every projection, query-mlp = q_proj and up_proj)";
    public TrainableAdapter Create(LlamaModel model, TrainingOptions options) => new BitFitTrainable(model, options);
}

public sealed class BitFitTrainable : TrainableAdapter
{
    private readonly Tensor?[,] _biases;
    private readonly string _baseModel;

    public override string Method => "bitfit";

    public BitFitTrainable(LlamaModel model, TrainingOptions o) : base(model)
    {
        _baseModel = o.BaseModelName;
        BitFitBias[] which = o.BitFitSubset.ToLowerInvariant() switch
        {
            "all" => [BitFitBias.Q, BitFitBias.K, BitFitBias.V, BitFitBias.O, BitFitBias.Gate, BitFitBias.Up, BitFitBias.Down],
            "query-mlp" => [BitFitBias.Q, BitFitBias.Up],
            _ => throw new ArgumentException($"--bitfit-subset must be all or query-mlp, not '{o.BitFitSubset}'"),
        };
        _biases = new Tensor?[Config.NumLayers, Enum.GetValues<BitFitBias>().Length];
        for (int l = 0; l < Config.NumLayers; l++)
            foreach (var b in which)
                _biases[l, (int)b] = Parameter($"{l}.{b}", torch.zeros(BitFitAdapter.Size(b, Config)));
    }

    private Tensor Add(int layer, Tensor output, params BitFitBias[] parts)
    {
        if (parts.All(p => _biases[layer, (int)p] is null)) return output;
        var bias = torch.cat(parts.Select(p => _biases[layer, (int)p] is { } b ? As(b, output)
            : torch.zeros(BitFitAdapter.Size(p, Config), output.dtype, output.device)).ToArray());
        return output + bias;
    }

    public override Tensor Qkv(int layer, Tensor x, Tensor qkv) => Add(layer, qkv, BitFitBias.Q, BitFitBias.K, BitFitBias.V);
    public override Tensor AttentionOutput(int layer, Tensor x, Tensor output) => Add(layer, output, BitFitBias.O);
    public override Tensor GateUp(int layer, Tensor x, Tensor gateUp) => Add(layer, gateUp, BitFitBias.Gate, BitFitBias.Up);
    public override Tensor MlpOutput(int layer, Tensor x, Tensor output) => Add(layer, output, BitFitBias.Down);

    public override void Save(string dir)
    {
        var tensors = new List<KeyValuePair<string, Tensor>>();
        for (int l = 0; l < Config.NumLayers; l++)
            foreach (var b in Enum.GetValues<BitFitBias>())
                if (_biases[l, (int)b] is { } t) tensors.Add(new("base_model.model." + BitFitAdapter.TensorName(l, b), t));
        Write(dir, new Dictionary<string, object?> { ["peft_type"] = "BITFIT", ["base_model_name_or_path"] = _baseModel }, tensors);
    }
}
