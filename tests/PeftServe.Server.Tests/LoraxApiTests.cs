using System.Net;
using System.Net.Http.Json;
using System.Text.Json;

namespace PeftServe.Server.Tests;

/// <summary>LoRAX's native API (/generate, /generate_stream), as its Python client sends it: every parameter
/// present, most null. The text equals the OpenAI endpoint's for the same adapter and prompt.</summary>
public sealed class LoraxApiTests(ServerFixture fixture) : IClassFixture<ServerFixture>
{
    private TestServer S => fixture.Server;
    private const string Prompt = "Once upon a time";

    /// <summary>What lorax-client's Parameters model serialises: every field, unset ones null or default.</summary>
    private static Dictionary<string, object?> ClientParameters(Dictionary<string, object?> set)
    {
        var p = new Dictionary<string, object?>
        {
            ["adapter_id"] = null, ["adapter_source"] = null, ["merged_adapters"] = null, ["api_token"] = null, ["do_sample"] = false,
            ["max_new_tokens"] = null, ["ignore_eos_token"] = false, ["repetition_penalty"] = null, ["return_full_text"] = false, ["stop"] = Array.Empty<string>(),
            ["seed"] = null, ["temperature"] = null, ["top_k"] = null, ["top_p"] = null, ["truncate"] = null, ["typical_p"] = null, ["best_of"] = null,
            ["watermark"] = false, ["details"] = false, ["decoder_input_details"] = false, ["return_k_alternatives"] = null, ["response_format"] = null,
        };
        foreach (var (k, v) in set) p[k] = v;
        return p;
    }

    private Task<JsonElement> Generate(Dictionary<string, object?> parameters) =>
        S.PostJsonAsync("generate", new { inputs = Prompt, parameters = ClientParameters(parameters), stream = false });

    [Fact]
    public async Task GenerateGivesTheOpenAiEndpointsTextWithDetails()
    {
        var openAi = await S.PostJsonAsync("v1/completions", new { model = "tiny-lora-r4-qv", prompt = Prompt, max_tokens = 6, temperature = 0, ignore_eos = true });
        var expected = openAi.GetProperty("choices")[0].GetProperty("text").GetString();

        var plain = await Generate(new() { ["adapter_id"] = "tiny-lora-r4-qv", ["max_new_tokens"] = 6, ["ignore_eos_token"] = true });
        Assert.Equal(expected, plain.GetProperty("generated_text").GetString());
        Assert.Equal(JsonValueKind.Null, plain.GetProperty("details").ValueKind);

        var full = await Generate(new() { ["adapter_id"] = "tiny-lora-r4-qv", ["max_new_tokens"] = 6, ["ignore_eos_token"] = true, ["return_full_text"] = true,
            ["details"] = true, ["decoder_input_details"] = true, ["return_k_alternatives"] = 2 });
        Assert.Equal(Prompt + expected, full.GetProperty("generated_text").GetString());
        var details = full.GetProperty("details");
        Assert.Equal("length", details.GetProperty("finish_reason").GetString());
        Assert.Equal(6, details.GetProperty("generated_tokens").GetInt32());
        Assert.Equal(openAi.GetProperty("usage").GetProperty("prompt_tokens").GetInt32(), details.GetProperty("prompt_tokens").GetInt32());
        var tokens = details.GetProperty("tokens").EnumerateArray().ToList();
        Assert.Equal(6, tokens.Count);
        foreach (var t in tokens)
        {
            Assert.True(t.GetProperty("logprob").GetSingle() <= 0);
            var alternatives = t.GetProperty("alternative_tokens").EnumerateArray().ToList();
            Assert.Equal(2, alternatives.Count);
            Assert.Equal(alternatives[0].GetProperty("id").GetInt32(), t.GetProperty("id").GetInt32());   // greedy: the most likely
            Assert.False(t.GetProperty("special").GetBoolean());
            Assert.False(t.GetProperty("skipped").GetBoolean());
        }
        var prefill = details.GetProperty("prefill").EnumerateArray().ToList();
        Assert.Equal(details.GetProperty("prompt_tokens").GetInt32(), prefill.Count);
        Assert.Equal(JsonValueKind.Null, prefill[0].GetProperty("logprob").ValueKind);
        Assert.All(prefill.Skip(1), t => Assert.True(t.GetProperty("logprob").GetSingle() <= 0));
    }

    [Fact]
    public async Task GenerateStreamSendsOneEventPerTokenAndTheTextAtTheEnd()
    {
        var whole = await Generate(new() { ["adapter_id"] = "tiny-ia3", ["max_new_tokens"] = 5, ["ignore_eos_token"] = true, ["details"] = true });
        using var request = new HttpRequestMessage(HttpMethod.Post, "generate_stream")
        {
            Content = JsonContent.Create(new { inputs = Prompt, parameters = ClientParameters(new() { ["adapter_id"] = "tiny-ia3", ["max_new_tokens"] = 5, ["ignore_eos_token"] = true }), stream = true }),
        };
        using var response = await S.Http.SendAsync(request, HttpCompletionOption.ResponseHeadersRead);
        Assert.Equal("text/event-stream", response.Content.Headers.ContentType!.MediaType);
        var events = (await response.Content.ReadAsStringAsync()).Split("\n\n", StringSplitOptions.RemoveEmptyEntries)
            .Select(l => JsonDocument.Parse(l["data:".Length..]).RootElement).ToList();   // every event is JSON: no [DONE]
        Assert.Equal(5, events.Count);
        Assert.Equal(whole.GetProperty("details").GetProperty("tokens").EnumerateArray().Select(t => t.GetProperty("id").GetInt32()),
            events.Select(e => e.GetProperty("token").GetProperty("id").GetInt32()));
        Assert.All(events[..^1], e => Assert.Equal(JsonValueKind.Null, e.GetProperty("generated_text").ValueKind));
        Assert.Equal(whole.GetProperty("generated_text").GetString(), events[^1].GetProperty("generated_text").GetString());
        Assert.Equal("length", events[^1].GetProperty("details").GetProperty("finish_reason").GetString());
        Assert.Equal(5, events[^1].GetProperty("details").GetProperty("generated_tokens").GetInt32());
    }

