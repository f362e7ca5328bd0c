using System.Text.Json.Nodes;
using PeftServe.Core.Model;
using PeftServe.Core.SafeTensors;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Adapters.Lora;

/// <summary>Reads the parts of a PEFT LoRA folder beyond A and B on decoder linears (<see cref="LoraVariants"/>)
/// and refuses, naming the key or tensor, whatever would otherwise be served only in part: a config field
/// this server does not implement, or a tensor PEFT itself would not load (a DoRA magnitude without use_dora,
/// a bias the base layer does not have, ...). PEFT's file layout: decoder tensors are
/// "model.layers.N.(self_attn|mlp).X_proj.{lora_magnitude_vector, lora_B.bias, base_layer.bias, bias}", the
/// embedding's "model.embed_tokens.{lora_embedding_A, lora_embedding_B, lora_magnitude_vector, weight, base_layer.weight}",
/// the LM head's "lm_head.{lora_A.weight, lora_B.weight, lora_B.bias, lora_magnitude_vector, weight, base_layer.weight}".</summary>
internal sealed class LoraVariantReader
{
    private const string Embed = "model.embed_tokens", Head = "lm_head";

    private readonly AdapterFolder _f;
    private readonly ModelConfig _c;
    private readonly AdapterLimits _limits;
    private readonly Func<string, long, double> _scale;
    private readonly string _where;
    private readonly bool _useDora, _loraBias;
    /// <summary>The base model ties its LM head to the embedding and the adapter keeps them tied (ensure_weight_tying).</summary>
    private readonly bool _keepsTie;
    private readonly bool _listsEmbed, _listsHead;
    private readonly Dictionary<(int, LoraTarget), Tensor> _magnitude = [], _loraBiasRaw = [];
    private readonly Dictionary<(int, LoraTarget), (Tensor Bias, bool OnBaseLayer)> _trainedBias = [];
    private readonly Dictionary<string, Tensor> _model = new(StringComparer.Ordinal);   // embedding / LM head tensors by name
    private readonly Dictionary<string, WeightRowSummary> _copies = new(StringComparer.Ordinal);

    /// <param name="scale">The LoRA scaling of a module (its full name) of rank r: alpha/r or alpha/sqrt(r), per alpha_pattern.</param>
    public LoraVariantReader(AdapterFolder f, ModelConfig c, AdapterLimits limits, Func<string, long, double> scale)
    {
        _f = f;
        _c = c;
        _limits = limits;
        _scale = scale;
        _where = System.IO.Path.Combine(f.Path, AdapterFolder.ConfigFile);
        RefuseUnsupportedConfig();
        _useDora = f.Bool("use_dora");
        _loraBias = f.Bool("lora_bias");
        if (_useDora && _loraBias) throw new AdapterException($"{_where}: use_dora and lora_bias together are not valid (PEFT refuses them too)");
        if (f.String("bias") is { } bias && bias is not ("none" or "all" or "lora_only"))
            throw new AdapterException($"{_where}: bias '{bias}' is not one of none, all, lora_only");
        _keepsTie = c.TieWordEmbeddings && f.Bool("ensure_weight_tying");
        foreach (var module in ModulesToSave())
        {
            // PEFT matches an entry against the end of a module's name.
            if (module is "lm_head") _listsHead = true;
            else if (module is "embed_tokens" or "model.embed_tokens") _listsEmbed = true;
            else throw new AdapterException($"{_where}: modules_to_save '{module}' is not supported (only lm_head and embed_tokens are served)");
        }
    }

    private IEnumerable<string> ModulesToSave() => _f.Config["modules_to_save"] switch
    {
        null => [],
        JsonArray a => a.Select(x => x is JsonValue v && v.TryGetValue<string>(out var s) ? s
            : throw new AdapterException($"{_where}: modules_to_save must be a list of module names")),
        _ => throw new AdapterException($"{_where}: modules_to_save must be a list of module names"),
    };

