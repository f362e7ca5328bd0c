using System.ClientModel;
using System.Net;
using System.Net.Http.Json;
using System.Text;
using System.Text.Json;
using OpenAI;
using OpenAI.Chat;

namespace PeftServe.Server.Tests;

/// <summary>The OpenAI-compatible API through the official OpenAI .NET library (and raw HTTP where
/// the library has no call), against the real server and the default tiny model.</summary>
public sealed class OpenAiApiTests(ServerFixture fixture) : IClassFixture<ServerFixture>
{
    private TestServer S => fixture.Server;

    private OpenAIClient Client() => new(new ApiKeyCredential("unused"), new OpenAIClientOptions { Endpoint = new Uri(S.Url + "/v1") });

    private static ChatCompletionOptions Greedy(int maxTokens) => new() { Temperature = 0f, MaxOutputTokenCount = maxTokens };

    private static readonly ChatMessage[] Hello = [new SystemChatMessage("You are terse."), new UserChatMessage("Hello there")];

    [Fact]
    public async Task ModelsListsTheBaseModelAndEveryAdapter()
    {
        var models = (await Client().GetOpenAIModelClient().GetModelsAsync()).Value;
        var ids = models.Select(m => m.Id).ToList();
        Assert.Equal("tiny-llama", ids[0]);
        Assert.Equal(TestServer.StoreAdapters.Order(StringComparer.Ordinal), ids.Skip(1));
        // vLLM's cards also say how long a sequence may be.
        var host = (Hosting.ModelHost)S.App.Services.GetService(typeof(Hosting.ModelHost))!;
        var raw = await S.Http.GetFromJsonAsync<JsonElement>("v1/models");
        Assert.All(raw.GetProperty("data").EnumerateArray(), m => Assert.Equal(host.Engine.MaxColumns, m.GetProperty("max_model_len").GetInt32()));
    }

    [Fact]
    public async Task GreedyChatIsDeterministicReportsUsageAndDiffersPerAdapter()
    {
        var baseChat = Client().GetChatClient("tiny-llama");
        var a = (await baseChat.CompleteChatAsync(Hello, Greedy(12))).Value;
        var b = (await baseChat.CompleteChatAsync(Hello, Greedy(12))).Value;
        Assert.Equal(a.Content[0].Text, b.Content[0].Text);
        Assert.Equal(ChatFinishReason.Length, a.FinishReason);
        Assert.Equal(12, a.Usage.OutputTokenCount);
        Assert.True(a.Usage.InputTokenCount > 5);
        Assert.Equal(a.Usage.InputTokenCount + 12, a.Usage.TotalTokenCount);
        Assert.Equal("tiny-llama", a.Model);

        var lora = (await Client().GetChatClient("tiny-lora-r8-all").CompleteChatAsync(Hello, Greedy(12))).Value;
        Assert.Equal("tiny-lora-r8-all", lora.Model);
        Assert.NotEqual(a.Content[0].Text, lora.Content[0].Text);
    }

    [Fact]
    public async Task StreamingChatYieldsTheSameTextAsOneShot()
    {
        var chat = Client().GetChatClient("tiny-ia3");
        var whole = (await chat.CompleteChatAsync(Hello, Greedy(16))).Value;
        var text = new StringBuilder();
        int updates = 0;
        ChatFinishReason? finish = null;
        ChatTokenUsage? usage = null;
        await foreach (var u in chat.CompleteChatStreamingAsync(Hello, Greedy(16)))
        {
            updates++;
            foreach (var part in u.ContentUpdate) text.Append(part.Text);
            finish ??= u.FinishReason;
            usage ??= u.Usage;
        }
        Assert.Equal(whole.Content[0].Text, text.ToString());
        Assert.True(updates >= 8, $"only {updates} updates: tokens were not streamed one by one");
        Assert.Equal(ChatFinishReason.Length, finish);
        Assert.NotNull(usage);
        Assert.Equal(16, usage!.OutputTokenCount);
    }

    [Fact]
    public async Task ConcurrentStreamsOverSeveralAdaptersMatchTheirSequentialResults()
    {
        string[] models = ["tiny-llama", .. TestServer.StoreAdapters];
        var client = Client();
        var sequential = new Dictionary<string, string>();
        foreach (var m in models) sequential[m] = (await client.GetChatClient(m).CompleteChatAsync(Hello, Greedy(10))).Value.Content[0].Text;

        async Task<(string Model, string Text)> Stream(string model)
        {
            var sb = new StringBuilder();
            await foreach (var u in client.GetChatClient(model).CompleteChatStreamingAsync(Hello, Greedy(10)))
                foreach (var p in u.ContentUpdate) sb.Append(p.Text);
            return (model, sb.ToString());
        }
        var results = await Task.WhenAll(models.Concat(models).Select(Stream));
        foreach (var (model, text) in results) Assert.Equal(sequential[model], text);
        Assert.True(sequential.Values.Distinct().Count() >= 3, "the adapters should change the output");
    }

    [Fact]
    public async Task ASeedMakesSampledOutputRepeatable()
    {
        var chat = Client().GetChatClient("tiny-llama");
        ChatCompletionOptions Options(long seed) => new() { Temperature = 1f, MaxOutputTokenCount = 24, Seed = seed };
        var a = (await chat.CompleteChatAsync(Hello, Options(7))).Value.Content[0].Text;
        var b = (await chat.CompleteChatAsync(Hello, Options(7))).Value.Content[0].Text;
        var c = (await chat.CompleteChatAsync(Hello, Options(8))).Value.Content[0].Text;
        Assert.Equal(a, b);
        Assert.NotEqual(a, c);
    }

