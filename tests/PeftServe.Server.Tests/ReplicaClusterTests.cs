using System.Net;
using System.Net.Http.Headers;
using System.Net.Http.Json;
using System.Text.Json;
using Microsoft.AspNetCore.Http.Connections;
using Microsoft.AspNetCore.SignalR;
using Microsoft.AspNetCore.SignalR.Client;
using PeftServe.Server.Hubs;
using PeftServe.Tests;

namespace PeftServe.Server.Tests;

/// <summary>Two replicas behind HAProxy with Redis, as a gateway would run them (issue 14's scenario,
/// on CPU): an adapter uploaded through the proxy is served by both, over SSE and SignalR; a replaced
/// adapter is served fresh by both within a second; a deleted one is refused by both within a second;
/// the gateway's metrics on each replica are true; a replica killed mid-stream gives its clients a
/// clean error and retries land on the other.</summary>
public sealed class ReplicaClusterTests(Xunit.Abstractions.ITestOutputHelper output)
{
    private static string Example(string name) => Path.Combine(TestData.RepoRoot, "adapters", name);

    private static HttpClient Client(string url, string key = ReplicaCluster.UserKey)
    {
        var http = new HttpClient { BaseAddress = new Uri(url + "/"), Timeout = TimeSpan.FromSeconds(60) };
        http.DefaultRequestHeaders.Authorization = new AuthenticationHeaderValue("Bearer", key);
        return http;
    }

    private static MultipartFormDataContent Folder(string name, string dir)
    {
        var form = new MultipartFormDataContent { { new StringContent(name), "name" } };
        foreach (var f in Directory.GetFiles(dir)) form.Add(new ByteArrayContent(File.ReadAllBytes(f)), "files", Path.GetFileName(f));
        return form;
    }

    private static string Replica(HttpResponseMessage r) => r.Headers.TryGetValues("X-PeftServe-Replica", out var v) ? v.Single() : "?";

    private static async Task<(HttpStatusCode Status, string Text, string Replica)> Greedy(HttpClient http, string model)
    {
        using var r = await http.PostAsJsonAsync("v1/completions", new { model, prompt = "Once upon", max_tokens = 8, temperature = 0, ignore_eos = true });
        var body = await r.Content.ReadFromJsonAsync<JsonElement>();
        return (r.StatusCode, r.IsSuccessStatusCode ? body.GetProperty("choices")[0].GetProperty("text").GetString()! : "", Replica(r));
    }

    /// <summary>A streamed completion read to its end: the replica that served it, its text, and whether it ended with [DONE].</summary>
    private static async Task<(string Replica, string Text, bool Done)> StreamToEnd(HttpClient http, string model, int maxTokens)
    {
        using var request = new HttpRequestMessage(HttpMethod.Post, "v1/completions")
        {
            Content = JsonContent.Create(new { model, prompt = "Once upon", max_tokens = maxTokens, temperature = 0, ignore_eos = true, stream = true }),
        };
        using var r = await http.SendAsync(request, HttpCompletionOption.ResponseHeadersRead);
        Assert.Equal(HttpStatusCode.OK, r.StatusCode);
        var (text, done) = ReadSse(await r.Content.ReadAsStringAsync());
        return (Replica(r), text, done);
    }

    private static (string Text, bool Done) ReadSse(string body)
    {
        var text = new System.Text.StringBuilder();
        bool done = false;
        foreach (var e in body.Split("\n\n", StringSplitOptions.RemoveEmptyEntries))
        {
            var data = e["data: ".Length..];
            if (data == "[DONE]") { done = true; continue; }
            var choices = JsonDocument.Parse(data).RootElement.GetProperty("choices");
            if (choices.GetArrayLength() > 0) text.Append(choices[0].GetProperty("text").GetString());
        }
        return (text.ToString(), done);
    }

    /// <summary>A SignalR connection through the proxy, over WebSockets after negotiation; its cookie
    /// container shows which replica HAProxy pinned it to.</summary>
    private static async Task<(HubConnection Hub, string Replica)> Connect(ReplicaCluster cluster, List<string> notices)
    {
        var cookies = new CookieContainer();
        var hub = new HubConnectionBuilder().WithUrl(cluster.ProxyUrl + "/hubs/chat", HttpTransportType.WebSockets, o =>
        {
            o.Cookies = cookies;
            o.AccessTokenProvider = () => Task.FromResult<string?>(ReplicaCluster.UserKey);
        }).Build();
        hub.On<JsonElement>("adaptersChanged", n => { lock (notices) notices.Add(n.GetProperty("name").GetString() + " " + n.GetProperty("change").GetString()); });
        await hub.StartAsync();
        var replica = cookies.GetCookies(new Uri(cluster.ProxyUrl))["PEFTSERVE_REPLICA"]?.Value ?? "?";
        return (hub, replica);
    }

