using System.Net;
using System.Net.Http.Headers;
using System.Net.Http.Json;
using System.Text;
using System.Text.Json;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.SignalR.Client;
using Microsoft.Extensions.Logging.Abstractions;
using PeftServe.Server.Api;
using PeftServe.Tests;

namespace PeftServe.Server.Tests;

/// <summary>Requests a browser page or a careless client could send: cross-site ones, a foreign Host,
/// non-JSON bodies, malformed JSON, parameters the server does not implement, values out of range.
/// Every one gets an OpenAI error with the right status, and the server keeps serving.</summary>
public sealed class HostileRequestTests(ServerFixture fixture) : IClassFixture<ServerFixture>
{
    private TestServer S => fixture.Server;

    private static readonly string Chat = """{"messages":[{"role":"user","content":"hi"}],"max_tokens":2}""";

    private async Task<JsonElement> Error(HttpResponseMessage response, int status, string? code = null)
    {
        var body = await response.Content.ReadAsStringAsync();
        Assert.True(status == (int)response.StatusCode, $"{(int)response.StatusCode}: {body}");
        var error = JsonDocument.Parse(body).RootElement.GetProperty("error");
        if (code is not null) Assert.Equal(code, error.GetProperty("code").GetString());
        Assert.DoesNotContain("Exception", body);
        Assert.Equal(HttpStatusCode.OK, (await S.Http.GetAsync("health")).StatusCode);
        return error;
    }

    private Task<HttpResponseMessage> Post(string path, string body, string contentType = "application/json", Action<HttpRequestMessage>? headers = null)
    {
        var request = new HttpRequestMessage(HttpMethod.Post, path) { Content = new StringContent(body, Encoding.UTF8) };
        request.Content.Headers.ContentType = MediaTypeHeaderValue.Parse(contentType);
        headers?.Invoke(request);
        return S.Http.SendAsync(request);
    }

    // ---- cross-site ----

    [Theory]
    [InlineData("text/plain")]
    [InlineData("application/x-www-form-urlencoded")]
    [InlineData("multipart/form-data; boundary=x")]
    public async Task JsonEndpointsRefuseOtherContentTypesWith415(string contentType)
    {
        // A page can send these cross-origin without a CORS preflight; JSON it cannot.
        using var chat = await Post("v1/chat/completions", Chat, contentType);
        await Error(chat, 415, "unsupported_media_type");
        using var completion = await Post("v1/completions", """{"prompt":"hi","max_tokens":2}""", contentType);
        await Error(completion, 415, "unsupported_media_type");
        using var json = await Post("v1/chat/completions", Chat, "application/json; charset=utf-8");
        Assert.Equal(HttpStatusCode.OK, json.StatusCode);
    }

    [Fact]
    public async Task CrossOriginRequestsThatChangeStateAreRefused()
    {
        using var foreignOrigin = await Post("v1/chat/completions", Chat, headers: r => r.Headers.Add("Origin", "https://evil.example"));
        await Error(foreignOrigin, 403, "cross_origin_refused");
        using var crossSite = await Post("v1/chat/completions", Chat, headers: r => r.Headers.Add("Sec-Fetch-Site", "cross-site"));
        await Error(crossSite, 403, "cross_origin_refused");

        // An upload a page posts as a form: refused, and nothing stored.
        var form = new MultipartFormDataContent { { new StringContent("csrf"), "name" } };
        foreach (var f in Directory.GetFiles(Path.Combine(TestData.RepoRoot, "adapters", "tiny-ia3")))
            form.Add(new ByteArrayContent(File.ReadAllBytes(f)), "files", Path.GetFileName(f));
        using var upload = new HttpRequestMessage(HttpMethod.Post, "v1/adapters") { Content = form };
        upload.Headers.Add("Origin", "http://localhost.evil.example");
        await Error(await S.Http.SendAsync(upload), 403, "cross_origin_refused");
        Assert.False(Directory.Exists(Path.Combine(S.Store, "csrf")));
        using var delete = new HttpRequestMessage(HttpMethod.Delete, "v1/adapters/tiny-ia3");
        delete.Headers.Add("Origin", "null");
        await Error(await S.Http.SendAsync(delete), 403, "cross_origin_refused");
        Assert.True(Directory.Exists(Path.Combine(S.Store, "tiny-ia3")));

        // The server's own pages (the playground) and clients that are not browsers are served.
        using var sameOrigin = await Post("v1/chat/completions", Chat, headers: r => { r.Headers.Add("Origin", S.Url); r.Headers.Add("Sec-Fetch-Site", "same-origin"); });
        Assert.Equal(HttpStatusCode.OK, sameOrigin.StatusCode);
        Assert.Equal(HttpStatusCode.OK, (await S.Http.GetAsync("v1/models")).StatusCode);
    }

