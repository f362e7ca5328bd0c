using System.Collections.Concurrent;
using System.Diagnostics;
using System.Globalization;
using System.Net;
using System.Net.Http.Json;
using System.Text;
using System.Text.Json;
using Microsoft.AspNetCore.SignalR.Client;

namespace PeftServe.FaultTest;

/// <summary>The fault test: a real server process on the built-in tiny model (CPU), put through
/// 1. a soak: N streaming clients (half SSE, half SignalR) for M minutes, each request completed,
///    cancelled or disconnected at random, over the base model and adapters that are uploaded and
///    deleted all along, with bursts that overflow the queue; memory and engine gauges sampled;
/// 2. SIGKILL in the middle of uploads, then a restart on the same store, which must be consistent;
/// 3. SIGTERM with streams running, which must all finish before the process exits (code 0).
/// It reports requests served, refused, cancelled and lost (lost must be 0), memory over time (a plot),
/// and KV blocks or adapter slots still held once idle (must be 0). Exit code 0 only if all holds.
///   dotnet run --project loadtests/PeftServe.FaultTest -c Release -- [--minutes 10] [--clients 120]
///     [--server src/PeftServe.Server/bin/Release/net10.0/PeftServe.Server.dll] [--out artifacts/fault-test]</summary>
public static class Program
{
    private static readonly string[] ExampleAdapters = ["tiny-lora-r4-qv", "tiny-lora-r8-all", "tiny-ia3", "tiny-prefix-6", "tiny-prompt-5", "trained-bottleneck", "trained-bitfit"];

    public static async Task<int> Main(string[] args)
    {
        var a = Args(args);
        var repo = RepoRoot();
        double minutes = double.Parse(a.GetValueOrDefault("minutes", "10"), CultureInfo.InvariantCulture);
        int clients = int.Parse(a.GetValueOrDefault("clients", "120"), CultureInfo.InvariantCulture);
        var serverDll = Path.GetFullPath(a.GetValueOrDefault("server", Path.Combine(repo, "src/PeftServe.Server/bin/Release/net10.0/PeftServe.Server.dll")));
        var outDir = Path.GetFullPath(a.GetValueOrDefault("out", Path.Combine(repo, "artifacts/fault-test")));
        Directory.CreateDirectory(outDir);
        var store = Path.Combine(outDir, "store");
        if (Directory.Exists(store)) Directory.Delete(store, true);
        foreach (var name in ExampleAdapters) CopyDir(Path.Combine(repo, "adapters", name), Path.Combine(store, name));
        var log = Path.Combine(outDir, "server.log");
        File.WriteAllText(log, "");
        string[] serverArgs = ["--max-batch-size", "32", "--max-queue-length", "64", "--kv-cache-blocks", "768", "--slots-per-method", "4",
                               "--host-cache-bytes", "400000", "--drain-seconds", "90", "--max-concurrent-uploads", "2"];
        var report = new Report { Minutes = minutes, Clients = clients };
        Console.WriteLine($"fault test: {clients} clients for {minutes} min against {serverDll}; output in {outDir}");

        using (var server = await ServerProcess.StartAsync(serverDll, store, log, serverArgs))
        {
            await Soak(server, repo, clients, TimeSpan.FromMinutes(minutes), report);
            await KillDuringUploads(server, repo, report);
        }
        using (var restarted = await ServerProcess.StartAsync(serverDll, store, log, serverArgs))
        {
            await CheckStore(restarted, store, report);
            await DrainOnSigterm(restarted, clients, report);
        }

        report.Write(outDir);
        Console.WriteLine(report.Summary());
        return report.Passed ? 0 : 1;
    }

    // ---- 1. soak ----