    private static async Task<(string Text, string? Finish)> Chat(HubConnection hub, string model, int maxTokens)
    {
        var text = new System.Text.StringBuilder();
        string? finish = null;
        var request = new ChatStreamRequest { Model = model, MaxTokens = maxTokens, Temperature = 0, IgnoreEos = true, Messages = [new HubMessage { Content = "Hello" }] };
        await foreach (var t in hub.StreamAsync<ChatToken>("StreamChat", request))
        {
            text.Append(t.Text);
            finish = t.FinishReason ?? finish;
        }
        return (text.ToString(), finish);
    }

    private static async Task<double> Metric(HttpClient http, string name, string labels)
    {
        var samples = await PrometheusText.ScrapeAsync(http);
        var want = labels.Split(',', StringSplitOptions.RemoveEmptyEntries).Select(l => l.Split('=')).ToDictionary(p => p[0], p => p[1].Trim('"'));
        return samples.Where(s => s.Name == name && want.All(w => s.Labels.TryGetValue(w.Key, out var v) && v == w.Value)).Sum(s => s.Value);
    }

    /// <summary>Polls until <paramref name="done"/> holds or the time is up; returns whether it held.</summary>
    private static async Task<bool> Within(TimeSpan limit, Func<Task<bool>> done)
    {
        var clock = System.Diagnostics.Stopwatch.StartNew();
        while (true)
        {
            if (await done()) return true;
            if (clock.Elapsed > limit) return false;
            await Task.Delay(20);
        }
    }

    [Fact]
    public async Task TwoReplicasBehindAProxyServeShareAndSurviveOneDying()
    {
        await using var cluster = await ReplicaCluster.StartAsync();
        try { await Scenario(cluster, output); }
        catch (Exception e) when (e is not OperationCanceledException)
        {
            throw new Xunit.Sdk.XunitException($"{e.Message}\n\n{cluster.Logs()}\n\n{e}");
        }
    }