    [Fact]
    public async Task ACrossOriginHubConnectionIsRefused()
    {
        await using var foreign = new HubConnectionBuilder().WithUrl(S.Url + "/hubs/chat", o => o.Headers["Origin"] = "https://evil.example").Build();
        var e = await Assert.ThrowsAsync<HttpRequestException>(() => foreign.StartAsync());
        Assert.Equal(HttpStatusCode.Forbidden, e.StatusCode);
        await using var own = new HubConnectionBuilder().WithUrl(S.Url + "/hubs/chat", o => o.Headers["Origin"] = S.Url).Build();
        await own.StartAsync();
        Assert.Equal(HubConnectionState.Connected, own.State);
    }

    [Theory]
    [InlineData("evil.example")]                 // DNS rebinding: the page's own name pointed at 127.0.0.1
    [InlineData("127.0.0.1.nip.io")]
    public async Task AForeignHostHeaderIsRefused(string host)
    {
        var request = new HttpRequestMessage(HttpMethod.Get, "v1/models");
        request.Headers.Host = host;
        await Error(await S.Http.SendAsync(request), 400, "invalid_host");
        var local = new HttpRequestMessage(HttpMethod.Get, "v1/models");
        local.Headers.Host = "localhost:" + new Uri(S.Url).Port;
        Assert.Equal(HttpStatusCode.OK, (await S.Http.SendAsync(local)).StatusCode);
    }

    [Fact]
    public async Task ConfiguredOriginsAndHostsAreServed()
    {
        await using var server = await TestServer.StartAsync("--PeftServe:CorsOrigins:0", "https://app.example", "--PeftServe:AllowedHosts:0", "api.example", "--PeftServe:AllowedHosts:1", "127.0.0.1");
        var preflight = new HttpRequestMessage(HttpMethod.Options, "v1/chat/completions");
        preflight.Headers.Add("Origin", "https://app.example");
        preflight.Headers.Add("Access-Control-Request-Method", "POST");
        preflight.Headers.Add("Access-Control-Request-Headers", "content-type");
        using var answer = await server.Http.SendAsync(preflight);
        Assert.Equal("https://app.example", answer.Headers.GetValues("Access-Control-Allow-Origin").Single());

        var allowed = new HttpRequestMessage(HttpMethod.Post, "v1/chat/completions") { Content = new StringContent(Chat, Encoding.UTF8, "application/json") };
        allowed.Headers.Add("Origin", "https://app.example");
        allowed.Headers.Host = "api.example";
        Assert.Equal(HttpStatusCode.OK, (await server.Http.SendAsync(allowed)).StatusCode);
        var other = new HttpRequestMessage(HttpMethod.Post, "v1/chat/completions") { Content = new StringContent(Chat, Encoding.UTF8, "application/json") };
        other.Headers.Add("Origin", "https://other.example");
        Assert.Equal(HttpStatusCode.Forbidden, (await server.Http.SendAsync(other)).StatusCode);
        var localhost = new HttpRequestMessage(HttpMethod.Get, "v1/models");
        localhost.Headers.Host = "localhost";   // not listed once AllowedHosts is set
        Assert.Equal(HttpStatusCode.BadRequest, (await server.Http.SendAsync(localhost)).StatusCode);
    }

    // ---- malformed API requests ----

    [Theory]
    [InlineData("""{"messages":[{"role":"user","content":"bad \ud800 half"}],"max_tokens":2}""", "messages[0].content")]
    [InlineData("""{"messages":[{"role":"user","content":"x"}],"stop":["\udfff"],"max_tokens":2}""", "stop[0]")]
    [InlineData("""{"messages":[{"role":"user","content":"x"}],"\ud83d":1}""", null)]
    public async Task ALoneSurrogateIsA400ThatEchoesNoParserText(string body, string? param)
    {
        using var response = await Post("v1/chat/completions", body);
        var error = await Error(response, 400, "invalid_string");
        Assert.Contains("unpaired UTF-16 surrogate", error.GetProperty("message").GetString());
        if (param is not null) Assert.Equal(param, error.GetProperty("param").GetString());
    }

    [Fact]
    public async Task InvalidJsonIsDescribedByPositionNotByTheParsersText()
    {
        using var response = await Post("v1/completions", "{\"prompt\": nope}");
        var message = (await Error(response, 400)).GetProperty("message").GetString()!;
        Assert.Equal("the request body is not valid JSON (line 1, byte 13)", message);
    }

