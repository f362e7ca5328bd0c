using System.Text.Json;
using PeftServe.Core.Model;

namespace PeftServe.Core.Tokenization;

/// <summary>A Hugging Face tokenizer read from a model folder's tokenizer.json (+ tokenizer_config.json,
/// generation_config.json and config.json for the special tokens), reproducing Hugging Face's ids.
/// Written here rather than taken from Microsoft.ML.Tokenizers because the product needs every
/// component tokenizer.json may declare (byte-level and SentencePiece-style BPE, normalizers,
/// pre-tokenizers, decoders, post-processors, added tokens) with Hugging Face's exact behaviour, and
/// ML.Tokenizers reads SentencePiece models only from their protobuf files.
/// The pipeline per input: split out added tokens, normalize and pre-tokenize the text between them,
/// BPE each word, then add special tokens as the post-processor says.</summary>
public sealed class Tokenizer
{
    private readonly BpeModel _model;
    private readonly Func<string, string> _normalize;
    private readonly PreTokenizer _preTokenize;
    private readonly Func<List<string>, List<string>> _decode;
    private readonly AddedTokens _added;
    private readonly int[] _prefix, _suffix;          // what the post-processor puts around a single sequence
    private readonly bool _cleanUpSpaces;

    public int VocabSize { get; }
    public string? BosToken { get; }
    public int? BosTokenId { get; }
    public string? EosToken { get; }
    /// <summary>Every id that ends generation: tokenizer_config's eos, generation_config.json's and config.json's eos_token_id.</summary>
    public IReadOnlyList<int> EosTokenIds { get; }
    public int? PadTokenId { get; }
    /// <summary>The chat template (Jinja source) from tokenizer_config.json, or null.</summary>
    public string? ChatTemplate { get; }

    private Tokenizer(JsonElement tokenizer, JsonElement? config, string dir, string source)
    {
        var modelElement = tokenizer.GetProperty("model");
        var modelType = modelElement.TryGetProperty("type", out var mt) ? mt.GetString() : "BPE";
        if (modelType != "BPE") throw new InvalidDataException($"{source}: model type '{modelType}' is not supported (BPE)");
        _model = new BpeModel(modelElement, source);

        var normalizer = tokenizer.TryGetProperty("normalizer", out var n) ? n : default;
        var preTokenizer = tokenizer.TryGetProperty("pre_tokenizer", out var p) ? p : default;
        string? tokenizerClass = config is { } c0 && c0.TryGetProperty("tokenizer_class", out var tc) && tc.ValueKind == JsonValueKind.String ? tc.GetString() : null;
        bool llamaClass = tokenizerClass is "LlamaTokenizer" or "LlamaTokenizerFast";
        if (llamaClass && IsLegacyLlamaNormalizer(normalizer) && (preTokenizer.ValueKind is JsonValueKind.Null or JsonValueKind.Undefined))
        {
            // transformers rebuilds Llama tokenizers (Llama 2, Mistral, TinyLlama) with a Metaspace
            // pre-tokenizer in place of the file's Prepend+Replace normalizer: "▁" is prepended only
            // when the text does not already start with a space, and only to the first section.
            bool legacy = !(config is { } cl && cl.TryGetProperty("legacy", out var lg) && lg.ValueKind == JsonValueKind.False);
            var scheme = legacy ? "always" : "first";
            _normalize = s => s;
            _preTokenize = (pieces, first) => PreTokenizers.Metaspace(pieces, first, "▁", scheme, split: false);
        }
        else
        {
            _normalize = normalizer.ValueKind == JsonValueKind.Undefined ? s => s : Normalizers.Create(normalizer, source);
            _preTokenize = preTokenizer.ValueKind == JsonValueKind.Undefined ? (x, _) => x : PreTokenizers.Create(preTokenizer, source);
        }
        _decode = tokenizer.TryGetProperty("decoder", out var d) ? Decoders.Create(d, source) : t => t;
        _added = new AddedTokens(tokenizer.TryGetProperty("added_tokens", out var at) ? at : default, _model);
        VocabSize = Math.Max(_model.VocabSize, _added.MaxId + 1);

        BosToken = SpecialToken(config, "bos_token");
        EosToken = SpecialToken(config, "eos_token");
        BosTokenId = BosToken is null ? null : TokenToId(BosToken);
        PadTokenId = SpecialToken(config, "pad_token") is { } pad ? TokenToId(pad) : null;
        var eos = new List<int>();
        if (EosToken is not null && TokenToId(EosToken) is { } eosId) eos.Add(eosId);
        foreach (var file in new[] { "generation_config.json", "config.json" })
        {
            var path = Path.Combine(dir, file);
            if (!File.Exists(path)) continue;
            try
            {
                var node = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(path));
                eos.AddRange(ModelConfig.ReadIds(node?["eos_token_id"]));
            }
            catch (JsonException e) { throw new InvalidDataException($"{path}: invalid JSON: {e.Message}"); }
        }
        EosTokenIds = eos.Distinct().ToArray();
        ChatTemplate = ReadChatTemplate(config);
        _cleanUpSpaces = config is { } cc && cc.TryGetProperty("clean_up_tokenization_spaces", out var cu) && cu.ValueKind == JsonValueKind.True;