    [Fact]
    public async Task StopSequencesEndTheTextBeforeThem()
    {
        var chat = Client().GetChatClient("tiny-llama");
        var full = (await chat.CompleteChatAsync(Hello, Greedy(24))).Value.Content[0].Text;
        // Stop at a piece of the greedy continuation: the answer is the text before it.
        var stop = full.Substring(6, 2);
        int at = full.IndexOf(stop, StringComparison.Ordinal);
        var options = Greedy(24);
        options.StopSequences.Add(stop);
        var stopped = (await chat.CompleteChatAsync(Hello, options)).Value;
        Assert.Equal(full[..at], stopped.Content.Count == 0 ? "" : stopped.Content[0].Text);
        Assert.Equal(ChatFinishReason.Stop, stopped.FinishReason);
    }

    [Fact]
    public async Task CompletionsStreamAsServerSentEventsEndingWithDone()
    {
        var oneShot = await S.PostJsonAsync("v1/completions", new { model = "tiny-lora-r4-qv", prompt = "Once upon", max_tokens = 8, temperature = 0 });
        Assert.Equal("text_completion", oneShot.GetProperty("object").GetString());
        var choice = oneShot.GetProperty("choices")[0];
        Assert.Equal("length", choice.GetProperty("finish_reason").GetString());
        Assert.Equal(8, oneShot.GetProperty("usage").GetProperty("completion_tokens").GetInt32());

        using var request = new HttpRequestMessage(HttpMethod.Post, "v1/completions")
        {
            Content = JsonContent.Create(new { model = "tiny-lora-r4-qv", prompt = "Once upon", max_tokens = 8, temperature = 0, stream = true, stream_options = new { include_usage = true } }),
        };
        using var response = await S.Http.SendAsync(request, HttpCompletionOption.ResponseHeadersRead);
        Assert.Equal("text/event-stream", response.Content.Headers.ContentType!.MediaType);
        var lines = (await response.Content.ReadAsStringAsync()).Split("\n\n", StringSplitOptions.RemoveEmptyEntries);
        Assert.All(lines, l => Assert.StartsWith("data: ", l));
        Assert.Equal("data: [DONE]", lines[^1]);
        var chunks = lines[..^1].Select(l => JsonDocument.Parse(l["data: ".Length..]).RootElement).ToList();
        var text = string.Concat(chunks.Where(c => c.GetProperty("choices").GetArrayLength() > 0).Select(c => c.GetProperty("choices")[0].GetProperty("text").GetString()));
        Assert.Equal(choice.GetProperty("text").GetString(), text);
        Assert.Equal("length", chunks[^2].GetProperty("choices")[0].GetProperty("finish_reason").GetString());
        Assert.Equal(8, chunks[^1].GetProperty("usage").GetProperty("completion_tokens").GetInt32());
        Assert.All(chunks, c => Assert.Equal(chunks[0].GetProperty("id").GetString(), c.GetProperty("id").GetString()));
    }

    /// <summary>n choices: choice i samples as a single request with seed + i would, the prompt is counted once
    /// and every choice's tokens are; greedy choices are all the greedy text.</summary>
    [Fact]
    public async Task SeveralChoicesSampleWithSeedPlusTheirIndex()
    {
        object Body(long seed, int n) => new { model = "tiny-lora-r4-qv", prompt = "Once upon", max_tokens = 10, temperature = 1, seed, n, ignore_eos = true };
        var three = await S.PostJsonAsync("v1/completions", Body(11, 3));
        var choices = three.GetProperty("choices");
        Assert.Equal(3, choices.GetArrayLength());
        var singles = new List<string>();
        for (int i = 0; i < 3; i++)
        {
            Assert.Equal(i, choices[i].GetProperty("index").GetInt32());
            Assert.Equal("length", choices[i].GetProperty("finish_reason").GetString());
            var single = await S.PostJsonAsync("v1/completions", Body(11 + i, 1));
            singles.Add(single.GetProperty("choices")[0].GetProperty("text").GetString()!);
            Assert.Equal(singles[i], choices[i].GetProperty("text").GetString());
            if (i == 0) Assert.Equal(single.GetProperty("usage").GetProperty("prompt_tokens").GetInt32(), three.GetProperty("usage").GetProperty("prompt_tokens").GetInt32());
        }
        Assert.True(singles.Distinct().Count() > 1, "different seeds should sample different texts");
        Assert.Equal(30, three.GetProperty("usage").GetProperty("completion_tokens").GetInt32());

        var greedy = await S.PostJsonAsync("v1/chat/completions", new { messages = new[] { new { role = "user", content = "hi" } }, max_tokens = 6, temperature = 0, n = 2 });
        var one = await S.PostJsonAsync("v1/chat/completions", new { messages = new[] { new { role = "user", content = "hi" } }, max_tokens = 6, temperature = 0 });
        var expected = one.GetProperty("choices")[0].GetProperty("message").GetProperty("content").GetString();
        Assert.All(greedy.GetProperty("choices").EnumerateArray(), c => Assert.Equal(expected, c.GetProperty("message").GetProperty("content").GetString()));
    }

