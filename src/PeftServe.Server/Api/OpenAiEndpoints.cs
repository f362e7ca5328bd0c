using System.Text;
using PeftServe.Core.Engine;
using PeftServe.Core.Generation;
using PeftServe.Server.Hosting;
using PeftServe.Server.Serving;

namespace PeftServe.Server.Api;

/// <summary>The OpenAI-compatible API: /v1/models, /v1/completions and /v1/chat/completions, with
/// and without streaming. The adapter is chosen by "model".</summary>
public static class OpenAiEndpoints
{
    public static void Map(WebApplication app)
    {
        app.MapGet("/v1/models", (ModelHost host) =>
        {
            long created = host.LoadedAt.ToUnixTimeSeconds();
            int maxModelLen = host.Engine.MaxColumns;   // as vLLM's model cards say it
            var data = new List<object> { new { id = host.ModelName, @object = "model", created, owned_by = "peftserve", root = host.ModelName, parent = (string?)null, max_model_len = maxModelLen } };
            data.AddRange(host.Store.List().Select(a => (object)new
            {
                id = a.Name, @object = "model", created = a.Created.ToUnixTimeSeconds(), owned_by = "peftserve", root = host.ModelName, parent = host.ModelName,
                max_model_len = maxModelLen, peft_type = a.PeftType,
            }));
            return Results.Ok(new { @object = "list", data });
        });
        app.MapGet("/v1/models/{id}", (string id, ModelHost host, GenerationService gen) =>
        {
            var (modelId, adapter) = gen.ResolveModel(id);
            return Results.Ok(new { id = modelId, @object = "model", created = host.LoadedAt.ToUnixTimeSeconds(), owned_by = "peftserve", root = host.ModelName, parent = adapter is null ? null : host.ModelName, max_model_len = host.Engine.MaxColumns });
        });
        app.MapPost("/v1/completions", Completions);
        app.MapPost("/v1/chat/completions", ChatCompletions);
    }

    public static string FinishName(FinishReason f) => f switch
    {
        FinishReason.Stop => "stop",
        FinishReason.Length => "length",
        _ => "cancelled",
    };

    /// <summary>The body of a JSON endpoint. Anything but application/json (or a +json type) is a 415:
    /// a web page can POST text/plain or a form anywhere without a CORS preflight, but not JSON.</summary>
    internal static async Task<string> ReadBody(HttpContext context)
    {
        var type = context.Request.ContentType;
        if (!Microsoft.Net.Http.Headers.MediaTypeHeaderValue.TryParse(type, out var media)
            || !(media.MediaType.Equals("application/json", StringComparison.OrdinalIgnoreCase) || media.Suffix.Equals("json", StringComparison.OrdinalIgnoreCase)))
            throw new ApiException(415, $"send the request body as JSON with 'Content-Type: application/json' (got {(string.IsNullOrEmpty(type) ? "no content type" : $"'{(type.Length > 80 ? type[..80] : type)}'")})",
                code: "unsupported_media_type");
        using var reader = new StreamReader(context.Request.Body, Encoding.UTF8);
        return await reader.ReadToEndAsync(context.RequestAborted);
    }

    private static async Task Completions(HttpContext context, GenerationService gen)
    {
        var body = OpenAiRequests.ParseBody(await ReadBody(context));
        var req = OpenAiRequests.ParseCompletion(body);
        var (modelId, adapter) = gen.ResolveModel(req.Settings.Model);
        var prompts = req.Prompts.Select(p => (IReadOnlyList<int>)(p.Ids?.ToArray() ?? gen.TextPrompt(p.Text!))).ToList();
        using var choices = Choices.Start(gen, "completions", modelId, req.Settings, prompts, adapter, defaultMaxTokens: 16, context.RequestAborted);
        string id = "cmpl-" + choices.Id["req-".Length..];
        long created = DateTimeOffset.UtcNow.ToUnixTimeSeconds();
        // Choice c answers prompt c / n.
        var echoes = req.Prompts.Select((p, i) => req.Echo ? p.Text ?? gen.Decode(prompts[i]) : "").ToList();
        IReadOnlyList<int> PromptOf(int choice) => prompts[choice / choices.PerPrompt];
        string EchoOf(int choice) => echoes[choice / choices.PerPrompt];

        var logprobs = req.Settings.Logprobs is null ? null : new LogprobFormat(gen.TokenText);
        // With echo, the prompt's tokens come first in the logprobs (the first without a value).
        List<(int, TokenLogprob?)> PromptEntries(int choice) => req.Echo && choices.Generations[choice].PromptLogprobs is { } scored
            ? PromptOf(choice).Select((token, j) => (token, scored[j])).ToList() : [];
        if (!req.Settings.Stream)
        {
            var (texts, tokens) = await Collect(choices, EchoOf, context.RequestAborted);
            await Results.Json(new
            {
                id, @object = "text_completion", created, model = modelId,
                choices = texts.Select((text, i) => new
                {
                    index = i, text,
                    logprobs = logprobs?.Completion([.. PromptEntries(i), .. tokens[i].Select(t => (t.TokenId, (TokenLogprob?)t))], 0),
                    finish_reason = FinishName(choices.Generations[i].Finish),
                }),
                usage = Usage(choices),
            }).ExecuteAsync(context);
            return;
        }

        var sse = new SseWriter(context.Response);
        var offsets = new int[choices.Generations.Count];   // where each choice's next listed token starts
        object Chunk(int index, string text, object? logprobsPart, string? finish) => new
        {
            id, @object = "text_completion", created, model = modelId,
            choices = new[] { new { index, text, logprobs = logprobsPart, finish_reason = finish } },
        };
        object Echo(int index)
        {
            var entries = PromptEntries(index);
            var chunk = Chunk(index, EchoOf(index), logprobs is null ? null : logprobs.Completion(entries, 0), null);
            offsets[index] = logprobs?.TextLength(entries.Select(e => e.Item1)) ?? 0;
            return chunk;
        }
        object Token(int index, string text, TokenLogprob? logprob)
        {
            var chunk = Chunk(index, text, logprob is null ? null : logprobs?.Completion([logprob], offsets[index]), null);
            if (logprob is not null) offsets[index] += gen.TokenText(logprob.TokenId).Length;
            return chunk;
        }
        await Stream(context, sse, choices, req.Settings.IncludeUsage,
            first: req.Echo ? Echo : null,
            token: Token,
            final: (i, f) => Chunk(i, "", null, f),
            usage: () => new { id, @object = "text_completion", created, model = modelId, choices = Array.Empty<object>(), usage = Usage(choices) });
    }

