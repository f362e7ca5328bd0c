using System.Net.Http.Json;
using System.Text.Json;
using Microsoft.AspNetCore.Builder;
using PeftServe.Tests;

namespace PeftServe.Server.Tests;

/// <summary>The real server (Kestrel on a free loopback port) with the default tiny model and an
/// adapter store of its own (copies of the example adapters), so tests may upload and delete.</summary>
public sealed class TestServer : IAsyncDisposable
{
    public static readonly string[] StoreAdapters = ["tiny-lora-r4-qv", "tiny-lora-r8-all", "tiny-ia3", "tiny-prefix-6"];

    private readonly bool _ownsStore;

    private TestServer(WebApplication app, string store, bool ownsStore = true)
    {
        App = app;
        Store = store;
        _ownsStore = ownsStore;
        Url = app.Urls.First().TrimEnd('/');
        Http = new HttpClient { BaseAddress = new Uri(Url + "/"), Timeout = TimeSpan.FromSeconds(60) };
    }

    public WebApplication App { get; }
    public string Store { get; }
    public string Url { get; }
    public HttpClient Http { get; }

    public static async Task<TestServer> StartAsync(params string[] extraArgs)
    {
        var store = Directory.CreateTempSubdirectory("peftserve-store-").FullName;
        foreach (var a in StoreAdapters) CopyDir(Path.Combine(TestData.RepoRoot, "adapters", a), Path.Combine(store, a));
        string[] args = ["--urls", "http://127.0.0.1:0", "--adapter-store", store, "--kv-cache-blocks", "256", .. extraArgs];
        var app = Program.BuildApp(args);
        await app.StartAsync();
        return new TestServer(app, store);
    }

    /// <summary>A server on an existing store that other servers share (a replica); the store is left in place.</summary>
    public static async Task<TestServer> StartOnStoreAsync(string store, params string[] extraArgs)
    {
        string[] args = ["--urls", "http://127.0.0.1:0", "--adapter-store", store, "--kv-cache-blocks", "256", .. extraArgs];
        var app = Program.BuildApp(args);
        await app.StartAsync();
        return new TestServer(app, store, ownsStore: false);
    }

    public static void CopyDir(string from, string to)
    {
        Directory.CreateDirectory(to);
        foreach (var f in Directory.GetFiles(from)) File.Copy(f, Path.Combine(to, Path.GetFileName(f)));
    }

    /// <summary>The value of one Prometheus sample line ("name{labels} value"), or 0 when absent.</summary>
    public async Task<double> MetricAsync(string nameWithLabels)
    {
        var text = await Http.GetStringAsync("metrics");
        foreach (var line in text.Split('\n'))
            if (line.StartsWith(nameWithLabels + " ", StringComparison.Ordinal))
                return double.Parse(line[(nameWithLabels.Length + 1)..], System.Globalization.CultureInfo.InvariantCulture);
        return 0;
    }

    public async Task<JsonElement> PostJsonAsync(string path, object body)
    {
        var response = await Http.PostAsJsonAsync(path, body);
        var json = await response.Content.ReadFromJsonAsync<JsonElement>();
        if (!response.IsSuccessStatusCode) throw new HttpRequestException($"{(int)response.StatusCode}: {json}");
        return json;
    }

    public async ValueTask DisposeAsync()
    {
        Http.Dispose();
        await App.StopAsync();
        await App.DisposeAsync();
        if (_ownsStore) try { Directory.Delete(Store, true); } catch (IOException) { }
    }
}

/// <summary>One server shared by the tests of a class.</summary>
public sealed class ServerFixture : IAsyncLifetime
{
    public TestServer Server { get; private set; } = null!;
    public async Task InitializeAsync() => Server = await TestServer.StartAsync();
    public async Task DisposeAsync() => await Server.DisposeAsync();
}