    private static async Task Soak(ServerProcess server, string repo, int clients, TimeSpan length, Report report)
    {
        using var http = Http(server.Url);
        var live = new ConcurrentDictionary<string, bool>(ExampleAdapters.Select(n => KeyValuePair.Create(n, true)));
        var results = report.SoakResults;
        var clock = Stopwatch.StartNew();
        using var stop = new CancellationTokenSource(length);

        var sampler = Task.Run(async () =>
        {
            while (!stop.IsCancellationRequested)
            {
                var m = await Metrics(http);
                report.Samples.Add(new Sample(clock.Elapsed.TotalMinutes, server.RssBytes() / 1048576.0, m.GetValueOrDefault("peftserve_requests_in_flight"),
                    m.GetValueOrDefault("peftserve_queue_depth"), m.GetValueOrDefault("peftserve_kv_cache_blocks_free"), m.GetValueOrDefault("peftserve_adapter_slots_held")));
                try { await Task.Delay(5000, stop.Token); } catch (OperationCanceledException) { }
            }
        });

        // Adapters come and go: an upload every 2 s (folder or zip), the oldest copy deleted past six.
        var churn = Task.Run(async () =>
        {
            var copies = new Queue<string>();
            var rng = new Random(7);
            for (int n = 0; !stop.IsCancellationRequested; n++)
            {
                var source = ExampleAdapters[rng.Next(ExampleAdapters.Length)];
                var name = $"churn-{n}";
                using var response = await http.PostAsync("v1/adapters", Upload(name, Path.Combine(repo, "adapters", source), asZip: n % 2 == 1));
                if (response.StatusCode == HttpStatusCode.Created) { report.Uploads++; copies.Enqueue(name); live[name] = true; }
                else if (response.StatusCode != HttpStatusCode.TooManyRequests) report.Lost.Add($"upload {name}: HTTP {(int)response.StatusCode} {await response.Content.ReadAsStringAsync()}");
                if (copies.Count > 6)
                {
                    var old = copies.Dequeue();
                    live.TryRemove(old, out _);
                    using var deleted = await http.DeleteAsync($"v1/adapters/{old}");
                    if (deleted.StatusCode == HttpStatusCode.OK) report.Deletes++;
                    else report.Lost.Add($"delete {old}: HTTP {(int)deleted.StatusCode}");
                }
                try { await Task.Delay(2000, stop.Token); } catch (OperationCanceledException) { }
            }
        });

        // Every minute a burst of short requests on top of the streams: the queue overflows (429).
        var bursts = Task.Run(async () =>
        {
            while (!stop.IsCancellationRequested)
            {
                try { await Task.Delay(TimeSpan.FromSeconds(45), stop.Token); } catch (OperationCanceledException) { break; }
                var burst = await Task.WhenAll(Enumerable.Range(0, 200).Select(i => Clients.OneShotAsync(http, "tiny-llama", $"burst {i}")));
                foreach (var r in burst) results.Add(("burst", r));
                report.Bursts++;
            }
        });

        var workers = Enumerable.Range(0, clients).Select(id => Task.Run(async () =>
        {
            var rng = new Random(id * 7919 + 1);
            bool signalR = id % 2 == 1;
            HubConnection? hub = null;
            using var clientHttp = Http(server.Url);
            while (!stop.IsCancellationRequested)
            {
                var models = live.Keys.ToArray();
                var model = rng.NextDouble() < 0.3 ? "tiny-llama" : models[rng.Next(models.Length)];
                int maxTokens = rng.Next(8, 64);
                double roll = rng.NextDouble();
                var behaviour = roll < 0.15 ? Behaviour.Cancel : roll < 0.25 ? Behaviour.Disconnect : Behaviour.Complete;
                int stopAfter = rng.Next(1, 6);
                var prompt = $"client {id} asks about {rng.Next(1000)}";
                RequestResult result;
                if (signalR)
                {
                    if (hub is null || hub.State != HubConnectionState.Connected)
                    {
                        if (hub is not null) await hub.DisposeAsync();
                        hub = new HubConnectionBuilder().WithUrl(server.Url + "/hubs/chat").Build();
                        try { await hub.StartAsync(); }
                        catch (Exception e) { results.Add(("signalr", new(Outcome.Lost, "connect: " + e.Message))); await Task.Delay(500); continue; }
                    }
                    result = await Clients.HubAsync(hub, model, maxTokens, behaviour, stopAfter, prompt);
                }
                else result = await Clients.SseAsync(clientHttp, model, maxTokens, behaviour, stopAfter, prompt);
                results.Add((signalR ? "signalr" : "sse", result));
                if (result.Outcome == Outcome.Refused) await Task.Delay(rng.Next(200, 1000));   // as Retry-After asks
                else await Task.Delay(rng.Next(0, 100));
            }
            if (hub is not null) await hub.DisposeAsync();
        })).ToList();

        var progress = Task.Run(async () =>
        {
            while (!stop.IsCancellationRequested)
            {
                try { await Task.Delay(TimeSpan.FromSeconds(30), stop.Token); } catch (OperationCanceledException) { break; }
                var counts = results.GroupBy(r => r.Result.Outcome).ToDictionary(g => g.Key, g => g.Count());
                Console.WriteLine($"  {clock.Elapsed:mm\\:ss} served {counts.GetValueOrDefault(Outcome.Served)}, refused {counts.GetValueOrDefault(Outcome.Refused)}, " +
                    $"cancelled {counts.GetValueOrDefault(Outcome.Cancelled)}, lost {counts.GetValueOrDefault(Outcome.Lost)}; uploads {report.Uploads}, deletes {report.Deletes}; RSS {server.RssBytes() / 1048576} MiB");
            }
        });

        await Task.WhenAll(workers);
        await Task.WhenAll(churn, bursts, sampler, progress);
        report.SoakSeconds = clock.Elapsed.TotalSeconds;

        // Idle: every KV block free again, no adapter slot held, nothing in flight.
        Dictionary<string, double> idle = [];
        for (int i = 0; i < 100; i++)
        {
            idle = await Metrics(http);
            if (idle.GetValueOrDefault("peftserve_requests_in_flight") == 0 && idle.GetValueOrDefault("peftserve_running_sequences") == 0
                && idle.GetValueOrDefault("peftserve_queue_depth") == 0) break;
            await Task.Delay(200);
        }
        report.KvBlocksLeaked = (int)(idle.GetValueOrDefault("peftserve_kv_cache_blocks_total") - idle.GetValueOrDefault("peftserve_kv_cache_blocks_free"));
        report.SlotsLeaked = (int)idle.GetValueOrDefault("peftserve_adapter_slots_held");
        report.InFlightAfter = (int)idle.GetValueOrDefault("peftserve_requests_in_flight");
        report.Samples.Add(new Sample(clock.Elapsed.TotalMinutes, server.RssBytes() / 1048576.0, report.InFlightAfter, 0, idle.GetValueOrDefault("peftserve_kv_cache_blocks_free"), report.SlotsLeaked));
        foreach (var (_, r) in results) if (r.Outcome == Outcome.Lost) report.Lost.Add(r.Detail);
    }

