using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using PeftServe.Tests;

namespace PeftServe.Server.Tests;

/// <summary>Two PeftServe server processes on one adapter store, Debian's redis-server, and Debian's
/// HAProxy in front (round robin for the API; a cookie keeps each SignalR connection on one replica),
/// all on loopback ports of this machine. Each program's output goes to a log file in <see cref="Dir"/>,
/// shown when a test fails. Disposing stops every process this started.</summary>
public sealed class ReplicaCluster : IAsyncDisposable
{
    public const string UserKey = "user-key", AdminKey = "admin-key";

    private readonly Dictionary<string, Process> _processes = [];

    private ReplicaCluster(string dir) => Dir = dir;

    public string Dir { get; }
    public string Store => Path.Combine(Dir, "store");
    public int RedisPort { get; private set; }
    public int ProxyPort { get; private set; }
    /// <summary>The replicas' URLs by HAProxy server name ("a", "b").</summary>
    public Dictionary<string, string> Replicas { get; } = [];
    public string ProxyUrl => $"http://127.0.0.1:{ProxyPort}";

    private static string Program(string name) =>
        new[] { $"/usr/bin/{name}", $"/usr/sbin/{name}", $"/usr/local/bin/{name}" }.FirstOrDefault(File.Exists)
        ?? throw new InvalidOperationException($"{name} is not installed (./peftserve test installs Debian's redis-server and haproxy)");

    public static async Task<ReplicaCluster> StartAsync()
    {
        var cluster = new ReplicaCluster(Directory.CreateTempSubdirectory("peftserve-cluster-").FullName);
        try
        {
            await cluster.StartAllAsync();
            return cluster;
        }
        catch
        {
            await cluster.DisposeAsync();
            throw;
        }
    }

    private async Task StartAllAsync()
    {
        foreach (var a in TestServer.StoreAdapters) TestServer.CopyDir(Path.Combine(TestData.RepoRoot, "adapters", a), Path.Combine(Store, a));
        RedisPort = FreePort();
        Start("redis", Program("redis-server"), $"--port {RedisPort} --bind 127.0.0.1 --save '' --appendonly no --protected-mode no");
        int[] ports = [FreePort(), FreePort()];
        Replicas["a"] = $"http://127.0.0.1:{ports[0]}";
        Replicas["b"] = $"http://127.0.0.1:{ports[1]}";
        await WaitForRedisAsync();
        // The version-file poll is slowed to a minute, so that what reaches the other replica within a
        // second can only have come through Redis.
        foreach (var (name, url) in Replicas)
            Start(name, "dotnet", $"{Quote(Path.Combine(AppContext.BaseDirectory, "PeftServe.Server.dll"))} --urls {url} --adapter-store {Quote(Store)} " +
                $"--redis 127.0.0.1:{RedisPort} --kv-cache-blocks 256",
                ("PEFTSERVE__APIKEYS__0", UserKey), ("PEFTSERVE__ADMINKEYS__0", AdminKey), ("PEFTSERVE__STOREPOLLMILLISECONDS", "60000"));
        ProxyPort = FreePort();
        var config = Path.Combine(Dir, "haproxy.cfg");
        File.WriteAllText(config, HaproxyConfig(ProxyPort, Replicas));
        Start("haproxy", Program("haproxy"), $"-db -f {Quote(config)}");
        using var http = new HttpClient { Timeout = TimeSpan.FromSeconds(2) };
        foreach (var url in Replicas.Values.Append(ProxyUrl)) await WaitForHealthAsync(http, url);
    }

