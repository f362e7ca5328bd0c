using System.Text;
using System.Text.Json;
using PeftServe.Core.Engine;
using PeftServe.Core.Generation;
using PeftServe.Server.Serving;

namespace PeftServe.Server.Api;

/// <summary>LoRAX's native API (Hugging Face TGI's, with an adapter per request): <c>POST /generate</c> and
/// <c>POST /generate_stream</c> with <c>{"inputs", "parameters": {"adapter_id", "max_new_tokens", ...}}</c>, so
/// that LoRAX clients (its Python client, TGI clients) drive PeftServe unchanged. Adapters come from this server's
/// store (adapter_source "local" or unset); guided JSON (response_format json_object, with a schema or not) is served;
/// what this server does not compute (typical_p, watermark, merged_adapters, best_of above 1) is refused by name, never
/// ignored. Errors use TGI's body, <c>{"error", "error_type"}</c>, which those clients parse.</summary>
public static class LoraxEndpoints
{
    /// <summary>TGI's default when max_new_tokens is not given.</summary>
    public const int DefaultMaxNewTokens = 20;

    private static readonly string[] TopLevel = ["inputs", "parameters", "stream"];
    private static readonly string[] Known =
    [
        "adapter_id", "adapter_source", "merged_adapters", "api_token", "do_sample", "max_new_tokens", "ignore_eos_token",
        "repetition_penalty", "return_full_text", "stop", "seed", "temperature", "top_k", "top_p", "truncate", "typical_p",
        "best_of", "watermark", "details", "decoder_input_details", "return_k_alternatives", "response_format",
    ];

    public static void Map(WebApplication app)
    {
        app.MapPost("/generate", (HttpContext context, GenerationService gen) => Run(context, gen, stream: false));
        app.MapPost("/generate_stream", (HttpContext context, GenerationService gen) => Run(context, gen, stream: true));
    }

    /// <summary>Whether a path is one of these endpoints (they sit outside /v1, behind the same keys).</summary>
    public static bool Owns(PathString path) => path.StartsWithSegments("/generate") || path.StartsWithSegments("/generate_stream");

    private sealed record Request(GenerationSettings Settings, string Inputs, int[] Prompt, string ModelId, string? Adapter,
        bool Details, bool Prefill, bool FullText, int Alternatives);

    private static async Task Run(HttpContext context, GenerationService gen, bool stream)
    {
        var sse = new SseWriter(context.Response);
        try
        {
            var request = Parse(OpenAiRequests.ParseBody(await OpenAiEndpoints.ReadBody(context)), gen, stream);
            using var choices = Choices.Start(gen, "generate", request.ModelId, request.Settings, [request.Prompt], request.Adapter,
                DefaultMaxNewTokens, context.RequestAborted);
            if (stream) await Stream(context, sse, gen, request, choices);
            else await Whole(context, gen, request, choices);
        }
        catch (ApiException e) when (!context.RequestAborted.IsCancellationRequested)
        {
            // Mid-stream, as TGI does: an error event (a failure now is the generation's, whatever its status).
            if (sse.Started) await sse.WriteAsync(new { error = e.Message, error_type = "generation" }, context.RequestAborted);
            else if (!context.Response.HasStarted)
            {
                if (e.RetryAfterSeconds is { } s) context.Response.Headers.RetryAfter = s.ToString(System.Globalization.CultureInfo.InvariantCulture);
                await Results.Json(Error(e), statusCode: e.Status).ExecuteAsync(context);
            }
        }
    }

    /// <summary>TGI's error body; its clients map error_type to their exceptions (a 404 has none: "not found").</summary>
    private static object Error(ApiException e)
    {
        string? type = e.Status switch
        {
            404 => null,
            429 or 503 => "overloaded",
            >= 500 => "generation",
            _ => "validation",
        };
        return type is null ? new { error = e.Message } : new { error = e.Message, error_type = type };
    }

    private static async Task Whole(HttpContext context, GenerationService gen, Request request, Choices choices)
    {
        var text = new StringBuilder();
        var tokens = new List<TokenLogprob>();
        int last = -1;
        await foreach (var (_, e) in choices.ReadAllAsync(context.RequestAborted))
        {
            text.Append(e.Text);
            if (e.Logprob is { } lp) tokens.Add(lp);
            if (e.TokenId >= 0) last = e.TokenId;
        }
        var g = choices.Generations[0];
        await Results.Json(new
        {
            generated_text = (request.FullText ? request.Inputs : "") + text,
            details = request.Details ? new
            {
                finish_reason = FinishReason(g, last),
                prompt_tokens = g.PromptTokens,
                generated_tokens = g.CompletionTokens,
                skipped_tokens = 0,
                seed = request.Settings.Seed,
                prefill = request.Prefill ? Prefill(gen, request.Prompt, g.PromptLogprobs) : [],
                tokens = tokens.Select(t => Token(gen, t, request.Alternatives)).ToList(),
            } : null,
        }).ExecuteAsync(context);
    }