    // ---- 2. SIGKILL mid-upload, restart ----

    private static async Task KillDuringUploads(ServerProcess server, string repo, Report report)
    {
        // A large upload (a 64 MiB README beside the adapter) sent in slices, so it is in flight when the kill comes.
        var big = Path.Combine(Path.GetTempPath(), $"peftserve-big-{Guid.NewGuid():N}");
        CopyDir(Path.Combine(repo, "adapters", "tiny-lora-r8-all"), big);
        var random = new byte[64 << 20];
        new Random(3).NextBytes(random);
        File.WriteAllBytes(Path.Combine(big, "README.md"), random);
        using var http = Http(server.Url);
        var upload = http.PostAsync("v1/adapters", Upload("killed-mid-upload", big, asZip: false, slow: true));
        await Task.Delay(1500);
        server.Kill();
        report.Kills++;
        try { using var _ = await upload; } catch (Exception) { }   // the connection died with the server
        Directory.Delete(big, true);
        Console.WriteLine("  SIGKILLed the server during a 64 MiB upload");
    }

    private static async Task CheckStore(ServerProcess server, string store, Report report)
    {
        using var http = Http(server.Url);
        var leftovers = Directory.GetDirectories(store).Where(d => Path.GetFileName(d).StartsWith('.')).ToList();
        var listed = (await http.GetFromJsonAsync<JsonElement>("v1/adapters")).GetProperty("data").EnumerateArray().Select(e => e.GetProperty("id").GetString()!).ToList();
        var folders = Directory.GetDirectories(store).Select(Path.GetFileName).Where(n => !n!.StartsWith('.')).ToList();
        var broken = new List<string>();
        foreach (var name in listed)
        {
            var r = await Clients.OneShotAsync(http, name, "check");
            if (r.Outcome != Outcome.Served) broken.Add($"{name}: {r.Detail}");
        }
        report.StoreConsistent = leftovers.Count == 0 && broken.Count == 0 && listed.Count == folders.Count && !listed.Contains("killed-mid-upload");
        report.StoreCheck = $"{listed.Count} adapters listed, each served one request; {leftovers.Count} hidden leftovers after restart; {broken.Count} broken; the killed upload {(listed.Contains("killed-mid-upload") ? "is present" : "is absent")}";
        foreach (var b in broken) report.Lost.Add("after restart: " + b);
        Console.WriteLine("  restart: " + report.StoreCheck);
    }

