using System.Net.Http.Json;

namespace PeftServe.Server.Tests;

/// <summary>The metrics the inference gateway's endpoint picker scrapes, under vLLM's names, hold the
/// engine's true figures: queue and batch, KV usage, and the adapters of running and waiting requests.</summary>
public sealed class GatewayMetricsTests
{
    private static PrometheusSample One(List<PrometheusSample> samples, string name)
    {
        var found = samples.Where(s => s.Name == name).ToList();
        Assert.True(found.Count == 1, $"{name}: {found.Count} series");
        return found[0];
    }

    /// <summary>Streams a long completion and reads it to the end (the caller does not wait for it).</summary>
    private static async Task Stream(TestServer s, string model, int maxTokens = 200)
    {
        using var request = new HttpRequestMessage(HttpMethod.Post, "v1/completions")
        {
            Content = JsonContent.Create(new { model, prompt = "Tell me everything", max_tokens = maxTokens, ignore_eos = true, stream = true }),
        };
        using var response = await s.Http.SendAsync(request, HttpCompletionOption.ResponseHeadersRead);
        response.EnsureSuccessStatusCode();
        await response.Content.ReadAsStringAsync();
    }

    [Fact]
    public async Task AnIdleServerReportsAnEmptyQueueAndItsCacheConfiguration()
    {
        await using var s = await TestServer.StartAsync("--slots-per-method", "3");
        var before = DateTimeOffset.UtcNow.ToUnixTimeMilliseconds() / 1000.0;
        var m = await PrometheusText.ScrapeAsync(s.Http);

        Assert.Equal(0, One(m, "vllm:num_requests_waiting").Value);
        Assert.Equal(0, One(m, "vllm:num_requests_running").Value);
        Assert.Equal("tiny-llama", One(m, "vllm:num_requests_running").Labels["model_name"]);
        Assert.Equal(0, One(m, "vllm:kv_cache_usage_perc").Value);
        Assert.Equal(0, One(m, "vllm:gpu_cache_usage_perc").Value);
        var lora = One(m, "vllm:lora_requests_info");
        Assert.Equal("3", lora.Labels["max_lora"]);
        Assert.Equal("", lora.Labels["running_lora_adapters"]);
        Assert.Equal("", lora.Labels["waiting_lora_adapters"]);
        Assert.InRange(lora.Value, before - 1, before + 60);   // the update time, in Unix seconds
        var cache = One(m, "vllm:cache_config_info");
        Assert.Equal("16", cache.Labels["block_size"]);
        Assert.Equal(await s.MetricAsync("peftserve_kv_cache_blocks_total"), double.Parse(cache.Labels["num_gpu_blocks"], System.Globalization.CultureInfo.InvariantCulture));
        // Our own metrics stay.
        Assert.Contains(m, x => x.Name == "peftserve_queue_depth");
    }

    /// <summary>One sequence at a time: while a LoRA request runs, an IA3 request waits; the scrapes show
    /// both adapters (of two methods) where they are, with matching counts and KV usage.</summary>
    [Fact]
    public async Task RunningAndWaitingAdaptersOfEveryMethodAreReported()
    {
        await using var s = await TestServer.StartAsync("--max-batch-size", "1");
        var streams = new[] { Stream(s, "tiny-lora-r4-qv"), Stream(s, "tiny-ia3"), Stream(s, "tiny-lora-r4-qv") };
        bool sawRunningAndWaiting = false, sawIa3Running = false;
        var all = Task.WhenAll(streams);
        while (!all.IsCompleted)
        {
            var m = await PrometheusText.ScrapeAsync(s.Http);
            var lora = One(m, "vllm:lora_requests_info");
            var running = lora.List("running_lora_adapters");
            var waiting = lora.List("waiting_lora_adapters");
            Assert.True(running.Length <= 1, "batch size 1, yet running: " + string.Join(",", running));
            if (running.Length == 1 && waiting.Length >= 1)
            {
                sawRunningAndWaiting = true;
                Assert.True(One(m, "vllm:kv_cache_usage_perc").Value > 0, "a sequence runs, yet the KV cache is empty");
            }
            sawIa3Running |= running.Contains("tiny-ia3");
            await Task.Delay(10);
        }
        await all;
        Assert.True(sawRunningAndWaiting, "never saw one adapter running while another waited");
        Assert.True(sawIa3Running, "an IA3 adapter never appeared in running_lora_adapters");

        var idle = await PrometheusText.ScrapeAsync(s.Http);
        Assert.Empty(One(idle, "vllm:lora_requests_info").List("running_lora_adapters"));
        Assert.Equal(0, One(idle, "vllm:num_requests_running").Value);
        Assert.Equal(0, One(idle, "vllm:kv_cache_usage_perc").Value);
    }
}
