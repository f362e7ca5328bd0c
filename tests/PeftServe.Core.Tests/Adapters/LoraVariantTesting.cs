using PeftServe.Core.Model;
using PeftServe.Core.SafeTensors;
using PeftServe.Tests;
using TorchSharp;
using static TorchSharp.torch;
using static PeftServe.Core.Tests.Adapters.OurAdapterTesting;

namespace PeftServe.Core.Tests.Adapters;

/// <summary>Two variants of the tiny Llama written for these tests: one with a bias on every projection
/// (attention_bias and mlp_bias, random values), one whose LM head is tied to the embedding
/// (tie_word_embeddings, no lm_head.weight). Each is loaded as the server loads it and as the float64
/// reference reads it.</summary>
public sealed class VariantModelsFixture : IDisposable
{
    private readonly string _root = Directory.CreateTempSubdirectory("peftserve-variant-models-").FullName;

    public string BiasedDir { get; }
    public string TiedDir { get; }
    public LlamaModel Biased { get; }
    public LlamaModel Tied { get; }
    internal ReferenceLlama BiasedReference { get; }
    internal ReferenceLlama TiedReference { get; }

    public VariantModelsFixture()
    {
        BiasedDir = Write("biased", (config, tensors) =>
        {
            config["attention_bias"] = true;
            config["mlp_bias"] = true;
            var rng = new Random(5);
            var m = ReferenceLlama.Tiny;
            for (int l = 0; l < m.Layers; l++)
                foreach (var (module, size) in new[] { ("self_attn.q_proj", m.Heads * m.HeadDim), ("self_attn.k_proj", m.KvHeads * m.HeadDim),
                             ("self_attn.v_proj", m.KvHeads * m.HeadDim), ("self_attn.o_proj", m.Hidden), ("mlp.gate_proj", m.Intermediate),
                             ("mlp.up_proj", m.Intermediate), ("mlp.down_proj", m.Hidden) })
                    tensors[$"model.layers.{l}.{module}.bias"] = torch.tensor(OurAdapterTesting.Random(rng, size, 0.3).Select(x => (float)x).ToArray());
        });
        TiedDir = Write("tied", (config, tensors) =>
        {
            config["tie_word_embeddings"] = true;
            tensors.Remove("lm_head.weight", out var head);
            head!.Dispose();
        });
        Biased = LlamaModel.Load(BiasedDir, new ModelOptions());
        Tied = LlamaModel.Load(TiedDir, new ModelOptions());
        BiasedReference = ReferenceLlama.Load(BiasedDir);
        TiedReference = ReferenceLlama.Load(TiedDir);
    }

    private string Write(string name, Action<System.Text.Json.Nodes.JsonObject, Dictionary<string, Tensor>> change)
    {
        var dir = Path.Combine(_root, name);
        Directory.CreateDirectory(dir);
        var config = (System.Text.Json.Nodes.JsonObject)System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(TestData.TinyLlamaDir, "config.json")))!;
        Dictionary<string, Tensor> tensors;
        using (var file = SafeTensorsFile.Open(Path.Combine(TestData.TinyLlamaDir, "model.safetensors")))
            tensors = file.Tensors.ToDictionary(t => t.Name, t => file.ToTensor(t.Name));
        change(config, tensors);
        File.WriteAllText(Path.Combine(dir, "config.json"), config.ToJsonString());
        SafeTensorsWriter.Write(Path.Combine(dir, "model.safetensors"), tensors);
        foreach (var t in tensors.Values) t.Dispose();
        return dir;
    }

    public void Dispose()
    {
        Biased.Dispose();
        Tied.Dispose();
        Directory.Delete(_root, recursive: true);
    }
}