    // ---- 3. SIGTERM drains ----

    private static async Task DrainOnSigterm(ServerProcess server, int clients, Report report)
    {
        int streams = Math.Min(clients, 40);
        const int tokens = 150;
        var started = new CountdownEvent(streams);
        using var http = Http(server.Url);
        var hubs = new List<HubConnection>();
        var tasks = Enumerable.Range(0, streams).Select(async i =>
        {
            if (i % 2 == 0)
            {
                // SSE: count events until [DONE].
                using var response = await http.SendAsync(new HttpRequestMessage(HttpMethod.Post, "v1/chat/completions") { Content = JsonContent.Create(Clients.ChatBody("tiny-llama", tokens, true, $"drain {i}")) },
                    HttpCompletionOption.ResponseHeadersRead);
                var reader = new StreamReader(await response.Content.ReadAsStreamAsync());
                bool signalled = false, done = false;
                int? completion = null;
                try
                {
                    while (await reader.ReadLineAsync() is { } line)
                    {
                        if (!signalled) { started.Signal(); signalled = true; }
                        if (line == "data: [DONE]") { done = true; break; }
                        if (line.StartsWith("data: {", StringComparison.Ordinal) && JsonDocument.Parse(line[6..]).RootElement.TryGetProperty("usage", out var u) && u.ValueKind == JsonValueKind.Object)
                            completion = u.GetProperty("completion_tokens").GetInt32();
                    }
                }
                catch (Exception e) { if (!signalled) started.Signal(); return new RequestResult(Outcome.Lost, "drain sse: " + e.Message); }
                if (!signalled) started.Signal();
                return done && completion == tokens ? new RequestResult(Outcome.Served, "drained") : new RequestResult(Outcome.Lost, $"drain sse: done {done}, {completion} tokens");
            }
            var hub = new HubConnectionBuilder().WithUrl(server.Url + "/hubs/chat").Build();
            lock (hubs) hubs.Add(hub);
            await hub.StartAsync();
            int count = 0;
            HubToken? last = null;
            try
            {
                await foreach (var t in hub.StreamAsync<HubToken>("StreamChat", new { model = "tiny-llama", messages = new[] { new { role = "user", content = $"drain {i}" } }, maxTokens = tokens, ignoreEos = true }))
                {
                    if (count++ == 0) started.Signal();
                    last = t;
                }
            }
            catch (Exception e) { if (count == 0) started.Signal(); return new RequestResult(Outcome.Lost, "drain hub: " + e.Message); }
            return count == tokens && last?.FinishReason == "length" ? new RequestResult(Outcome.Served, "drained") : new RequestResult(Outcome.Lost, $"drain hub: {count} tokens");
        }).ToList();

        started.Wait(TimeSpan.FromMinutes(2));
        var clock = Stopwatch.StartNew();
        server.Terminate();
        // New work during the drain is refused with 503 (or finds the port closed once the server is gone).
        await Task.Delay(200);
        try
        {
            using var late = await http.PostAsJsonAsync("v1/chat/completions", Clients.ChatBody("tiny-llama", 4, false, "late"));
            report.LateRequestStatus = (int)late.StatusCode;
        }
        catch (HttpRequestException) { report.LateRequestStatus = 0; }
        var results = await Task.WhenAll(tasks);
        bool exited = await server.WaitForExitAsync(TimeSpan.FromMinutes(3));
        report.DrainSeconds = clock.Elapsed.TotalSeconds;
        report.DrainStreams = streams;
        report.DrainServed = results.Count(r => r.Outcome == Outcome.Served);
        report.DrainExitCode = exited ? server.ExitCode : -1;
        foreach (var r in results.Where(r => r.Outcome != Outcome.Served)) report.Lost.Add(r.Detail);
        foreach (var h in hubs) await h.DisposeAsync();
        Console.WriteLine($"  SIGTERM: {report.DrainServed} of {streams} running streams finished; exit code {report.DrainExitCode} after {report.DrainSeconds:F1} s; a request sent meanwhile got {report.LateRequestStatus}");
    }

