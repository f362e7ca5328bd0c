using System.Net;
using System.Net.Http.Json;
using System.Text.Json;
using Microsoft.AspNetCore.SignalR;
using Microsoft.AspNetCore.SignalR.Client;

namespace PeftServe.FaultTest;

/// <summary>What became of one request. Served: a whole stream (finish reason, [DONE], the token
/// count the server reported). Refused: a clean refusal the client can act on (429 with Retry-After,
/// 503 while draining, 404 for an adapter deleted meanwhile). Cancelled: the client itself cancelled or
/// disconnected. Lost: anything else (a 5xx, a stream that broke off, a wrong count): must stay 0.</summary>
public enum Outcome { Served, Refused, Cancelled, Lost }

/// <summary>How a client treats its request: read it all, cancel it, or drop the connection mid-stream.</summary>
public enum Behaviour { Complete, Cancel, Disconnect }

public sealed record RequestResult(Outcome Outcome, string Detail);

/// <summary>The chat token the hub streams (camelCase JSON, as PeftServe.Server.Hubs.ChatToken).</summary>
public sealed record HubToken(string Text, int TokenId, int Index, string? FinishReason, int? PromptTokens, int? CompletionTokens);

public static class Clients
{
    public static object ChatBody(string model, int maxTokens, bool stream, string prompt) => new
    {
        model,
        messages = new[] { new { role = "user", content = prompt } },
        max_tokens = maxTokens,
        ignore_eos = true,
        temperature = 0.8,
        stream,
        stream_options = stream ? new { include_usage = true } : null,
    };

    /// <summary>One streamed chat over SSE.</summary>
    public static async Task<RequestResult> SseAsync(HttpClient http, string model, int maxTokens, Behaviour behaviour, int stopAfter, string prompt)
    {
        using var cts = new CancellationTokenSource(TimeSpan.FromMinutes(5));
        HttpResponseMessage response;
        try
        {
            response = await http.SendAsync(new HttpRequestMessage(HttpMethod.Post, "v1/chat/completions") { Content = JsonContent.Create(ChatBody(model, maxTokens, true, prompt)) },
                HttpCompletionOption.ResponseHeadersRead, cts.Token);
        }
        catch (Exception e) when (e is HttpRequestException or TaskCanceledException) { return new(Outcome.Lost, "sse: " + e.GetType().Name + " " + e.Message); }
        using (response)
        {
            if (Refusal(response) is { } refused) return refused;
            if (response.StatusCode != HttpStatusCode.OK) return new(Outcome.Lost, $"sse: HTTP {(int)response.StatusCode} {await response.Content.ReadAsStringAsync()}");
            var reader = new StreamReader(await response.Content.ReadAsStreamAsync(cts.Token));
            int chunks = 0;
            string? finish = null;
            int? completion = null;
            bool done = false;
            try
            {
                while (await reader.ReadLineAsync(cts.Token) is { } line)
                {
                    if (!line.StartsWith("data: ", StringComparison.Ordinal)) continue;
                    var data = line["data: ".Length..];
                    if (data == "[DONE]") { done = true; break; }
                    var json = JsonDocument.Parse(data).RootElement;
                    if (json.TryGetProperty("error", out var error)) return new(Outcome.Lost, "sse: error event " + error);
                    if (json.TryGetProperty("usage", out var usage) && usage.ValueKind == JsonValueKind.Object) completion = usage.GetProperty("completion_tokens").GetInt32();
                    foreach (var choice in json.GetProperty("choices").EnumerateArray())
                        if (choice.TryGetProperty("finish_reason", out var f) && f.ValueKind == JsonValueKind.String) finish = f.GetString();
                    if (++chunks == stopAfter && behaviour != Behaviour.Complete)
                    {
                        // Cancel: abandon the request; disconnect: drop the connection under it. Either way the server must let go.
                        if (behaviour == Behaviour.Cancel) cts.Cancel();
                        return new(Outcome.Cancelled, behaviour.ToString());
                    }
                }
            }
            catch (Exception e) when (e is IOException or HttpRequestException or OperationCanceledException) { return new(Outcome.Lost, "sse: stream broke off: " + e.Message); }
            if (!done || finish is null || completion is null) return new(Outcome.Lost, $"sse: incomplete stream (done {done}, finish {finish}, usage {completion})");
            if (finish == "length" && completion != maxTokens) return new(Outcome.Lost, $"sse: finished by length after {completion} of {maxTokens} tokens");
            return new(Outcome.Served, finish);
        }
    }