    /// <summary>A batch of prompts (strings, or lists of token ids) in one completions request: choice p * n + i
    /// answers prompt p, as a request for that prompt alone would; usage counts every prompt once.</summary>
    [Fact]
    public async Task ABatchOfPromptsIsAnsweredInOrder()
    {
        string[] prompts = ["Once upon", "The cat", "In a hole"];
        var batch = await S.PostJsonAsync("v1/completions", new { prompt = prompts, max_tokens = 5, temperature = 0, n = 2, ignore_eos = true, echo = true });
        var choices = batch.GetProperty("choices");
        Assert.Equal(6, choices.GetArrayLength());
        int promptTokens = 0;
        for (int p = 0; p < prompts.Length; p++)
        {
            var alone = await S.PostJsonAsync("v1/completions", new { prompt = prompts[p], max_tokens = 5, temperature = 0, ignore_eos = true, echo = true });
            promptTokens += alone.GetProperty("usage").GetProperty("prompt_tokens").GetInt32();
            for (int i = 0; i < 2; i++)
            {
                Assert.Equal(p * 2 + i, choices[p * 2 + i].GetProperty("index").GetInt32());
                Assert.Equal(alone.GetProperty("choices")[0].GetProperty("text").GetString(), choices[p * 2 + i].GetProperty("text").GetString());
            }
        }
        Assert.Equal(promptTokens, batch.GetProperty("usage").GetProperty("prompt_tokens").GetInt32());
        Assert.Equal(30, batch.GetProperty("usage").GetProperty("completion_tokens").GetInt32());

        var ids = await S.PostJsonAsync("v1/completions", new { prompt = new[] { new[] { 1, 40, 41 }, new[] { 1, 50 } }, max_tokens = 2, temperature = 0 });
        Assert.Equal(2, ids.GetProperty("choices").GetArrayLength());
        Assert.Equal(5, ids.GetProperty("usage").GetProperty("prompt_tokens").GetInt32());
    }

    [Fact]
    public async Task StreamedChoicesEachOpenCarryTheirIndexAndFinish()
    {
        var body = new { messages = new[] { new { role = "user", content = "hi" } }, max_tokens = 8, temperature = 1, seed = 5, n = 3, ignore_eos = true };
        var oneShot = await S.PostJsonAsync("v1/chat/completions", body);
        using var request = new HttpRequestMessage(HttpMethod.Post, "v1/chat/completions")
        {
            Content = JsonContent.Create(new { body.messages, body.max_tokens, body.temperature, body.seed, body.n, body.ignore_eos, stream = true, stream_options = new { include_usage = true } }),
        };
        using var response = await S.Http.SendAsync(request, HttpCompletionOption.ResponseHeadersRead);
        var lines = (await response.Content.ReadAsStringAsync()).Split("\n\n", StringSplitOptions.RemoveEmptyEntries);
        Assert.Equal("data: [DONE]", lines[^1]);
        var chunks = lines[..^1].Select(l => JsonDocument.Parse(l["data: ".Length..]).RootElement).ToList();
        Assert.Equal(24, chunks[^1].GetProperty("usage").GetProperty("completion_tokens").GetInt32());
        var perChoice = chunks.Where(c => c.GetProperty("choices").GetArrayLength() == 1).GroupBy(c => c.GetProperty("choices")[0].GetProperty("index").GetInt32())
            .ToDictionary(g => g.Key, g => g.Select(c => c.GetProperty("choices")[0]).ToList());
        Assert.Equal([0, 1, 2], perChoice.Keys.Order());
        foreach (var (index, parts) in perChoice)
        {
            Assert.Equal("assistant", parts[0].GetProperty("delta").GetProperty("role").GetString());   // each choice opens with its role
            Assert.Equal("length", parts[^1].GetProperty("finish_reason").GetString());
            var text = string.Concat(parts.Select(p => p.GetProperty("delta").TryGetProperty("content", out var t) ? t.GetString() : ""));
            Assert.Equal(oneShot.GetProperty("choices")[index].GetProperty("message").GetProperty("content").GetString(), text);
        }
    }

    /// <summary>Completions' logprobs: one entry per generated token; a greedy token is its row's most likely
    /// one; offsets run along the text; the stream carries the same numbers as the one-shot answer.</summary>
    [Fact]
    public async Task CompletionLogprobsFollowTheTokensAndMatchWhenStreamed()
    {
        object Body(bool stream) => new { prompt = "Once upon", max_tokens = 6, temperature = 0, logprobs = 2, ignore_eos = true, stream };
        var oneShot = await S.PostJsonAsync("v1/completions", Body(false));
        var lp = oneShot.GetProperty("choices")[0].GetProperty("logprobs");
        var tokens = lp.GetProperty("tokens").EnumerateArray().Select(t => t.GetString()!).ToList();
        var values = lp.GetProperty("token_logprobs").EnumerateArray().Select(v => v.GetSingle()).ToList();
        var tops = lp.GetProperty("top_logprobs").EnumerateArray().ToList();
        var offsets = lp.GetProperty("text_offset").EnumerateArray().Select(v => v.GetInt32()).ToList();
        Assert.Equal(6, tokens.Count);
        Assert.Equal((6, 6, 6), (values.Count, tops.Count, offsets.Count));
        for (int i = 0; i < 6; i++)
        {
            Assert.True(values[i] <= 0);
            var alternatives = tops[i].EnumerateObject().ToDictionary(p => p.Name, p => p.Value.GetSingle());
            Assert.InRange(alternatives.Count, 1, 3);   // the two best, and the chosen one (here among them)
            Assert.Equal(alternatives.Values.Max(), values[i], 1e-5f);   // greedy: the chosen token is the most likely
            Assert.Equal(i == 0 ? 0 : offsets[i - 1] + tokens[i - 1].Length, offsets[i]);
        }

        using var request = new HttpRequestMessage(HttpMethod.Post, "v1/completions") { Content = JsonContent.Create(Body(true)) };
        using var response = await S.Http.SendAsync(request, HttpCompletionOption.ResponseHeadersRead);
        var streamed = (await response.Content.ReadAsStringAsync()).Split("\n\n", StringSplitOptions.RemoveEmptyEntries)[..^1]
            .Select(l => JsonDocument.Parse(l["data: ".Length..]).RootElement.GetProperty("choices")[0])
            .Where(c => c.GetProperty("logprobs").ValueKind == JsonValueKind.Object).Select(c => c.GetProperty("logprobs")).ToList();
        Assert.Equal(tokens, streamed.Select(c => c.GetProperty("tokens")[0].GetString()!));
        Assert.Equal(values, streamed.Select(c => c.GetProperty("token_logprobs")[0].GetSingle()));
        Assert.Equal(offsets, streamed.Select(c => c.GetProperty("text_offset")[0].GetInt32()));
    }

