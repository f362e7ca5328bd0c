using System.Text.Json;
using PeftServe.Core.SafeTensors;
using PeftServe.Tests;
using static TorchSharp.torch;

namespace PeftServe.Core.Tests.Adapters;

/// <summary>Where an adapter's formula enters <see cref="ReferenceLlama"/>'s forward pass. Each hook gets
/// one position's vector and returns the vector to carry on with; a null hook changes nothing.</summary>
internal sealed class ReferenceHooks
{
    /// <summary>(layer, RMSNorm output feeding q/k/v) -> vector fed to q/k/v.</summary>
    public Func<int, double[], double[]>? AfterInputNorm { get; init; }
    /// <summary>(layer, RMSNorm output feeding gate/up) -> vector fed to gate/up.</summary>
    public Func<int, double[], double[]>? AfterPostAttentionNorm { get; init; }
    /// <summary>(layer, "q_proj".."down_proj", that projection's output) -> output to use.</summary>
    public Func<int, string, double[], double[]>? Projection { get; init; }
    /// <summary>(layer, "q_proj".."down_proj", the projection's input x, its output W x + b) -> output to use
    /// (LoRA-type formulas need x); runs before <see cref="Projection"/>.</summary>
    public Func<int, string, double[], double[], double[]>? ProjectionOf { get; init; }
    /// <summary>(token id, its embedding row) -> the embedding to use.</summary>
    public Func<int, double[], double[]>? TokenEmbedding { get; init; }
    /// <summary>(final-normed hidden state, the LM head's logits) -> logits to use.</summary>
    public Func<double[], double[], double[]>? Logits { get; init; }
    /// <summary>(layer, attention block output = o_proj result) -> what is added to the residual stream.</summary>
    public Func<int, double[], double[]>? AttentionBlockOutput { get; init; }
    /// <summary>(layer, MLP block output = down_proj result) -> what is added to the residual stream.</summary>
    public Func<int, double[], double[]>? MlpBlockOutput { get; init; }
}

/// <summary>An independent, deliberately plain Llama forward pass for checking the server's math: float64,
/// one sequence at a time, positions 0..T-1, no KV cache, no batching, no fused projections. It reads
/// config.json and model.safetensors itself and shares no code with PeftServe.Core.Model. Projections
/// add their bias where the checkpoint has one.</summary>
internal sealed class ReferenceLlama
{
    private static readonly Lazy<ReferenceLlama> TinyInstance = new(() => Load(TestData.TinyLlamaDir));
    /// <summary>The tiny test model (the fixtures' base model).</summary>
    public static ReferenceLlama Tiny => TinyInstance.Value;

    public int Hidden { get; private init; }
    public int Layers { get; private init; }
    public int Heads { get; private init; }
    public int KvHeads { get; private init; }
    public int HeadDim { get; private init; }
    public int Intermediate { get; private init; }
    public int Vocab { get; private init; }
    public double Eps { get; private init; }
    public double Theta { get; private init; }

    private readonly Dictionary<string, double[][]> _matrices = [];   // [out][in]
    private readonly Dictionary<string, double[]> _vectors = [];