    // ---- helpers ----

    private static HttpClient Http(string url) => new() { BaseAddress = new Uri(url + "/"), Timeout = TimeSpan.FromMinutes(5) };

    private static async Task<Dictionary<string, double>> Metrics(HttpClient http)
    {
        var result = new Dictionary<string, double>();
        try
        {
            foreach (var line in (await http.GetStringAsync("metrics")).Split('\n'))
            {
                if (line.StartsWith('#') || line.Length == 0) continue;
                int space = line.LastIndexOf(' ');
                if (space > 0 && double.TryParse(line[(space + 1)..], CultureInfo.InvariantCulture, out var v)) result[line[..space]] = v;
            }
        }
        catch (HttpRequestException) { }
        return result;
    }

    private static MultipartFormDataContent Upload(string name, string dir, bool asZip, bool slow = false)
    {
        var form = new MultipartFormDataContent { { new StringContent(name), "name" } };
        if (asZip)
        {
            using var ms = new MemoryStream();
            using (var zip = new System.IO.Compression.ZipArchive(ms, System.IO.Compression.ZipArchiveMode.Create, leaveOpen: true))
                foreach (var f in AdapterFiles(dir))
                {
                    using var entry = zip.CreateEntry(Path.GetFileName(f)).Open();
                    entry.Write(File.ReadAllBytes(f));
                }
            form.Add(new ByteArrayContent(ms.ToArray()), "files", name + ".zip");
            return form;
        }
        foreach (var f in AdapterFiles(dir))
            form.Add(slow ? new SlicedContent(File.ReadAllBytes(f)) : new ByteArrayContent(File.ReadAllBytes(f)), "files", Path.GetFileName(f));
        return form;
    }

    /// <summary>Bytes sent 1 MiB at a time, 100 ms apart: an upload that stays in flight for a while.</summary>
    private sealed class SlicedContent(byte[] data) : HttpContent
    {
        protected override async Task SerializeToStreamAsync(Stream stream, TransportContext? context)
        {
            for (int at = 0; at < data.Length; at += 1 << 20)
            {
                await stream.WriteAsync(data.AsMemory(at, Math.Min(1 << 20, data.Length - at)));
                await stream.FlushAsync();
                await Task.Delay(100);
            }
        }