    private static async Task Scenario(ReplicaCluster cluster, Xunit.Abstractions.ITestOutputHelper output)
    {
        using var proxy = Client(cluster.ProxyUrl);
        using var admin = Client(cluster.ProxyUrl, ReplicaCluster.AdminKey);
        var direct = cluster.Replicas.ToDictionary(r => r.Key, r => Client(r.Value));
        var directAdmin = cluster.Replicas.ToDictionary(r => r.Key, r => Client(r.Value, ReplicaCluster.AdminKey));
        try
        {
            string v1 = (await Greedy(proxy, "tiny-lora-r4-qv")).Text, v2 = (await Greedy(proxy, "tiny-lora-r8-all")).Text;
            Assert.NotEqual(v1, v2);

            // SignalR clients pinned to each replica (round robin on negotiate, then the cookie).
            var notices = new List<string>();
            var hubs = new Dictionary<string, HubConnection>();
            for (int i = 0; i < 2; i++)
            {
                var (hub, replica) = await Connect(cluster, notices);
                hubs[replica] = hub;
            }
            Assert.Equal(["a", "b"], hubs.Keys.Order());

            // Upload through the proxy; two replicas storing one name at once: one 201, one 409.
            using (var up = await admin.PostAsync("v1/adapters", Folder("fleet-lora", Example("tiny-lora-r4-qv"))))
                Assert.Equal(HttpStatusCode.Created, up.StatusCode);
            var race = await Task.WhenAll(directAdmin.Values.Select(async h => { using var r = await h.PostAsync("v1/adapters", Folder("raced", Example("tiny-ia3"))); return (int)r.StatusCode; }));
            Assert.Equal([201, 409], race.Order());

            // Both SignalR clients heard of the upload, whichever replica took it (the Redis backplane).
            Assert.True(await Within(TimeSpan.FromSeconds(2), () => Task.FromResult(notices.Count(n => n == "fleet-lora stored") == 2)),
                "adaptersChanged reached: " + string.Join(", ", notices));

            // Streamed completions through the proxy land on both replicas and generate the same text.
            var streams = new List<(string Replica, string Text, bool Done)>();
            for (int i = 0; i < 4; i++) streams.Add(await StreamToEnd(proxy, "fleet-lora", 8));
            Assert.Equal(["a", "b"], streams.Select(s => s.Replica).Distinct().Order());
            Assert.All(streams, s => Assert.True(s.Done));
            Assert.All(streams, s => Assert.Equal(v1, s.Text));
            // SignalR chat with the adapter on each replica.
            foreach (var (replica, hub) in hubs)
            {
                var (text, finish) = await Chat(hub, "fleet-lora", 6);
                Assert.Equal("length", finish);
                Assert.Equal(1, await Metric(direct[replica], "peftserve_requests_total", "api=signalr,model=fleet-lora,outcome=ok"));
            }

            // The gateway's metrics on each replica: present, and the adapter in use is in running_lora_adapters.
            foreach (var (replica, http) in direct)
            {
                var running = Task.WhenAll(Enumerable.Range(0, 3).Select(_ => StreamToEnd(http, "fleet-lora", 200)));
                bool seen = false;
                while (!running.IsCompleted && !seen)
                {
                    var m = await PrometheusText.ScrapeAsync(http);
                    foreach (var name in new[] { "vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc" })
                        Assert.Equal("tiny-llama", Assert.Single(m, s => s.Name == name).Labels["model_name"]);
                    var info = Assert.Single(m, s => s.Name == "vllm:lora_requests_info");
                    Assert.Equal("16", info.Labels["max_lora"]);
                    Assert.Contains("waiting_lora_adapters", info.Labels.Keys);
                    Assert.Contains("block_size", Assert.Single(m, s => s.Name == "vllm:cache_config_info").Labels.Keys);
                    if (info.List("running_lora_adapters").Contains("fleet-lora"))
                    {
                        seen = true;
                        Assert.True(m.Single(s => s.Name == "vllm:num_requests_running").Value >= 1);
                        Assert.True(m.Single(s => s.Name == "vllm:kv_cache_usage_perc").Value > 0);
                    }
                }
                Assert.True(seen, $"replica {replica} never showed fleet-lora in running_lora_adapters while serving it");
                await running;
            }

            // Replaced through the proxy: both replicas serve the new weights within a second (their caches
            // held the old ones; the version file is polled only once a minute here, so this is Redis).
            using (var del = await admin.DeleteAsync("v1/adapters/fleet-lora")) Assert.Equal(HttpStatusCode.OK, del.StatusCode);
            using (var up = await admin.PostAsync("v1/adapters", Folder("fleet-lora", Example("tiny-lora-r8-all")))) Assert.Equal(HttpStatusCode.Created, up.StatusCode);
            var clock = System.Diagnostics.Stopwatch.StartNew();
            foreach (var (replica, http) in direct)
            {
                Assert.True(await Within(TimeSpan.FromSeconds(1), async () => (await Greedy(http, "fleet-lora")).Text == v2), $"replica {replica} still served the old fleet-lora");
                output.WriteLine($"replaced fleet-lora served by replica {replica} {clock.Elapsed.TotalMilliseconds:F0} ms after the upload returned");
            }

            // Deleted through the proxy: both replicas refuse it within a second.
            using (var del = await admin.DeleteAsync("v1/adapters/fleet-lora")) Assert.Equal(HttpStatusCode.OK, del.StatusCode);
            clock.Restart();
            foreach (var (replica, http) in direct)
            {
                Assert.True(await Within(TimeSpan.FromSeconds(1), async () => (await Greedy(http, "fleet-lora")).Status == HttpStatusCode.NotFound), $"replica {replica} still served the deleted fleet-lora");
                output.WriteLine($"deleted fleet-lora refused by replica {replica} {clock.Elapsed.TotalMilliseconds:F0} ms after the delete returned");
            }
            foreach (var hub in hubs.Values)
                await Assert.ThrowsAsync<HubException>(() => Chat(hub, "fleet-lora", 4));

            // Kill the replica that serves a long stream, mid-stream.
            using var request = new HttpRequestMessage(HttpMethod.Post, "v1/completions")
            {
                Content = JsonContent.Create(new { model = "tiny-ia3", prompt = "Once upon", max_tokens = 240, ignore_eos = true, stream = true }),
            };
            using var response = await proxy.SendAsync(request, HttpCompletionOption.ResponseHeadersRead);
            var victim = Replica(response);
            var survivor = victim == "a" ? "b" : "a";
            var body = await response.Content.ReadAsStreamAsync();
            var first = new byte[256];
            Assert.True(await body.ReadAsync(first) > 0);
            var hubStream = Chat(hubs[victim], "tiny-ia3", 240);
            cluster.Kill(victim);

            // That client gets a clean error: the stream breaks off (no [DONE], no hang).
            var rest = new MemoryStream();
            var read = Task.Run(async () => { await body.CopyToAsync(rest); });
            var ended = await Task.WhenAny(read, Task.Delay(TimeSpan.FromSeconds(15)));
            Assert.Same(read, ended);
            Assert.True(read.IsFaulted || !System.Text.Encoding.UTF8.GetString(rest.ToArray()).Contains("[DONE]"), "the stream of a killed replica ended as if complete");
            var hubError = await Record.ExceptionAsync(() => hubStream.WaitAsync(TimeSpan.FromSeconds(15)));
            Assert.True(hubError is not null and not TimeoutException, "the SignalR stream of the killed replica did not fail cleanly: " + hubError);

            // Retries land on the other replica.
            for (int i = 0; i < 4; i++)
            {
                var (status, text, replica) = await Greedy(proxy, "tiny-lora-r4-qv");
                Assert.Equal(HttpStatusCode.OK, status);
                Assert.Equal(survivor, replica);
                Assert.Equal(v1, text);
            }
            var again = await StreamToEnd(proxy, "tiny-ia3", 8);
            Assert.Equal(survivor, again.Replica);
            Assert.True(again.Done);
            await using var rejoined = (await Connect(cluster, notices)).Hub;
            Assert.Equal("length", (await Chat(rejoined, "tiny-lora-r4-qv", 4)).Finish);
            foreach (var hub in hubs.Values) await hub.DisposeAsync();
        }
        finally
        {
            foreach (var h in direct.Values.Concat(directAdmin.Values)) h.Dispose();
        }
    }
}