    /// <summary>Config fields of LoRA variants this server does not compute: each would change the forward pass, so
    /// an adapter that sets one is refused, naming it.</summary>
    private void RefuseUnsupportedConfig()
    {
        string[] variants = ["trainable_token_indices", "layer_replication", "target_parameters", "alora_invocation_tokens", "velora_config",
            "kasa_config", "arrow_config", "use_bdlora", "monteclora_config"];
        foreach (var key in variants)
            if (IsSet(_f.Config[key])) throw new AdapterException($"{_where}: {key} is not supported");
        if (_f.Bool("use_qalora")) throw new AdapterException($"{_where}: use_qalora (QA-LoRA) is not supported");
        // These initialisations rewrite the base weights themselves (the adapter is relative to the rewritten ones).
        if (_f.Config["init_lora_weights"] is JsonValue init && init.TryGetValue<string>(out var how)
            && (how.StartsWith("pissa", StringComparison.OrdinalIgnoreCase) || how is "olora" or "corda" or "loftq" or "lora_ga"))
            throw new AdapterException($"{_where}: init_lora_weights '{how}' is not supported (it changes the base model's weights; " +
                                       "save the adapter with path_initial_model_for_weight_conversion to get a plain LoRA)");
    }

    private static bool IsSet(JsonNode? node) => node switch
    {
        null => false,
        JsonValue v when v.TryGetValue<bool>(out var b) => b,
        JsonArray a => a.Count > 0,
        JsonObject o => o.Count > 0,
        _ => true,
    };

    private static string ModuleName(int layer, LoraTarget t) => $"model.layers.{layer}.{(t <= LoraTarget.O ? "self_attn" : "mlp")}.{LoraAdapter.ModuleName(t)}";

    private bool BaseHasBias(LoraTarget t) => t switch
    {
        LoraTarget.Q or LoraTarget.K or LoraTarget.V => _c.QkvBias,
        LoraTarget.O => _c.OutputBias,
        _ => _c.MlpBias,
    };

    /// <summary>A float tensor of this shape, finite: a shape-only stand-in when the folder is opened for
    /// metadata, unless <paramref name="values"/> (a later check compares its values).</summary>
    private Tensor Load(string name, long[] shape, bool values = false)
    {
        var t = values ? _f.Values(name, shape) : _f.Float(name, shape);
        if (!AdapterFolder.AllFinite(t))
        {
            t.Dispose();
            throw new AdapterException($"{_f.Path}: tensor '{name}' holds NaN or infinite values");
        }
        return t;
    }

    /// <summary>A decoder tensor that is not lora_A/lora_B.weight; throws when it is none this server serves.</summary>
    public void TakeLayerTensor(string tensor, int layer, LoraTarget target, string rest)
    {
        long outF = LoraAdapter.Shape(target, _c).Out;
        var module = ModuleName(layer, target);
        switch (rest)
        {
            case "lora_magnitude_vector":
                if (!_useDora) throw new AdapterException($"{_f.Path}: tensor '{tensor}' is a DoRA magnitude, but use_dora is not set in {AdapterFolder.ConfigFile} (PEFT would ignore it)");
                _magnitude[(layer, target)] = Load(tensor, [outF]);
                break;
            case "lora_B.bias":
                if (!_loraBias) throw new AdapterException($"{_f.Path}: tensor '{tensor}' is lora_B's bias, but lora_bias is not set in {AdapterFolder.ConfigFile} (PEFT would ignore it)");
                _loraBiasRaw[(layer, target)] = Load(tensor, [outF]);
                break;
            case "base_layer.bias" or "bias":
                if (!BaseHasBias(target))
                    throw new AdapterException($"{_f.Path}: tensor '{tensor}' is a trained bias, but the base model's {LoraAdapter.ModuleName(target)} has no bias (PEFT would ignore it)");
                _trainedBias[(layer, target)] = (Load(tensor, [outF]), rest == "base_layer.bias");
                break;
            default:
                throw new AdapterException($"{_f.Path}: tensor '{tensor}' is not supported (a LoRA layer holds lora_A.weight, lora_B.weight, " +
                                           $"lora_B.bias, lora_magnitude_vector and a trained base_layer.bias; {module} has no '{rest}')");
        }
    }

