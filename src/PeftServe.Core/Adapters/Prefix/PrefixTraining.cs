using PeftServe.Core.Adapters.Training;
using PeftServe.Core.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Adapters.Prefix;

/// <summary>Trains prefix tuning: every layer's attention sees n learned key/value pairs in the
/// sequence's first n (virtual) columns. With the reparameterization (default, as the paper and PEFT's
/// prefix_projection) the prefixes are W2 tanh(W1 E + b1) + b2 of a learned E [n, kvHeads*headDim];
/// the adapter is saved folded, as plain prefixes (prompt_embeddings [n, L*2*kvHeads*headDim],
/// prefix_projection false), which both the server and PEFT read.</summary>
public sealed class PrefixTuningTrainingMethod : ITrainingMethod
{
    public string Name => "prefix";
    public string Description => "prefix tuning: --num-virtual-tokens learned keys/values per layer, trained through an MLP (--encoder-hidden-size; --no-prefix-projection for direct)";
    public TrainableAdapter Create(LlamaModel model, TrainingOptions options) => new PrefixTrainable(model, options);
}

public sealed class PrefixTrainable : TrainableAdapter
{
    private readonly TrainingOptions _o;
    private readonly int _n;
    private readonly Tensor _embedding;
    private readonly (Tensor W, Tensor B)? _l1, _l2;

    public override string Method => "prefix";
    public override int VirtualTokens => _n;

    private long TokenDim => (long)Config.NumKvHeads * Config.HeadDim;
    private long Width => 2L * Config.NumLayers * TokenDim;

    public PrefixTrainable(LlamaModel model, TrainingOptions o) : base(model)
    {
        _o = o;
        _n = o.NumVirtualTokens;
        if (_n < 1) throw new ArgumentException($"--num-virtual-tokens must be at least 1, not {_n}");
        if (o.PrefixProjection)
        {
            _embedding = Parameter("embedding", torch.randn(_n, TokenDim));
            _l1 = LinearParameters("transform.0", TokenDim, o.EncoderHiddenSize);
            _l2 = LinearParameters("transform.2", o.EncoderHiddenSize, Width);
        }
        else _embedding = Parameter("embedding", torch.randn(_n, Width));
    }

    /// <summary>The prefixes [n, L*2*kv*hd].</summary>
    public Tensor Prefixes()
    {
        if (_l1 is not { } a || _l2 is not { } b) return _embedding;
        return nn.functional.linear(torch.tanh(nn.functional.linear(_embedding, a.W, a.B)), b.W, b.B);
    }

    /// <summary>Layer <paramref name="layer"/>'s keys and values [2, n, kv, hd]: its slice of
    /// <see cref="Prefixes"/>, computed inside the layer's own hook from the parameters, so that a layer
    /// recomputed in backward (gradient checkpointing) needs nothing made elsewhere in the pass.</summary>
    private Tensor LayerPrefixes(int layer)
    {
        long width = 2 * TokenDim, start = layer * width;
        var flat = _l1 is { } a && _l2 is { } b
            ? nn.functional.linear(torch.tanh(nn.functional.linear(_embedding, a.W, a.B)), b.W.narrow(0, start, width), b.B.narrow(0, start, width))
            : _embedding.narrow(1, start, width);
        return flat.view(_n, 2, Config.NumKvHeads, Config.HeadDim).permute(1, 0, 2, 3);
    }

    public override (Tensor Keys, Tensor Values) KeysValues(int layer, Tensor keys, Tensor values)
    {
        var kv = LayerPrefixes(layer);
        long b = keys.shape[0];
        var k = torch.cat([PerRow(As(kv[0], keys), b), keys[.., _n.., .., ..]], 1);
        var v = torch.cat([PerRow(As(kv[1], values), b), values[.., _n.., .., ..]], 1);
        return (k, v);
    }

    public override void Save(string dir)
    {
        using var _ = torch.no_grad();
        using var prefixes = Prefixes().detach().clone();
        Write(dir, new Dictionary<string, object?>
        {
            ["peft_type"] = "PREFIX_TUNING",
            ["task_type"] = "CAUSAL_LM",
            ["base_model_name_or_path"] = _o.BaseModelName,
            ["num_virtual_tokens"] = _n,
            ["token_dim"] = TokenDim,
            ["num_transformer_submodules"] = 1,
            ["num_attention_heads"] = Config.NumKvHeads,
            ["num_layers"] = Config.NumLayers,
            ["encoder_hidden_size"] = _o.EncoderHiddenSize,
            ["prefix_projection"] = false,
            ["inference_mode"] = true,
        }, [new("prompt_embeddings", prefixes)]);
    }
}
