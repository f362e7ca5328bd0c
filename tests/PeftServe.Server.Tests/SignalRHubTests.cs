using System.Net.Http.Json;
using System.Text.Json;
using Microsoft.AspNetCore.SignalR;
using Microsoft.AspNetCore.SignalR.Client;
using PeftServe.Server.Hubs;

namespace PeftServe.Server.Tests;

/// <summary>The SignalR hub at /hubs/chat through Microsoft.AspNetCore.SignalR.Client.</summary>
public sealed class SignalRHubTests(ServerFixture fixture) : IClassFixture<ServerFixture>
{
    private TestServer S => fixture.Server;

    private async Task<HubConnection> ConnectAsync()
    {
        var connection = new HubConnectionBuilder().WithUrl(S.Url + "/hubs/chat").Build();
        await connection.StartAsync();
        return connection;
    }

    private static ChatStreamRequest Request(string model, int maxTokens) => new()
    {
        Model = model,
        Messages = [new HubMessage { Role = "user", Content = "Tell me something" }],
        MaxTokens = maxTokens,
        Temperature = 0,
    };

    [Fact]
    public async Task StreamChatYieldsTokensPerAdapterAndMatchesTheHttpApi()
    {
        await using var connection = await ConnectAsync();
        foreach (var model in new[] { "tiny-llama", "tiny-lora-r8-all" })
        {
            var tokens = new List<ChatToken>();
            await foreach (var t in connection.StreamAsync<ChatToken>("StreamChat", Request(model, 12)))
                tokens.Add(t);
            Assert.Equal(12, tokens.Count(t => t.TokenId >= 0));
            Assert.Equal(Enumerable.Range(0, tokens.Count), tokens.Select(t => t.Index));
            Assert.Equal("length", tokens[^1].FinishReason);
            Assert.Equal(12, tokens[^1].CompletionTokens);
            Assert.All(tokens[..^1], t => Assert.Null(t.FinishReason));

            var http = await S.PostJsonAsync("v1/chat/completions", new
            {
                model, max_tokens = 12, temperature = 0, messages = new[] { new { role = "user", content = "Tell me something" } },
            });
            Assert.Equal(http.GetProperty("choices")[0].GetProperty("message").GetProperty("content").GetString(), string.Concat(tokens.Select(t => t.Text)));
        }
    }

    [Fact]
    public async Task CancellingTheStreamCancelsTheRequest()
    {
        await using var connection = await ConnectAsync();
        await foreach (var _ in connection.StreamAsync<ChatToken>("StreamChat", Request("tiny-llama", 2))) { } // warm
        double before = await S.MetricAsync("peftserve_engine_requests_total{outcome=\"cancelled\"}");
        using var cts = new CancellationTokenSource();
        var request = Request("tiny-ia3", 200);
        request.IgnoreEos = true;
        int seen = 0;
        await Assert.ThrowsAnyAsync<OperationCanceledException>(async () =>
        {
            await foreach (var _ in connection.StreamAsync<ChatToken>("StreamChat", request, cts.Token))
                if (++seen == 1) cts.Cancel();
        });
        Assert.True(seen < 200);
        double after = before;
        for (int i = 0; i < 100 && after <= before; i++)
        {
            await Task.Delay(100);
            after = await S.MetricAsync("peftserve_engine_requests_total{outcome=\"cancelled\"}");
        }
        Assert.True(after > before, "the engine did not see the stream cancelled");
        // The connection is still usable.
        int again = 0;
        await foreach (var t in connection.StreamAsync<ChatToken>("StreamChat", Request("tiny-llama", 3))) if (t.TokenId >= 0) again++;
        Assert.Equal(3, again);
    }

    [Fact]
    public async Task AnUnknownModelIsAHubError()
    {
        await using var connection = await ConnectAsync();
        var e = await Assert.ThrowsAsync<HubException>(async () =>
        {
            await foreach (var _ in connection.StreamAsync<ChatToken>("StreamChat", Request("no-such-adapter", 4))) { }
        });
        Assert.Contains("model_not_found", e.Message);
    }
}
