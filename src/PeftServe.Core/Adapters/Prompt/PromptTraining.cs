using PeftServe.Core.Adapters.Training;
using PeftServe.Core.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Adapters.Prompt;

/// <summary>Trains prompt tuning: n virtual-token embeddings before the sequence, initialised randomly
/// (normal with the spread of the model's own embedding table) or from the embeddings of an init text
/// (its tokens repeated or cut to n). Saved as PEFT's PROMPT_TUNING.</summary>
public sealed class PromptTuningTrainingMethod : ITrainingMethod
{
    public string Name => "prompt";
    public string Description => "prompt tuning: --num-virtual-tokens learned input embeddings; random init or --prompt-init-text";
    public TrainableAdapter Create(LlamaModel model, TrainingOptions options) => new PromptTrainable(model, options);
}

/// <summary>Shared by prompt tuning and P-tuning: the virtual columns' embeddings come from
/// <see cref="Prompts"/>, which the chunk's first n columns take.</summary>
public abstract class VirtualPromptTrainable(LlamaModel model, int tokens) : TrainableAdapter(model)
{
    public override int VirtualTokens => tokens;

    /// <summary>The n prompt embeddings [n, hidden] as the model sees them.</summary>
    public abstract Tensor Prompts();

    public override Tensor Embeddings(Tensor embeddings)
    {
        int n = VirtualTokens;
        var prompts = PerRow(As(Prompts(), embeddings), embeddings.shape[0]);
        return torch.cat([prompts, embeddings[.., n.., ..]], 1);
    }

    protected Dictionary<string, object?> CommonConfig(string peftType, TrainingOptions o) => new()
    {
        ["peft_type"] = peftType,
        ["task_type"] = "CAUSAL_LM",
        ["base_model_name_or_path"] = o.BaseModelName,
        ["num_virtual_tokens"] = VirtualTokens,
        ["token_dim"] = Config.HiddenSize,
        ["num_transformer_submodules"] = 1,
        ["num_attention_heads"] = Config.NumHeads,
        ["num_layers"] = Config.NumLayers,
        ["inference_mode"] = true,
    };
}

public sealed class PromptTrainable : VirtualPromptTrainable
{
    private readonly Tensor _prompts;
    private readonly TrainingOptions _o;

    public override string Method => "prompt";

    public PromptTrainable(LlamaModel model, TrainingOptions o) : base(model, o.NumVirtualTokens)
    {
        _o = o;
        int n = o.NumVirtualTokens;
        if (n < 1) throw new ArgumentException($"--num-virtual-tokens must be at least 1, not {n}");
        Tensor init;
        if (!string.IsNullOrEmpty(o.PromptInitText))
        {
            var tok = o.Tokenizer ?? throw new ArgumentException("--prompt-init-text needs the model's tokenizer");
            var ids = tok.Encode(o.PromptInitText, addSpecialTokens: false);
            if (ids.Length == 0) throw new ArgumentException("--prompt-init-text tokenizes to nothing");
            var repeated = Enumerable.Range(0, n).Select(i => (long)ids[i % ids.Length]).ToArray();
            using var idt = torch.tensor(repeated);
            init = model.Embed(idt).to(ScalarType.Float32);
        }
        else init = torch.randn(n, Config.HiddenSize) * model.EmbeddingStd;
        _prompts = Parameter("prompt_embeddings", init);
    }

    public override Tensor Prompts() => _prompts;

    public override void Save(string dir)
    {
        var config = CommonConfig("PROMPT_TUNING", _o);
        // The init only matters before training; PEFT would fetch a tokenizer to redo a TEXT init at load.
        config["prompt_tuning_init"] = "RANDOM";
        Write(dir, config, [new("prompt_embeddings", _prompts)]);
    }
}

/// <summary>Trains P-tuning (Liu et al., 2021): the virtual-token embeddings are the output of a prompt
/// encoder over n learned inputs, an MLP (Linear-ReLU-Linear-ReLU-Linear) or a bidirectional LSTM
/// followed by an MLP head, as PEFT's PromptEncoder. Saved as PEFT saves it: the encoder's output as
/// plain prompt_embeddings [n, hidden] under P_TUNING.</summary>
public sealed class PTuningTrainingMethod : ITrainingMethod
{
    public string Name => "ptuning";
    public string Description => "P-tuning: virtual tokens from a prompt encoder (--encoder-type mlp|lstm, --encoder-hidden-size)";
    public TrainableAdapter Create(LlamaModel model, TrainingOptions options) => new PTuningTrainable(model, options);
}

public sealed class PTuningTrainable : VirtualPromptTrainable
{
    private readonly TrainingOptions _o;
    private readonly Tensor _inputs;
    private readonly (Tensor W, Tensor B)[] _mlp;
    private readonly TorchSharp.Modules.LSTM? _lstm;
    private readonly bool _isLstm;

    public override string Method => "ptuning";

    public PTuningTrainable(LlamaModel model, TrainingOptions o) : base(model, o.NumVirtualTokens)
    {
        _o = o;
        int n = o.NumVirtualTokens, h = o.EncoderHiddenSize;
        long d = Config.HiddenSize;
        if (n < 1) throw new ArgumentException($"--num-virtual-tokens must be at least 1, not {n}");
        _isLstm = o.EncoderType.ToLowerInvariant() switch
        {
            "mlp" => false,
            "lstm" => true,
            _ => throw new ArgumentException($"--encoder-type must be mlp or lstm, not '{o.EncoderType}'"),
        };
        _inputs = Parameter("embedding", torch.randn(n, d));
        if (_isLstm)
        {
            _lstm = nn.LSTM(d, h, numLayers: 2, batchFirst: true, bidirectional: true);
            _lstm.to(model.Device);
            foreach (var (name, p) in _lstm.named_parameters()) Adopt("lstm_head." + name, p);
            _mlp = [LinearParameters("mlp_head.0", 2L * h, 2L * h), LinearParameters("mlp_head.2", 2L * h, d)];
        }
        else _mlp = [LinearParameters("mlp_head.0", d, h), LinearParameters("mlp_head.2", h, h), LinearParameters("mlp_head.4", h, d)];
    }

    public override Tensor Prompts()
    {
        var x = _inputs;
        if (_lstm is not null)
        {
            var (output, hn, cn) = _lstm.forward(x.unsqueeze(0));
            hn.Dispose();
            cn.Dispose();
            x = output.squeeze(0);
        }
        for (int i = 0; i < _mlp.Length; i++)
        {
            x = nn.functional.linear(x, _mlp[i].W, _mlp[i].B);
            if (i < _mlp.Length - 1) x = nn.functional.relu(x);
        }
        return x;
    }

    public override void Save(string dir)
    {
        var config = CommonConfig("P_TUNING", _o);
        config["encoder_reparameterization_type"] = _isLstm ? "LSTM" : "MLP";
        config["encoder_hidden_size"] = _o.EncoderHiddenSize;
        config["encoder_num_layers"] = 2;
        config["encoder_dropout"] = 0.0;
        using var _ = torch.no_grad();
        using var prompts = Prompts();
        Write(dir, config, [new("prompt_embeddings", prompts)]);
    }

    protected override void DisposeModules() => _lstm?.Dispose();
}
