using PeftServe.Core.Model;
using PeftServe.Core.Runtime;
using PeftServe.Core.SafeTensors;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Adapters.Training;

/// <summary>An adapter being trained: its parameters (float32 leaf tensors that require grad), the
/// hooks through which they act on the frozen model's forward pass, and how they are written as an
/// adapter folder the server loads. Each method's training module lives in the method's own folder
/// (Adapters/Lora/LoraTraining.cs, ...) and is listed once in <see cref="TrainingMethods"/>.
/// Hooks cast parameters to the activations' dtype, so a bfloat16 model trains float32 parameters.</summary>
public abstract class TrainableAdapter : IdentityAdapterHooks, IDisposable
{
    private readonly List<(string Name, Tensor Value)> _parameters = [];

    protected TrainableAdapter(LlamaModel model) => Model = model;

    public LlamaModel Model { get; }
    protected ModelConfig Config => Model.Config;

    /// <summary>The method's short name (as <c>train --method</c> spells it).</summary>
    public abstract string Method { get; }

    /// <summary>Columns the adapter puts before a sequence's tokens (prompt, prefix, P-tuning).</summary>
    public virtual int VirtualTokens => 0;

    /// <summary>True during training steps, false for evaluation and saving (AdaMix routes
    /// stochastically and LoRA applies dropout only while training).</summary>
    public bool Training { get; set; } = true;

    /// <summary>Seed of everything random in one forward pass (set per micro-batch by the trainer, so a
    /// resumed run draws what the uninterrupted one would have). Random choices are a function of this
    /// seed, the layer and the site (<see cref="LayerRandom"/>, <see cref="Dropout"/>), never of a stream
    /// that advances, so a layer recomputed in backward (gradient checkpointing) draws the same again.</summary>
    public int ForwardSeed { get; set; }

    /// <summary>The random source of site <paramref name="site"/> of layer <paramref name="layer"/> in
    /// this forward pass.</summary>
    protected Random LayerRandom(int layer, int site) => new(Seeds.Mix(ForwardSeed, layer, 16 + site));

    /// <summary>Inverted dropout of <paramref name="x"/> with drop probability <paramref name="p"/> while
    /// <see cref="Training"/> (the identity otherwise). The mask is drawn from a generator seeded for
    /// (<see cref="ForwardSeed"/>, layer, site): TorchSharp makes seeded generators on the CPU only, so on
    /// CUDA the device's default generator is re-seeded first.</summary>
    protected Tensor Dropout(Tensor x, double p, int layer, int site)
    {
        if (!Training || p <= 0) return x;
        if (p >= 1) return torch.zeros_like(x);
        using var scope = torch.NewDisposeScope();
        int seed = Seeds.Mix(ForwardSeed, layer, 64 + site);
        Tensor uniform;
        if (x.device.type == DeviceType.CUDA)
        {
            torch.cuda.manual_seed(seed);
            uniform = torch.rand(x.shape, ScalarType.Float32, x.device);
        }
        else
        {
            using var generator = new torch.Generator((ulong)seed);
            uniform = torch.rand(x.shape, ScalarType.Float32, generator: generator).to(x.device);
        }
        var keep = uniform.ge(p).to(x.dtype).mul_(1.0 / (1.0 - p));
        return (x * keep).MoveToOuterDisposeScope();
    }

    /// <summary>Every trainable tensor by a stable name (checkpoints use the names).</summary>
    public IReadOnlyList<(string Name, Tensor Value)> Parameters => _parameters;

    public long ParameterCount => _parameters.Sum(p => p.Value.NumberOfElements);

    /// <summary>Registers a float32 leaf on the model's device that requires grad.</summary>
    protected Tensor Parameter(string name, Tensor init)
    {
        var p = init.to(ScalarType.Float32, Model.Device).detach().requires_grad_(true);
        p.DetachFromDisposeScope();
        init.Dispose();
        _parameters.Add((name, p));
        return p;
    }

    /// <summary>Registers a parameter a TorchSharp module owns (it already requires grad).</summary>
    protected void Adopt(string name, Tensor p) => _parameters.Add((name, p));

    /// <summary>A Linear layer's weight [out,in] and bias [out], initialised as torch.nn.Linear does.</summary>
    protected (Tensor W, Tensor B) LinearParameters(string name, long inF, long outF)
    {
        double bound = 1.0 / Math.Sqrt(inF);
        return (Parameter(name + ".weight", torch.empty(outF, inF).uniform_(-bound, bound)),
                Parameter(name + ".bias", torch.empty(outF).uniform_(-bound, bound)));
    }

    /// <summary>[n, ...] repeated for every row of a batch: [B, n, ...].</summary>
    protected static Tensor PerRow(Tensor t, long batch) => t.unsqueeze(0).expand([batch, .. t.shape]);

    /// <summary>A parameter in the dtype of the activations it meets.</summary>
    protected static Tensor As(Tensor p, Tensor like) => p.dtype == like.dtype ? p : p.to(like.dtype);

    /// <summary>Writes adapter_config.json and adapter_model.safetensors into <paramref name="dir"/>.</summary>
    public abstract void Save(string dir);