    /// <summary>One streamed chat over a SignalR connection. Disconnect stops the connection mid-stream (the caller makes a new one).</summary>
    public static async Task<RequestResult> HubAsync(HubConnection hub, string model, int maxTokens, Behaviour behaviour, int stopAfter, string prompt)
    {
        using var cts = new CancellationTokenSource(TimeSpan.FromMinutes(5));
        int tokens = 0;
        HubToken? last = null;
        try
        {
            var request = new { model, messages = new[] { new { role = "user", content = prompt } }, maxTokens, temperature = 0.8, ignoreEos = true };
            await foreach (var token in hub.StreamAsync<HubToken>("StreamChat", request, cts.Token))
            {
                tokens++;
                last = token;
                if (tokens == stopAfter && behaviour != Behaviour.Complete)
                {
                    if (behaviour == Behaviour.Cancel) cts.Cancel();
                    else await hub.StopAsync();
                    return new(Outcome.Cancelled, behaviour.ToString());
                }
            }
        }
        catch (HubException e) when (e.Message.Contains("429 ") || e.Message.Contains("503 ") || e.Message.Contains("404 ")) { return new(Outcome.Refused, "hub: " + e.Message[..3]); }
        catch (Exception e) { return new(Outcome.Lost, "hub: " + e.GetType().Name + " " + e.Message); }
        if (last?.FinishReason is null) return new(Outcome.Lost, $"hub: stream ended without a finish reason after {tokens} tokens");
        if (last.CompletionTokens != tokens) return new(Outcome.Lost, $"hub: {tokens} tokens streamed, {last.CompletionTokens} reported");
        if (last.FinishReason == "length" && tokens != maxTokens) return new(Outcome.Lost, $"hub: finished by length after {tokens} of {maxTokens} tokens");
        return new(Outcome.Served, last.FinishReason);
    }

    /// <summary>One short non-streaming completion (the queue-overflow bursts).</summary>
    public static async Task<RequestResult> OneShotAsync(HttpClient http, string model, string prompt)
    {
        try
        {
            using var response = await http.PostAsJsonAsync("v1/chat/completions", ChatBody(model, 8, false, prompt));
            if (Refusal(response) is { } refused) return refused;
            if (response.StatusCode != HttpStatusCode.OK) return new(Outcome.Lost, $"oneshot: HTTP {(int)response.StatusCode}");
            var body = await response.Content.ReadFromJsonAsync<JsonElement>();
            return body.GetProperty("usage").GetProperty("completion_tokens").GetInt32() == 8 ? new(Outcome.Served, "ok") : new(Outcome.Lost, "oneshot: wrong token count");
        }
        catch (Exception e) when (e is HttpRequestException or TaskCanceledException) { return new(Outcome.Lost, "oneshot: " + e.Message); }
    }

    /// <summary>A clean refusal: 429 and 503 must say when to come back; 404 is an adapter deleted meanwhile.</summary>
    private static RequestResult? Refusal(HttpResponseMessage response) => response.StatusCode switch
    {
        HttpStatusCode.TooManyRequests or HttpStatusCode.ServiceUnavailable when response.Headers.RetryAfter is null => new(Outcome.Lost, $"HTTP {(int)response.StatusCode} without Retry-After"),
        HttpStatusCode.TooManyRequests => new(Outcome.Refused, "429"),
        HttpStatusCode.ServiceUnavailable => new(Outcome.Refused, "503"),
        HttpStatusCode.NotFound => new(Outcome.Refused, "404"),
        _ => null,
    };
}