    [Fact]
    public async Task StopSequencesSamplingAndTruncation()
    {
        var greedy = (await Generate(new() { ["max_new_tokens"] = 12, ["ignore_eos_token"] = true })).GetProperty("generated_text").GetString()!;
        var stop = greedy.Substring(4, 2);
        var stopped = await Generate(new() { ["max_new_tokens"] = 12, ["ignore_eos_token"] = true, ["stop"] = new[] { stop }, ["details"] = true });
        Assert.Equal(greedy[..greedy.IndexOf(stop, StringComparison.Ordinal)], stopped.GetProperty("generated_text").GetString());
        Assert.Equal("stop_sequence", stopped.GetProperty("details").GetProperty("finish_reason").GetString());

        var a = await Generate(new() { ["max_new_tokens"] = 12, ["do_sample"] = true, ["seed"] = 5, ["ignore_eos_token"] = true });
        var b = await Generate(new() { ["max_new_tokens"] = 12, ["temperature"] = 1.0, ["seed"] = 5, ["ignore_eos_token"] = true });
        Assert.Equal(a.GetProperty("generated_text").GetString(), b.GetProperty("generated_text").GetString());   // temperature implies sampling

        var repeated = await Generate(new() { ["max_new_tokens"] = 12, ["ignore_eos_token"] = true, ["repetition_penalty"] = 3.0 });
        var openAi = await S.PostJsonAsync("v1/completions", new { prompt = Prompt, max_tokens = 12, ignore_eos = true, temperature = 0, repetition_penalty = 3.0 });
        Assert.Equal(openAi.GetProperty("choices")[0].GetProperty("text").GetString(), repeated.GetProperty("generated_text").GetString());
        Assert.NotEqual(greedy, repeated.GetProperty("generated_text").GetString());

        var json = await Generate(new() { ["max_new_tokens"] = 10, ["response_format"] = new Dictionary<string, object?> { ["type"] = "json_object", ["schema"] = null } });
        Assert.StartsWith("{", json.GetProperty("generated_text").GetString()!.TrimStart());
        var schema = new Dictionary<string, object?> { ["type"] = "object", ["properties"] = new { a = new { @enum = new[] { "b" } } }, ["required"] = new[] { "a" }, ["additionalProperties"] = false };
        var host = (Hosting.ModelHost)S.App.Services.GetService(typeof(Hosting.ModelHost))!;
        var held = await Generate(new() { ["max_new_tokens"] = 30, ["response_format"] = new Dictionary<string, object?> { ["type"] = "json_object", ["schema"] = schema },
            ["stop"] = Array.Empty<string>() });
        var text = held.GetProperty("generated_text").GetString()!;
        Assert.Matches("^\\s?\\{\\s*\"(a(\"\\s*(:\\s*(\"(b\"?)?)?)?)?)?", text);   // a prefix of the one object the schema allows

        var truncated = await Generate(new() { ["max_new_tokens"] = 2, ["truncate"] = 2, ["details"] = true });
        Assert.Equal(2, truncated.GetProperty("details").GetProperty("prompt_tokens").GetInt32());
    }

    [Theory]
    [InlineData("repetition_penalty", "0", 400, "validation")]
    [InlineData("typical_p", "0.9", 400, "validation")]
    [InlineData("watermark", "true", 400, "validation")]
    [InlineData("best_of", "2", 400, "validation")]
    [InlineData("adapter_source", "\"hub\"", 400, "validation")]
    [InlineData("merged_adapters", "{\"ids\": [\"a\"], \"weights\": [1], \"density\": 1}", 400, "validation")]
    [InlineData("top_p", "1.5", 400, "validation")]
    [InlineData("response_format", "{\"type\": \"json_object\", \"schema\": {\"type\": \"object\", \"maxProperties\": 3}}", 400, "validation")]
    [InlineData("no_such_parameter", "1", 400, "validation")]
    [InlineData("adapter_id", "\"not-in-the-store\"", 404, null)]
    public async Task RefusalsUseTgisErrorBody(string name, string value, int status, string? type)
    {
        using var response = await S.Http.PostAsync("generate", new StringContent("{\"inputs\":\"hi\",\"parameters\":{\"" + name + "\":" + value + "}}", System.Text.Encoding.UTF8, "application/json"));
        Assert.Equal(status, (int)response.StatusCode);
        var body = await response.Content.ReadFromJsonAsync<JsonElement>();
        Assert.Equal(JsonValueKind.String, body.GetProperty("error").ValueKind);
        if (type is null) Assert.False(body.TryGetProperty("error_type", out _));
        else Assert.Equal(type, body.GetProperty("error_type").GetString());
        Assert.Equal(HttpStatusCode.OK, (await S.Http.GetAsync("health")).StatusCode);
    }

    [Fact]
    public async Task EmptyInputsAreRefused()
    {
        using var response = await S.Http.PostAsJsonAsync("generate", new { inputs = "" });
        Assert.Equal(HttpStatusCode.BadRequest, response.StatusCode);
        Assert.Equal("validation", (await response.Content.ReadFromJsonAsync<JsonElement>()).GetProperty("error_type").GetString());
    }
}