    /// <summary>echo with logprobs, as evaluation harnesses ask (lm-eval's loglikelihood): every prompt token is listed
    /// (the first with null), then the generated ones; the same in the stream, and the generated token's value is
    /// the one a request without echo gets.</summary>
    [Fact]
    public async Task EchoWithLogprobsScoresThePrompt()
    {
        var ids = new[] { 1, 40, 41, 42, 43 };
        object Body(bool echo, bool stream) => new { model = "tiny-lora-r8-all", prompt = ids, max_tokens = 1, temperature = 0, logprobs = 1, echo, stream };
        var scored = (await S.PostJsonAsync("v1/completions", Body(true, false))).GetProperty("choices")[0].GetProperty("logprobs");
        var values = scored.GetProperty("token_logprobs").EnumerateArray().ToList();
        var tops = scored.GetProperty("top_logprobs").EnumerateArray().ToList();
        Assert.Equal(ids.Length + 1, values.Count);
        Assert.Equal((JsonValueKind.Null, JsonValueKind.Null), (values[0].ValueKind, tops[0].ValueKind));
        Assert.All(values.Skip(1), v => Assert.True(v.GetSingle() <= 0));
        Assert.All(tops.Skip(1), t => Assert.InRange(t.EnumerateObject().Count(), 1, 2));
        var host = (Hosting.ModelHost)S.App.Services.GetService(typeof(Hosting.ModelHost))!;
        Assert.Equal(ids.Select(id => host.Tokenizer.Decode([id], skipSpecialTokens: false)), scored.GetProperty("tokens").EnumerateArray().Take(ids.Length).Select(t => t.GetString()));

        var plain = (await S.PostJsonAsync("v1/completions", Body(false, false))).GetProperty("choices")[0].GetProperty("logprobs");
        Assert.Equal(plain.GetProperty("token_logprobs")[0].GetSingle(), values[^1].GetSingle());

        using var request = new HttpRequestMessage(HttpMethod.Post, "v1/completions") { Content = JsonContent.Create(Body(true, true)) };
        using var response = await S.Http.SendAsync(request, HttpCompletionOption.ResponseHeadersRead);
        var parts = (await response.Content.ReadAsStringAsync()).Split("\n\n", StringSplitOptions.RemoveEmptyEntries)[..^1]
            .Select(l => JsonDocument.Parse(l["data: ".Length..]).RootElement.GetProperty("choices")[0].GetProperty("logprobs"))
            .Where(l => l.ValueKind == JsonValueKind.Object).ToList();
        var streamedValues = parts.SelectMany(p => p.GetProperty("token_logprobs").EnumerateArray()).Select(v => v.ValueKind == JsonValueKind.Null ? (float?)null : v.GetSingle()).ToList();
        Assert.Equal(values.Select(v => v.ValueKind == JsonValueKind.Null ? (float?)null : v.GetSingle()), streamedValues);
        Assert.Equal(scored.GetProperty("text_offset").EnumerateArray().Select(o => o.GetInt32()),
            parts.SelectMany(p => p.GetProperty("text_offset").EnumerateArray()).Select(o => o.GetInt32()));
    }

    [Fact]
    public async Task ChatLogprobsListEachTokenWithItsBytesAndAlternatives()
    {
        var answer = await S.PostJsonAsync("v1/chat/completions", new { messages = new[] { new { role = "user", content = "hi" } }, max_tokens = 5, temperature = 0.7, seed = 4, logprobs = true, top_logprobs = 3, ignore_eos = true });
        var content = answer.GetProperty("choices")[0].GetProperty("logprobs").GetProperty("content").EnumerateArray().ToList();
        Assert.Equal(answer.GetProperty("usage").GetProperty("completion_tokens").GetInt32(), content.Count);
        foreach (var entry in content)
        {
            var token = entry.GetProperty("token").GetString()!;
            Assert.Equal(Encoding.UTF8.GetBytes(token).Select(b => (int)b), entry.GetProperty("bytes").EnumerateArray().Select(b => b.GetInt32()));
            var alternatives = entry.GetProperty("top_logprobs").EnumerateArray().Select(a => a.GetProperty("logprob").GetSingle()).ToList();
            Assert.Equal(3, alternatives.Count);
            Assert.Equal(alternatives.OrderDescending(), alternatives);
            Assert.True(entry.GetProperty("logprob").GetSingle() <= alternatives[0] + 1e-6f);
        }
        var plain = await S.PostJsonAsync("v1/chat/completions", new { messages = new[] { new { role = "user", content = "hi" } }, max_tokens = 2 });
        Assert.Equal(JsonValueKind.Null, plain.GetProperty("choices")[0].GetProperty("logprobs").ValueKind);

        // The OpenAI client reads them as its own.
        var viaClient = (await Client().GetChatClient("tiny-lora-r4-qv").CompleteChatAsync(Hello,
            new ChatCompletionOptions { IncludeLogProbabilities = true, TopLogProbabilityCount = 2, MaxOutputTokenCount = 4, Temperature = 0 })).Value;
        Assert.Equal(viaClient.Usage.OutputTokenCount, viaClient.ContentTokenLogProbabilities.Count);
        Assert.All(viaClient.ContentTokenLogProbabilities, t =>
        {
            Assert.Equal(2, t.TopLogProbabilities.Count);
            Assert.Equal(t.TopLogProbabilities[0].LogProbability, t.LogProbability, 1e-5f);   // greedy
        });
    }