    /// <summary>The LM head the training loss goes through, in <paramref name="like"/>'s dtype, when the method trains
    /// one of its own (LoRA's modules_to_save lm_head); null for the base model's.</summary>
    public virtual Tensor? LmHead(Tensor like) => null;

    /// <summary>Helper for <see cref="Save"/>: float32 CPU copies of tensors, in the folder format.</summary>
    protected static void Write(string dir, object config, IEnumerable<KeyValuePair<string, Tensor>> tensors)
    {
        using var _ = torch.no_grad();
        SyntheticAdapters.Write(dir, config, tensors.Select(t => new KeyValuePair<string, Tensor>(t.Key, t.Value.detach().to(ScalarType.Float32).cpu().contiguous().clone())).ToList());
    }

    /// <summary>Checkpoint tensors: the parameters by name.</summary>
    public void LoadParameters(IReadOnlyDictionary<string, Tensor> values)
    {
        using var _ = torch.no_grad();
        foreach (var (name, p) in _parameters)
        {
            if (!values.TryGetValue(name, out var v)) throw new InvalidDataException($"checkpoint has no parameter '{name}'");
            if (!v.shape.SequenceEqual(p.shape)) throw new InvalidDataException($"checkpoint parameter '{name}' has shape [{string.Join(",", v.shape)}], expected [{string.Join(",", p.shape)}]");
            p.copy_(v);
        }
    }


    /// <summary>Frees modules the method owns besides the registered parameters.</summary>
    protected virtual void DisposeModules() { }

    public void Dispose()
    {
        DisposeModules();
        foreach (var (_, p) in _parameters) p.Dispose();
        _parameters.Clear();
        GC.SuppressFinalize(this);
    }
}

/// <summary>Method options of <c>train</c>, each with a sensible default; a method reads the ones it uses.</summary>
public sealed record TrainingOptions
{
    /// <summary>LoRA/QLoRA rank.</summary>
    public int Rank { get; init; } = 8;
    /// <summary>LoRA alpha (scale alpha/rank); default 2*rank.</summary>
    public double? Alpha { get; init; }
    /// <summary>LoRA/QLoRA: DoRA (PEFT's use_dora), a trained magnitude per output of each target.</summary>
    public bool UseDora { get; init; }
    /// <summary>LoRA/QLoRA: modules trained whole and saved with the adapter (PEFT's modules_to_save): lm_head, embed_tokens.</summary>
    public IReadOnlyList<string> ModulesToSave { get; init; } = [];
    /// <summary>LoRA dropout on each LoRA input in training (PEFT's lora_dropout); never when serving.</summary>
    public double LoraDropout { get; init; }
    /// <summary>LoRA target modules (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj).</summary>
    public IReadOnlyList<string> LoraTargets { get; init; } = ["q_proj", "v_proj"];
    /// <summary>Virtual tokens of prompt tuning, prefix tuning and P-tuning.</summary>
    public int NumVirtualTokens { get; init; } = 8;
    /// <summary>Prompt tuning: initialise from the embeddings of this text instead of randomly.</summary>
    public string? PromptInitText { get; init; }
    /// <summary>Hidden width of the prefix reparameterization MLP and of the P-tuning encoder.</summary>
    public int EncoderHiddenSize { get; init; } = 64;
    /// <summary>P-tuning prompt encoder: "mlp" or "lstm".</summary>
    public string EncoderType { get; init; } = "mlp";
    /// <summary>Prefix tuning: train through the reparameterization MLP (saved folded as plain prefixes).</summary>
    public bool PrefixProjection { get; init; } = true;
    /// <summary>LLaMA-Adapter: adaption prompt length and how many top layers carry one.</summary>
    public int AdapterLength { get; init; } = 10;
    public int AdapterLayers { get; init; } = 2;
    /// <summary>Bottleneck/AdaMix: bottleneck dimension = hidden / reduction factor.</summary>
    public int ReductionFactor { get; init; } = 16;
    public string Placement { get; init; } = "both";
    public string NonLinearity { get; init; } = "relu";
    /// <summary>AdaMix experts per module.</summary>
    public int NumExperts { get; init; } = 4;
    /// <summary>BitFit: "all" (every projection bias) or "query-mlp" (q_proj and up_proj biases).</summary>
    public string BitFitSubset { get; init; } = "all";
    /// <summary>The tokenizer, for prompt-init text.</summary>
    public Tokenization.Tokenizer? Tokenizer { get; init; }
    /// <summary>Name of the base model written into adapter_config.json.</summary>
    public string BaseModelName { get; init; } = "";
}

/// <summary>One method's training module factory.</summary>
public interface ITrainingMethod
{
    /// <summary>The <c>--method</c> name.</summary>
    string Name { get; }
    /// <summary>One line for --help.</summary>
    string Description { get; }
    /// <summary>Whether the base must be loaded NF4-quantized (QLoRA).</summary>
    bool QuantizedBase => false;
    /// <summary>A freshly initialised trainable adapter (the global torch seed is set beforehand).</summary>
    TrainableAdapter Create(LlamaModel model, TrainingOptions options);
}
