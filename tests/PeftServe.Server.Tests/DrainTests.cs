using System.Net;
using System.Net.Http.Json;
using System.Text.Json;
using Microsoft.AspNetCore.SignalR.Client;
using PeftServe.Server.Hubs;

namespace PeftServe.Server.Tests;

/// <summary>Shutdown (what SIGTERM starts) lets running streams finish, SSE and SignalR alike, while
/// new requests are refused with 503 and /health says "draining". The process-level version (a real
/// SIGTERM to a separate server) is part of the fault test in loadtests/.</summary>
public sealed class DrainTests
{
    [Fact]
    public async Task StoppingTheServerDrainsRunningStreamsFirst()
    {
        var server = await TestServer.StartAsync("--drain-seconds", "120");
        try
        {
            const int tokens = 120;
            using var sseRequest = new HttpRequestMessage(HttpMethod.Post, "v1/completions")
            {
                Content = JsonContent.Create(new { prompt = "Once", max_tokens = tokens, ignore_eos = true, stream = true, stream_options = new { include_usage = true } }),
            };
            using var sse = await server.Http.SendAsync(sseRequest, HttpCompletionOption.ResponseHeadersRead);
            var sseBody = new StreamReader(await sse.Content.ReadAsStreamAsync());
            Assert.StartsWith("data: ", await sseBody.ReadLineAsync());   // the stream has begun

            await using var hub = new HubConnectionBuilder().WithUrl(server.Url + "/hubs/chat").Build();
            await hub.StartAsync();
            var hubTokens = hub.StreamAsync<ChatToken>("StreamChat", new ChatStreamRequest { Messages = [new HubMessage { Content = "Hi" }], MaxTokens = tokens, IgnoreEos = true })
                .GetAsyncEnumerator();
            Assert.True(await hubTokens.MoveNextAsync());

            // Shutdown's first step waits for the drain, so it runs on a thread of its own here (as on SIGTERM).
            var stopping = Task.Run(() => server.App.StopAsync());

            // While draining: /health says so, and new work is refused with a retry hint.
            HttpResponseMessage health;
            int tries = 0;
            while ((health = await server.Http.GetAsync("health")).StatusCode == HttpStatusCode.OK && tries++ < 100) await Task.Delay(20);
            Assert.Equal(HttpStatusCode.ServiceUnavailable, health.StatusCode);
            Assert.Equal("draining", (await health.Content.ReadFromJsonAsync<JsonElement>()).GetProperty("status").GetString());
            using var refused = await server.Http.PostAsJsonAsync("v1/completions", new { prompt = "late", max_tokens = 2 });
            Assert.Equal(HttpStatusCode.ServiceUnavailable, refused.StatusCode);
            Assert.NotNull(refused.Headers.RetryAfter);
            Assert.Equal("shutting_down", (await refused.Content.ReadFromJsonAsync<JsonElement>()).GetProperty("error").GetProperty("code").GetString());

            // Both running streams finish whole.
            var rest = (await sseBody.ReadToEndAsync()).Split("\n\n", StringSplitOptions.RemoveEmptyEntries);
            Assert.Equal("data: [DONE]", rest[^1]);
            var usage = JsonDocument.Parse(rest[^2]["data: ".Length..]).RootElement.GetProperty("usage");
            Assert.Equal(tokens, usage.GetProperty("completion_tokens").GetInt32());
            ChatToken last = hubTokens.Current;
            while (await hubTokens.MoveNextAsync()) last = hubTokens.Current;
            Assert.Equal("length", last.FinishReason);
            Assert.Equal(tokens, last.CompletionTokens);

            await stopping;
        }
        finally { await server.DisposeAsync(); }
    }
}
