using System.Diagnostics;
using System.Runtime.CompilerServices;
using Microsoft.Extensions.Options;
using PeftServe.Core.Adapters;
using PeftServe.Core.Engine;
using PeftServe.Core.Generation;
using PeftServe.Core.Templates;
using PeftServe.Server.Api;
using PeftServe.Server.Hosting;

namespace PeftServe.Server.Serving;

/// <summary>Turns API calls (HTTP or SignalR) into engine requests: resolves the model id to the base
/// or an adapter, renders chats with the tokenizer's template, maps the engine's refusals to OpenAI
/// errors and times every request's tokens for the metrics.</summary>
public sealed class GenerationService(ModelHost host, ServerMetrics metrics, IOptions<ServerOptions> options, ILogger<GenerationService> log)
{
    public string BaseModel => host.ModelName;

    /// <summary>The adapter a model id names: null for the base model (or no model given).</summary>
    public (string ModelId, string? Adapter) ResolveModel(string? model)
    {
        if (host.Draining) throw new ApiException(503, "the server is shutting down", code: "shutting_down") { RetryAfterSeconds = options.Value.RetryAfterSeconds };
        if (string.IsNullOrEmpty(model) || model == host.ModelName) return (host.ModelName, null);
        if (AdapterNames.IsSafe(model) && host.Store.Find(model) is not null) return (model, model);
        throw new ApiException(404, $"The model '{model}' does not exist (GET /v1/models lists the base model and every adapter)", "model", "model_not_found");
    }

    /// <summary>A chat as token ids, through the model's chat template (with the assistant's turn header).</summary>
    public int[] ChatPrompt(IReadOnlyList<ChatMessage> messages, bool addGenerationPrompt = true)
    {
        var tokenizer = host.Tokenizer;
        var template = tokenizer.ChatTemplate ?? throw new ApiException(400, "this model has no chat template; use /v1/completions", "messages");
        string rendered;
        try
        {
            rendered = ChatTemplate.Render(template, messages, addGenerationPrompt, new Dictionary<string, object?>
            {
                ["bos_token"] = tokenizer.BosToken ?? "",
                ["eos_token"] = tokenizer.EosToken ?? "",
            });
        }
        catch (JinjaException e) { throw new ApiException(400, $"the chat template refused these messages: {e.Message}", "messages"); }
        // As transformers does: the template writes its own special tokens.
        return tokenizer.Encode(rendered, addSpecialTokens: false);
    }

    public int[] TextPrompt(string text, bool addSpecialTokens = true) => host.Tokenizer.Encode(text, addSpecialTokens);

    public int VocabSize => host.Tokenizer.VocabSize;
    public bool IsSpecial(int id) => host.Tokenizer.IsSpecial(id);
    public int MaxSequenceLength => host.Engine.MaxColumns;

    public string Decode(IEnumerable<int> ids) => host.Tokenizer.Decode(ids);

    /// <summary>One token's text, special tokens included (for log probabilities).</summary>
    public string TokenText(int id) => host.Tokenizer.Decode([id], skipSpecialTokens: false);

    /// <summary>The engine request for these settings. max_tokens defaults to what is left of the
    /// sequence (bounded by <paramref name="defaultMaxTokens"/>); more than fits is a 400, as OpenAI answers.</summary>
    public GenerationRequest Build(GenerationSettings s, IReadOnlyList<int> prompt, string? adapter, int defaultMaxTokens)
    {
        int room = host.Engine.MaxColumns - prompt.Count;
        if (room < 1)
            throw new ApiException(400, $"the prompt has {prompt.Count} tokens; this model holds at most {host.Engine.MaxColumns} tokens per sequence", "messages", "context_length_exceeded");
        if (s.MaxTokens is { } asked && asked > room)
            throw new ApiException(400, $"this model holds at most {host.Engine.MaxColumns} tokens per sequence; the prompt has {prompt.Count}, so max_tokens can be at most {room} (got {asked})", "max_tokens", "context_length_exceeded");
        int maxTokens = s.MaxTokens ?? Math.Min(defaultMaxTokens, room);
        if (s.MinTokens > maxTokens)
            throw new ApiException(400, $"min_tokens ({s.MinTokens}) is more than max_tokens ({maxTokens})", "min_tokens");
        int vocab = host.Tokenizer.VocabSize;
        int badBias = s.LogitBias?.Keys.FirstOrDefault(id => id >= vocab, -1) ?? -1, badStop = s.StopTokenIds.FirstOrDefault(id => id >= vocab, -1);
        if (badBias >= 0) throw new ApiException(400, $"logit_bias names token {badBias}; the vocabulary has {vocab} tokens", "logit_bias");
        if (badStop >= 0) throw new ApiException(400, $"stop_token_ids names token {badStop}; the vocabulary has {vocab} tokens", "stop_token_ids");
        return new GenerationRequest
        {
            PromptIds = prompt,
            Adapter = adapter,
            StopStrings = s.Stop,
            Id = $"req-{Guid.NewGuid():N}",
            Sampling = new SamplingParams
            {
                Temperature = s.Temperature,
                TopP = s.TopP,
                TopK = s.TopK,
                Seed = s.Seed is { } seed ? unchecked((ulong)seed) : null,
                MaxTokens = maxTokens,
                StopTokenIds = [.. (s.IgnoreEos ? [] : host.Tokenizer.EosTokenIds).Concat(s.StopTokenIds).Distinct()],
                PresencePenalty = s.PresencePenalty,
                FrequencyPenalty = s.FrequencyPenalty,
                Logprobs = s.Logprobs,
                PromptLogprobs = s.PromptLogprobs,
                MinP = s.MinP,
                RepetitionPenalty = s.RepetitionPenalty,
                MinTokens = s.MinTokens,
                Json = s.Json,
                LogitBias = s.LogitBias,
            },
        };
    }

