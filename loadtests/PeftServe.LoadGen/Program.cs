using System.Diagnostics;
using System.Net.Http.Json;
using System.Text;
using System.Text.Json;
using Microsoft.AspNetCore.SignalR.Client;

namespace PeftServe.LoadGen;

/// <summary>Load generator: N concurrent streaming clients (HTTP SSE or SignalR) over M adapters.
/// Reports requests/s, output tokens/s, time to first token and inter-token latency percentiles,
/// writes a JSON summary and a plot.
///   dotnet run --project loadtests/PeftServe.LoadGen -c Release -- --url http://127.0.0.1:8000
///     [--transport sse|signalr] [--clients 16] [--requests 64] [--max-tokens 32]
///     [--adapters a,b,c | --upload-copies DIR --adapter-count M] [--key KEY] [--json out.json] [--plot out.png] [--label NAME]</summary>
public static class Program
{
    private sealed record Result(string Model, double TtftMs, List<double> ItlMs, int Tokens, double TotalMs, string? Error);

    public static async Task<int> Main(string[] args)
    {
        var a = Args(args);
        string url = a.GetValueOrDefault("url", "http://127.0.0.1:8000").TrimEnd('/');
        string transport = a.GetValueOrDefault("transport", "sse");
        int clients = int.Parse(a.GetValueOrDefault("clients", "16"));
        int requests = int.Parse(a.GetValueOrDefault("requests", (clients * 4).ToString()));
        int maxTokens = int.Parse(a.GetValueOrDefault("max-tokens", "32"));
        string label = a.GetValueOrDefault("label", $"{transport}-{clients}c");
        string? key = a.GetValueOrDefault("key");
        using var http = new HttpClient { BaseAddress = new Uri(url + "/"), Timeout = TimeSpan.FromMinutes(10) };
        if (key is not null) http.DefaultRequestHeaders.Authorization = new("Bearer", key);

        var models = await Models(http, a);
        Console.Error.WriteLine($"{label}: {clients} clients, {requests} requests, {maxTokens} tokens each, over {models.Count} model(s) via {transport}");

        var hubs = new List<HubConnection>();
        if (transport == "signalr")
            for (int i = 0; i < clients; i++)
            {
                var hub = new HubConnectionBuilder().WithUrl(url + "/hubs/chat", o => { if (key is not null) o.AccessTokenProvider = () => Task.FromResult<string?>(key); }).Build();
                await hub.StartAsync();
                hubs.Add(hub);
            }

        int next = -1;
        var results = new System.Collections.Concurrent.ConcurrentBag<Result>();
        var wall = Stopwatch.StartNew();
        await Task.WhenAll(Enumerable.Range(0, clients).Select(async c =>
        {
            int i;
            while ((i = Interlocked.Increment(ref next)) < requests)
            {
                var model = models[i % models.Count];
                var prompt = $"Request {i}: tell me a story about number {i * 7919 % 1000}.";
                results.Add(transport == "signalr" ? await SignalR(hubs[c], model, prompt, maxTokens) : await Sse(http, model, prompt, maxTokens));
            }
        }));
        wall.Stop();
        foreach (var h in hubs) await h.DisposeAsync();

        var ok = results.Where(r => r.Error is null).ToList();
        var errors = results.Where(r => r.Error is not null).GroupBy(r => r.Error).ToDictionary(g => g.Key!, g => g.Count());
        var ttft = ok.Select(r => r.TtftMs).Order().ToArray();
        var itl = ok.SelectMany(r => r.ItlMs).Order().ToArray();
        double secs = wall.Elapsed.TotalSeconds;
        var summary = new
        {
            label, transport, clients, requests, max_tokens = maxTokens, models = models.Count,
            completed = ok.Count, failed = results.Count - ok.Count, errors,
            seconds = Math.Round(secs, 3),
            requests_per_s = Math.Round(ok.Count / secs, 2),
            output_tokens_per_s = Math.Round(ok.Sum(r => r.Tokens) / secs, 1),
            ttft_ms = Percentiles(ttft),
            itl_ms = Percentiles(itl),
        };
        var json = JsonSerializer.Serialize(summary, new JsonSerializerOptions { WriteIndented = true });
        Console.WriteLine(json);
        if (a.GetValueOrDefault("json") is { } jsonPath) File.WriteAllText(jsonPath, json);
        if (a.GetValueOrDefault("plot") is { } plotPath) Plot(plotPath, label, ttft, itl);
        return ok.Count == results.Count ? 0 : 1;
    }

    private static Dictionary<string, double> Percentiles(double[] sorted) => sorted.Length == 0 ? [] : new()
    {
        ["p50"] = Math.Round(At(sorted, 0.50), 2), ["p90"] = Math.Round(At(sorted, 0.90), 2),
        ["p99"] = Math.Round(At(sorted, 0.99), 2), ["max"] = Math.Round(sorted[^1], 2), ["mean"] = Math.Round(sorted.Average(), 2),
    };

    private static double At(double[] sorted, double q) => sorted[Math.Min(sorted.Length - 1, (int)Math.Ceiling(q * sorted.Length) - 1)];