/// <summary>A PEFT LoRA adapter as the test builds it, with any of the variants PEFT saves, written in PEFT's
/// layout, and its logits computed from PEFT's formulas in float64 on <see cref="Base"/> (LoRA: W x + b + s B A x;
/// DoRA: (m / ||W + s B A||) ⊙ (W x + s B A x) + b, the norm per output row, per hidden unit over the vocabulary
/// for the embedding; trained biases replace the base's; lora_bias adds s · b; saved modules replace theirs).
/// Every value is float32-exact, so the reference uses the very numbers the server reads.</summary>
internal sealed class LoraVariantSpec
{
    public static readonly string[] Targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

    public required ReferenceLlama Base { get; init; }
    public int Rank { get; init; } = 4;
    public double Alpha { get; init; } = 8;
    public bool RsLora { get; init; }
    public Dictionary<string, double> AlphaPattern { get; init; } = [];
    public Dictionary<string, int> RankPattern { get; init; } = [];
    public bool UseDora { get; init; }
    public bool LoraBias { get; init; }
    public string Bias { get; init; } = "none";
    public bool EnsureWeightTying { get; init; }
    public List<string>? ModulesToSave { get; init; }
    /// <summary>Write PEFT's copy of the base embedding / LM head beside LoRA on them (base_layer.weight), as save_pretrained does.</summary>
    public bool WriteBaseCopies { get; init; } = true;

    public Dictionary<(int Layer, string Module), (double[][] A, double[][] B)> Linear { get; } = [];
    public Dictionary<(int Layer, string Module), double[]> Magnitude { get; } = [];
    public Dictionary<(int Layer, string Module), double[]> LoraBBias { get; } = [];
    /// <summary>Trained biases; saved as base_layer.bias where the module has LoRA, as bias where not (PEFT's keys).</summary>
    public Dictionary<(int Layer, string Module), double[]> TrainedBias { get; } = [];
    public (double[][] A, double[][] B)? EmbedLora { get; set; }   // lora_embedding_A [r,V], lora_embedding_B [hidden,r]
    public double[]? EmbedMagnitude { get; set; }
    public (double[][] A, double[][] B)? HeadLora { get; set; }    // lora_A [r,hidden], lora_B [V,r]
    public double[]? HeadMagnitude { get; set; }
    public double[]? HeadLoraBias { get; set; }
    public double[][]? SavedEmbed { get; set; }
    public double[][]? SavedHead { get; set; }

    public static string Block(string module) => module is "gate_proj" or "up_proj" or "down_proj" ? "mlp" : "self_attn";
    public static string ModuleName(int layer, string module) => $"model.layers.{layer}.{Block(module)}.{module}";

    public (int In, int Out) Shape(string module)
    {
        var m = Base;
        return module switch
        {
            "q_proj" => (m.Hidden, m.Heads * m.HeadDim),
            "k_proj" or "v_proj" => (m.Hidden, m.KvHeads * m.HeadDim),
            "o_proj" => (m.Heads * m.HeadDim, m.Hidden),
            "gate_proj" or "up_proj" => (m.Hidden, m.Intermediate),
            _ => (m.Intermediate, m.Hidden),
        };
    }

    public int RankOf(string module) => RankPattern.FirstOrDefault(p => System.Text.RegularExpressions.Regex.IsMatch(module, $"(^|\\.)({p.Key})$")).Value is var r && r > 0 ? r : Rank;

    /// <summary>PEFT's scaling of a module: alpha (alpha_pattern first) over r, or over sqrt(r) with rsLoRA.</summary>
    public double Scale(string module, int r)
    {
        double alpha = AlphaPattern.FirstOrDefault(p => System.Text.RegularExpressions.Regex.IsMatch(module, $"(^|\\.)({p.Key})$")).Value is var a && a != 0 ? a : Alpha;
        return RsLora ? alpha / Math.Sqrt(r) : alpha / r;
    }

    // ---- building ----