    public int DefaultChatMaxTokens => options.Value.DefaultChatMaxTokens;

    /// <summary>Submits a request; the engine's refusals become OpenAI errors (429 with Retry-After when the queue is full).</summary>
    public Generation Start(string api, string modelId, GenerationRequest request, CancellationToken cancellation)
    {
        GenerationStream stream;
        try { stream = host.Engine.Submit(request, cancellation); }
        catch (QueueFullException e)
        {
            metrics.Requests.WithLabels(api, modelId, "rejected").Inc();
            log.LogWarning("Queue full ({Capacity} waiting): refused {RequestId} for {Model}", e.Capacity, request.Id, modelId);
            throw new ApiException(429, e.Message, code: "queue_full") { RetryAfterSeconds = options.Value.RetryAfterSeconds };
        }
        catch (EngineStoppedException e) { throw new ApiException(503, e.Message, code: "shutting_down") { RetryAfterSeconds = options.Value.RetryAfterSeconds }; }
        catch (AdapterException e) { throw new ApiException(404, e.Message, "model", "model_not_found"); }
        catch (ArgumentException e) { throw new ApiException(400, e.Message); }
        metrics.PromptTokens.WithLabels(modelId).Inc(request.PromptIds.Count);
        return new Generation(api, modelId, request, stream, metrics, log, host);
    }
}

/// <summary>One running request: its token events, timed for the metrics. Enumerate it once.</summary>
public sealed class Generation(string api, string modelId, GenerationRequest request, GenerationStream stream, ServerMetrics metrics, ILogger log, ModelHost host)
    : IAsyncEnumerable<GenerationEvent>
{
    private readonly Stopwatch _clock = Stopwatch.StartNew();

    public string Id => stream.Id;
    public string ModelId => modelId;
    public int PromptTokens => stream.PromptTokens;
    public int CompletionTokens => stream.CompletionTokens;
    public GenerationRequest Request => request;
    /// <summary>The prompt's log probabilities when asked for (see <see cref="GenerationStream.PromptLogprobs"/>).</summary>
    public IReadOnlyList<TokenLogprob?>? PromptLogprobs => stream.PromptLogprobs;
    public FinishReason Finish { get; private set; } = FinishReason.Length;
    public double? TimeToFirstToken { get; private set; }

    /// <summary>An adapter that failed to load: deleted since the request named it (404, as if it had
    /// never been there), or unusable (422). Store paths are not shown to the client.</summary>
    private ApiException AdapterFailure(AdapterException e)
    {
        if (request.Adapter is { } name && host.Store.Find(name) is null)
            return new ApiException(404, $"The model '{name}' does not exist (it was deleted)", "model", "model_not_found");
        log.LogWarning(e, "Adapter {Adapter} could not be loaded for {RequestId}", request.Adapter, Id);
        var message = e.Message.Replace(host.Store.Directory + Path.DirectorySeparatorChar, "").Replace(host.Store.Directory, "the adapter store");
        return new ApiException(422, message, "model", "adapter_unavailable");
    }

    public async IAsyncEnumerator<GenerationEvent> GetAsyncEnumerator(CancellationToken cancellationToken = default)
    {
        metrics.InFlight.Inc();
        string outcome = "error";
        double last = 0;
        try
        {
            await using var e = stream.GetAsyncEnumerator(cancellationToken);
            while (true)
            {
                try
                {
                    if (!await e.MoveNextAsync()) break;
                }
                catch (AdapterException ex) { throw AdapterFailure(ex); }
                catch (ArgumentException ex) { throw new ApiException(400, ex.Message); }
                var ev = e.Current;
                if (ev.TokenId >= 0)
                {
                    double now = _clock.Elapsed.TotalSeconds;
                    if (TimeToFirstToken is null)
                    {
                        TimeToFirstToken = now;
                        metrics.TimeToFirstToken.WithLabels(api).Observe(now);
                    }
                    else metrics.InterTokenLatency.WithLabels(api).Observe(now - last);
                    last = now;
                    metrics.CompletionTokens.WithLabels(modelId).Inc();
                }
                if (ev.Finish is { } f) Finish = f;
                yield return ev;
            }
            outcome = Finish == FinishReason.Cancelled ? "cancelled" : "ok";
        }
        finally
        {
            if (outcome == "error" && cancellationToken.IsCancellationRequested) outcome = "cancelled";
            metrics.InFlight.Dec();
            metrics.Requests.WithLabels(api, modelId, outcome).Inc();
            metrics.RequestDuration.WithLabels(api).Observe(_clock.Elapsed.TotalSeconds);
            log.LogInformation("{Api} {RequestId} model {Model}: {Outcome}, {PromptTokens} prompt + {CompletionTokens} completion tokens, finish {Finish}, first token {TtftMs:F1} ms, total {TotalMs:F1} ms",
                api, Id, modelId, outcome, PromptTokens, CompletionTokens, Finish, (TimeToFirstToken ?? double.NaN) * 1000, _clock.Elapsed.TotalMilliseconds);
        }
    }
}
