using System.Text.Json.Nodes;
using PeftServe.Core.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Adapters.Lora;

/// <summary>The seven linear layers of a decoder block LoRA may target, in the order the model fuses
/// them (q|k|v, o, gate|up, down).</summary>
public enum LoraTarget { Q, K, V, O, Gate, Up, Down }

/// <summary>A LoRA adapter in host memory: per layer and target, A [r,in] and B [out,r] with the
/// scaling (alpha/r, or alpha/sqrt(r) for rsLoRA) already folded into B, so serving computes
/// x A^T B^T and nothing else.</summary>
public sealed class LoraAdapter : Adapter
{
    public override AdapterMethod Method { get; }
    /// <summary>[layer, target] -> (A, scaled B), null where the adapter does not touch that layer.</summary>
    public (Tensor A, Tensor B)?[,] Weights { get; }
    public int MaxRank { get; }
    public override long ByteSize => _byteSize;
    private long _byteSize;
    /// <summary>After <see cref="PrepareForDevice"/>: one host block (pinned for a GPU) in the serving dtype that
    /// holds every A and every B transposed ([r, out]), the layouts of the slot pool, so storing is one copy each.</summary>
    private Tensor? _hostBlock;
    /// <summary>Per [layer, target] after preparation: B transposed, a view of the host block.</summary>
    internal Tensor?[,]? UpRows { get; private set; }

    /// <summary>DoRA, trained biases, LoRA on the embedding and LM head, saved modules; null for a plain LoRA.</summary>
    public LoraVariants? Variants { get; }

    internal LoraAdapter(AdapterMethod method, (Tensor, Tensor)?[,] weights, LoraVariants? variants = null)
    {
        Method = method;
        Weights = weights;
        Variants = variants;
        MaxRank = weights.Cast<(Tensor A, Tensor B)?>().Where(w => w is not null).Select(w => (int)w!.Value.A.shape[0]).DefaultIfEmpty(0).Max();
        _byteSize = Bytes(weights.Cast<(Tensor A, Tensor B)?>().Where(w => w is not null).SelectMany(w => new[] { w!.Value.A, w.Value.B }))
            + Bytes(variants?.Tensors.Distinct() ?? []);
    }

    public static string ModuleName(LoraTarget t) => t switch
    {
        LoraTarget.Q => "q_proj", LoraTarget.K => "k_proj", LoraTarget.V => "v_proj", LoraTarget.O => "o_proj",
        LoraTarget.Gate => "gate_proj", LoraTarget.Up => "up_proj", _ => "down_proj",
    };

    public static (long In, long Out) Shape(LoraTarget t, ModelConfig c) => t switch
    {
        LoraTarget.Q => (c.HiddenSize, (long)c.NumHeads * c.HeadDim),
        LoraTarget.K or LoraTarget.V => (c.HiddenSize, (long)c.NumKvHeads * c.HeadDim),
        LoraTarget.O => ((long)c.NumHeads * c.HeadDim, c.HiddenSize),
        LoraTarget.Gate or LoraTarget.Up => (c.HiddenSize, c.IntermediateSize),
        _ => (c.IntermediateSize, c.HiddenSize),
    };

    /// <summary>PEFT's default LoRA targets for Llama-family models when a config names none.</summary>
    public static readonly string[] DefaultTargets = ["q_proj", "v_proj"];