    /// <summary>Random LoRA on <paramref name="modules"/> of <paramref name="layers"/> (every layer by default), with
    /// DoRA magnitudes (the weight row norms PEFT starts from, times random factors) when <see cref="UseDora"/>.</summary>
    public LoraVariantSpec WithLinear(int seed, string[] modules, int[]? layers = null, double scale = 0.3)
    {
        var rng = new Random(seed);
        foreach (int l in layers ?? Enumerable.Range(0, Base.Layers).ToArray())
            foreach (var module in modules)
            {
                var (inF, outF) = Shape(module);
                int r = RankOf(ModuleName(l, module));
                Linear[(l, module)] = (RandomMatrix(rng, r, inF, scale), RandomMatrix(rng, outF, r, scale));
                if (UseDora)
                {
                    var w = Base.Matrix(ModuleName(l, module) + ".weight");
                    Magnitude[(l, module)] = w.Select(row => (double)(float)(Norm(row) * (0.6 + 0.8 * rng.NextDouble()))).ToArray();
                }
                if (LoraBias) LoraBBias[(l, module)] = OurAdapterTesting.Random(rng, outF, 0.3);
            }
        return this;
    }

    public LoraVariantSpec WithTrainedBiases(int seed, string[] modules, int[]? layers = null)
    {
        var rng = new Random(seed);
        foreach (int l in layers ?? Enumerable.Range(0, Base.Layers).ToArray())
            foreach (var module in modules) TrainedBias[(l, module)] = OurAdapterTesting.Random(rng, Shape(module).Out, 0.5);
        return this;
    }

    public LoraVariantSpec WithEmbedLora(int seed, double scale = 0.5)
    {
        var rng = new Random(seed);
        EmbedLora = (RandomMatrix(rng, Rank, Base.Vocab, scale), RandomMatrix(rng, Base.Hidden, Rank, scale));
        if (UseDora) EmbedMagnitude = Enumerable.Range(0, Base.Hidden)
            .Select(j => (double)(float)(Norm(Base.Matrix("model.embed_tokens.weight").Select(row => row[j]).ToArray()) * (0.6 + 0.8 * rng.NextDouble()))).ToArray();
        return this;
    }

    public LoraVariantSpec WithHeadLora(int seed, double scale = 0.5)
    {
        var rng = new Random(seed);
        HeadLora = (RandomMatrix(rng, Rank, Base.Hidden, scale), RandomMatrix(rng, Base.Vocab, Rank, scale));
        if (UseDora) HeadMagnitude = Base.Matrix("lm_head.weight").Select(row => (double)(float)(Norm(row) * (0.6 + 0.8 * rng.NextDouble()))).ToArray();
        if (LoraBias) HeadLoraBias = OurAdapterTesting.Random(rng, Base.Vocab, 0.5);
        return this;
    }

    /// <summary>A trained copy of the embedding (or LM head): the base's plus random noise.</summary>
    public double[][] TrainedCopyOf(string tensor, int seed, double noise = 0.5)
    {
        var rng = new Random(seed);
        return Base.Matrix(tensor).Select(row => row.Select(x => (double)(float)(x + noise * (rng.NextDouble() * 2 - 1))).ToArray()).ToArray();
    }

    private static double Norm(double[] v) => Math.Sqrt(v.Sum(x => x * x));

    // ---- the files ----

    public Dictionary<string, object?> Config() => new()
    {
        ["peft_type"] = "LORA",
        ["task_type"] = "CAUSAL_LM",
        ["r"] = Rank,
        ["lora_alpha"] = Alpha,
        ["use_rslora"] = RsLora,
        ["use_dora"] = UseDora,
        ["lora_bias"] = LoraBias,
        ["bias"] = Bias,
        ["ensure_weight_tying"] = EnsureWeightTying,
        ["modules_to_save"] = ModulesToSave,
        ["alpha_pattern"] = AlphaPattern,
        ["rank_pattern"] = RankPattern,
        ["target_modules"] = Linear.Keys.Select(k => k.Module).Distinct()
            .Concat(EmbedLora is null ? [] : ["embed_tokens"]).Concat(HeadLora is null ? [] : ["lm_head"]).ToArray(),
        // LoRA on some layers only: say which, as PEFT's config must (target_modules alone would claim every layer).
        ["layers_to_transform"] = Linear.Keys.Select(k => k.Layer).Distinct().Order().ToArray() is { Length: > 0 } layers && layers.Length < Base.Layers ? layers : null,
        ["init_lora_weights"] = true,
        ["peft_version"] = "0.21.0",
    };

