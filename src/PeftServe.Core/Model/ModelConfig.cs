using System.Text.Json;
using System.Text.Json.Nodes;

namespace PeftServe.Core.Model;

/// <summary>How rotary position embeddings are computed, from config.json's <c>rope_parameters</c>
/// (transformers 5) or <c>rope_theta</c> + <c>rope_scaling</c> (older checkpoints).</summary>
public sealed record RopeConfig
{
    public double Theta { get; init; } = 10000.0;
    /// <summary>default, linear or llama3.</summary>
    public string Type { get; init; } = "default";
    public double Factor { get; init; } = 1.0;
    public double LowFreqFactor { get; init; } = 1.0;
    public double HighFreqFactor { get; init; } = 4.0;
    public int OriginalMaxPositionEmbeddings { get; init; } = 8192;
}

/// <summary>The architecture hyper-parameters of a Llama-family checkpoint (Llama 2/3, Mistral,
/// Qwen2, SmolLM, TinyLlama all share this shape), read from its config.json.</summary>
public sealed record ModelConfig
{
    public static readonly string[] SupportedArchitectures = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"];

    public string Architecture { get; init; } = "LlamaForCausalLM";
    public string ModelType { get; init; } = "llama";
    public int VocabSize { get; init; }
    public int HiddenSize { get; init; }
    public int IntermediateSize { get; init; }
    public int NumLayers { get; init; }
    public int NumHeads { get; init; }
    public int NumKvHeads { get; init; }
    public int HeadDim { get; init; }
    public double RmsNormEps { get; init; } = 1e-6;
    public int MaxPositionEmbeddings { get; init; } = 2048;
    public bool TieWordEmbeddings { get; init; }
    /// <summary>Bias on q, k and v projections (Qwen2 always; Llama when attention_bias is set).</summary>
    public bool QkvBias { get; init; }
    /// <summary>Bias on the output projection (Llama's attention_bias sets it too; Qwen2 has none).</summary>
    public bool OutputBias { get; init; }
    public bool MlpBias { get; init; }
    public RopeConfig Rope { get; init; } = new();
    public int? BosTokenId { get; init; }
    public IReadOnlyList<int> EosTokenIds { get; init; } = [];
    public int? PadTokenId { get; init; }
    /// <summary>Sliding-window attention (Mistral v0.1's sliding_window; Qwen2's when use_sliding_window is set and
    /// some layer is at or beyond max_window_layers): a query sees only the last this-many positions. Null: none.
    /// A sequence no longer than the window attends exactly as with full attention, so sequences are capped here
    /// (as early vLLM did) rather than served with a window the decode kernels do not apply.</summary>
    public int? SlidingWindow { get; init; }

    public int KvGroups => NumHeads / NumKvHeads;

    /// <summary>The longest sequence this model is served or trained with: its positions, within any sliding window.</summary>
    public int MaxSequenceLength => SlidingWindow is { } w ? Math.Min(w, MaxPositionEmbeddings) : MaxPositionEmbeddings;

    /// <summary>Reads and checks DIR/config.json. Errors name the file and the key.</summary>
    public static ModelConfig Load(string modelDir)
    {
        var path = Path.Combine(modelDir, "config.json");
        if (!File.Exists(path)) throw new ModelLoadException($"{path}: not found (a Hugging Face model folder has a config.json)");
        JsonObject root;
        try { root = JsonNode.Parse(File.ReadAllText(path)) as JsonObject ?? throw new JsonException("not a JSON object"); }
        catch (JsonException e) { throw new ModelLoadException($"{path}: invalid JSON: {e.Message}"); }
        return Parse(root, path);
    }

