using System.Net;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace PeftServe.Server.Tests;

/// <summary>Valid requests to every generation endpoint, mutated at random (fields dropped, values swapped for
/// values of every JSON kind and size, known and unknown fields added): whatever comes in, the answer is a success
/// or a 4xx with an error body, never a 500, and the server is idle and serving afterwards. The seed is fixed, so a
/// failure repeats.</summary>
public sealed class RandomizedRequestTests
{
    private static readonly (string Path, string Body)[] Bases =
    [
        ("v1/completions", """{"prompt":"hi","max_tokens":3}"""),
        ("v1/completions", """{"prompt":[[1,40],[1,41,42]],"max_tokens":2,"n":2,"logprobs":2,"echo":true}"""),
        ("v1/chat/completions", """{"messages":[{"role":"user","content":"hi"}],"max_tokens":3}"""),
        ("v1/chat/completions", """{"messages":[{"role":"user","content":"hi"}],"max_tokens":3,"stream":true,"logprobs":true,"top_logprobs":2}"""),
        ("generate", """{"inputs":"hi","parameters":{"max_new_tokens":3,"details":true}}"""),
        ("generate_stream", """{"inputs":"hi","parameters":{"max_new_tokens":3}}"""),
        ("tokenize", """{"prompt":"hi"}"""),
        ("detokenize", """{"tokens":[1,2]}"""),
    ];

    private static readonly string[] Keys =
    [
        "model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "best_of",
        "echo", "logprobs", "top_logprobs", "logit_bias", "min_p", "min_tokens", "repetition_penalty", "stop_token_ids", "ignore_eos",
        "stream", "stream_options", "presence_penalty", "frequency_penalty", "response_format", "tools", "user", "suffix",
        "inputs", "parameters", "adapter_id", "adapter_source", "max_new_tokens", "do_sample", "details", "decoder_input_details",
        "return_k_alternatives", "truncate", "return_full_text", "tokens", "add_special_tokens", "add_generation_prompt", "return_token_strs",
        "guided_json", "response_format", "schema", "json_schema", "type",
    ];

    private static JsonNode? Value(Random rng) => rng.Next(30) switch
    {
        26 => new JsonObject { ["type"] = "json_object" },
        27 => new JsonObject { ["type"] = "json_schema", ["json_schema"] = new JsonObject { ["name"] = "x", ["schema"] = Schema(rng) } },
        28 => Schema(rng),
        29 => "json_object",
        0 => null,
        1 => true,
        2 => false,
        3 => 0,
        4 => -1,
        5 => 1e308,
        6 => -1e308,
        7 => 2147483648L,
        8 => 0.5,
        9 => "",
        10 => "x",
        11 => "\u0000\uffff",
        12 => new string('a', 20_000),
        13 => new JsonArray(),
        14 => new JsonArray(1, 2),
        15 => new JsonArray(new JsonArray(1), new JsonArray()),
        16 => new JsonObject(),
        17 => new JsonObject { ["1"] = 5, ["x"] = "y" },
        18 => "tiny-lora-r4-qv",
        19 => "tiny-ia3",
        20 => new JsonArray(new JsonObject { ["role"] = "user", ["content"] = new JsonArray(new JsonObject { ["type"] = "image_url" }) }),
        21 => Deep(rng.Next(10, 200)),
        22 => rng.Next(1, 40),
        23 => new JsonArray("a", "b"),
        24 => new JsonObject { ["include_usage"] = true },
        _ => -0.0,
    };

    /// <summary>A small random schema: sometimes valid, sometimes not (unknown keywords, wrong shapes, a self-reference).</summary>
    private static JsonNode Schema(Random rng) => rng.Next(6) switch
    {
        0 => new JsonObject { ["type"] = "object", ["properties"] = new JsonObject { ["a"] = new JsonObject { ["type"] = "integer" } }, ["required"] = new JsonArray("a") },
        1 => new JsonObject { ["type"] = "object", ["additionalProperties"] = false },
        2 => new JsonObject { ["type"] = "array" },
        3 => new JsonObject { ["type"] = "object", ["properties"] = new JsonObject { ["a"] = new JsonObject { ["$ref"] = "#/$defs/a" } }, ["$defs"] = new JsonObject { ["a"] = new JsonObject { ["anyOf"] = new JsonArray(new JsonObject { ["$ref"] = "#/$defs/a" }, new JsonObject { ["type"] = "null" }) } } },
        4 => new JsonObject { ["type"] = "object", ["properties"] = new JsonObject { ["a"] = new JsonObject { ["pattern"] = "x" } } },
        _ => new JsonObject { ["type"] = new JsonArray("object", 5), ["enum"] = new JsonArray() },
    };

    private static JsonNode Deep(int depth)
    {
        JsonNode node = new JsonArray();
        for (int i = 0; i < depth; i++) node = new JsonArray(node);
        return node;
    }

    private static void Mutate(JsonObject body, Random rng)
    {
        // The LoRAX bodies' parameters object is a target as much as the top level.
        var target = body["parameters"] is JsonObject p && rng.Next(2) == 0 ? p : body;
        switch (rng.Next(4))
        {
            case 0 when target.Count > 0:
                target.Remove(target.ElementAt(rng.Next(target.Count)).Key);
                break;
            case 1 when target.Count > 0:
                target[target.ElementAt(rng.Next(target.Count)).Key] = Value(rng);
                break;
            case 2:
                target[Keys[rng.Next(Keys.Length)]] = Value(rng);
                break;
            default:
                target["unknown_" + rng.Next(100)] = Value(rng);
                break;
        }
    }

    [Fact]
    public async Task MutatedRequestsNeverGetA500()
    {
        await using var server = await TestServer.StartAsync();
        var rng = new Random(20261203);
        var failures = new List<string>();
        for (int i = 0; i < 400; i++)
        {
            var (path, json) = Bases[i % Bases.Length];
            var body = JsonNode.Parse(json)!.AsObject();
            for (int m = rng.Next(1, 4); m > 0; m--) Mutate(body, rng);
            var text = body.ToJsonString();
            using var response = await server.Http.PostAsync(path, new StringContent(text, Encoding.UTF8, "application/json"));
            var answer = await response.Content.ReadAsStringAsync();
            int status = (int)response.StatusCode;
            if (status >= 500) failures.Add($"{status} {path} {Trim(text)} -> {Trim(answer)}");
            else if (status >= 400)
            {
                try { _ = JsonDocument.Parse(answer).RootElement.GetProperty("error"); }
                catch (Exception e) when (e is JsonException or KeyNotFoundException or InvalidOperationException)
                { failures.Add($"{status} without an error body: {path} {Trim(text)} -> {Trim(answer)}"); }
            }
            else if (answer.Contains("\"error\"", StringComparison.Ordinal) && answer.Contains("server_error", StringComparison.Ordinal))
                failures.Add($"stream failed: {path} {Trim(text)} -> {Trim(answer)}");
        }
        Assert.True(failures.Count == 0, string.Join("\n", failures.Take(10)));
        Assert.Equal(HttpStatusCode.OK, (await server.Http.GetAsync("health")).StatusCode);
        for (int i = 0; i < 50 && await server.MetricAsync("peftserve_requests_in_flight") > 0; i++) await Task.Delay(100);
        Assert.Equal(0, await server.MetricAsync("peftserve_requests_in_flight"));
    }

    private static string Trim(string s) => s.Length > 300 ? s[..300] + "..." : s;
}