    public IEnumerable<FileTensor> Tensors()
    {
        foreach (var ((l, module), (a, b)) in Linear)
        {
            var p = ModuleName(l, module);
            yield return FileTensor.Of(p + ".lora_A.weight", a);
            yield return FileTensor.Of(p + ".lora_B.weight", b);
            if (Magnitude.TryGetValue((l, module), out var m)) yield return FileTensor.Of(p + ".lora_magnitude_vector", m);
            if (LoraBBias.TryGetValue((l, module), out var bias)) yield return FileTensor.Of(p + ".lora_B.bias", bias);
        }
        foreach (var ((l, module), bias) in TrainedBias)
            yield return FileTensor.Of(ModuleName(l, module) + (Linear.ContainsKey((l, module)) ? ".base_layer.bias" : ".bias"), bias);
        if (EmbedLora is { } e)
        {
            yield return FileTensor.Of("model.embed_tokens.lora_embedding_A", e.A);
            yield return FileTensor.Of("model.embed_tokens.lora_embedding_B", e.B);
            if (EmbedMagnitude is { } m) yield return FileTensor.Of("model.embed_tokens.lora_magnitude_vector", m);
            if (WriteBaseCopies) yield return FileTensor.Of("model.embed_tokens.base_layer.weight", Base.Matrix("model.embed_tokens.weight"));
        }
        if (HeadLora is { } h)
        {
            yield return FileTensor.Of("lm_head.lora_A.weight", h.A);
            yield return FileTensor.Of("lm_head.lora_B.weight", h.B);
            if (HeadMagnitude is { } m) yield return FileTensor.Of("lm_head.lora_magnitude_vector", m);
            if (HeadLoraBias is { } b) yield return FileTensor.Of("lm_head.lora_B.bias", b);
            if (WriteBaseCopies) yield return FileTensor.Of("lm_head.base_layer.weight", Base.Matrix("lm_head.weight"));
        }
        if (SavedEmbed is { } se) yield return FileTensor.Of("model.embed_tokens.weight", se);
        if (SavedHead is { } sh) yield return FileTensor.Of("lm_head.weight", sh);
    }

    public string Write(string root, string name) => WriteAdapter(root, name, Config(), Tensors());

    // ---- PEFT's formulas ----