    public static ModelConfig Parse(JsonObject root, string source = "config.json")
    {
        int Int(string key, int? fallback = null)
        {
            var node = root[key];
            if (node is null) return fallback ?? throw new ModelLoadException($"{source}: missing required key '{key}'");
            try { return node.GetValue<int>(); }
            catch (Exception e) when (e is FormatException or InvalidOperationException)
            { throw new ModelLoadException($"{source}: '{key}' must be an integer"); }
        }
        double Dbl(JsonObject o, string key, double fallback) => o[key] is { } n ? n.GetValue<double>() : fallback;
        bool Bool(string key) => root[key] is { } n && n.GetValueKind() == JsonValueKind.True;

        var archs = (root["architectures"] as JsonArray)?.Select(a => a?.GetValue<string>() ?? "").ToList() ?? [];
        var modelType = root["model_type"]?.GetValue<string>() ?? "";
        var arch = archs.FirstOrDefault(SupportedArchitectures.Contains)
            ?? modelType switch
            {
                "llama" => "LlamaForCausalLM",
                "mistral" => "MistralForCausalLM",
                "qwen2" => "Qwen2ForCausalLM",
                _ => throw new ModelLoadException(
                    $"{source}: unsupported architecture {(archs.Count > 0 ? string.Join(",", archs) : $"model_type '{modelType}'")}; " +
                    $"supported: {string.Join(", ", SupportedArchitectures)}"),
            };

        int hidden = Int("hidden_size"), heads = Int("num_attention_heads");
        int kvHeads = Int("num_key_value_heads", heads);
        int headDim = root["head_dim"] is { } hd && hd.GetValueKind() == JsonValueKind.Number ? hd.GetValue<int>() : hidden / heads;
        if (heads % kvHeads != 0) throw new ModelLoadException($"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kvHeads}");
        var act = root["hidden_act"]?.GetValue<string>() ?? "silu";
        if (act != "silu") throw new ModelLoadException($"{source}: hidden_act '{act}' is not supported (only silu)");

        bool qwen = arch == "Qwen2ForCausalLM";
        bool attentionBias = Bool("attention_bias");
        return new ModelConfig
        {
            Architecture = arch,
            ModelType = modelType,
            VocabSize = Int("vocab_size"),
            HiddenSize = hidden,
            IntermediateSize = Int("intermediate_size"),
            NumLayers = Int("num_hidden_layers"),
            NumHeads = heads,
            NumKvHeads = kvHeads,
            HeadDim = headDim,
            RmsNormEps = Dbl(root, "rms_norm_eps", 1e-6),
            MaxPositionEmbeddings = Int("max_position_embeddings", 2048),
            TieWordEmbeddings = Bool("tie_word_embeddings"),
            QkvBias = qwen || attentionBias,
            OutputBias = !qwen && attentionBias,
            MlpBias = Bool("mlp_bias"),
            Rope = ParseRope(root, source),
            BosTokenId = root["bos_token_id"]?.GetValueKind() == JsonValueKind.Number ? root["bos_token_id"]!.GetValue<int>() : null,
            EosTokenIds = ReadIds(root["eos_token_id"]),
            PadTokenId = root["pad_token_id"]?.GetValueKind() == JsonValueKind.Number ? root["pad_token_id"]!.GetValue<int>() : null,
            SlidingWindow = ParseSlidingWindow(root, qwen, Int("num_hidden_layers"), source),
        };
    }

    /// <summary>Mistral: sliding_window (null or absent: none). Qwen2: only with use_sliding_window, and only if some
    /// layer index reaches max_window_layers. Any config may turn it off with use_sliding_window: false.</summary>
    private static int? ParseSlidingWindow(JsonObject root, bool qwen, int layers, string source)
    {
        if (root["sliding_window"] is not { } node || node.GetValueKind() == JsonValueKind.Null) return null;
        var use = root["use_sliding_window"]?.GetValueKind();
        if (use == JsonValueKind.False || (qwen && use != JsonValueKind.True)) return null;
        if (qwen && root["max_window_layers"] is { } mw && mw.GetValueKind() == JsonValueKind.Number && mw.GetValue<int>() >= layers) return null;
        // transformers 5 may list each layer's kind: a window with no "sliding_attention" layer is unused.
        if (root["layer_types"] is JsonArray kinds && !kinds.Any(k => k?.GetValueKind() == JsonValueKind.String && k.GetValue<string>() == "sliding_attention"))
            return null;
        int window;
        try { window = node.GetValue<int>(); }
        catch (Exception e) when (e is FormatException or InvalidOperationException)
        { throw new ModelLoadException($"{source}: 'sliding_window' must be an integer or null"); }
        if (window < 1) throw new ModelLoadException($"{source}: 'sliding_window' must be at least 1 (got {window})");
        return window;
    }

    /// <summary>An id or a list of ids (generation_config.json and config.json allow both).</summary>
    internal static IReadOnlyList<int> ReadIds(JsonNode? node) => node switch
    {
        JsonArray a => a.Where(x => x is not null).Select(x => x!.GetValue<int>()).ToArray(),
        JsonValue v when v.GetValueKind() == JsonValueKind.Number => [v.GetValue<int>()],
        _ => [],
    };

    private static RopeConfig ParseRope(JsonObject root, string source)
    {
        // transformers 5: "rope_parameters": {"rope_theta", "rope_type", "factor", ...}
        // older: "rope_theta" at the top level and "rope_scaling": {"type"|"rope_type", "factor", ...} or null
        var parameters = root["rope_parameters"] as JsonObject;
        var scaling = parameters ?? root["rope_scaling"] as JsonObject;
        double theta = parameters?["rope_theta"]?.GetValue<double>() ?? root["rope_theta"]?.GetValue<double>() ?? 10000.0;
        if (scaling is null) return new RopeConfig { Theta = theta };
        var type = scaling["rope_type"]?.GetValue<string>() ?? scaling["type"]?.GetValue<string>() ?? "default";
        if (type is not ("default" or "linear" or "llama3"))
            throw new ModelLoadException($"{source}: rope type '{type}' is not supported (default, linear, llama3)");
        double D(string k, double f) => scaling[k] is { } n ? n.GetValue<double>() : f;
        return new RopeConfig
        {
            Theta = theta,
            Type = type,
            Factor = D("factor", 1.0),
            LowFreqFactor = D("low_freq_factor", 1.0),
            HighFreqFactor = D("high_freq_factor", 4.0),
            OriginalMaxPositionEmbeddings = (int)D("original_max_position_embeddings", root["max_position_embeddings"]?.GetValue<int>() ?? 8192),
        };
    }
}

/// <summary>A model folder that cannot be used: the message says which file and what is wrong.</summary>
public sealed class ModelLoadException(string message, Exception? inner = null) : Exception(message, inner);