    /// <summary>The models to spread requests over: --adapters, or M uploaded copies of one adapter folder, or the base model.</summary>
    private static async Task<List<string>> Models(HttpClient http, Dictionary<string, string> a)
    {
        if (a.GetValueOrDefault("adapters") is { } list) return list.Split(',', StringSplitOptions.RemoveEmptyEntries).ToList();
        if (a.GetValueOrDefault("upload-copies") is { } dir)
        {
            int m = int.Parse(a.GetValueOrDefault("adapter-count", "1"));
            var names = new List<string>();
            for (int i = 0; i < m; i++)
            {
                var name = $"load-{Path.GetFileName(dir.TrimEnd('/'))}-{i:D3}";
                using var form = new MultipartFormDataContent { { new StringContent(name), "name" } };
                foreach (var f in Directory.GetFiles(dir)) form.Add(new ByteArrayContent(File.ReadAllBytes(f)), "files", Path.GetFileName(f));
                using var r = await http.PostAsync("v1/adapters", form);
                if (!r.IsSuccessStatusCode && (int)r.StatusCode != 409) throw new InvalidOperationException($"upload {name}: {(int)r.StatusCode} {await r.Content.ReadAsStringAsync()}");
                names.Add(name);
            }
            return names;
        }
        var models = await http.GetFromJsonAsync<JsonElement>("v1/models");
        return [models.GetProperty("data")[0].GetProperty("id").GetString()!];
    }

    private static async Task<Result> Sse(HttpClient http, string model, string prompt, int maxTokens)
    {
        var clock = Stopwatch.StartNew();
        var body = JsonSerializer.Serialize(new { model, messages = new[] { new { role = "user", content = prompt } }, max_tokens = maxTokens, ignore_eos = true, stream = true, stream_options = new { include_usage = true } });
        using var request = new HttpRequestMessage(HttpMethod.Post, "v1/chat/completions") { Content = new StringContent(body, Encoding.UTF8, "application/json") };
        try
        {
            using var response = await http.SendAsync(request, HttpCompletionOption.ResponseHeadersRead);
            if (!response.IsSuccessStatusCode) return new(model, 0, [], 0, clock.Elapsed.TotalMilliseconds, $"HTTP {(int)response.StatusCode}");
            using var reader = new StreamReader(await response.Content.ReadAsStreamAsync());
            double first = -1, last = 0;
            var itl = new List<double>();
            int tokens = 0;
            while (await reader.ReadLineAsync() is { } line)
            {
                if (!line.StartsWith("data: ", StringComparison.Ordinal) || line == "data: [DONE]") continue;
                using var doc = JsonDocument.Parse(line[6..]);
                if (doc.RootElement.TryGetProperty("usage", out var usage) && usage.ValueKind == JsonValueKind.Object)
                {
                    tokens = usage.GetProperty("completion_tokens").GetInt32(); // the server's count (a chunk may carry no text)
                    continue;
                }
                var choices = doc.RootElement.GetProperty("choices");
                if (choices.GetArrayLength() == 0 || !choices[0].GetProperty("delta").TryGetProperty("content", out var c) || c.GetString() is not { Length: > 0 }) continue;
                double now = clock.Elapsed.TotalMilliseconds;
                if (first < 0) first = now; else itl.Add(now - last);
                last = now;
            }
            return new(model, first, itl, tokens, clock.Elapsed.TotalMilliseconds, null);
        }
        catch (Exception e) when (e is HttpRequestException or IOException) { return new(model, 0, [], 0, clock.Elapsed.TotalMilliseconds, e.GetType().Name); }
    }

    private static async Task<Result> SignalR(HubConnection hub, string model, string prompt, int maxTokens)
    {
        var clock = Stopwatch.StartNew();
        double first = -1, last = 0;
        var itl = new List<double>();
        int tokens = 0;
        try
        {
            var request = new { model, messages = new[] { new { role = "user", content = prompt } }, maxTokens, temperature = 1.0, ignoreEos = true };
            await foreach (var t in hub.StreamAsync<JsonElement>("StreamChat", request))
            {
                if (t.GetProperty("tokenId").GetInt32() < 0) continue;
                double now = clock.Elapsed.TotalMilliseconds;
                if (first < 0) first = now; else itl.Add(now - last);
                last = now;
                tokens++;
            }
            return new(model, first, itl, tokens, clock.Elapsed.TotalMilliseconds, null);
        }
        catch (Exception e) { return new(model, 0, [], 0, clock.Elapsed.TotalMilliseconds, e.GetType().Name + ": " + e.Message); }
    }

    /// <summary>Cumulative distributions of time to first token and inter-token latency.</summary>
    private static void Plot(string path, string label, double[] ttft, double[] itl)
    {
        var plot = new ScottPlot.Plot();
        void Cdf(double[] xs, string name)
        {
            if (xs.Length == 0) return;
            var ys = Enumerable.Range(1, xs.Length).Select(i => 100.0 * i / xs.Length).ToArray();
            var line = plot.Add.ScatterLine(xs, ys);
            line.LegendText = name;
        }
        Cdf(ttft, "time to first token");
        Cdf(itl, "inter-token latency");
        plot.Axes.Bottom.Label.Text = "milliseconds";
        plot.Axes.Left.Label.Text = "percent of samples ≤ x";
        plot.Title($"PeftServe load test: {label}");
        plot.ShowLegend();
        plot.SavePng(path, 900, 500);
        Console.Error.WriteLine($"plot: {path}");
    }

    private static Dictionary<string, string> Args(string[] args)
    {
        var d = new Dictionary<string, string>();
        for (int i = 0; i < args.Length; i++)
        {
            if (!args[i].StartsWith("--")) throw new ArgumentException($"unexpected argument '{args[i]}'");
            d[args[i][2..]] = i + 1 < args.Length && !args[i + 1].StartsWith("--") ? args[++i] : "true";
        }
        return d;
    }
}