    internal static LoraAdapter Read(AdapterMethod method, AdapterFolder f, string name, ModelConfig c, AdapterLimits limits)
    {
        var where = Path.Combine(f.Path, AdapterFolder.ConfigFile);
        int configRank = f.Int("r", 8);
        double alpha = f.Double("lora_alpha", configRank);
        bool rslora = f.Bool("use_rslora");
        var rankPattern = ModuleSelection.ReadPatterns(f, "rank_pattern", integers: true);
        var alphaPattern = ModuleSelection.ReadPatterns(f, "alpha_pattern", integers: false);
        var selected = Selection(f, c);
        // The scaling of a module (its full name) of rank r, as PEFT sets it: alpha_pattern, then alpha / r (or / sqrt(r) for rsLoRA).
        double Scale(string module, long r)
        {
            double moduleAlpha = ModuleSelection.Lookup(alphaPattern, module, where, "alpha_pattern") ?? alpha;
            return rslora ? moduleAlpha / Math.Sqrt(r) : moduleAlpha / r;
        }
        // DoRA, biases, embedding and LM head, saved modules; it also refuses config fields of variants not served.
        var variants = new LoraVariantReader(f, c, limits, Scale);

        var targets = Enum.GetValues<LoraTarget>().ToDictionary(ModuleName);
        var found = new Dictionary<(int, LoraTarget), (Tensor? A, Tensor? B)>();
        // Everything read is disposed if validation fails; what is kept is detached at the end.
        using var scope = torch.NewDisposeScope();
        foreach (var tensor in f.TensorNames.Order(StringComparer.Ordinal))
        {
            if (!AdapterFolder.TryParseLayerTensor(tensor, out var layer, out var module, out var rest) || !targets.TryGetValue(module, out var target))
            {
                variants.TakeModelTensor(tensor);
                continue;
            }
            if (layer >= c.NumLayers) throw new AdapterException($"{f.Path}: tensor '{tensor}' names layer {layer}, the base model has {c.NumLayers}");
            if (rest is not ("lora_A.weight" or "lora_B.weight"))
            {
                variants.TakeLayerTensor(tensor, layer, target, rest);
                continue;
            }
            found.TryGetValue((layer, target), out var pair);
            found[(layer, target)] = rest == "lora_A.weight" ? (Load(f, tensor), pair.B) : (pair.A, Load(f, tensor));
        }

        var weights = new (Tensor, Tensor)?[c.NumLayers, 7];
        foreach (var ((layer, target), (a, b)) in found.OrderBy(p => p.Key))
        {
            var module = FullName(layer, target);
            if (a is null || b is null) throw new AdapterException($"{f.Path}: {module} has lora_{(a is null ? "A" : "B")}.weight missing");
            var (inF, outF) = Shape(target, c);
            long r = a.shape[0];
            if (a.dim() != 2 || a.shape[1] != inF) throw new AdapterException($"{f.Path}: {module}.lora_A.weight has shape [{string.Join(",", a.shape)}], the base model needs [r,{inF}]");
            if (b.dim() != 2 || b.shape[0] != outF || b.shape[1] != r) throw new AdapterException($"{f.Path}: {module}.lora_B.weight has shape [{string.Join(",", b.shape)}], needs [{outF},{r}]");
            if (r < 1 || r > limits.MaxRank) throw new AdapterException($"{f.Path}: {module} has rank {r}, above the configured maximum of {limits.MaxRank}");
            if (!selected(layer, target))
                throw new AdapterException($"{where}: the weights include {module}, which the config does not target ({Describe(f)})");
            double? patternRank = ModuleSelection.Lookup(rankPattern, module, where, "rank_pattern");
            if (r != (patternRank ?? configRank))
                throw new AdapterException($"{where}: {module} has rank {r} in its tensors, but the config gives it rank {patternRank ?? configRank} " +
                    (patternRank is null ? "('r')" : "(from 'rank_pattern')"));
            weights[layer, (int)target] = (a, b.mul_(Scale(module, r)));
        }
        // PEFT gives every module the config targets a LoRA pair: one without weights is a mismatch too.
        for (int layer = 0; layer < c.NumLayers; layer++)
            foreach (var target in Enum.GetValues<LoraTarget>())
                if (selected(layer, target) && weights[layer, (int)target] is null)
                    throw new AdapterException($"{where}: the config targets {FullName(layer, target)} ({Describe(f)}), but the weights have no LoRA pair for it");
        var extras = variants.Finish(weights);
        if (found.Count == 0 && extras is null) throw new AdapterException($"{f.Path}: no LoRA weights found");
        foreach (var w in weights)
            if (w is var (wa, wb)) { wa.DetachFromDisposeScope(); wb.DetachFromDisposeScope(); }
        if (extras is not null) foreach (var t in extras.Tensors) t?.DetachFromDisposeScope();
        // Vocabulary-sized parts need a slot of the embeddings pool, which also holds the rest of such an adapter.
        var servedBy = extras is { NeedsVocabularySlot: true } ? LoraEmbeddingsMethod.Instance : method;
        return new LoraAdapter(servedBy, weights, extras) { Name = name, SourcePath = f.Path };
    }

    /// <summary>"model.layers.{layer}.self_attn.q_proj" and so on: the module's name in the base model.</summary>
    public static string FullName(int layer, LoraTarget target) =>
        $"model.layers.{layer}.{(target <= LoraTarget.O ? "self_attn" : "mlp")}.{ModuleName(target)}";