    /// <summary>vLLM's /tokenize and /detokenize: the ids the completions and chat endpoints would feed the model.</summary>
    [Fact]
    public async Task TokenizeAndDetokenizeMatchWhatGenerationUses()
    {
        var host = (Hosting.ModelHost)S.App.Services.GetService(typeof(Hosting.ModelHost))!;
        var text = await S.PostJsonAsync("tokenize", new { model = "tiny-ia3", prompt = "Once upon a time", return_token_strs = true });
        var ids = text.GetProperty("tokens").EnumerateArray().Select(t => t.GetInt32()).ToArray();
        Assert.Equal(host.Tokenizer.Encode("Once upon a time"), ids);
        Assert.Equal(ids.Length, text.GetProperty("count").GetInt32());
        Assert.Equal(host.Engine.MaxColumns, text.GetProperty("max_model_len").GetInt32());
        Assert.Equal(ids.Select(id => host.Tokenizer.Decode([id], skipSpecialTokens: false)), text.GetProperty("token_strs").EnumerateArray().Select(t => t.GetString()));
        var bare = await S.PostJsonAsync("tokenize", new { prompt = "Once upon a time", add_special_tokens = false });
        Assert.Equal(host.Tokenizer.Encode("Once upon a time", addSpecialTokens: false), bare.GetProperty("tokens").EnumerateArray().Select(t => t.GetInt32()));

        var messages = new[] { new { role = "user", content = "hi there" } };
        var chat = await S.PostJsonAsync("tokenize", new { messages });
        var completion = await S.PostJsonAsync("v1/chat/completions", new { messages, max_tokens = 1 });
        Assert.Equal(completion.GetProperty("usage").GetProperty("prompt_tokens").GetInt32(), chat.GetProperty("count").GetInt32());
        var noHeader = await S.PostJsonAsync("tokenize", new { messages, add_generation_prompt = false });
        Assert.True(noHeader.GetProperty("count").GetInt32() < chat.GetProperty("count").GetInt32());

        var back = await S.PostJsonAsync("detokenize", new { tokens = ids });
        Assert.Equal(host.Tokenizer.Decode(ids), back.GetProperty("prompt").GetString());

        foreach (var (path, body, status) in new (string, object, int)[]
                 {
                     ("tokenize", new { prompt = "x", messages }, 400),
                     ("tokenize", new { }, 400),
                     ("tokenize", new { prompt = "x", model = "no-such" }, 404),
                     ("tokenize", new { prompt = "x", truncate = 3 }, 400),
                     ("detokenize", new { tokens = new[] { 1, 999999 } }, 400),
                     ("detokenize", new { tokens = "1 2" }, 400),
                 })
        {
            using var response = await S.Http.PostAsJsonAsync(path, body);
            Assert.Equal(status, (int)response.StatusCode);
            Assert.False(string.IsNullOrEmpty((await response.Content.ReadFromJsonAsync<JsonElement>()).GetProperty("error").GetProperty("message").GetString()));
        }
    }