    /// <summary>A tensor outside the decoder layers; throws unless it belongs to the embedding or the LM head.</summary>
    public void TakeModelTensor(string tensor)
    {
        long v = _c.VocabSize, h = _c.HiddenSize;
        switch (tensor)
        {
            case Embed + ".lora_embedding_A" or Embed + ".lora_embedding_B" or Head + ".lora_A.weight" or Head + ".lora_B.weight":
                var info = _f.Info(tensor);
                if (info.Shape.Length != 2) throw new AdapterException($"{_f.Path}: tensor '{tensor}' has shape [{string.Join(",", info.Shape)}], a LoRA matrix has two dimensions");
                // The rank is checked against its partner in Finish; here only the vocabulary/hidden side.
                long[] expected = tensor switch
                {
                    Embed + ".lora_embedding_A" => [info.Shape[0], v],
                    Embed + ".lora_embedding_B" => [h, info.Shape[1]],
                    Head + ".lora_A.weight" => [info.Shape[0], h],
                    _ => [v, info.Shape[1]],
                };
                _model[tensor] = Load(tensor, expected, values: _keepsTie);   // the tie check compares head and embedding LoRA
                break;
            case Embed + ".lora_magnitude_vector" or Head + ".lora_magnitude_vector":
                if (!_useDora) throw new AdapterException($"{_f.Path}: tensor '{tensor}' is a DoRA magnitude, but use_dora is not set in {AdapterFolder.ConfigFile} (PEFT would ignore it)");
                _model[tensor] = Load(tensor, [tensor.StartsWith(Embed, StringComparison.Ordinal) ? h : v]);
                break;
            case Head + ".lora_B.bias":
                if (!_loraBias) throw new AdapterException($"{_f.Path}: tensor '{tensor}' is lora_B's bias, but lora_bias is not set in {AdapterFolder.ConfigFile} (PEFT would ignore it)");
                _model[tensor] = Load(tensor, [v]);
                break;
            case Embed + ".weight" or Head + ".weight":
                // Both saved on a tied base: compared with each other.
                _model[tensor] = Load(tensor, [v, h], values: _c.TieWordEmbeddings && _f.Contains(Embed + ".weight") && _f.Contains(Head + ".weight"));
                break;
            case Embed + ".base_layer.weight" or Head + ".base_layer.weight":
                using (var copy = Load(tensor, [v, h], values: true))
                    _copies[tensor] = WeightRowSummary.Of(tensor, copy, _f.Info(tensor).DType.ToScalarType());
                break;
            default:
                throw new AdapterException($"{_f.Path}: tensor '{tensor}' is not a LoRA weight this server serves " +
                                           "(decoder q,k,v,o,gate,up,down_proj; embed_tokens; lm_head)");
        }
    }

    private Tensor? Take(string name) => _model.Remove(name, out var t) ? t : null;

    /// <summary>Checks the parts against each other and the LoRA weights read (<paramref name="weights"/>, with B
    /// already scaled), and returns them, or null when the adapter is plain LoRA. Disposes what it read on failure.</summary>
    public LoraVariants? Finish((Tensor A, Tensor B)?[,] weights)
    {
        var v = new LoraVariants(_c.NumLayers);
        try
        {
            FinishLinears(v, weights);
            FinishEmbedding(v);
            FinishLmHead(v);
            FinishSavedModules(v);
            if (_copies.Remove(Embed + ".base_layer.weight", out var embedCopy))
            {
                if (v.Embedding is null) throw new AdapterException($"{_f.Path}: tensor '{embedCopy.TensorName}' is the base embedding saved beside LoRA on it, but the file has no lora_embedding_A/B");
                v.EmbeddingCopy = embedCopy;
            }
            if (_copies.Remove(Head + ".base_layer.weight", out var headCopy))
            {
                if (v.LmHead is null) throw new AdapterException($"{_f.Path}: tensor '{headCopy.TensorName}' is the base LM head saved beside LoRA on it, but the file has no lm_head.lora_A/B");
                v.LmHeadCopy = headCopy;
            }
            if (_model.Keys.FirstOrDefault() is { } left)
                throw new AdapterException($"{_f.Path}: tensor '{left}' has no partner (LoRA on the embedding needs lora_embedding_A and _B, on lm_head lora_A and lora_B)");
            if (v.NeedsVocabularySlot && _limits.EmbeddingSlots < 1)
                throw new AdapterException($"{_f.Path}: the adapter has vocabulary-sized parts (embed_tokens or lm_head), and this server keeps no slots for them (EmbeddingSlots is 0)");
            if (v.IsEmpty) { v.Dispose(); return null; }
            return v;
        }
        catch
        {
            v.Dispose();
            foreach (var t in _model.Values.Concat(_magnitude.Values).Concat(_loraBiasRaw.Values).Concat(_trainedBias.Values.Select(b => b.Bias))) t.Dispose();
            throw;
        }
    }