    public static ReferenceLlama Load(string dir)
    {
        using var doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(dir, "config.json")));
        var c = doc.RootElement;
        int hidden = c.GetProperty("hidden_size").GetInt32(), heads = c.GetProperty("num_attention_heads").GetInt32();
        double theta = c.TryGetProperty("rope_parameters", out var rope) ? rope.GetProperty("rope_theta").GetDouble()
            : c.TryGetProperty("rope_theta", out var t) ? t.GetDouble() : 10000.0;
        var model = new ReferenceLlama
        {
            Hidden = hidden,
            Layers = c.GetProperty("num_hidden_layers").GetInt32(),
            Heads = heads,
            KvHeads = c.GetProperty("num_key_value_heads").GetInt32(),
            HeadDim = c.TryGetProperty("head_dim", out var hd) ? hd.GetInt32() : hidden / heads,
            Intermediate = c.GetProperty("intermediate_size").GetInt32(),
            Vocab = c.GetProperty("vocab_size").GetInt32(),
            Eps = c.GetProperty("rms_norm_eps").GetDouble(),
            Theta = theta,
            Tied = c.TryGetProperty("tie_word_embeddings", out var tie) && tie.GetBoolean(),
        };
        bool tied = model.Tied;
        using var file = SafeTensorsFile.Open(Path.Combine(dir, "model.safetensors"));
        foreach (var info in file.Tensors)
        {
            using var tensor = file.ToTensor(info.Name, dtype: ScalarType.Float64);
            var data = tensor.data<double>().ToArray();
            if (info.Shape.Length == 1) model._vectors[info.Name] = data;
            else model._matrices[info.Name] = Rows(data, (int)info.Shape[0], (int)info.Shape[1]);
        }
        if (tied) model._matrices["lm_head.weight"] = model._matrices["model.embed_tokens.weight"];
        return model;
    }

    /// <summary>Splits a row-major [rows, cols] array into rows.</summary>
    public static double[][] Rows(double[] data, int rows, int cols) =>
        Enumerable.Range(0, rows).Select(r => data.AsSpan(r * cols, cols).ToArray()).ToArray();

    public double[][] Matrix(string name) => _matrices[name];
    public double[] Vector(string name) => _vectors[name];
    public bool HasVector(string name) => _vectors.ContainsKey(name);
    public bool Tied { get; private init; }

    /// <summary>Logits [T][V] of every position of <paramref name="ids"/>.</summary>
    public double[][] Logits(IReadOnlyList<int> ids, ReferenceHooks? hooks = null)
    {
        hooks ??= new ReferenceHooks();
        int n = ids.Count;
        var h = ids.Select(id => (double[])Matrix("model.embed_tokens.weight")[id].Clone()).ToArray();
        if (hooks.TokenEmbedding is { } embed) h = h.Select((e, t) => embed(ids[t], e)).ToArray();
        for (int layer = 0; layer < Layers; layer++)
        {
            string p = $"model.layers.{layer}.";
            double[] Project(string module, double[] x)
            {
                var block = module is "gate_proj" or "up_proj" or "down_proj" ? "mlp" : "self_attn";
                var y = MatVec(Matrix($"{p}{block}.{module}.weight"), x);
                if (_vectors.TryGetValue($"{p}{block}.{module}.bias", out var bias)) y = Add(y, bias);
                if (hooks.ProjectionOf is { } g) y = g(layer, module, x, y);
                return hooks.Projection is { } f ? f(layer, module, y) : y;
            }

            // Attention block.
            var q = new double[n][]; var k = new double[n][]; var v = new double[n][];
            for (int t = 0; t < n; t++)
            {
                var x = RmsNorm(h[t], Vector(p + "input_layernorm.weight"));
                if (hooks.AfterInputNorm is { } f) x = f(layer, x);
                q[t] = Rotate(Project("q_proj", x), Heads, t);
                k[t] = Rotate(Project("k_proj", x), KvHeads, t);
                v[t] = Project("v_proj", x);
            }
            var attnOut = new double[n][];
            for (int t = 0; t < n; t++)
            {
                var concat = new double[Heads * HeadDim];
                for (int head = 0; head < Heads; head++)
                {
                    int kvHead = head / (Heads / KvHeads);
                    var scores = new double[t + 1];
                    for (int j = 0; j <= t; j++)
                    {
                        double s = 0;
                        for (int d = 0; d < HeadDim; d++) s += q[t][head * HeadDim + d] * k[j][kvHead * HeadDim + d];
                        scores[j] = s / Math.Sqrt(HeadDim);
                    }
                    double max = scores.Max(), sum = 0;
                    for (int j = 0; j <= t; j++) sum += scores[j] = Math.Exp(scores[j] - max);
                    for (int j = 0; j <= t; j++)
                        for (int d = 0; d < HeadDim; d++) concat[head * HeadDim + d] += scores[j] / sum * v[j][kvHead * HeadDim + d];
                }
                attnOut[t] = Project("o_proj", concat);
                if (hooks.AttentionBlockOutput is { } f) attnOut[t] = f(layer, attnOut[t]);
            }
            for (int t = 0; t < n; t++) h[t] = Add(h[t], attnOut[t]);

            // MLP block.
            for (int t = 0; t < n; t++)
            {
                var x = RmsNorm(h[t], Vector(p + "post_attention_layernorm.weight"));
                if (hooks.AfterPostAttentionNorm is { } f) x = f(layer, x);
                var gate = Project("gate_proj", x);
                var up = Project("up_proj", x);
                var act = new double[Intermediate];
                for (int i = 0; i < Intermediate; i++) act[i] = gate[i] / (1 + Math.Exp(-gate[i])) * up[i];
                var down = Project("down_proj", act);
                if (hooks.MlpBlockOutput is { } g) down = g(layer, down);
                h[t] = Add(h[t], down);
            }
        }
        return h.Select(x =>
        {
            var normed = RmsNorm(x, Vector("model.norm.weight"));
            var logits = MatVec(Matrix("lm_head.weight"), normed);
            return hooks.Logits is { } f ? f(normed, logits) : logits;
        }).ToArray();
    }

    /// <summary>Greedy continuation: at each step the whole sequence is run again and the argmax of the
    /// last position's logits appended.</summary>
    public int[] Greedy(IReadOnlyList<int> prompt, int count, ReferenceHooks? hooks = null)
    {
        var seq = prompt.ToList();
        var generated = new List<int>();
        for (int i = 0; i < count; i++)
        {
            var last = Logits(seq, hooks)[^1];
            int best = 0;
            for (int j = 1; j < last.Length; j++) if (last[j] > last[best]) best = j;
            generated.Add(best);
            seq.Add(best);
        }
        return generated.ToArray();
    }

    private double[] RmsNorm(double[] x, double[] weight)
    {
        double ms = x.Sum(a => a * a) / x.Length;
        double scale = 1 / Math.Sqrt(ms + Eps);
        return x.Select((a, i) => a * scale * weight[i]).ToArray();
    }

    /// <summary>Rotary embedding, "rotate half" layout: within each head, element i pairs with i + d/2 at angle pos * theta^(-2i/d).</summary>
    private double[] Rotate(double[] x, int heads, int position)
    {
        var y = new double[x.Length];
        int half = HeadDim / 2;
        for (int head = 0; head < heads; head++)
            for (int i = 0; i < half; i++)
            {
                double angle = position * Math.Pow(Theta, -2.0 * i / HeadDim);
                double a = x[head * HeadDim + i], b = x[head * HeadDim + i + half];
                y[head * HeadDim + i] = a * Math.Cos(angle) - b * Math.Sin(angle);
                y[head * HeadDim + i + half] = b * Math.Cos(angle) + a * Math.Sin(angle);
            }
        return y;
    }

    public static double[] MatVec(double[][] m, double[] x)
    {
        var y = new double[m.Length];
        for (int r = 0; r < m.Length; r++)
        {
            double s = 0;
            var row = m[r];
            for (int c = 0; c < x.Length; c++) s += row[c] * x[c];
            y[r] = s;
        }
        return y;
    }

    public static double[] Add(double[] a, double[] b) => a.Select((x, i) => x + b[i]).ToArray();
}
