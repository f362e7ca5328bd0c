using System.Text.Json;
using PeftServe.Core.Templates;

namespace PeftServe.Server.Api;

/// <summary>The generation settings common to /v1/completions, /v1/chat/completions and the SignalR hub.</summary>
public sealed record GenerationSettings
{
    public string? Model { get; init; }
    public int? MaxTokens { get; init; }
    public float Temperature { get; init; } = 1f;
    public float TopP { get; init; } = 1f;
    public int TopK { get; init; }
    public long? Seed { get; init; }
    public IReadOnlyList<string> Stop { get; init; } = [];
    public float PresencePenalty { get; init; }
    public float FrequencyPenalty { get; init; }
    public bool IgnoreEos { get; init; }
    public bool Stream { get; init; }
    public bool IncludeUsage { get; init; }
    /// <summary>How many choices to sample for the prompt (OpenAI's n).</summary>
    public int N { get; init; } = 1;
    /// <summary>Null: no log probabilities; else each token's, with this many alternatives (completions' logprobs,
    /// chat's top_logprobs).</summary>
    public int? Logprobs { get; init; }
    /// <summary>Null, or the prompt's log probabilities with this many alternatives (completions' echo with logprobs).</summary>
    public int? PromptLogprobs { get; init; }
    /// <summary>Guided JSON: response_format json_object (any object) or json_schema, or vLLM's guided_json. Null: free text.</summary>
    public Core.Generation.JsonSchema? Json { get; init; }
    /// <summary>vLLM's min_tokens: no stop token id before this many tokens.</summary>
    public int MinTokens { get; init; }
    /// <summary>vLLM's repetition_penalty (1 = off).</summary>
    public float RepetitionPenalty { get; init; } = 1f;
    /// <summary>vLLM's min_p (0 = off).</summary>
    public float MinP { get; init; }
    /// <summary>OpenAI's logit_bias, by token id (null: none).</summary>
    public IReadOnlyDictionary<int, float>? LogitBias { get; init; }
    /// <summary>vLLM's stop_token_ids: more token ids that end generation (beside EOS unless ignore_eos).</summary>
    public IReadOnlyList<int> StopTokenIds { get; init; } = [];
}

/// <summary>A parsed /v1/completions body: the prompt as text or as token ids.</summary>
public sealed record CompletionRequest(GenerationSettings Settings, IReadOnlyList<CompletionPrompt> Prompts, bool Echo);

/// <summary>One prompt of a completions request: its text, or its token ids.</summary>
public sealed record CompletionPrompt(string? Text, IReadOnlyList<int>? Ids);

/// <summary>A parsed /v1/chat/completions body.</summary>
public sealed record ChatRequest(GenerationSettings Settings, IReadOnlyList<ChatMessage> Messages);

/// <summary>Reads OpenAI request bodies field by field, so that every mistake is answered with an
/// OpenAI-style 400 naming the offending parameter (rather than a generic deserialization error).</summary>
public static class OpenAiRequests
{
    public const int MaxStopStrings = 4;
    /// <summary>The most choices one request may ask for (each is a sequence in the engine's batch).</summary>
    public const int MaxChoices = 16;
    /// <summary>The most prompts one completions request may carry (a batch, as OpenAI's API allows).</summary>
    public const int MaxPrompts = 64;