    private void FinishLinears(LoraVariants v, (Tensor A, Tensor B)?[,] weights)
    {
        for (int l = 0; l < _c.NumLayers; l++)
            foreach (var t in Enum.GetValues<LoraTarget>())
            {
                var module = ModuleName(l, t);
                bool hasLora = weights[l, (int)t] is not null;
                if (_magnitude.Remove((l, t), out var m))
                {
                    if (!hasLora) { m.Dispose(); throw new AdapterException($"{_f.Path}: {module}.lora_magnitude_vector has no lora_A/lora_B beside it"); }
                    v.Magnitude[l, (int)t] = m;
                }
                else if (_useDora && hasLora)
                    throw new AdapterException($"{_f.Path}: use_dora is set, but {module} has no lora_magnitude_vector");
                if (_loraBiasRaw.Remove((l, t), out var b))
                {
                    if (weights[l, (int)t] is not { } w) { b.Dispose(); throw new AdapterException($"{_f.Path}: {module}.lora_B.bias has no lora_A/lora_B beside it"); }
                    v.LoraBias[l, (int)t] = b.mul_(_scale(module, w.A.shape[0]));
                }
                if (_trainedBias.Remove((l, t), out var trained))
                {
                    // PEFT keeps a targeted layer's own bias under base_layer.bias: the other spelling would not be loaded.
                    if (trained.OnBaseLayer != hasLora)
                    {
                        trained.Bias.Dispose();
                        throw new AdapterException(hasLora
                            ? $"{_f.Path}: {module}.bias names the bias of a layer LoRA wraps, which PEFT keeps as {module}.base_layer.bias (PEFT would ignore it)"
                            : $"{_f.Path}: {module}.base_layer.bias names the bias of a layer without LoRA weights, which PEFT keeps as {module}.bias (PEFT would ignore it)");
                    }
                    v.TrainedBias[l, (int)t] = trained.Bias;
                }
            }
    }

    private void FinishEmbedding(LoraVariants v)
    {
        var a = Take(Embed + ".lora_embedding_A");   // [r, V]
        var b = Take(Embed + ".lora_embedding_B");   // [hidden, r]
        var m = Take(Embed + ".lora_magnitude_vector");
        if (a is null != b is null)
        {
            a?.Dispose(); b?.Dispose(); m?.Dispose();
            throw new AdapterException($"{_f.Path}: {Embed} has lora_embedding_{(a is null ? "A" : "B")} missing");
        }
        if (a is null || b is null)
        {
            if (m is not null) { m.Dispose(); throw new AdapterException($"{_f.Path}: {Embed}.lora_magnitude_vector has no lora_embedding_A/B beside it"); }
            return;
        }
        long r = a.shape[0];
        CheckRank(Embed, r, b.shape[1], "lora_embedding_B", a, b, m);
        double s = _scale(Embed, r);
        v.Embedding = (a.t().contiguous(), b.mul(s).t().contiguous());
        a.Dispose();
        b.Dispose();
        if (_useDora && m is null) throw new AdapterException($"{_f.Path}: use_dora is set, but {Embed} has no lora_magnitude_vector");
        v.EmbeddingMagnitude = m;
    }

    private void FinishLmHead(LoraVariants v)
    {
        var a = Take(Head + ".lora_A.weight");   // [r, hidden]
        var b = Take(Head + ".lora_B.weight");   // [V, r]
        var m = Take(Head + ".lora_magnitude_vector");
        var bias = Take(Head + ".lora_B.bias");
        if (a is null != b is null)
        {
            a?.Dispose(); b?.Dispose(); m?.Dispose(); bias?.Dispose();
            throw new AdapterException($"{_f.Path}: {Head} has lora_{(a is null ? "A" : "B")}.weight missing");
        }
        // Where the base ties its LM head to the embedding and the adapter keeps the tie, PEFT gives lm_head the
        // embedding's LoRA, transposed: its A is lora_embedding_B^T, its B lora_embedding_A^T (with lm_head's own scaling).
        if (_keepsTie && v.Embedding is { } e)
        {
            long r = e.AT.shape[1];
            double s = _scale(Head, r), sEmbed = _scale(Embed, r);
            var tiedA = (e.ScaledBT / sEmbed).contiguous();             // lora_embedding_B^T [r, hidden]
            var tiedBT = (e.AT.t() * s).contiguous();                    // s · lora_embedding_A [r, V]
            if (a is not null && b is not null)
            {
                bool same = torch.allclose(a, tiedA, 1e-5, 1e-7) && torch.allclose(b.t() * s, tiedBT, 1e-5, 1e-7);
                a.Dispose();
                b.Dispose();
                if (!same)
                {
                    tiedA.Dispose(); tiedBT.Dispose(); m?.Dispose(); bias?.Dispose();
                    throw new AdapterException($"{_f.Path}: ensure_weight_tying keeps lm_head's LoRA tied to the embedding's, but lm_head.lora_A/B differ from lora_embedding_B/A");
                }
            }
            a = null;
            b = null;
            v.LmHead = (tiedA, tiedBT);
        }
        if (a is not null && b is not null)
        {
            long r = a.shape[0];
            CheckRank(Head, r, b.shape[1], "lora_B.weight", a, b, m, bias);
            double s = _scale(Head, r);
            v.LmHead = (a, b.mul_(s).t().contiguous());
            b.Dispose();
        }
        if (v.LmHead is { } head)
        {
            if (_useDora && m is null) throw new AdapterException($"{_f.Path}: use_dora is set, but {Head} has no lora_magnitude_vector");
            v.LmHeadMagnitude = m;
            if (bias is not null) v.LmHeadLoraBias = bias.mul_(_scale(Head, head.A.shape[0]));
        }
        else if (m is not null || bias is not null)
        {
            m?.Dispose();
            bias?.Dispose();
            throw new AdapterException($"{_f.Path}: {Head}.{(m is not null ? "lora_magnitude_vector" : "lora_B.bias")} has no lora_A/lora_B beside it");
        }
    }

