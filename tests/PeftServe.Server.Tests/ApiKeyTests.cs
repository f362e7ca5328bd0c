using System.Net;
using System.Net.Http.Headers;
using System.Net.Http.Json;
using Microsoft.AspNetCore.SignalR.Client;
using PeftServe.Tests;

namespace PeftServe.Server.Tests;

/// <summary>Bearer keys from configuration: user keys may generate, only admin keys may change adapters.</summary>
public sealed class ApiKeyTests
{
    private static HttpRequestMessage With(HttpMethod method, string path, string? key, HttpContent? content = null)
    {
        var r = new HttpRequestMessage(method, path) { Content = content };
        if (key is not null) r.Headers.Authorization = new AuthenticationHeaderValue("Bearer", key);
        return r;
    }

    [Fact]
    public async Task KeysGateTheApiAndAdminKeysGateUploadAndDelete()
    {
        await using var s = await TestServer.StartAsync("--PeftServe:ApiKeys:0", "user-key", "--PeftServe:AdminKeys:0", "admin-key");
        var chat = () => JsonContent.Create(new { max_tokens = 2, messages = new[] { new { role = "user", content = "hi" } } });

        Assert.Equal(HttpStatusCode.OK, (await s.Http.GetAsync("health")).StatusCode);
        using (var none = await s.Http.SendAsync(With(HttpMethod.Post, "v1/chat/completions", null, chat())))
        {
            Assert.Equal(HttpStatusCode.Unauthorized, none.StatusCode);
            Assert.Equal("invalid_api_key", (await none.Content.ReadFromJsonAsync<System.Text.Json.JsonElement>()).GetProperty("error").GetProperty("code").GetString());
        }
        Assert.Equal(HttpStatusCode.Unauthorized, (await s.Http.SendAsync(With(HttpMethod.Get, "v1/models", "wrong"))).StatusCode);
        Assert.Equal(HttpStatusCode.OK, (await s.Http.SendAsync(With(HttpMethod.Post, "v1/chat/completions", "user-key", chat()))).StatusCode);
        Assert.Equal(HttpStatusCode.OK, (await s.Http.SendAsync(With(HttpMethod.Get, "v1/adapters", "user-key"))).StatusCode);
        // vLLM's tokenizer endpoints and LoRAX's generate endpoints sit outside /v1, behind the same keys.
        foreach (var path in new[] { "tokenize", "detokenize", "generate", "generate_stream" })
        {
            var body = () => JsonContent.Create(path switch
            {
                "tokenize" => new { prompt = "hi" },
                "detokenize" => (object)new { tokens = new[] { 1, 40 } },
                _ => new { inputs = "hi", parameters = new { max_new_tokens = 2 } },
            });
            Assert.Equal(HttpStatusCode.Unauthorized, (await s.Http.SendAsync(With(HttpMethod.Post, path, null, body()))).StatusCode);
            Assert.Equal(HttpStatusCode.OK, (await s.Http.SendAsync(With(HttpMethod.Post, path, "user-key", body()))).StatusCode);
        }

        MultipartFormDataContent Upload()
        {
            var form = new MultipartFormDataContent { { new StringContent("keyed"), "name" } };
            foreach (var f in Directory.GetFiles(Path.Combine(TestData.RepoRoot, "adapters", "tiny-ia3")))
                form.Add(new ByteArrayContent(File.ReadAllBytes(f)), "files", Path.GetFileName(f));
            return form;
        }
        Assert.Equal(HttpStatusCode.Forbidden, (await s.Http.SendAsync(With(HttpMethod.Post, "v1/adapters", "user-key", Upload()))).StatusCode);
        Assert.Equal(HttpStatusCode.Created, (await s.Http.SendAsync(With(HttpMethod.Post, "v1/adapters", "admin-key", Upload()))).StatusCode);
        Assert.Equal(HttpStatusCode.Forbidden, (await s.Http.SendAsync(With(HttpMethod.Delete, "v1/adapters/keyed", "user-key"))).StatusCode);
        Assert.Equal(HttpStatusCode.OK, (await s.Http.SendAsync(With(HttpMethod.Delete, "v1/adapters/keyed", "admin-key"))).StatusCode);

        // The hub too: refused without a key, served with one (as a browser sends it, in the query string).
        await using var anonymous = new HubConnectionBuilder().WithUrl(s.Url + "/hubs/chat").Build();
        var refused = await Assert.ThrowsAsync<HttpRequestException>(() => anonymous.StartAsync());
        Assert.Equal(HttpStatusCode.Unauthorized, refused.StatusCode);
        await using var keyed = new HubConnectionBuilder().WithUrl(s.Url + "/hubs/chat", o => o.AccessTokenProvider = () => Task.FromResult<string?>("user-key")).Build();
        await keyed.StartAsync();
        Assert.Equal(HubConnectionState.Connected, keyed.State);
    }

    [Theory]
    [InlineData("http://0.0.0.0:8000", "http://127.0.0.1:8000", true)]
    [InlineData("http://*:8000;http://localhost:9000", "http://127.0.0.1:8000;http://localhost:9000", true)]
    [InlineData("http://[::]:8000", "http://127.0.0.1:8000", true)]
    [InlineData("http://127.0.0.1:0", "http://127.0.0.1:0", false)]
    [InlineData("http://[::1]:8000", "http://[::1]:8000", false)]
    [InlineData("http://example.com:80/", "http://127.0.0.1:80/", true)]
    public void WithoutKeysEveryUrlIsBoundToLoopback(string urls, string expected, bool changed)
    {
        Assert.Equal((expected, changed), Program.LoopbackUrls(urls));
    }

    [Fact]
    public void ABareDoubleQuantSwitchMeansTrue()
    {
        Assert.Equal(["--quantize", "nf4", "--double-quant=true", "--urls", "x"], Program.NormalizeFlags(["--quantize", "nf4", "--double-quant", "--urls", "x"]));
        Assert.Equal(["--double-quant", "false"], Program.NormalizeFlags(["--double-quant", "false"]));
    }

    [Fact]
    public async Task Nf4QuantizationIsWiredIntoTheModelLoad()
    {
        await using var s = await TestServer.StartAsync("--quantize", "nf4", "--double-quant");
        var host = (Hosting.ModelHost)s.App.Services.GetService(typeof(Hosting.ModelHost))!;
        Assert.Equal(Core.Quantization.QuantizationMode.Nf4, host.Model.Options.Quantization);
        Assert.True(host.Model.Options.DoubleQuant);
        var body = await s.PostJsonAsync("v1/completions", new { prompt = "Hi", max_tokens = 3, temperature = 0 });
        Assert.Equal(3, body.GetProperty("usage").GetProperty("completion_tokens").GetInt32());
    }
}