        protected override bool TryComputeLength(out long length)
        {
            length = data.Length;
            return true;
        }
    }

    /// <summary>The files an adapter upload carries (the trained examples also hold logs and plots).</summary>
    private static IEnumerable<string> AdapterFiles(string dir) =>
        Directory.GetFiles(dir).Where(f => Path.GetFileName(f) is "adapter_config.json" or "adapter_model.safetensors" or "README.md");

    private static void CopyDir(string from, string to)
    {
        Directory.CreateDirectory(to);
        foreach (var f in Directory.GetFiles(from)) File.Copy(f, Path.Combine(to, Path.GetFileName(f)), overwrite: true);
    }

    private static string RepoRoot()
    {
        for (var d = new DirectoryInfo(AppContext.BaseDirectory); d is not null; d = d.Parent)
            if (File.Exists(Path.Combine(d.FullName, "PeftServe.sln"))) return d.FullName;
        return Directory.GetCurrentDirectory();
    }

    private static Dictionary<string, string> Args(string[] args)
    {
        var result = new Dictionary<string, string>();
        for (int i = 0; i + 1 < args.Length; i += 2) result[args[i].TrimStart('-')] = args[i + 1];
        return result;
    }
}

/// <summary>One sample of the soak: minutes since start, server RSS, in-flight requests, queue depth, free KV blocks, held slots.</summary>
public sealed record Sample(double Minutes, double RssMiB, double InFlight, double Queue, double KvFree, double SlotsHeld);

public sealed class Report
{
    public double Minutes { get; set; }
    public int Clients { get; set; }
    public double SoakSeconds { get; set; }
    public ConcurrentBag<(string Kind, RequestResult Result)> SoakResults { get; } = [];
    public List<Sample> Samples { get; } = [];
    public int Uploads, Deletes, Bursts, Kills;
    public ConcurrentBag<string> Lost { get; } = [];
    public int KvBlocksLeaked { get; set; }
    public int SlotsLeaked { get; set; }
    public int InFlightAfter { get; set; }
    public bool StoreConsistent { get; set; }
    public string StoreCheck { get; set; } = "";
    public int DrainStreams { get; set; }
    public int DrainServed { get; set; }
    public int DrainExitCode { get; set; }
    public double DrainSeconds { get; set; }
    public int LateRequestStatus { get; set; }

    public int Count(Outcome o) => SoakResults.Count(r => r.Result.Outcome == o);

    /// <summary>RSS growth over the second half of the soak, in percent. The first minutes are warm-up
    /// (JIT, the adapter caches filling, the GC settling on its heap size); a leak keeps growing after.</summary>
    public double RssGrowthPercent
    {
        get
        {
            double half = Samples.Select(s => s.Minutes).DefaultIfEmpty().Max() / 2;
            var second = Samples.Where(s => s.Minutes >= half).ToList();
            if (second.Count < 6) return 0;
            double first = second.Take(3).Average(s => s.RssMiB), last = second.TakeLast(3).Average(s => s.RssMiB);
            return 100 * (last - first) / first;
        }
    }

    /// <summary>RSS at the sample nearest to <paramref name="minutes"/>.</summary>
    public double RssAt(double minutes) => Samples.OrderBy(s => Math.Abs(s.Minutes - minutes)).Select(s => s.RssMiB).FirstOrDefault();

    public bool Passed => Lost.IsEmpty && KvBlocksLeaked == 0 && SlotsLeaked == 0 && InFlightAfter == 0 && StoreConsistent
                          && DrainServed == DrainStreams && DrainExitCode == 0 && LateRequestStatus is 503 or 0 && RssGrowthPercent < 5;

