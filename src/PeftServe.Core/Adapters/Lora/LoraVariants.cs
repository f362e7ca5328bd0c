using System.Text.Json.Nodes;
using PeftServe.Core.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Adapters.Lora;

/// <summary>What a PEFT LoRA adapter may carry besides A and B on the decoder's linear layers, as read from
/// its files (host tensors, float32 unless <see cref="LoraAdapter.PrepareForDevice"/> converted the large
/// ones). Each part is served as PEFT computes it:
/// <list type="bullet">
/// <item>DoRA (use_dora): per target the magnitude m [out]; the layer computes (m / ||W + s B A||) ⊙ (W x + s B A x) + b,
/// the norm per output row taken once when the adapter is placed (PEFT detaches it, so it is a constant).</item>
/// <item>Trained biases (bias "lora_only"/"all", saved as base_layer.bias or bias): they replace the base layer's bias.</item>
/// <item>lora_bias: lora_B's own bias, added as s · b.</item>
/// <item>LoRA on embed_tokens (lora_embedding_A [r,V], lora_embedding_B [hidden,r]) and on lm_head, each optionally with DoRA.</item>
/// <item>modules_to_save lm_head / embed_tokens: whole replacement matrices [V, hidden].</item>
/// <item>Copies of the base embedding or LM head that PEFT saves beside LoRA on them (base_layer.weight): only checked
/// to be the served base model's own weights, as summaries (<see cref="WeightRowSummary"/>).</item>
/// </list></summary>
public sealed class LoraVariants : IDisposable
{
    /// <summary>[layer, target] DoRA magnitude [out], or null.</summary>
    public Tensor?[,] Magnitude { get; }
    /// <summary>[layer, target] trained bias [out] that replaces the base layer's bias, or null.</summary>
    public Tensor?[,] TrainedBias { get; }
    /// <summary>[layer, target] s · lora_B.bias [out], added to the output, or null.</summary>
    public Tensor?[,] LoraBias { get; }

    /// <summary>LoRA on the embedding: A transposed [V, r] (rows gathered by token id) and s · B transposed [r, hidden].</summary>
    public (Tensor AT, Tensor ScaledBT)? Embedding { get; internal set; }
    /// <summary>DoRA on the embedding: magnitude [hidden] (PEFT takes the norm over the vocabulary, per hidden unit).</summary>
    public Tensor? EmbeddingMagnitude { get; internal set; }
    /// <summary>LoRA on the LM head: A [r, hidden] and s · B transposed [r, V].</summary>
    public (Tensor A, Tensor ScaledBT)? LmHead { get; internal set; }
    /// <summary>DoRA on the LM head: magnitude [V].</summary>
    public Tensor? LmHeadMagnitude { get; internal set; }
    /// <summary>lora_bias on the LM head: s · lora_B.bias [V].</summary>
    public Tensor? LmHeadLoraBias { get; internal set; }
    /// <summary>A replacement of the input embedding [V, hidden] (modules_to_save, or a saved embed_tokens.weight).</summary>
    public Tensor? SavedEmbedding { get; internal set; }
    /// <summary>A replacement of the LM head [V, hidden] (modules_to_save lm_head, or the saved embedding where the
    /// base model ties them and the adapter keeps them tied).</summary>
    public Tensor? SavedLmHead { get; internal set; }
    /// <summary>Summaries of the copies of the base embedding / LM head the file holds, checked when placed.</summary>
    public WeightRowSummary? EmbeddingCopy { get; internal set; }
    public WeightRowSummary? LmHeadCopy { get; internal set; }

    internal LoraVariants(int layers)
    {
        Magnitude = new Tensor?[layers, 7];
        TrainedBias = new Tensor?[layers, 7];
        LoraBias = new Tensor?[layers, 7];
    }

    public bool UsesDora => Magnitude.Cast<Tensor?>().Any(t => t is not null) || EmbeddingMagnitude is not null || LmHeadMagnitude is not null;

    /// <summary>Whether anything of vocabulary size needs a slot of the embeddings pool (<see cref="LoraEmbeddingsMethod"/>).</summary>
    public bool NeedsVocabularySlot => Embedding is not null || LmHead is not null || SavedEmbedding is not null || SavedLmHead is not null;

    /// <summary>Whether the decoder linears' outputs need a per-row scale or offset (DoRA, biases).</summary>
    public bool ChangesLinearOutputs => UsesDoraOnLinears || TrainedBias.Cast<Tensor?>().Any(t => t is not null) || LoraBias.Cast<Tensor?>().Any(t => t is not null);

    private bool UsesDoraOnLinears => Magnitude.Cast<Tensor?>().Any(t => t is not null);

    /// <summary>Whether there is anything at all (a plain LoRA adapter has nothing here).</summary>
    public bool IsEmpty => !ChangesLinearOutputs && !NeedsVocabularySlot && EmbeddingCopy is null && LmHeadCopy is null
        && EmbeddingMagnitude is null && LmHeadMagnitude is null && LmHeadLoraBias is null;

