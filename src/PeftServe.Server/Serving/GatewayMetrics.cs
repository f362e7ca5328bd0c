using System.Globalization;
using System.Text;
using Microsoft.Extensions.Options;
using PeftServe.Server.Hosting;
using Prometheus;

namespace PeftServe.Server.Serving;

/// <summary>The metrics the Kubernetes inference gateway's endpoint picker scrapes from every model
/// server, under the vLLM names it looks for by default (the model server protocol,
/// kubernetes-sigs/gateway-api-inference-extension docs/proposals/003-model-server-protocol), served on
/// /metrics after our own peftserve_* metrics. All are read from the engine at each scrape:
/// <list type="bullet">
/// <item><c>vllm:num_requests_waiting</c>, <c>vllm:num_requests_running</c>: requests not yet admitted, and
/// sequences in the running batch.</item>
/// <item><c>vllm:kv_cache_usage_perc</c> (and its older name <c>vllm:gpu_cache_usage_perc</c>): used KV blocks
/// over usable blocks, a fraction in [0, 1] as vLLM reports it despite the name.</item>
/// <item><c>vllm:lora_requests_info</c>: value = the update time (Unix seconds; the picker takes the series
/// with the latest value), labels <c>running_lora_adapters</c> and <c>waiting_lora_adapters</c> (comma-separated
/// adapter names of running and waiting requests, of every method, not only LoRA) and <c>max_lora</c> (the
/// device slots of one method: how many adapters of a kind one batch can hold). One series: the current one.</item>
/// <item><c>vllm:cache_config_info</c>: value 1, labels <c>block_size</c> and <c>num_gpu_blocks</c> (the KV cache's
/// tokens per block and usable blocks), read by the picker's prefix-cache scorer.</item>
/// </list>
/// They are written here rather than through prometheus-net because prometheus-net refuses ':' in metric
/// names (the Prometheus format allows it, and these are the names the picker looks for).</summary>
public sealed class GatewayMetrics(ModelHost host, IOptions<ServerOptions> options)
{
    /// <summary>Serves /metrics: prometheus-net's registry, then these metrics.</summary>
    public static void Map(WebApplication app, CollectorRegistry registry)
    {
        var gateway = app.Services.GetRequiredService<GatewayMetrics>();
        app.MapGet("/metrics", async (HttpContext context) =>
        {
            context.Response.ContentType = "text/plain; version=0.0.4; charset=utf-8";
            await registry.CollectAndExportAsTextAsync(context.Response.Body, context.RequestAborted);
            await context.Response.WriteAsync(gateway.Text(), context.RequestAborted);
        });
    }

    /// <summary>The metrics in Prometheus' text format (empty while the model loads).</summary>
    public string Text()
    {
        if (!host.IsReady) return "";
        var s = host.Engine.Stats;
        var model = new[] { ("model_name", host.ModelName) };
        double usage = s.KvBlocksTotal > 0 ? (double)(s.KvBlocksTotal - s.KvBlocksFree) / s.KvBlocksTotal : 0;
        var text = new StringBuilder();
        Gauge(text, "vllm:num_requests_waiting", "Requests waiting to be admitted into the running batch (vLLM's name, for the inference gateway).", model, s.Waiting);
        Gauge(text, "vllm:num_requests_running", "Sequences in the running batch (vLLM's name, for the inference gateway).", model, s.Running);
        Gauge(text, "vllm:kv_cache_usage_perc", "KV-cache usage: used blocks over usable blocks, 1 = full (vLLM's name, for the inference gateway).", model, usage);
        Gauge(text, "vllm:gpu_cache_usage_perc", "The same as vllm:kv_cache_usage_perc, under vLLM's older name.", model, usage);
        Gauge(text, "vllm:lora_requests_info", "Adapters of running and waiting requests (every method); the value is the update time (vLLM's name, for the inference gateway).",
            [("max_lora", options.Value.SlotsPerMethod.ToString(CultureInfo.InvariantCulture)),
             ("waiting_lora_adapters", string.Join(',', s.WaitingAdapters)),
             ("running_lora_adapters", string.Join(',', s.RunningAdapters))],
            DateTimeOffset.UtcNow.ToUnixTimeMilliseconds() / 1000.0);
        Gauge(text, "vllm:cache_config_info", "KV-cache configuration (vLLM's name, for the inference gateway's prefix-cache scorer).",
            [("block_size", s.KvBlockSize.ToString(CultureInfo.InvariantCulture)), ("num_gpu_blocks", s.KvBlocksTotal.ToString(CultureInfo.InvariantCulture))], 1);
        return text.ToString();
    }

    private static void Gauge(StringBuilder text, string name, string help, (string Name, string Value)[] labels, double value)
    {
        text.Append("# HELP ").Append(name).Append(' ').Append(help).Append('\n');
        text.Append("# TYPE ").Append(name).Append(" gauge\n");
        text.Append(name).Append('{');
        for (int i = 0; i < labels.Length; i++)
        {
            if (i > 0) text.Append(',');
            text.Append(labels[i].Name).Append("=\"").Append(Escape(labels[i].Value)).Append('"');
        }
        text.Append("} ").Append(value.ToString("R", CultureInfo.InvariantCulture)).Append('\n');
    }

    /// <summary>A label value as the text format wants it: backslash, double quote and newline escaped.</summary>
    private static string Escape(string value) => value.Replace("\\", "\\\\").Replace("\"", "\\\"").Replace("\n", "\\n");
}