    /// <summary>The reference hooks. <paramref name="inputEmbedding"/> and <paramref name="lmHead"/> are the matrices
    /// the test expects the adapter to serve in place of the base's (null: the base's own, plus any LoRA on it);
    /// <paramref name="headLora"/> overrides the LM head's LoRA (PEFT's tied LoRA).</summary>
    public ReferenceHooks Hooks(double[][]? inputEmbedding = null, double[][]? lmHead = null, (double[][] A, double[][] B)? headLora = null)
    {
        var linearNorms = new Dictionary<(int, string), double[]>();
        foreach (var key in Magnitude.Keys)
        {
            var (a, b) = Linear[key];
            var w = Base.Matrix(ModuleName(key.Layer, key.Module) + ".weight");
            linearNorms[key] = RowNorms(w, a, b, Scale(ModuleName(key.Layer, key.Module), a.Length));
        }
        double[]? embedScale = null;
        if (EmbedLora is { } e && EmbedMagnitude is { } em)
        {
            // DoRA on the embedding: the norm of each hidden column of E + s (B A)^T, over the vocabulary.
            double s = Scale("model.embed_tokens", e.A.Length);
            var E = Base.Matrix("model.embed_tokens.weight");
            embedScale = new double[Base.Hidden];
            for (int j = 0; j < Base.Hidden; j++)
            {
                double sum = 0;
                for (int v = 0; v < Base.Vocab; v++)
                {
                    double d = E[v][j];
                    for (int k = 0; k < e.A.Length; k++) d += s * e.B[j][k] * e.A[k][v];
                    sum += d * d;
                }
                embedScale[j] = em[j] / Math.Sqrt(sum);
            }
        }
        var head = headLora ?? HeadLora;
        double[]? headScale = null;
        if (head is { } hl && HeadMagnitude is { } hm)
        {
            var n = RowNorms(Base.Matrix("lm_head.weight"), hl.A, hl.B, Scale("lm_head", hl.A.Length));
            headScale = hm.Select((m, v) => m / n[v]).ToArray();
        }

        return new ReferenceHooks
        {
            ProjectionOf = (layer, module, x, y) =>
            {
                var key = (layer, module);
                bool lora = Linear.TryGetValue(key, out var w);
                bool trained = TrainedBias.TryGetValue(key, out var bias);
                if (!lora && !trained) return y;
                var name = ModuleName(layer, module);
                var b0 = Base.HasVector(name + ".bias") ? Base.Vector(name + ".bias") : new double[y.Length];
                var core = y.Select((v, i) => v - b0[i]).ToArray();                                   // W x
                if (lora)
                {
                    double s = Scale(name, w.A.Length);
                    var ba = ReferenceLlama.MatVec(w.B, ReferenceLlama.MatVec(w.A, x));
                    for (int i = 0; i < core.Length; i++) core[i] += s * ba[i];
                    if (Magnitude.TryGetValue(key, out var m))
                        for (int i = 0; i < core.Length; i++) core[i] *= m[i] / linearNorms[key][i];
                    if (LoraBBias.TryGetValue(key, out var lb))
                        for (int i = 0; i < core.Length; i++) core[i] += s * lb[i];
                }
                var b = trained ? bias! : b0;
                return core.Select((v, i) => v + b[i]).ToArray();
            },
            TokenEmbedding = inputEmbedding is not null ? (id, _) => (double[])inputEmbedding[id].Clone()
                : EmbedLora is not { } el ? null : (id, row) =>
                {
                    double s = Scale("model.embed_tokens", el.A.Length);
                    var result = (double[])row.Clone();
                    for (int j = 0; j < result.Length; j++)
                        for (int k = 0; k < el.A.Length; k++) result[j] += s * el.B[j][k] * el.A[k][id];
                    if (embedScale is not null) for (int j = 0; j < result.Length; j++) result[j] *= embedScale[j];
                    return result;
                },
            Logits = lmHead is not null ? (h, _) => ReferenceLlama.MatVec(lmHead, h)
                : head is not { } hh ? null : (h, logits) =>
                {
                    double s = Scale("lm_head", hh.A.Length);
                    var ba = ReferenceLlama.MatVec(hh.B, ReferenceLlama.MatVec(hh.A, h));
                    var result = logits.Select((v, i) => v + s * ba[i]).ToArray();
                    if (headScale is not null) for (int v = 0; v < result.Length; v++) result[v] *= headScale[v];
                    if (HeadLoraBias is { } hb) for (int v = 0; v < result.Length; v++) result[v] += s * hb[v];
                    return result;
                },
        };
    }

    /// <summary>||W[o] + s (B A)[o]|| for every output row o.</summary>
    private static double[] RowNorms(double[][] w, double[][] a, double[][] b, double s)
    {
        var norms = new double[w.Length];
        for (int o = 0; o < w.Length; o++)
        {
            double sum = 0;
            for (int i = 0; i < w[o].Length; i++)
            {
                double d = w[o][i];
                for (int k = 0; k < a.Length; k++) d += s * b[o][k] * a[k][i];
                sum += d * d;
            }
            norms[o] = Math.Sqrt(sum);
        }
        return norms;
    }
}
