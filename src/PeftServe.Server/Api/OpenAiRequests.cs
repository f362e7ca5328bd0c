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
}

/// <summary>A parsed /v1/completions body: the prompt as text or as token ids.</summary>
public sealed record CompletionRequest(GenerationSettings Settings, string? PromptText, IReadOnlyList<int>? PromptIds, bool Echo);

/// <summary>A parsed /v1/chat/completions body.</summary>
public sealed record ChatRequest(GenerationSettings Settings, IReadOnlyList<ChatMessage> Messages);

/// <summary>Reads OpenAI request bodies field by field, so that every mistake is answered with an
/// OpenAI-style 400 naming the offending parameter (rather than a generic deserialization error).</summary>
public static class OpenAiRequests
{
    public const int MaxStopStrings = 4;

    public static JsonElement ParseBody(string body)
    {
        if (string.IsNullOrWhiteSpace(body)) throw new ApiException(400, "the request body is empty; send a JSON object");
        try
        {
            using var doc = JsonDocument.Parse(body);
            if (doc.RootElement.ValueKind != JsonValueKind.Object) throw new ApiException(400, "the request body must be a JSON object");
            return doc.RootElement.Clone();
        }
        catch (JsonException e) { throw new ApiException(400, $"the request body is not valid JSON: {e.Message}"); }
    }

    public static CompletionRequest ParseCompletion(JsonElement root)
    {
        var settings = ParseSettings(root, chat: false);
        if (!root.TryGetProperty("prompt", out var prompt) || prompt.ValueKind == JsonValueKind.Null)
            throw new ApiException(400, "'prompt' is required", "prompt");
        string? text = null;
        List<int>? ids = null;
        switch (prompt.ValueKind)
        {
            case JsonValueKind.String: text = prompt.GetString(); break;
            case JsonValueKind.Array:
                var items = prompt.EnumerateArray().ToList();
                if (items.Count == 0) throw new ApiException(400, "'prompt' must not be empty", "prompt");
                if (items.All(i => i.ValueKind == JsonValueKind.Number))
                    ids = items.Select(i => i.TryGetInt32(out var v) ? v : throw new ApiException(400, "'prompt' token ids must be integers", "prompt")).ToList();
                else if (items.Count == 1 && items[0].ValueKind == JsonValueKind.String) text = items[0].GetString();
                else if (items.All(i => i.ValueKind == JsonValueKind.String))
                    throw new ApiException(400, "only one prompt per request is supported", "prompt");
                else throw new ApiException(400, "'prompt' must be a string, a list of one string or a list of token ids", "prompt");
                break;
            default: throw new ApiException(400, "'prompt' must be a string or a list of token ids", "prompt");
        }
        if (text is { Length: 0 }) throw new ApiException(400, "'prompt' must not be empty", "prompt");
        return new CompletionRequest(settings, text, ids, Bool(root, "echo") ?? false);
    }

    public static ChatRequest ParseChat(JsonElement root)
    {
        var settings = ParseSettings(root, chat: true);
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
        return new ChatRequest(settings, list);
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
        var n = Int(root, "n");
        if (n is not null and not 1) throw new ApiException(400, "only n = 1 is supported", "n");
        if (root.TryGetProperty("logprobs", out var lp) && lp.ValueKind is not (JsonValueKind.Null or JsonValueKind.False))
            throw new ApiException(400, "logprobs are not supported", "logprobs");
        if (root.TryGetProperty("tools", out var tools) && tools.ValueKind == JsonValueKind.Array && tools.GetArrayLength() > 0)
            throw new ApiException(400, "tools are not supported", "tools");
        int? maxTokens = Int(root, "max_tokens");
        if (chat) maxTokens = Int(root, "max_completion_tokens") ?? maxTokens;
        if (maxTokens is < 1) throw new ApiException(400, $"max_tokens must be at least 1; got {maxTokens}", chat && root.TryGetProperty("max_completion_tokens", out _) ? "max_completion_tokens" : "max_tokens");
        var stream = Bool(root, "stream") ?? false;
        bool includeUsage = false;
        if (root.TryGetProperty("stream_options", out var so) && so.ValueKind == JsonValueKind.Object)
            includeUsage = Bool(so, "include_usage", "stream_options.include_usage") ?? false;
        var s = new GenerationSettings
        {
            Model = String(root, "model"),
            MaxTokens = maxTokens,
            Temperature = Float(root, "temperature") ?? 1f,
            TopP = Float(root, "top_p") ?? 1f,
            TopK = Int(root, "top_k") is { } k && k > 0 ? k : 0,
            Seed = Long(root, "seed"),
            Stop = Stop(root),
            PresencePenalty = Float(root, "presence_penalty") ?? 0f,
            FrequencyPenalty = Float(root, "frequency_penalty") ?? 0f,
            IgnoreEos = Bool(root, "ignore_eos") ?? false,
            Stream = stream,
            IncludeUsage = includeUsage,
        };
        Check(s);
        return s;
    }

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

    private static string? String(JsonElement o, string name)
    {
        if (!Present(o, name, out var v)) return null;
        return v.ValueKind == JsonValueKind.String ? v.GetString() : throw new ApiException(400, $"'{name}' must be a string", name);
    }

    private static bool? Bool(JsonElement o, string name, string? param = null)
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