    /// <summary>logit_bias forces or forbids tokens (greedy included); stop_token_ids end generation at a token, not before
    /// min_tokens; min_p
    /// is accepted and, at 1, makes sampling greedy.</summary>
    [Fact]
    public async Task LogitBiasStopTokenIdsAndMinPShapeTheOutput()
    {
        var ids = new[] { 1, 40, 41 };
        async Task<int[]> Tokens(object extra)
        {
            var body = System.Text.Json.Nodes.JsonNode.Parse(JsonSerializer.Serialize(new { prompt = ids, max_tokens = 4, ignore_eos = true, logprobs = 0, temperature = 0 }))!.AsObject();
            foreach (var (k, v) in System.Text.Json.Nodes.JsonNode.Parse(JsonSerializer.Serialize(extra))!.AsObject()) body[k] = v?.DeepClone();
            var answer = await S.PostJsonAsync("v1/completions", body);
            var host = (Hosting.ModelHost)S.App.Services.GetService(typeof(Hosting.ModelHost))!;
            // The logprobs list the generated tokens; map their texts back through the tokenizer's vocabulary.
            return answer.GetProperty("choices")[0].GetProperty("logprobs").GetProperty("tokens").EnumerateArray()
                .Select(t => Enumerable.Range(0, host.Tokenizer.VocabSize).First(id => host.Tokenizer.Decode([id], skipSpecialTokens: false) == t.GetString())).ToArray();
        }
        var greedy = await Tokens(new { });
        Assert.Equal(4, greedy.Length);
        int forced = (greedy[0] + 5) % 300 + 3;
        Assert.All(await Tokens(new { logit_bias = new Dictionary<string, int> { [forced.ToString()] = 100 } }), t => Assert.Equal(forced, t));
        var banned = await Tokens(new { logit_bias = greedy.Distinct().ToDictionary(t => t.ToString(), _ => -100) });
        Assert.DoesNotContain(banned, greedy.Contains);
        var stopped = await S.PostJsonAsync("v1/completions", new { prompt = ids, max_tokens = 4, ignore_eos = true, temperature = 0, stop_token_ids = new[] { greedy[1] } });
        Assert.Equal("stop", stopped.GetProperty("choices")[0].GetProperty("finish_reason").GetString());
        Assert.Equal(2, stopped.GetProperty("usage").GetProperty("completion_tokens").GetInt32());
        var atOnce = await S.PostJsonAsync("v1/completions", new { prompt = ids, max_tokens = 4, ignore_eos = true, temperature = 0, stop_token_ids = new[] { greedy[0] } });
        Assert.Equal(1, atOnce.GetProperty("usage").GetProperty("completion_tokens").GetInt32());
        var held = await S.PostJsonAsync("v1/completions", new { prompt = ids, max_tokens = 4, ignore_eos = true, temperature = 0, stop_token_ids = new[] { greedy[0] }, min_tokens = 3 });
        Assert.True(held.GetProperty("usage").GetProperty("completion_tokens").GetInt32() >= 3);
        Assert.Equal(greedy, await Tokens(new { temperature = 1, seed = 9, min_p = 1 }));
    }

    /// <summary>JSON mode: the answer is a prefix of one JSON object, and a whole one when it stops (here the braces are
    /// made likely, so it closes at once). A JSON schema (response_format json_schema, or vLLM's guided_json) is held;
    /// one with a keyword that cannot be held is refused by name.</summary>
    [Fact]
    public async Task JsonModeHoldsTheAnswerToOneObject()
    {
        var messages = new[] { new { role = "user", content = "Give me JSON" } };
        for (int seed = 0; seed < 3; seed++)
        {
            var answer = await S.PostJsonAsync("v1/chat/completions", new { messages, max_tokens = 24, seed, response_format = new { type = "json_object" } });
            var content = answer.GetProperty("choices")[0].GetProperty("message").GetProperty("content").GetString()!;
            Assert.StartsWith("{", content.TrimStart());
            if (answer.GetProperty("choices")[0].GetProperty("finish_reason").GetString() == "stop") JsonDocument.Parse(content).Dispose();
        }
        var host = (Hosting.ModelHost)S.App.Services.GetService(typeof(Hosting.ModelHost))!;
        var braces = new[] { "{", "}" }.ToDictionary(b => host.Tokenizer.Encode(b, addSpecialTokens: false).Single().ToString(), _ => 50);
        var closed = await S.PostJsonAsync("v1/chat/completions", new { messages, max_tokens = 24, temperature = 0, logit_bias = braces, response_format = new { type = "json_object" } });
        Assert.Equal("stop", closed.GetProperty("choices")[0].GetProperty("finish_reason").GetString());
        Assert.Equal("{}", closed.GetProperty("choices")[0].GetProperty("message").GetProperty("content").GetString()!.Trim());

        // A schema: held exactly (this one allows one object; whitespace is made unlikely so greedy decoding ends it).
        var blanks = Enumerable.Range(0, host.Tokenizer.VocabSize).Where(id => !host.Tokenizer.IsSpecial(id) && host.Tokenizer.Decode([id]) is { Length: > 0 } t && string.IsNullOrWhiteSpace(t))
            .ToDictionary(id => id.ToString(), _ => -100);
        var schema = new { type = "object", properties = new { a = new { @const = "b" } }, required = new[] { "a" }, additionalProperties = false };
        var held = await S.PostJsonAsync("v1/chat/completions", new { messages, max_tokens = 30, temperature = 0, logit_bias = blanks,
            response_format = new { type = "json_schema", json_schema = new { name = "only", schema, strict = true } } });
        static void IsTheOnlyObject(string text)
        {
            using var doc = JsonDocument.Parse(text);
            Assert.Equal("a", doc.RootElement.EnumerateObject().Single().Name);
            Assert.Equal("b", doc.RootElement.GetProperty("a").GetString());
        }
        IsTheOnlyObject(held.GetProperty("choices")[0].GetProperty("message").GetProperty("content").GetString()!);
        Assert.Equal("stop", held.GetProperty("choices")[0].GetProperty("finish_reason").GetString());
        var guided = await S.PostJsonAsync("v1/completions", new { prompt = "x", max_tokens = 30, temperature = 0, logit_bias = blanks, guided_json = schema });
        IsTheOnlyObject(guided.GetProperty("choices")[0].GetProperty("text").GetString()!);

        // Hostile shapes are served or refused, never a crash: a definition that is an alternative of itself, deep nesting.
        var cyclic = System.Text.Json.Nodes.JsonNode.Parse("""{"type": "object", "properties": {"a": {"$ref": "#/$defs/a"}}, "$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "array", "items": {"$ref": "#/$defs/a"}}]}}}""");
        using (var served = await S.Http.PostAsJsonAsync("v1/completions", new { prompt = "x", max_tokens = 40, guided_json = cyclic }))
            Assert.Equal(HttpStatusCode.OK, served.StatusCode);

        using var refused = await S.Http.PostAsJsonAsync("v1/chat/completions", new { messages, response_format = new { type = "json_schema", json_schema = new { name = "x", schema = new { type = "object", minProperties = 2 } } } });
        Assert.Equal(HttpStatusCode.BadRequest, refused.StatusCode);
        var error = (await refused.Content.ReadFromJsonAsync<JsonElement>()).GetProperty("error");
        Assert.Equal("response_format", error.GetProperty("param").GetString());
        Assert.Contains("minProperties", error.GetProperty("message").GetString());
    }