    [Theory]
    [InlineData("response_format", """{"type": "json_object", "schema": {}}""")]
    [InlineData("response_format", """{"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "string", "pattern": "x"}}}}}""")]
    [InlineData("response_format", """{"type": "xml"}""")]
    [InlineData("tool_choice", "\"auto\"")]
    [InlineData("functions", """[{"name": "f"}]""")]
    [InlineData("service_tier", "\"auto\"")]
    public async Task ParametersThatAreNotImplementedAreRefusedByName(string name, string value)
    {
        using var response = await Post("v1/chat/completions", $$"""{"messages":[{"role":"user","content":"hi"}],"max_tokens":2,"{{name}}":{{value}}}""");
        var error = await Error(response, 400, "unsupported_parameter");
        Assert.Equal(name, error.GetProperty("param").GetString());
        Assert.Contains($"'{name}'", error.GetProperty("message").GetString());
    }

    [Theory]
    [InlineData("v1/chat/completions", "\"top_logprobs\": 2", "top_logprobs")]                        // without logprobs: true
    [InlineData("v1/chat/completions", "\"logprobs\": true, \"top_logprobs\": 21", "top_logprobs")]
    [InlineData("v1/chat/completions", "\"logprobs\": true, \"top_logprobs\": -1", "top_logprobs")]
    [InlineData("v1/chat/completions", "\"logprobs\": 3", "logprobs")]
    [InlineData("v1/completions", "\"logprobs\": 21", "logprobs")]
    [InlineData("v1/completions", "\"logprobs\": true", "logprobs")]
    [InlineData("v1/completions", "\"logit_bias\": {\"abc\": 1}", "logit_bias")]
    [InlineData("v1/completions", "\"logit_bias\": {\"5\": 101}", "logit_bias")]
    [InlineData("v1/completions", "\"logit_bias\": {\"-5\": 1}", "logit_bias")]
    [InlineData("v1/completions", "\"logit_bias\": {\"99999999\": 1}", "logit_bias")]
    [InlineData("v1/completions", "\"logit_bias\": [1, 2]", "logit_bias")]
    [InlineData("v1/completions", "\"min_p\": 1.5", "min_p")]
    [InlineData("v1/completions", "\"repetition_penalty\": 0", "repetition_penalty")]
    [InlineData("v1/completions", "\"min_tokens\": 3", "min_tokens")]
    [InlineData("v1/completions", "\"min_tokens\": -1", "min_tokens")]
    [InlineData("v1/completions", "\"repetition_penalty\": -1.5", "repetition_penalty")]
    [InlineData("v1/completions", "\"stop_token_ids\": [-1]", "stop_token_ids")]
    [InlineData("v1/completions", "\"stop_token_ids\": [99999999]", "stop_token_ids")]
    public async Task SamplingExtrasOutOfRangeAreRefusedByName(string path, string parameter, string param)
    {
        var body = path.Contains("chat") ? $$"""{"messages":[{"role":"user","content":"hi"}],"max_tokens":2,{{parameter}}}""" : $$"""{"prompt":"hi","max_tokens":2,{{parameter}}}""";
        var error = await Error(await Post(path, body), 400);
        Assert.Equal(param, error.GetProperty("param").GetString());
    }

    [Theory]
    [InlineData("\"logit_bias\": {}")]
    [InlineData("\"logit_bias\": {\"5\": -100, \"17\": 2.5}")]
    [InlineData("\"min_p\": 0.1")]
    [InlineData("\"repetition_penalty\": 1.3")]
    [InlineData("\"min_tokens\": 2")]
    [InlineData("\"stop_token_ids\": [3, 4]")]
    [InlineData("\"response_format\": {\"type\": \"text\"}")]
    [InlineData("\"tools\": []")]
    [InlineData("\"logprobs\": false")]
    [InlineData("\"user\": \"alice\"")]
    [InlineData("\"top_k\": -1")]
    [InlineData("\"top_k\": 1")]
    public async Task NeutralValuesOfThoseParametersAreServed(string parameter)
    {
        using var response = await Post("v1/chat/completions", $$"""{"messages":[{"role":"user","content":"hi"}],"max_tokens":2,{{parameter}}}""");
        Assert.Equal(HttpStatusCode.OK, response.StatusCode);
    }