    /// <summary>One event per token: the token (id, text, log probability, whether special); the last also carries
    /// the whole text and the details. No closing "[DONE]": TGI's clients read every event as JSON.</summary>
    private static async Task Stream(HttpContext context, SseWriter sse, GenerationService gen, Request request, Choices choices)
    {
        var aborted = context.RequestAborted;
        var text = new StringBuilder(request.FullText ? request.Inputs : "");
        await foreach (var (_, e) in choices.ReadAllAsync(aborted))
        {
            text.Append(e.Text);
            if (e.TokenId < 0 || e.Logprob is not { } lp) continue;
            var g = choices.Generations[0];
            bool last = e.Finish is not null;
            await sse.WriteAsync(new
            {
                token = Token(gen, lp, request.Alternatives),
                generated_text = last ? text.ToString() : null,
                details = last ? new
                {
                    finish_reason = FinishReason(g, e.TokenId),
                    prompt_tokens = g.PromptTokens,
                    generated_tokens = g.CompletionTokens,
                    seed = request.Settings.Seed,
                } : null,
            }, aborted);
        }
    }

    /// <summary>TGI's reasons: the token budget, an end-of-sequence (stop) token, or a stop sequence.</summary>
    private static string FinishReason(Generation g, int lastToken) => g.Finish switch
    {
        Core.Generation.FinishReason.Length => "length",
        _ when g.Request.Sampling.StopTokenIds.Contains(lastToken) => "eos_token",
        _ => "stop_sequence",
    };

    private static object Token(GenerationService gen, TokenLogprob t, int alternatives) => new
    {
        id = t.TokenId,
        text = gen.TokenText(t.TokenId),
        logprob = LogprobFormat.Finite(t.Logprob),
        special = gen.IsSpecial(t.TokenId),
        alternative_tokens = alternatives > 0 ? t.Top.Select(a => new { id = a.TokenId, text = gen.TokenText(a.TokenId), logprob = LogprobFormat.Finite(a.Logprob) }).ToList() : null,
        skipped = false,
    };

    private static List<object> Prefill(GenerationService gen, int[] prompt, IReadOnlyList<TokenLogprob?>? scored) =>
        prompt.Select((id, j) => (object)new { id, text = gen.TokenText(id), logprob = scored?[j] is { } lp ? LogprobFormat.Finite(lp.Logprob) : (float?)null }).ToList();


    // ------------------------------------------------------------------ request