    [Fact]
    public async Task TokenIdPromptsAndEchoAreAccepted()
    {
        var ids = new[] { 1, 40, 41, 42 };
        var plain = await S.PostJsonAsync("v1/completions", new { prompt = ids, max_tokens = 3, temperature = 0 });
        var echoed = await S.PostJsonAsync("v1/completions", new { prompt = ids, max_tokens = 3, temperature = 0, echo = true });
        Assert.Equal(4, echoed.GetProperty("usage").GetProperty("prompt_tokens").GetInt32());
        Assert.Equal("tiny-llama", echoed.GetProperty("model").GetString());
        // echo puts the prompt (decoded from its ids) before the same completion.
        var host = (Hosting.ModelHost)S.App.Services.GetService(typeof(Hosting.ModelHost))!;
        var prompt = host.Tokenizer.Decode(ids);
        Assert.False(string.IsNullOrEmpty(prompt));
        var completion = plain.GetProperty("choices")[0].GetProperty("text").GetString();
        Assert.Equal(prompt + completion, echoed.GetProperty("choices")[0].GetProperty("text").GetString());

        var text = await S.PostJsonAsync("v1/completions", new { prompt = "Once upon", max_tokens = 3, temperature = 0, echo = true });
        var textPlain = await S.PostJsonAsync("v1/completions", new { prompt = "Once upon", max_tokens = 3, temperature = 0 });
        Assert.Equal("Once upon" + textPlain.GetProperty("choices")[0].GetProperty("text").GetString(), text.GetProperty("choices")[0].GetProperty("text").GetString());
    }

    [Theory]
    [InlineData("{not json", 400, null)]
    [InlineData("[1,2]", 400, null)]
    [InlineData("""{"model":"no-such-model","prompt":"x"}""", 404, "model_not_found")]
    [InlineData("""{"model":"../tiny-ia3","prompt":"x"}""", 404, "model_not_found")]
    [InlineData("""{"prompt":"x","max_tokens":0}""", 400, null)]
    [InlineData("""{"prompt":"x","max_tokens":100000}""", 400, "context_length_exceeded")]
    [InlineData("""{"prompt":"x","temperature":7}""", 400, null)]
    [InlineData("""{"prompt":"x","top_p":"high"}""", 400, null)]
    [InlineData("""{"prompt":"x","n":0}""", 400, null)]
    [InlineData("""{"prompt":"x","n":17}""", 400, null)]
    [InlineData("""{"prompt":["a",""]}""", 400, null)]
    [InlineData("""{"prompt":[[1,2],[]]}""", 400, null)]
    [InlineData("""{"prompt":[[1,2],"a"]}""", 400, null)]
    [InlineData("""{"prompt":["a","b","c","d","e","f","g","h","i"],"n":8}""", 400, null)]
    [InlineData("""{"prompt":"x","n":2,"best_of":3}""", 400, "unsupported_parameter")]
    [InlineData("""{"prompt":[999999]}""", 400, null)]
    [InlineData("""{"max_tokens":3}""", 400, null)]
    [InlineData("""{"prompt":"x","stop":["a","b","c","d","e"]}""", 400, null)]
    public async Task BadCompletionRequestsGetOpenAiErrors(string body, int status, string? code)
    {
        using var response = await S.Http.PostAsync("v1/completions", new StringContent(body, Encoding.UTF8, "application/json"));
        Assert.Equal(status, (int)response.StatusCode);
        var error = (await response.Content.ReadFromJsonAsync<JsonElement>()).GetProperty("error");
        Assert.False(string.IsNullOrEmpty(error.GetProperty("message").GetString()));
        Assert.Equal("invalid_request_error", error.GetProperty("type").GetString());
        if (code is not null) Assert.Equal(code, error.GetProperty("code").GetString());
        // ... and the server keeps serving.
        Assert.Equal(HttpStatusCode.OK, (await S.Http.GetAsync("health")).StatusCode);
    }

    [Fact]
    public async Task BadChatRequestsGetOpenAiErrorsThroughTheClientLibrary()
    {
        var missing = await Assert.ThrowsAsync<ClientResultException>(() => Client().GetChatClient("nope").CompleteChatAsync(Hello));
        Assert.Equal(404, missing.Status);
        using var response = await S.Http.PostAsync("v1/chat/completions",
            new StringContent("""{"messages":[{"content":"no role"}]}""", Encoding.UTF8, "application/json"));
        Assert.Equal(HttpStatusCode.BadRequest, response.StatusCode);
        Assert.Equal("messages[0].role", (await response.Content.ReadFromJsonAsync<JsonElement>()).GetProperty("error").GetProperty("param").GetString());
        using var unknown = await S.Http.GetAsync("v1/nothing-here");
        Assert.Equal(HttpStatusCode.NotFound, unknown.StatusCode);
    }