    [Theory]
    [InlineData("\"top_k\": -3", "top_k")]
    [InlineData("\"top_k\": 0", "top_k")]
    [InlineData("\"best_of\": 2", "best_of")]
    [InlineData("\"suffix\": \"x\"", "suffix")]
    [InlineData("\"stream_options\": {\"include_usage\": true}", "stream_options")]
    [InlineData("\"stream\": true, \"stream_options\": {\"include_usage\": true, \"continuous\": true}", "stream_options.continuous")]
    [InlineData("\"temperature\": -0.5", "temperature")]
    [InlineData("\"top_p\": 0", "top_p")]
    [InlineData("\"presence_penalty\": 2.5", "presence_penalty")]
    [InlineData("\"frequency_penalty\": -3", "frequency_penalty")]
    [InlineData("\"seed\": 1.5", "seed")]
    [InlineData("\"n\": -1", "n")]
    [InlineData("\"n\": 1000000", "n")]
    [InlineData("\"max_tokens\": 4294967296", "max_tokens")]
    public async Task OutOfRangeCompletionParametersAreRefused(string parameter, string param)
    {
        using var response = await Post("v1/completions", $$"""{"prompt":"hi","max_tokens":2,{{parameter}}}""".Replace("\"max_tokens\":2,\"max_tokens\"", "\"max_tokens\""));
        var error = await Error(response, 400);
        Assert.Equal(param, error.GetProperty("param").GetString());
    }

    [Fact]
    public async Task TheHubRefusesTopKOutOfRange()
    {
        await using var hub = new HubConnectionBuilder().WithUrl(S.Url + "/hubs/chat").Build();
        await hub.StartAsync();
        var request = new Hubs.ChatStreamRequest { Messages = [new Hubs.HubMessage { Content = "hi" }], MaxTokens = 2, TopK = -3 };
        var e = await Assert.ThrowsAsync<Microsoft.AspNetCore.SignalR.HubException>(async () => { await foreach (var _ in hub.StreamAsync<Hubs.ChatToken>("StreamChat", request)) { } });
        Assert.Contains("top_k must be -1 (no limit) or at least 1; got -3", e.Message);
    }

    // ---- keys and metrics ----

    [Fact]
    public async Task MetricsCanBePutBehindAKey()
    {
        await using var server = await TestServer.StartAsync("--metrics-key", "scrape-me", "--PeftServe:AdminKeys:0", "admin");
        Assert.Equal(HttpStatusCode.Unauthorized, (await server.Http.GetAsync("metrics")).StatusCode);
        foreach (var (key, status) in new[] { ("scrape-m", 401), ("scrape-me!", 401), ("scrape-me", 200), ("admin", 200) })
        {
            var request = new HttpRequestMessage(HttpMethod.Get, "metrics");
            request.Headers.Authorization = new AuthenticationHeaderValue("Bearer", key);
            Assert.True(status == (int)(await server.Http.SendAsync(request)).StatusCode, key);
        }
        Assert.Equal(HttpStatusCode.OK, (await server.Http.GetAsync("health")).StatusCode);
    }

    [Fact]
    public void KeysMatchOnlyExactly()
    {
        var ring = new KeyRing(new Hosting.ServerOptions { ApiKeys = ["user-key-1", "user-key-2"], AdminKeys = ["admin-key"] });
        Assert.True(ring.IsUser("user-key-2"));
        Assert.True(ring.IsUser("admin-key"));
        Assert.True(ring.IsAdmin("admin-key"));
        foreach (var wrong in new[] { "user-key-", "user-key-22", "USER-KEY-1", "", "admin-key ", "admin" })
        {
            Assert.False(ring.IsUser(wrong), wrong);
            Assert.False(ring.IsAdmin(wrong), wrong);
        }
        Assert.False(ring.IsAdmin("user-key-1"));
        Assert.True(ring.MayReadMetrics(null));   // no metrics key configured: open
    }

    [Fact]
    public async Task AnUnexpectedFailureIsA500ThatKeepsItsTextInTheLog()
    {
        var middleware = new ErrorHandlingMiddleware(_ => throw new InvalidOperationException("secret path /etc/peftserve/internal.db"), NullLogger<ErrorHandlingMiddleware>.Instance);
        var context = new DefaultHttpContext { RequestServices = S.App.Services };
        context.Response.Body = new MemoryStream();
        await middleware.InvokeAsync(context);
        Assert.Equal(500, context.Response.StatusCode);
        var body = Encoding.UTF8.GetString(((MemoryStream)context.Response.Body).ToArray());
        Assert.Contains("internal server error", body);
        Assert.DoesNotContain("secret", body);
        Assert.DoesNotContain("InvalidOperationException", body);
    }
}