        (_prefix, _suffix) = PostProcessor(tokenizer, config, llamaClass, source);
        foreach (var id in _prefix.Concat(_suffix))
            if (_added.Content(id) is null && _model.IdToToken(id) is null)
                throw new InvalidDataException($"{source}: the post-processor adds token id {id}, which is not in the vocabulary");
    }

    /// <summary>Reads DIR/tokenizer.json and, when present, DIR/tokenizer_config.json.</summary>
    public static Tokenizer FromDirectory(string dir)
    {
        var path = Path.Combine(dir, "tokenizer.json");
        if (!File.Exists(path)) throw new InvalidDataException($"{path}: not found (a Hugging Face model folder has a tokenizer.json)");
        var configPath = Path.Combine(dir, "tokenizer_config.json");
        try
        {
            using var doc = JsonDocument.Parse(File.ReadAllBytes(path));
            using var config = File.Exists(configPath) ? JsonDocument.Parse(File.ReadAllBytes(configPath)) : null;
            if (!doc.RootElement.TryGetProperty("model", out _)) throw new InvalidDataException($"{path}: no \"model\" section");
            return new Tokenizer(doc.RootElement, config?.RootElement, dir, path);
        }
        catch (JsonException e) { throw new InvalidDataException($"{(e.Path is null ? path : path)}: invalid JSON: {e.Message}"); }
        catch (KeyNotFoundException e) { throw new InvalidDataException($"{path}: a required key is missing ({e.Message})"); }
        catch (InvalidOperationException e) { throw new InvalidDataException($"{path}: unexpected value ({e.Message})"); }
        catch (ArgumentException e) { throw new InvalidDataException($"{path}: invalid value ({e.Message})"); }   // e.g. a pattern that is no regex
        // JsonElement's accessors on a value of the wrong shape: a number that is no int, an array too short.
        catch (FormatException) { throw new InvalidDataException($"{path}: a number is not of the expected kind (an integer where one is needed)"); }
        catch (IndexOutOfRangeException) { throw new InvalidDataException($"{path}: a list holds fewer items than its place needs"); }
    }

    public int? TokenToId(string token) => _added.Find(token) ?? _model.TokenToId(token);

    public string IdToToken(int id) => _added.Content(id) ?? _model.IdToToken(id)
        ?? throw new ArgumentOutOfRangeException(nameof(id), $"token id {id} is outside the vocabulary");

    public bool IsSpecial(int id) => _added.IsSpecial(id);

    public int[] Encode(string text, bool addSpecialTokens = true)
    {
        var ids = new List<int>();
        if (addSpecialTokens) ids.AddRange(_prefix);
        foreach (var (segment, id, offset) in _added.Split(text))
        {
            if (id is { } addedId) { ids.Add(addedId); continue; }
            var normalized = _normalize(segment);
            if (normalized.Length == 0) continue;
            foreach (var word in _preTokenize([normalized], offset == 0))
                ids.AddRange(_model.Tokenize(word));
        }
        if (addSpecialTokens) ids.AddRange(_suffix);
        return ids.ToArray();
    }

    public string Decode(IEnumerable<int> ids, bool skipSpecialTokens = true)
    {
        var tokens = ids.Where(id => !(skipSpecialTokens && IsSpecial(id))).Select(IdToToken).ToList();
        var text = string.Concat(_decode(tokens));
        return _cleanUpSpaces ? CleanUp(text) : text;
    }

    public StreamingDecoder CreateStreamingDecoder(bool skipSpecialTokens = true) => new(this, skipSpecialTokens);

    /// <summary>transformers' clean_up_tokenization: no space before punctuation and common contractions.</summary>
    private static string CleanUp(string s) => s.Replace(" .", ".").Replace(" ?", "?").Replace(" !", "!").Replace(" ,", ",")
        .Replace(" ' ", "'").Replace(" n't", "n't").Replace(" 'm", "'m").Replace(" 's", "'s").Replace(" 've", "'ve").Replace(" 're", "'re");

    private static bool IsLegacyLlamaNormalizer(JsonElement n) =>
        n.ValueKind == JsonValueKind.Object && n.GetProperty("type").GetString() == "Sequence" &&
        n.GetProperty("normalizers").EnumerateArray().Select(x => x.GetProperty("type").GetString()).SequenceEqual(["Prepend", "Replace"]);

    private (int[] Prefix, int[] Suffix) PostProcessor(JsonElement tokenizer, JsonElement? config, bool llamaClass, string source)
    {
        if (llamaClass)
        {
            // transformers builds Llama's post-processor from add_bos_token / add_eos_token.
            bool bos = !(config is { } c1 && c1.TryGetProperty("add_bos_token", out var ab) && ab.ValueKind == JsonValueKind.False);
            bool eos = config is { } c2 && c2.TryGetProperty("add_eos_token", out var ae) && ae.ValueKind == JsonValueKind.True;
            return (bos && BosTokenId is { } b ? [b] : [], eos && EosToken is not null && TokenToId(EosToken) is { } e ? [e] : []);
        }
        if (!tokenizer.TryGetProperty("post_processor", out var pp) || pp.ValueKind == JsonValueKind.Null) return ([], []);
        return Template(pp, source);
    }

    private static (int[] Prefix, int[] Suffix) Template(JsonElement pp, string source)
    {
        switch (pp.GetProperty("type").GetString())
        {
            case "TemplateProcessing":
                var special = pp.GetProperty("special_tokens").EnumerateObject().ToDictionary(p => p.Name, p => p.Value.GetProperty("ids").EnumerateArray().Select(x => x.GetInt32()).ToArray());
                var prefix = new List<int>();
                var suffix = new List<int>();
                bool seenSequence = false;
                foreach (var item in pp.GetProperty("single").EnumerateArray())
                {
                    if (item.TryGetProperty("Sequence", out _)) { seenSequence = true; continue; }
                    var id = item.GetProperty("SpecialToken").GetProperty("id").GetString()!;
                    (seenSequence ? suffix : prefix).AddRange(special[id]);
                }
                return (prefix.ToArray(), suffix.ToArray());
            case "Sequence":
                var parts = pp.GetProperty("processors").EnumerateArray().Select(x => Template(x, source)).ToList();
                return (parts.SelectMany(x => x.Prefix).ToArray(), parts.SelectMany(x => x.Suffix).ToArray());
            case "RobertaProcessing" or "BertProcessing":
                return ([pp.GetProperty("cls")[1].GetInt32()], [pp.GetProperty("sep")[1].GetInt32()]);
            case "ByteLevel":
                return ([], []);
            case var other:
                throw new InvalidDataException($"{source}: post_processor type '{other}' is not supported");
        }
    }

    /// <summary>A special token as tokenizer_config.json gives it: a string or {"content": ...}.</summary>
    private static string? SpecialToken(JsonElement? config, string key)
    {
        if (config is not { } c || !c.TryGetProperty(key, out var v)) return null;
        return v.ValueKind switch
        {
            JsonValueKind.String => v.GetString(),
            JsonValueKind.Object when v.TryGetProperty("content", out var content) => content.GetString(),
            _ => null,
        };
    }

    private static string? ReadChatTemplate(JsonElement? config)
    {
        if (config is not { } c || !c.TryGetProperty("chat_template", out var t)) return null;
        if (t.ValueKind == JsonValueKind.String) return t.GetString();
        if (t.ValueKind == JsonValueKind.Array)
        {
            var named = t.EnumerateArray().Select(x => (Name: x.GetProperty("name").GetString(), Template: x.GetProperty("template").GetString())).ToList();
            return (named.FirstOrDefault(x => x.Name == "default").Template) ?? named.FirstOrDefault().Template;
        }
        return null;
    }
}