    /// <summary>Round robin for the API; SignalR (/hubs/) sticks to one replica through a cookie, since its
    /// negotiate request and the WebSocket that follows must reach the same server. Health checks every
    /// 250 ms take a dead replica out at once; a request whose connection is refused is retried on the other.</summary>
    public static string HaproxyConfig(int port, IReadOnlyDictionary<string, string> replicas)
    {
        string Servers(bool cookie) => string.Join("\n", replicas.Select(r =>
            $"  server {r.Key} {new Uri(r.Value).Authority} check inter 250ms fall 1 rise 2{(cookie ? $" cookie {r.Key}" : "")}"));
        return $"""
            global
              maxconn 256
            defaults
              mode http
              timeout connect 2s
              timeout client 60s
              timeout server 60s
              timeout tunnel 60s
              retries 3
              option redispatch
            frontend api
              bind 127.0.0.1:{port}
              use_backend signalr if {"{"} path_beg /hubs/ {"}"}
              default_backend replicas
            backend replicas
              balance roundrobin
              option httpchk GET /health
              http-response set-header X-PeftServe-Replica %s
            {Servers(false)}
            backend signalr
              balance roundrobin
              cookie PEFTSERVE_REPLICA insert indirect nocache
              option httpchk GET /health
              http-response set-header X-PeftServe-Replica %s
            {Servers(true)}

            """;
    }

    public void Kill(string name)
    {
        var p = _processes[name];
        p.Kill(entireProcessTree: true);
        p.WaitForExit(10_000);
    }

    /// <summary>The last lines each program wrote (for failure messages).</summary>
    public string Logs(int lines = 15) => string.Join("\n", _processes.Keys.Select(n =>
    {
        var path = Path.Combine(Dir, n + ".log");
        var text = File.Exists(path) ? File.ReadAllLines(path).TakeLast(lines) : [];
        return $"--- {n} ---\n" + string.Join("\n", text);
    }));

    private void Start(string name, string program, string arguments, params (string Key, string Value)[] environment)
    {
        // bash execs the program with its output in a log file: the process id stays the program's.
        var psi = new ProcessStartInfo("bash", ["-c", $"exec {Quote(program)} {arguments} >{Quote(Path.Combine(Dir, name + ".log"))} 2>&1"])
        {
            WorkingDirectory = Dir,
            UseShellExecute = false,
        };
        foreach (var (k, v) in environment) psi.Environment[k] = v;
        _processes[name] = Process.Start(psi) ?? throw new InvalidOperationException($"cannot start {program}");
    }

    private async Task WaitForRedisAsync()
    {
        var deadline = DateTime.UtcNow.AddSeconds(20);
        while (true)
        {
            try
            {
                using var tcp = new TcpClient();
                await tcp.ConnectAsync(IPAddress.Loopback, RedisPort);
                var stream = tcp.GetStream();
                await stream.WriteAsync("PING\r\n"u8.ToArray());
                var buffer = new byte[16];
                int n = await stream.ReadAsync(buffer);
                if (System.Text.Encoding.ASCII.GetString(buffer, 0, n).StartsWith("+PONG", StringComparison.Ordinal)) return;
            }
            catch (SocketException) { }
            if (DateTime.UtcNow > deadline) throw new TimeoutException("redis-server did not answer PING\n" + Logs());
            await Task.Delay(50);
        }
    }

    private async Task WaitForHealthAsync(HttpClient http, string url)
    {
        var deadline = DateTime.UtcNow.AddSeconds(90);
        while (true)
        {
            try
            {
                using var r = await http.GetAsync(url + "/health");
                if (r.IsSuccessStatusCode) return;
            }
            catch (HttpRequestException) { }
            catch (TaskCanceledException) { }
            if (_processes.Values.Any(p => p.HasExited)) throw new InvalidOperationException($"a program of the cluster exited while {url} started\n" + Logs(40));
            if (DateTime.UtcNow > deadline) throw new TimeoutException($"{url}/health did not answer 200\n" + Logs(40));
            await Task.Delay(100);
        }
    }

    private static int FreePort()
    {
        using var l = new TcpListener(IPAddress.Loopback, 0);
        l.Start();
        return ((IPEndPoint)l.LocalEndpoint).Port;
    }

    private static string Quote(string s) => "'" + s.Replace("'", "'\\''") + "'";

    public async ValueTask DisposeAsync()
    {
        foreach (var p in _processes.Values)
        {
            try { if (!p.HasExited) p.Kill(entireProcessTree: true); }
            catch (InvalidOperationException) { }
        }
        foreach (var p in _processes.Values)
        {
            await p.WaitForExitAsync(new CancellationTokenSource(10_000).Token).ContinueWith(_ => { });
            p.Dispose();
        }
        try { Directory.Delete(Dir, true); } catch (IOException) { }
    }
}