    /// <summary>Parameters every generation endpoint reads. "user" only names the caller for the
    /// caller's own records and changes nothing generated.</summary>
    private static readonly string[] CommonParameters =
        ["model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "presence_penalty", "frequency_penalty",
         "ignore_eos", "stream", "stream_options", "n", "user", "logprobs", "logit_bias", "min_p", "stop_token_ids", "repetition_penalty", "min_tokens", "guided_json"];
    /// <summary>OpenAI's limit on logit_bias entries.</summary>
    public const int MaxLogitBias = 300;
    private static readonly string[] CompletionParameters = ["prompt", "echo", "best_of"];
    private static readonly string[] ChatParameters =
        ["messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "response_format", "parallel_tool_calls"];

    public static JsonElement ParseBody(string body)
    {
        if (string.IsNullOrWhiteSpace(body)) throw new ApiException(400, "the request body is empty; send a JSON object");
        JsonElement root;
        try
        {
            using var doc = JsonDocument.Parse(body);
            if (doc.RootElement.ValueKind != JsonValueKind.Object) throw new ApiException(400, "the request body must be a JSON object");
            root = doc.RootElement.Clone();
        }
        // The parser's own message is not echoed: where it failed is enough to find the mistake.
        catch (JsonException e) { throw new ApiException(400, $"the request body is not valid JSON (line {e.LineNumber + 1}, byte {e.BytePositionInLine + 1})"); }
        CheckStrings(root, "");
        return root;
    }

    /// <summary>Refuses strings that hold a lone UTF-16 surrogate ("\ud800" with no pair): valid JSON
    /// text, but no valid string, so reading it later would fail deep inside the request.</summary>
    private static void CheckStrings(JsonElement element, string path)
    {
        switch (element.ValueKind)
        {
            case JsonValueKind.Object:
                foreach (var property in element.EnumerateObject())
                {
                    string name;
                    try { name = property.Name; }
                    catch (InvalidOperationException) { throw LoneSurrogate(path.Length == 0 ? "a property name" : $"a property name in '{path}'", path); }
                    var child = path.Length == 0 ? name : $"{path}.{name}";
                    CheckStrings(property.Value, child);
                }
                break;
            case JsonValueKind.Array:
                int i = 0;
                foreach (var item in element.EnumerateArray()) CheckStrings(item, $"{path}[{i++}]");
                break;
            case JsonValueKind.String:
                try { _ = element.GetString(); }
                catch (InvalidOperationException) { throw LoneSurrogate($"'{path}'", path); }
                break;
        }
    }

    private static ApiException LoneSurrogate(string where, string path) =>
        new(400, $"{where} holds an unpaired UTF-16 surrogate escape (\\uD800-\\uDFFF without its pair); send valid Unicode text", path.Length == 0 ? null : path, "invalid_string");

    /// <summary>Refuses every parameter this server does not implement, rather than ignoring it (a
    /// client asking for JSON output must not silently get free text). A parameter sent with its
    /// neutral value (null, an empty logit_bias, response_format "text", no tools) is accepted.</summary>
    private static void CheckParameters(JsonElement root, bool chat)
    {
        foreach (var p in root.EnumerateObject())
        {
            var name = p.Name;
            var v = p.Value;
            bool known = CommonParameters.Contains(name) || (chat ? ChatParameters : CompletionParameters).Contains(name);
            if (!known)
                throw new ApiException(400, $"unrecognized request argument '{name}' (this server does not implement it)", name, "unsupported_parameter");
            if (v.ValueKind == JsonValueKind.Null) continue;
            bool neutral = name switch
            {
                // Everything else is read, and checked, where it is used (response_format, logprobs, best_of, ...).
                "tools" => v.ValueKind == JsonValueKind.Array && v.GetArrayLength() == 0,
                "tool_choice" => v.ValueKind == JsonValueKind.String && v.GetString() == "none",
                "parallel_tool_calls" => false,
                _ => true,
            };
            if (!neutral)
                throw new ApiException(400, $"'{name}' is not supported by this server; leave it out", name, "unsupported_parameter");
        }
    }

    public static CompletionRequest ParseCompletion(JsonElement root)
    {
        var settings = ParseSettings(root, chat: false);
        if (!root.TryGetProperty("prompt", out var prompt) || prompt.ValueKind == JsonValueKind.Null)
            throw new ApiException(400, "'prompt' is required", "prompt");
        var prompts = Prompts(prompt);
        if (prompts.Count > MaxPrompts) throw new ApiException(400, $"at most {MaxPrompts} prompts per request; got {prompts.Count}", "prompt");
        if (prompts.Count * settings.N > MaxPrompts)
            throw new ApiException(400, $"prompts times n must be at most {MaxPrompts}; got {prompts.Count} x {settings.N}", "n");
        // best_of = n samples n and returns them all; more would need ranking by log probability, which this server does not compute.
        if (Int(root, "best_of") is { } bestOf && bestOf != settings.N)
            throw new ApiException(400, $"best_of ({bestOf}) must equal n ({settings.N}): this server returns every sequence it samples", "best_of", "unsupported_parameter");
        bool echo = Bool(root, "echo") ?? false;
        // echo with logprobs scores the prompt too (as OpenAI's legacy API and vLLM do): what evaluation harnesses use.
        if (echo) settings = settings with { PromptLogprobs = settings.Logprobs };
        return new CompletionRequest(settings, prompts, echo);
    }

    /// <summary>OpenAI's four prompt forms: a string, a list of strings, a list of token ids, a list of such lists.</summary>
    private static List<CompletionPrompt> Prompts(JsonElement prompt)
    {
        static CompletionPrompt Text(string? text, string param) =>
            string.IsNullOrEmpty(text) ? throw new ApiException(400, $"'{param}' must not be empty", "prompt") : new CompletionPrompt(text, null);
        static CompletionPrompt Ids(List<JsonElement> items, string param) =>
            items.Count == 0 ? throw new ApiException(400, $"'{param}' must not be empty", "prompt")
            : new CompletionPrompt(null, items.Select(i => i.ValueKind == JsonValueKind.Number && i.TryGetInt32(out var v) ? v
                : throw new ApiException(400, $"'{param}' token ids must be integers", "prompt")).ToList());
        switch (prompt.ValueKind)
        {
            case JsonValueKind.String: return [Text(prompt.GetString(), "prompt")];
            case JsonValueKind.Array:
                var items = prompt.EnumerateArray().ToList();
                if (items.Count == 0) throw new ApiException(400, "'prompt' must not be empty", "prompt");
                if (items.All(i => i.ValueKind == JsonValueKind.Number)) return [Ids(items, "prompt")];
                if (items.All(i => i.ValueKind == JsonValueKind.String)) return items.Select((i, n) => Text(i.GetString(), $"prompt[{n}]")).ToList();
                if (items.All(i => i.ValueKind == JsonValueKind.Array)) return items.Select((i, n) => Ids(i.EnumerateArray().ToList(), $"prompt[{n}]")).ToList();
                throw new ApiException(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of such lists", "prompt");
            default: throw new ApiException(400, "'prompt' must be a string or a list of token ids", "prompt");
        }
    }

    public static ChatRequest ParseChat(JsonElement root) => new(ParseSettings(root, chat: true), Messages(root));

    /// <summary>A body's "messages": role and text content of each.</summary>
    public static IReadOnlyList<ChatMessage> Messages(JsonElement root)
    {
        if (!root.TryGetProperty("messages", out var messages) || messages.ValueKind != JsonValueKind.Array)
            throw new ApiException(400, "'messages' is required and must be a list", "messages");
        var list = new List<ChatMessage>();
        int i = 0;
        foreach (var m in messages.EnumerateArray())
        {
            if (m.ValueKind != JsonValueKind.Object || !m.TryGetProperty("role", out var role) || role.ValueKind != JsonValueKind.String)
                throw new ApiException(400, $"messages[{i}] needs a string 'role'", $"messages[{i}].role");
            list.Add(new ChatMessage(role.GetString()!, Content(m, i)));
            i++;
        }
        if (list.Count == 0) throw new ApiException(400, "'messages' must hold at least one message", "messages");
        return list;
    }

    /// <summary>A message's content: a string, or a list of text parts (other part types are refused).</summary>
    private static string Content(JsonElement message, int index)
    {
        if (!message.TryGetProperty("content", out var content) || content.ValueKind == JsonValueKind.Null) return "";
        if (content.ValueKind == JsonValueKind.String) return content.GetString()!;
        if (content.ValueKind == JsonValueKind.Array)
        {
            var text = new System.Text.StringBuilder();
            foreach (var part in content.EnumerateArray())
            {
                if (part.ValueKind != JsonValueKind.Object || !part.TryGetProperty("type", out var type) || type.GetString() != "text"
                    || !part.TryGetProperty("text", out var t) || t.ValueKind != JsonValueKind.String)
                    throw new ApiException(400, $"messages[{index}].content: only text parts are supported", $"messages[{index}].content");
                text.Append(t.GetString());
            }
            return text.ToString();
        }
        throw new ApiException(400, $"messages[{index}].content must be a string or a list of text parts", $"messages[{index}].content");
    }

    public static GenerationSettings ParseSettings(JsonElement root, bool chat)
    {
        CheckParameters(root, chat);
        var n = Int(root, "n") ?? 1;
        if (n is < 1 or > MaxChoices) throw new ApiException(400, $"n must be between 1 and {MaxChoices}; got {n}", "n");
        int? maxTokens = Int(root, "max_tokens");
        if (chat) maxTokens = Int(root, "max_completion_tokens") ?? maxTokens;
        if (maxTokens is < 1) throw new ApiException(400, $"max_tokens must be at least 1; got {maxTokens}", chat && root.TryGetProperty("max_completion_tokens", out _) ? "max_completion_tokens" : "max_tokens");
        var stream = Bool(root, "stream") ?? false;
        bool includeUsage = false;
        if (Present(root, "stream_options", out var so))
        {
            if (!stream) throw new ApiException(400, "'stream_options' is only allowed with stream: true", "stream_options");
            if (so.ValueKind != JsonValueKind.Object) throw new ApiException(400, "'stream_options' must be an object", "stream_options");
            foreach (var option in so.EnumerateObject())
                if (option.Name != "include_usage")
                    throw new ApiException(400, $"unrecognized stream option '{option.Name}'", $"stream_options.{option.Name}", "unsupported_parameter");
            includeUsage = Bool(so, "include_usage", "stream_options.include_usage") ?? false;
        }
        var s = new GenerationSettings
        {
            Logprobs = Logprobs(root, chat),
            MinP = Float(root, "min_p") ?? 0f,
            RepetitionPenalty = Float(root, "repetition_penalty") ?? 1f,
            MinTokens = Int(root, "min_tokens") ?? 0,
            Json = GuidedJson(root),
            LogitBias = LogitBias(root),
            StopTokenIds = TokenIds(root, "stop_token_ids"),
            Model = String(root, "model"),
            MaxTokens = maxTokens,
            Temperature = Float(root, "temperature") ?? 1f,
            TopP = Float(root, "top_p") ?? 1f,
            TopK = TopK(Int(root, "top_k")),
            Seed = Long(root, "seed"),
            Stop = Stop(root),
            PresencePenalty = Float(root, "presence_penalty") ?? 0f,
            FrequencyPenalty = Float(root, "frequency_penalty") ?? 0f,
            IgnoreEos = Bool(root, "ignore_eos") ?? false,
            Stream = stream,
            IncludeUsage = includeUsage,
            N = n,
        };
        Check(s);
        return s;
    }

    /// <summary>response_format: "text" (free), "json_object" (any object) or "json_schema" ({"json_schema": {"name",
    /// "schema", "strict"}}); or vLLM's guided_json (a schema, or a string holding one). A schema this server cannot
    /// hold is a 400 naming the keyword.</summary>
    private static Core.Generation.JsonSchema? GuidedJson(JsonElement root)
    {
        Core.Generation.JsonSchema? Compile(JsonElement schema, string param)
        {
            try { return Core.Generation.JsonSchema.Parse(schema); }
            catch (ArgumentException e) { throw new ApiException(400, $"'{param}': {e.Message}", param, "unsupported_parameter"); }
        }
        Core.Generation.JsonSchema? fromFormat = null;
        if (Present(root, "response_format", out var format))
        {
            if (format.ValueKind != JsonValueKind.Object || !format.TryGetProperty("type", out var type) || type.ValueKind != JsonValueKind.String)
                throw new ApiException(400, "'response_format' must be an object with a 'type'", "response_format");
            foreach (var p in format.EnumerateObject())
                if (p.Name is not ("type" or "json_schema"))
                    throw new ApiException(400, $"'response_format' takes 'type' and 'json_schema'; '{p.Name}' is not supported by this server", "response_format", "unsupported_parameter");
            fromFormat = type.GetString() switch
            {
                "text" => null,
                "json_object" => Core.Generation.JsonSchema.AnyObject,
                "json_schema" => format.TryGetProperty("json_schema", out var js) && js.ValueKind == JsonValueKind.Object && js.TryGetProperty("schema", out var schema)
                    ? Compile(schema, "response_format")
                    : throw new ApiException(400, "'response_format' of type json_schema needs 'json_schema': {\"name\", \"schema\"}", "response_format"),
                var other => throw new ApiException(400, $"'response_format' type '{other}' is not supported (text, json_object, json_schema)", "response_format", "unsupported_parameter"),
            };
        }
        if (Present(root, "guided_json", out var guided))
        {
            if (fromFormat is not null) throw new ApiException(400, "give either 'guided_json' or a JSON 'response_format', not both", "guided_json");
            return Compile(guided, "guided_json");
        }
        return fromFormat;
    }

    /// <summary>logit_bias: {"token id": bias in [-100, 100]}, at most <see cref="MaxLogitBias"/> entries (the
    /// vocabulary bound is checked against the model when the request is built).</summary>
    private static IReadOnlyDictionary<int, float>? LogitBias(JsonElement root)
    {
        if (!Present(root, "logit_bias", out var v)) return null;
        if (v.ValueKind != JsonValueKind.Object) throw new ApiException(400, "'logit_bias' must be an object of token ids to biases", "logit_bias");
        var biases = new Dictionary<int, float>();
        foreach (var entry in v.EnumerateObject())
        {
            if (!int.TryParse(entry.Name, System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out var id))
                throw new ApiException(400, $"logit_bias keys must be token ids; got '{(entry.Name.Length > 20 ? entry.Name[..20] + "..." : entry.Name)}'", "logit_bias");
            if (entry.Value.ValueKind != JsonValueKind.Number || !entry.Value.TryGetDouble(out var bias) || !(bias >= -100 && bias <= 100))
                throw new ApiException(400, $"logit_bias values must be numbers from -100 to 100 (token {id})", "logit_bias");
            biases[id] = (float)bias;
        }
        if (biases.Count > MaxLogitBias) throw new ApiException(400, $"logit_bias may name at most {MaxLogitBias} tokens; got {biases.Count}", "logit_bias");
        return biases.Count == 0 ? null : biases;
    }

    /// <summary>A list of token ids (ids >= 0; the vocabulary bound is checked when the request is built).</summary>
    private static IReadOnlyList<int> TokenIds(JsonElement root, string name)
    {
        if (!Present(root, name, out var v)) return [];
        if (v.ValueKind != JsonValueKind.Array) throw new ApiException(400, $"'{name}' must be a list of token ids", name);
        return v.EnumerateArray().Select(t => t.ValueKind == JsonValueKind.Number && t.TryGetInt32(out var id) && id >= 0 ? id
            : throw new ApiException(400, $"'{name}' must hold token ids (integers >= 0)", name)).ToList();
    }

    /// <summary>Chat: logprobs true/false and top_logprobs 0-20 (only with logprobs). Completions: logprobs is the
    /// number of alternatives, 0-20 (false or null: none).</summary>
    private static int? Logprobs(JsonElement root, bool chat)
    {
        const int most = Core.Generation.SamplingParams.MaxLogprobs;
        if (chat)
        {
            bool wanted = Bool(root, "logprobs") ?? false;
            int? top = Int(root, "top_logprobs");
            if (top is not null && !wanted) throw new ApiException(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs");
            if (top is < 0 or > most) throw new ApiException(400, $"top_logprobs must be between 0 and {most}; got {top}", "top_logprobs");
            return wanted ? top ?? 0 : null;
        }
        if (!Present(root, "logprobs", out var v) || v.ValueKind == JsonValueKind.False) return null;
        int k = Int(root, "logprobs")!.Value;
        if (k is < 0 or > most) throw new ApiException(400, $"logprobs must be between 0 and {most}; got {k}", "logprobs");
        return k;
    }

    /// <summary>top_k as vLLM reads it: -1 (or absent) means no limit, otherwise at least 1. The engine's 0 means no limit.</summary>
    public static int TopK(int? k) => k switch
    {
        null or -1 => 0,
        >= 1 => k.Value,
        _ => throw new ApiException(400, $"top_k must be -1 (no limit) or at least 1; got {k}", "top_k"),
    };

    /// <summary>Range checks with the parameter's OpenAI name (the engine checks again).</summary>
    public static void Check(GenerationSettings s)
    {
        if (!(s.Temperature >= 0 && s.Temperature <= 2)) throw new ApiException(400, $"temperature must be between 0 and 2; got {s.Temperature}", "temperature");
        if (!(s.TopP > 0 && s.TopP <= 1)) throw new ApiException(400, $"top_p must be in (0, 1]; got {s.TopP}", "top_p");
        if (!(s.PresencePenalty >= -2 && s.PresencePenalty <= 2)) throw new ApiException(400, $"presence_penalty must be between -2 and 2; got {s.PresencePenalty}", "presence_penalty");
        if (!(s.FrequencyPenalty >= -2 && s.FrequencyPenalty <= 2)) throw new ApiException(400, $"frequency_penalty must be between -2 and 2; got {s.FrequencyPenalty}", "frequency_penalty");
        if (s.MaxTokens is < 1) throw new ApiException(400, $"max_tokens must be at least 1; got {s.MaxTokens}", "max_tokens");
        if (s.Stop.Count > MaxStopStrings) throw new ApiException(400, $"at most {MaxStopStrings} stop sequences", "stop");
        if (s.Stop.Any(x => x.Length == 0)) throw new ApiException(400, "stop sequences must not be empty", "stop");
        if (!(s.MinP >= 0 && s.MinP <= 1)) throw new ApiException(400, $"min_p must be between 0 and 1; got {s.MinP}", "min_p");
        if (s.MinTokens < 0 || s.MinTokens > s.MaxTokens) throw new ApiException(400, $"min_tokens must be from 0 to max_tokens; got {s.MinTokens}", "min_tokens");
        if (!(s.RepetitionPenalty > 0 && s.RepetitionPenalty <= 100)) throw new ApiException(400, $"repetition_penalty must be above 0 and at most 100 (1 = off); got {s.RepetitionPenalty}", "repetition_penalty");
    }

    private static IReadOnlyList<string> Stop(JsonElement root)
    {
        if (!root.TryGetProperty("stop", out var stop) || stop.ValueKind == JsonValueKind.Null) return [];
        if (stop.ValueKind == JsonValueKind.String) return [stop.GetString()!];
        if (stop.ValueKind == JsonValueKind.Array && stop.EnumerateArray().All(e => e.ValueKind == JsonValueKind.String))
            return stop.EnumerateArray().Select(e => e.GetString()!).ToList();
        throw new ApiException(400, "'stop' must be a string or a list of strings", "stop");
    }

    private static bool Present(JsonElement o, string name, out JsonElement value) =>
        o.TryGetProperty(name, out value) && value.ValueKind != JsonValueKind.Null;

    internal static string? String(JsonElement o, string name)
    {
        if (!Present(o, name, out var v)) return null;
        return v.ValueKind == JsonValueKind.String ? v.GetString() : throw new ApiException(400, $"'{name}' must be a string", name);
    }

    internal static bool? Bool(JsonElement o, string name, string? param = null)
    {
        if (!Present(o, name, out var v)) return null;
        return v.ValueKind switch
        {
            JsonValueKind.True => true,
            JsonValueKind.False => false,
            _ => throw new ApiException(400, $"'{param ?? name}' must be true or false", param ?? name),
        };
    }

    private static int? Int(JsonElement o, string name)
    {
        if (!Present(o, name, out var v)) return null;
        return v.ValueKind == JsonValueKind.Number && v.TryGetInt32(out var i) ? i : throw new ApiException(400, $"'{name}' must be an integer", name);
    }

    private static long? Long(JsonElement o, string name)
    {
        if (!Present(o, name, out var v)) return null;
        return v.ValueKind == JsonValueKind.Number && v.TryGetInt64(out var i) ? i : throw new ApiException(400, $"'{name}' must be an integer", name);
    }

    private static float? Float(JsonElement o, string name)
    {
        if (!Present(o, name, out var v)) return null;
        return v.ValueKind == JsonValueKind.Number && v.TryGetDouble(out var d) ? (float)d : throw new ApiException(400, $"'{name}' must be a number", name);
    }
}