    private static Request Parse(JsonElement root, GenerationService gen, bool stream)
    {
        foreach (var p in root.EnumerateObject())
            if (!TopLevel.Contains(p.Name)) throw Invalid($"unrecognized request field '{p.Name}'", p.Name);
        if (!root.TryGetProperty("inputs", out var inputsElement) || inputsElement.ValueKind != JsonValueKind.String || inputsElement.GetString() is not { Length: > 0 } inputs)
            throw Invalid("'inputs' is required: a non-empty string", "inputs");
        var p0 = root.TryGetProperty("parameters", out var parameters) && parameters.ValueKind != JsonValueKind.Null ? parameters : default;
        if (p0.ValueKind is not (JsonValueKind.Undefined or JsonValueKind.Object)) throw Invalid("'parameters' must be an object", "parameters");
        if (p0.ValueKind == JsonValueKind.Object)
            foreach (var p in p0.EnumerateObject())
                if (!Known.Contains(p.Name)) throw Invalid($"unrecognized parameter '{p.Name}'", p.Name);

        JsonElement? Get(string name) => p0.ValueKind == JsonValueKind.Object && p0.TryGetProperty(name, out var v) && v.ValueKind != JsonValueKind.Null ? v : null;
        double? Number(string name) => Get(name) is { } v ? v.ValueKind == JsonValueKind.Number ? v.GetDouble() : throw Invalid($"'{name}' must be a number", name) : null;
        long? Integer(string name) => Get(name) is { } v ? v.ValueKind == JsonValueKind.Number && v.TryGetInt64(out var i) ? i : throw Invalid($"'{name}' must be an integer", name) : null;
        bool Flag(string name) => Get(name) is { } v ? v.ValueKind switch
        {
            JsonValueKind.True => true,
            JsonValueKind.False => false,
            _ => throw Invalid($"'{name}' must be true or false", name),
        } : false;
        void Unsupported(string name, bool neutral)
        {
            if (!neutral) throw Invalid($"'{name}' is not supported by this server; leave it out", name);
        }

        // Adapters are this server's: from its store, by name.
        var source = Get("adapter_source") is { } src ? src.ValueKind == JsonValueKind.String ? src.GetString() : throw Invalid("'adapter_source' must be a string", "adapter_source") : null;
        if (source is not (null or "local"))
            throw Invalid($"adapter_source '{source}' is not served: adapters come from this server's store (upload them to /v1/adapters)", "adapter_source");
        Unsupported("merged_adapters", Get("merged_adapters") is null);
        Unsupported("typical_p", Get("typical_p") is null);
        Unsupported("watermark", !Flag("watermark"));
        // Guided JSON: {"type": "json_object"} with a schema or without one (any object).
        Core.Generation.JsonSchema? json = null;
        if (Get("response_format") is { } format)
        {
            if (format.ValueKind != JsonValueKind.Object || !format.TryGetProperty("type", out var ft) || ft.ValueKind != JsonValueKind.String || ft.GetString() != "json_object")
                throw Invalid("'response_format' must be {\"type\": \"json_object\"}, with a \"schema\" or without", "response_format");
            if (format.TryGetProperty("schema", out var schema) && schema.ValueKind != JsonValueKind.Null)
            {
                try { json = Core.Generation.JsonSchema.Parse(schema); }
                catch (ArgumentException e) { throw Invalid($"response_format.schema: {e.Message}", "response_format"); }
            }
            else json = Core.Generation.JsonSchema.AnyObject;
        }
        Unsupported("best_of", Integer("best_of") is null or 1);

        var adapterId = Get("adapter_id") is { } a ? a.ValueKind == JsonValueKind.String ? a.GetString() : throw Invalid("'adapter_id' must be a string", "adapter_id") : null;
        var (modelId, adapter) = gen.ResolveModel(adapterId);

        double? temperature = Number("temperature"), topP = Number("top_p"), repetition = Number("repetition_penalty");
        if (repetition is not null and (<= 0 or > 100)) throw Invalid($"'repetition_penalty' must be above 0 and at most 100; got {repetition}", "repetition_penalty");
        long? topK = Integer("top_k"), seed = Integer("seed"), maxNew = Integer("max_new_tokens"), truncate = Integer("truncate"), k = Integer("return_k_alternatives");
        if (temperature is < 0 or > 100) throw Invalid($"'temperature' must be from 0 to 100; got {temperature}", "temperature");
        if (topP is not null and (<= 0 or > 1)) throw Invalid($"'top_p' must be in (0, 1]; got {topP}", "top_p");
        if (topK is < 1 or > int.MaxValue) throw Invalid($"'top_k' must be at least 1; got {topK}", "top_k");
        if (seed is < 0) throw Invalid($"'seed' must not be negative; got {seed}", "seed");
        if (maxNew is < 1 or > int.MaxValue) throw Invalid($"'max_new_tokens' must be at least 1; got {maxNew}", "max_new_tokens");
        if (truncate is < 1 or > int.MaxValue) throw Invalid($"'truncate' must be at least 1; got {truncate}", "truncate");
        if (k is not null and (< 1 or > SamplingParams.MaxLogprobs)) throw Invalid($"'return_k_alternatives' must be from 1 to {SamplingParams.MaxLogprobs}; got {k}", "return_k_alternatives");
        var stop = Get("stop") is { } st
            ? st.ValueKind == JsonValueKind.Array && st.EnumerateArray().All(x => x.ValueKind == JsonValueKind.String && x.GetString()!.Length > 0)
                ? st.EnumerateArray().Select(x => x.GetString()!).ToList() : throw Invalid("'stop' must be a list of non-empty strings", "stop")
            : [];
        if (stop.Count > OpenAiRequests.MaxStopStrings) throw Invalid($"at most {OpenAiRequests.MaxStopStrings} stop sequences", "stop");

        // TGI samples when asked to, or when any sampling parameter is given; otherwise it decodes greedily.
        bool sample = Flag("do_sample") || temperature is not null || topP is not null || topK is not null;
        bool details = Flag("details"), prefill = details && Flag("decoder_input_details");
        int alternatives = (int)(k ?? 0);
        var prompt = gen.TextPrompt(inputs);
        if (truncate is { } t && prompt.Length > t) prompt = prompt[^(int)t..];   // keep the last tokens, as TGI does

        var settings = new GenerationSettings
        {
            Model = modelId,
            MaxTokens = (int?)maxNew,
            Temperature = sample ? (float)(temperature ?? 1.0) : 0f,
            TopP = (float)(topP ?? 1.0),
            TopK = (int)(topK ?? 0),
            Seed = seed,
            Stop = stop,
            IgnoreEos = Flag("ignore_eos_token"),
            RepetitionPenalty = (float)(repetition ?? 1.0),
            Json = json,
            // Every streamed token carries its log probability, as do the details' tokens.
            Logprobs = stream || details ? alternatives : null,
            PromptLogprobs = prefill ? 0 : null,
        };
        return new Request(settings, inputs, prompt, modelId, adapter, details, prefill, Flag("return_full_text"), alternatives);
    }

    private static ApiException Invalid(string message, string param) => new(400, message, param);
}