    public string Summary()
    {
        var s = new StringBuilder();
        s.AppendLine($"soak: {Clients} clients (half SSE, half SignalR) for {SoakSeconds / 60:F1} min");
        foreach (var kind in new[] { "sse", "signalr", "burst" })
        {
            var of = SoakResults.Where(r => r.Kind == kind).ToList();
            s.AppendLine($"  {kind,-8} served {of.Count(r => r.Result.Outcome == Outcome.Served)}, refused {of.Count(r => r.Result.Outcome == Outcome.Refused)}, " +
                $"cancelled/disconnected {of.Count(r => r.Result.Outcome == Outcome.Cancelled)}, lost {of.Count(r => r.Result.Outcome == Outcome.Lost)}");
        }
        s.AppendLine($"  adapters uploaded {Uploads}, deleted {Deletes}; queue-overflow bursts {Bursts}");
        double end = Samples.Select(x => x.Minutes).DefaultIfEmpty().Max();
        s.AppendLine($"  memory: RSS {RssAt(0):F0} MiB at start, {RssAt(1):F0} at 1 min, {RssAt(3):F0} at 3 min, {RssAt(end / 2):F0} at half time, {RssAt(end):F0} at the end " +
            $"(peak {Samples.Select(x => x.RssMiB).DefaultIfEmpty().Max():F0}); second half {RssGrowthPercent:+0.0;-0.0}% (a leak fails above +5%)");
        s.AppendLine($"  idle afterwards: {KvBlocksLeaked} KV blocks and {SlotsLeaked} adapter slots held, {InFlightAfter} requests in flight");
        s.AppendLine($"kill: SIGKILL during an upload ({Kills}x), restart: {StoreCheck}");
        s.AppendLine($"drain: SIGTERM with {DrainStreams} streams running: {DrainServed} finished whole, exit code {DrainExitCode} after {DrainSeconds:F1} s; a request sent during the drain got {(LateRequestStatus == 0 ? "connection refused" : LateRequestStatus.ToString())}");
        s.AppendLine($"lost: {Lost.Count}{(Lost.IsEmpty ? "" : ": " + string.Join("; ", Lost.Take(10)))}");
        s.AppendLine(Passed ? "PASSED" : "FAILED");
        return s.ToString();
    }

    public void Write(string dir)
    {
        File.WriteAllText(Path.Combine(dir, "summary.txt"), Summary());
        File.WriteAllText(Path.Combine(dir, "report.json"), JsonSerializer.Serialize(new
        {
            Minutes, Clients, SoakSeconds,
            served = Count(Outcome.Served), refused = Count(Outcome.Refused), cancelled = Count(Outcome.Cancelled), lost = Lost.Count,
            lost_details = Lost.Take(50), Uploads, Deletes, Bursts, Kills, KvBlocksLeaked, SlotsLeaked, InFlightAfter, StoreConsistent, StoreCheck,
            DrainStreams, DrainServed, DrainExitCode, DrainSeconds, LateRequestStatus, RssGrowthPercent, Passed, samples = Samples,
        }, new JsonSerializerOptions { WriteIndented = true }));

        var plot = new ScottPlot.Plot();
        var xs = Samples.Select(x => x.Minutes).ToArray();
        var rss = plot.Add.ScatterLine(xs, Samples.Select(x => x.RssMiB).ToArray());
        rss.LegendText = "server RSS (MiB)";
        var inFlight = plot.Add.ScatterLine(xs, Samples.Select(x => x.InFlight).ToArray());
        inFlight.LegendText = "requests in flight";
        inFlight.Axes.YAxis = plot.Axes.Right;
        plot.Axes.Bottom.Label.Text = "minutes";
        plot.Axes.Left.Label.Text = "RSS (MiB)";
        plot.Axes.Right.Label.Text = "requests in flight";
        plot.Axes.SetLimitsY(0, Samples.Select(x => x.RssMiB).DefaultIfEmpty(1).Max() * 1.2, plot.Axes.Left);
        plot.Title($"Soak: {Clients} streaming clients, SSE + SignalR, adapters churning");
        plot.ShowLegend();
        plot.SavePng(Path.Combine(dir, "memory.png"), 900, 450);
    }
}