    private static async Task ChatCompletions(HttpContext context, GenerationService gen)
    {
        var body = OpenAiRequests.ParseBody(await ReadBody(context));
        var req = OpenAiRequests.ParseChat(body);
        var (modelId, adapter) = gen.ResolveModel(req.Settings.Model);
        var prompt = gen.ChatPrompt(req.Messages);
        using var choices = Choices.Start(gen, "chat", modelId, req.Settings, [prompt], adapter, gen.DefaultChatMaxTokens, context.RequestAborted);
        string id = "chatcmpl-" + choices.Id["req-".Length..];
        long created = DateTimeOffset.UtcNow.ToUnixTimeSeconds();

        var logprobs = req.Settings.Logprobs is null ? null : new LogprobFormat(gen.TokenText);
        if (!req.Settings.Stream)
        {
            var (texts, tokens) = await Collect(choices, _ => "", context.RequestAborted);
            await Results.Json(new
            {
                id, @object = "chat.completion", created, model = modelId,
                choices = texts.Select((text, i) => new
                {
                    index = i, message = new { role = "assistant", content = text }, logprobs = logprobs?.Chat(tokens[i]),
                    finish_reason = FinishName(choices.Generations[i].Finish),
                }),
                usage = Usage(choices),
            }).ExecuteAsync(context);
            return;
        }

        var sse = new SseWriter(context.Response);
        object Chunk(int index, object delta, TokenLogprob? logprob, string? finish) => new
        {
            id, @object = "chat.completion.chunk", created, model = modelId,
            choices = new[] { new { index, delta, logprobs = logprob is null ? null : logprobs?.Chat([logprob]), finish_reason = finish } },
        };
        await Stream(context, sse, choices, req.Settings.IncludeUsage,
            first: i => Chunk(i, new { role = "assistant", content = "" }, null, null),
            token: (i, t, lp) => Chunk(i, new { content = t }, lp, null),
            final: (i, f) => Chunk(i, new { }, null, f),
            usage: () => new { id, @object = "chat.completion.chunk", created, model = modelId, choices = Array.Empty<object>(), usage = Usage(choices) });
    }

    /// <summary>Every choice's text (after <paramref name="prefix"/>) and the log probabilities of its tokens (when asked).</summary>
    private static async Task<(string[] Texts, List<TokenLogprob>[] Tokens)> Collect(Choices choices, Func<int, string> prefix, CancellationToken aborted)
    {
        var texts = choices.Generations.Select((_, i) => new StringBuilder(prefix(i))).ToArray();
        var tokens = choices.Generations.Select(_ => new List<TokenLogprob>()).ToArray();
        await foreach (var (i, e) in choices.ReadAllAsync(aborted))
        {
            texts[i].Append(e.Text);
            if (e.Logprob is { } lp) tokens[i].Add(lp);
        }
        return (texts.Select(t => t.ToString()).ToArray(), tokens);
    }

    /// <summary>OpenAI's usage: the prompt counted once, the completion tokens of every choice.</summary>
    private static object Usage(Choices c) => new
    {
        prompt_tokens = c.PromptTokens,
        completion_tokens = c.CompletionTokens,
        total_tokens = c.PromptTokens + c.CompletionTokens,
    };

    /// <summary>Streams the choices as SSE, each chunk naming its choice's index; a choice's
    /// <paramref name="first"/> chunk (the chat role, the completion's echo) comes before its first token. The
    /// headers wait for the first event, so a request that fails before its first token (an adapter that cannot
    /// be loaded) still gets its status code; a failure after that becomes an error event. A client that goes
    /// away cancels every choice.</summary>
    private static async Task Stream(HttpContext context, SseWriter sse, Choices choices, bool includeUsage,
        Func<int, object>? first, Func<int, string, TokenLogprob?, object> token, Func<int, string, object> final, Func<object> usage)
    {
        var aborted = context.RequestAborted;
        var opened = new bool[choices.Generations.Count];
        async Task Open(int i)
        {
            if (opened[i]) return;
            opened[i] = true;
            if (first is not null) await sse.WriteAsync(first(i), aborted);
        }
        try
        {
            await foreach (var (i, e) in choices.ReadAllAsync(aborted))
            {
                await Open(i);
                if (e.Text.Length > 0 || e.Logprob is not null) await sse.WriteAsync(token(i, e.Text, e.Logprob), aborted);
                if (e.Finish is { } f) await sse.WriteAsync(final(i, FinishName(f)), aborted);
            }
            for (int i = 0; i < opened.Length; i++) await Open(i);
            if (includeUsage) await sse.WriteAsync(usage(), aborted);
            await sse.DoneAsync(aborted);
        }
        catch (ApiException e) when (sse.Started && !aborted.IsCancellationRequested)
        {
            await sse.WriteAsync(new { error = new OpenAiError(e.Message, "server_error", e.Param, e.Code) }, aborted);
            await sse.DoneAsync(aborted);
        }
    }
}