    [Theory]
    [InlineData(1)]
    [InlineData(3)]
    public async Task AClientThatDisconnectsCancelsItsRequest(int n)
    {
        // Warm the streaming path first, so that the generation below is still running when the client goes.
        using (var warm = await S.Http.PostAsJsonAsync("v1/completions", new { prompt = "Warm", max_tokens = 4, stream = true }))
            await warm.Content.ReadAsStringAsync();
        double before = await S.MetricAsync("peftserve_engine_requests_total{outcome=\"cancelled\"}");
        // A raw socket: send the request, read the first bytes of the stream, then close the connection.
        using (var tcp = new System.Net.Sockets.TcpClient())
        {
            var uri = new Uri(S.Url);
            await tcp.ConnectAsync(uri.Host, uri.Port);
            var stream = tcp.GetStream();
            var json = $$"""{"prompt":"Long story","max_tokens":248,"ignore_eos":true,"stream":true,"n":{{n}}}""";
            var head = $"POST /v1/completions HTTP/1.1\r\nHost: {uri.Authority}\r\nContent-Type: application/json\r\nContent-Length: {json.Length}\r\n\r\n{json}";
            await stream.WriteAsync(Encoding.ASCII.GetBytes(head));
            var buffer = new byte[256];
            Assert.True(await stream.ReadAsync(buffer) > 0);
            tcp.Client.Close();
        }
        double after = before;
        for (int i = 0; i < 100 && after < before + n; i++)
        {
            await Task.Delay(100);
            after = await S.MetricAsync("peftserve_engine_requests_total{outcome=\"cancelled\"}");
        }
        Assert.True(after >= before + n, $"the engine saw {after - before} of the {n} choices cancelled");
    }

    [Fact]
    public async Task MetricsAreInPrometheusTextFormat()
    {
        await Client().GetChatClient("tiny-lora-r4-qv").CompleteChatAsync(Hello, Greedy(4));
        using var response = await S.Http.GetAsync("metrics");
        Assert.StartsWith("text/plain", response.Content.Headers.ContentType!.ToString());
        var text = await response.Content.ReadAsStringAsync();
        foreach (var name in new[] { "peftserve_requests_total", "peftserve_completion_tokens_total", "peftserve_queue_depth", "peftserve_batch_size",
                     "peftserve_adapter_cache_hits_total", "peftserve_adapter_cache_misses_total", "peftserve_adapter_cache_evictions_total",
                     "peftserve_time_to_first_token_seconds", "peftserve_inter_token_latency_seconds" })
            Assert.Contains("# TYPE " + name, text);
        Assert.True(await S.MetricAsync("peftserve_completion_tokens_total{model=\"tiny-lora-r4-qv\"}") >= 4);
        Assert.True(await S.MetricAsync("peftserve_requests_total{api=\"chat\",model=\"tiny-lora-r4-qv\",outcome=\"ok\"}") >= 1);
        Assert.True(await S.MetricAsync("peftserve_time_to_first_token_seconds_count{api=\"chat\"}") >= 1);
        Assert.True(await S.MetricAsync("peftserve_inter_token_latency_seconds_count{api=\"chat\"}") >= 3);
        Assert.True(await S.MetricAsync("peftserve_adapter_cache_misses_total") >= 1);
    }
}

public sealed class QueueLimitTests
{
    [Fact]
    public async Task AFullQueueAnswers429WithRetryAfter()
    {
        await using var server = await TestServer.StartAsync("--max-queue-length", "0");
        using var response = await server.Http.PostAsJsonAsync("v1/chat/completions", new { messages = new[] { new { role = "user", content = "hi" } }, max_tokens = 2 });
        Assert.Equal(HttpStatusCode.TooManyRequests, response.StatusCode);
        Assert.Equal(TimeSpan.FromSeconds(1), response.Headers.RetryAfter!.Delta);
        var error = (await response.Content.ReadFromJsonAsync<JsonElement>()).GetProperty("error");
        Assert.Equal("queue_full", error.GetProperty("code").GetString());
        Assert.Equal(1, await server.MetricAsync("peftserve_requests_total{api=\"chat\",model=\"tiny-llama\",outcome=\"rejected\"}"));
    }
}

/// <summary>An adapter that cannot be loaded fails every choice of a request with one clean error, streamed or not,
/// and the server goes on serving.</summary>
public sealed class BrokenAdapterChoicesTests
{
    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task EveryChoiceFailsWithOneError(bool stream)
    {
        await using var server = await TestServer.StartAsync();
        // Listed (its config is fine), unreadable once loaded.
        File.WriteAllBytes(Path.Combine(server.Store, "tiny-lora-r4-qv", "adapter_model.safetensors"), [1, 2, 3, 4, 5, 6, 7, 8, 9]);
        using var response = await server.Http.PostAsJsonAsync("v1/completions", new { model = "tiny-lora-r4-qv", prompt = "x", max_tokens = 4, n = 3, stream });
        Assert.Equal(422, (int)response.StatusCode);
        var error = (await response.Content.ReadFromJsonAsync<JsonElement>()).GetProperty("error");
        Assert.Equal("adapter_unavailable", error.GetProperty("code").GetString());
        Assert.DoesNotContain(server.Store, error.GetProperty("message").GetString());
        var ok = await server.PostJsonAsync("v1/completions", new { prompt = "x", max_tokens = 2, n = 2 });
        Assert.Equal(2, ok.GetProperty("choices").GetArrayLength());
        Assert.Equal(0, await server.MetricAsync("peftserve_requests_in_flight"));
    }
}