    /// <summary>Which (layer, target) pairs the config selects: target_modules (PEFT's default for
    /// Llama when absent), minus exclude_modules, within layers_to_transform.</summary>
    private static Func<int, LoraTarget, bool> Selection(AdapterFolder f, ModelConfig c)
    {
        var targets = ModuleSelection.Read(f, "target_modules");
        var excluded = ModuleSelection.Read(f, "exclude_modules");
        var layers = ModuleSelection.ReadLayers(f, "layers_to_transform", c.NumLayers);
        var cache = new Dictionary<(int, LoraTarget), bool>();
        return (layer, target) =>
        {
            if (cache.TryGetValue((layer, target), out var hit)) return hit;
            var module = FullName(layer, target);
            bool targeted = targets?.Matches(module) ?? DefaultTargets.Contains(ModuleName(target));
            return cache[(layer, target)] = targeted && (layers is null || layers.Contains(layer)) && excluded?.Matches(module) != true;
        };
    }

    private static string Describe(AdapterFolder f)
    {
        var targets = ModuleSelection.Read(f, "target_modules");
        var text = "target_modules " + (targets?.Description ?? $"absent, so PEFT's default [{string.Join(", ", DefaultTargets)}]");
        if (f.Config["layers_to_transform"] is { } layers) text += $", layers_to_transform {layers.ToJsonString()}";
        if (ModuleSelection.Read(f, "exclude_modules") is { } excluded) text += $", exclude_modules {excluded.Description}";
        return text;
    }

    private static Tensor Load(AdapterFolder f, string tensor)
    {
        var info = f.Info(tensor);
        if (info.DType is not (SafeTensors.SafeTensorDType.F32 or SafeTensors.SafeTensorDType.F16 or SafeTensors.SafeTensorDType.BF16))
            throw new AdapterException($"{f.Path}: tensor '{tensor}' has dtype {info.DType}; LoRA weights are F32, F16 or BF16");
        var t = f.Float(tensor);
        if (!AdapterFolder.AllFinite(t)) throw new AdapterException($"{f.Path}: tensor '{tensor}' holds NaN or infinite values");
        return t;
    }

    public override void PrepareForDevice(ScalarType dtype, bool pin)
    {
        if (_hostBlock is not null) return;
        Variants?.ConvertLarge(dtype);
        long total = Weights.Cast<(Tensor A, Tensor B)?>().Where(w => w is not null).Sum(w => w!.Value.A.NumberOfElements + w.Value.B.NumberOfElements);
        using (var plain = torch.empty([total], dtype))
            _hostBlock = pin ? plain.pin_memory() : plain.clone();
        UpRows = new Tensor?[Weights.GetLength(0), Weights.GetLength(1)];
        long offset = 0;
        Tensor Take(Tensor source, long rows, long cols)
        {
            var view = _hostBlock.narrow(0, offset, rows * cols).view(rows, cols);
            view.copy_(source);
            offset += rows * cols;
            return view;
        }
        for (int l = 0; l < Weights.GetLength(0); l++)
            for (int t = 0; t < Weights.GetLength(1); t++)
            {
                if (Weights[l, t] is not { } w) continue;
                long r = w.A.shape[0];
                var a = Take(w.A, r, w.A.shape[1]);
                var up = Take(w.B.t(), r, w.B.shape[0]);
                w.A.Dispose();
                w.B.Dispose();
                UpRows[l, t] = up;
                Weights[l, t] = (a, up.t());
            }
        _byteSize = total * _hostBlock.ElementSize + Bytes(Variants?.Tensors.Distinct() ?? []);
    }

    public override void Dispose()
    {
        foreach (var w in Weights)
            if (w is { } pair) { pair.A.Dispose(); pair.B.Dispose(); }
        if (UpRows is not null) foreach (var u in UpRows) u?.Dispose();
        _hostBlock?.Dispose();
        Variants?.Dispose();
    }
}

/// <summary>LoRA (Hu et al., 2021): y = W x + B A x * alpha/r on any subset of the decoder's linear layers.</summary>
public sealed class LoraMethod : AdapterMethod
{
    public override string Name => "lora";
    public override IReadOnlyList<string> PeftTypes { get; } = ["LORA"];

    public override Adapter Load(AdapterFolder folder, string name, ModelConfig model, AdapterLimits limits) =>
        LoraAdapter.Read(this, folder, name, model, limits);

    public override AdapterSlotPool CreatePool(LlamaModel model, AdapterLimits limits) => new LoraSlotPool(this, model, limits);

    public override long PoolBytes(ModelConfig c, AdapterLimits limits, ScalarType dtype) => LoraSlotPool.Bytes(c, limits, dtype);
}