    private void CheckRank(string module, long r, long partnerRank, string partner, params Tensor?[] parts)
    {
        string? error = null;
        if (partnerRank != r) error = $"{_f.Path}: {module}.{partner} has rank {partnerRank}, its partner rank {r}";
        else if (r < 1 || r > _limits.MaxRank) error = $"{_f.Path}: {module} has rank {r}, above the configured maximum of {_limits.MaxRank}";
        if (error is null) return;
        foreach (var p in parts) p?.Dispose();
        throw new AdapterException(error);
    }

    /// <summary>Saved modules, as PEFT applies them: one listed in modules_to_save replaces its own module only
    /// (PEFT wraps a deep copy), unless the base ties embedding and LM head and the adapter keeps them tied
    /// (ensure_weight_tying), when one matrix serves both; a saved embed_tokens.weight or lm_head.weight that is
    /// not listed is loaded into the base model's parameter itself, so on a tied base it changes both.</summary>
    private void FinishSavedModules(LoraVariants v)
    {
        var embed = Take(Embed + ".weight");
        var head = Take(Head + ".weight");
        try
        {
            if (_keepsTie && (embed is not null || head is not null || _listsEmbed || _listsHead))
            {
                if (embed is not null && head is not null && !torch.allclose(embed, head, 0, 0))
                    throw new AdapterException($"{_f.Path}: ensure_weight_tying keeps lm_head tied to embed_tokens, but the file holds two different matrices for them");
                var shared = embed ?? head ?? throw new AdapterException(
                    $"{_where}: modules_to_save lists {(_listsEmbed ? "embed_tokens" : "lm_head")}, but the file has no {Embed}.weight or {Head}.weight");
                if (embed is not null && head is not null) { head.Dispose(); head = null; }
                v.SavedEmbedding = v.SavedLmHead = shared;
            }
            else
            {
                if (_listsEmbed && embed is null) throw new AdapterException($"{_where}: modules_to_save lists embed_tokens, but the file has no tensor '{Embed}.weight'");
                if (_listsHead && head is null) throw new AdapterException($"{_where}: modules_to_save lists lm_head, but the file has no tensor '{Head}.weight'");
                bool tiedBase = _c.TieWordEmbeddings;
                // Neither listed: both would be loaded into the one tied parameter, the later over the earlier.
                if (embed is not null && head is not null && tiedBase && !_listsEmbed && !_listsHead && !torch.allclose(embed, head, 0, 0))
                    throw new AdapterException($"{_f.Path}: the base model ties lm_head to embed_tokens, and the file holds different {Embed}.weight and {Head}.weight, " +
                                               "neither in modules_to_save: PEFT would load one over the other");
                v.SavedEmbedding = embed ?? (tiedBase && !_listsHead ? head : null);
                v.SavedLmHead = head ?? (tiedBase && !_listsEmbed ? embed : null);
            }
            embed = head = null;
            if (v.SavedEmbedding is not null && v.Embedding is not null)
                throw new AdapterException($"{_f.Path}: the file holds both a saved embed_tokens and LoRA on it");
            if (v.SavedLmHead is not null && v.LmHead is not null)
                throw new AdapterException($"{_f.Path}: the file holds both a saved lm_head and LoRA on it");
        }
        catch
        {
            embed?.Dispose();
            head?.Dispose();
            throw;
        }
    }
}