    internal IEnumerable<Tensor?> Tensors => Magnitude.Cast<Tensor?>().Concat(TrainedBias.Cast<Tensor?>()).Concat(LoraBias.Cast<Tensor?>())
        .Concat([Embedding?.AT, Embedding?.ScaledBT, EmbeddingMagnitude, LmHead?.A, LmHead?.ScaledBT, LmHeadMagnitude, LmHeadLoraBias, SavedEmbedding, SavedLmHead]);

    /// <summary>Converts the vocabulary-sized tensors (saved modules, LoRA on the embedding and LM head) to
    /// <paramref name="dtype"/>: they are the bulk of the adapter and the device holds them in that dtype anyway.
    /// The small vectors (magnitudes, biases) stay float32 for the load-time arithmetic.</summary>
    internal void ConvertLarge(ScalarType dtype)
    {
        Tensor To(Tensor t)
        {
            if (t.dtype == dtype) return t;
            var c = t.to(dtype);
            t.Dispose();
            return c;
        }
        if (Embedding is { } e) Embedding = (To(e.AT), To(e.ScaledBT));
        if (LmHead is { } h) LmHead = (To(h.A), To(h.ScaledBT));
        bool shared = ReferenceEquals(SavedEmbedding, SavedLmHead);
        if (SavedEmbedding is { } se) SavedEmbedding = To(se);
        if (shared) SavedLmHead = SavedEmbedding;
        else if (SavedLmHead is { } sh) SavedLmHead = To(sh);
    }

    public void Dispose()
    {
        foreach (var t in Tensors.Where(t => t is not null).Distinct()) t!.Dispose();
    }
}

/// <summary>A fingerprint of a [V, hidden] matrix, two float64 numbers per row: the sum of each row's
/// entries times fixed pseudo-random signs, and the sum of their magnitudes. Two matrices that agree once
/// rounded to the serving dtype have fingerprints within that rounding of each other; any other matrix
/// (another base model's embedding, a resized vocabulary) is far off. It lets an adapter keep a 2 x V
/// summary instead of the V x hidden copy PEFT saves beside LoRA on an embedding.</summary>
public sealed class WeightRowSummary
{
    public string TensorName { get; }
    private readonly double[] _signed, _magnitude;
    private readonly double _rounding;

    private WeightRowSummary(string name, double[] signed, double[] magnitude, double rounding)
    {
        TensorName = name;
        _signed = signed;
        _magnitude = magnitude;
        _rounding = rounding;
    }

    /// <summary>Relative rounding of one entry stored in <paramref name="dtype"/>.</summary>
    private static double Rounding(ScalarType dtype) => dtype switch { ScalarType.BFloat16 => 1.0 / 256, ScalarType.Float16 => 1.0 / 2048, _ => 1e-6 };

    /// <summary>The summary of <paramref name="matrix"/> [V, hidden] (any device), whose entries were stored in
    /// <paramref name="storedAs"/> (the file's dtype: it bounds how far the copy may be from the base weights).</summary>
    public static WeightRowSummary Of(string name, Tensor matrix, ScalarType storedAs)
    {
        using var scope = torch.NewDisposeScope();
        using var _ = torch.no_grad();
        var m = matrix.to(ScalarType.Float64);
        var signs = Signs(m.shape[1], m.device);
        var signed = torch.matmul(m, signs).cpu().data<double>().ToArray();
        var magnitude = m.abs().sum(1).cpu().data<double>().ToArray();
        return new WeightRowSummary(name, signed, magnitude, Rounding(storedAs));
    }

    /// <summary>Fixed ±1 per column (a hash of the column index), the same wherever it is computed.</summary>
    private static Tensor Signs(long columns, Device device)
    {
        var s = new double[columns];
        for (long i = 0; i < columns; i++)
        {
            ulong h = (ulong)i * 0x9E3779B97F4A7C15UL;
            h ^= h >> 31;
            s[i] = (h & 1) == 0 ? 1.0 : -1.0;
        }
        return torch.tensor(s, device: device);
    }

    /// <summary>Null when <paramref name="served"/> [V, hidden] (the base model's tensor, in <paramref name="dtype"/>)
    /// agrees with the matrix summarised here up to rounding to that dtype; else the first row that does not.</summary>
    public long? FirstDifferentRow(Tensor served, ScalarType dtype)
    {
        var other = Of(TensorName, served, dtype);
        if (other._signed.Length != _signed.Length) return 0;
        // Rounding moves each entry by at most half an ulp of the coarser dtype: that bounds every row sum's change.
        double relative = Math.Max(_rounding, other._rounding);
        for (long v = 0; v < _signed.Length; v++)
        {
            double tolerance = relative * Math.Max(_magnitude[v], other._magnitude[v]) + 1e-9;
            if (Math.Abs(_signed[v] - other._signed[v]) > tolerance || Math.Abs(_magnitude[v] - other._magnitude[v]) > tolerance) return v;
        }
        return null;
    }
}
