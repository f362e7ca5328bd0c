using System.Text.Json;
using PeftServe.Tests;

namespace PeftServe.Server.Tests;

/// <summary>The load generator against a real server: every request completes over either transport,
/// over uploaded adapter copies, and the summary and plot it writes hold what it measured.</summary>
public sealed class LoadGeneratorTests
{
    [Theory]
    [InlineData("sse")]
    [InlineData("signalr")]
    public async Task RunsStreamingClientsOverAdaptersAndReports(string transport)
    {
        await using var server = await TestServer.StartAsync();
        var dir = Directory.CreateTempSubdirectory("peftserve-loadgen-").FullName;
        try
        {
            var json = Path.Combine(dir, "summary.json");
            var plot = Path.Combine(dir, "plot.png");
            int code = await LoadGen.Program.Main(["--url", server.Url, "--transport", transport, "--clients", "3", "--requests", "7",
                "--max-tokens", "6", "--upload-copies", Path.Combine(TestData.RepoRoot, "adapters", "tiny-lora-r4-qv"), "--adapter-count", "2",
                "--json", json, "--plot", plot]);
            Assert.Equal(0, code);
            using var doc = JsonDocument.Parse(File.ReadAllText(json));
            var r = doc.RootElement;
            Assert.Equal(7, r.GetProperty("completed").GetInt32());
            Assert.Equal(0, r.GetProperty("failed").GetInt32());
            Assert.Equal(2, r.GetProperty("models").GetInt32());
            Assert.True(r.GetProperty("output_tokens_per_s").GetDouble() > 0);
            Assert.True(r.GetProperty("ttft_ms").EnumerateObject().First().Value.GetDouble() > 0);
            Assert.True(new FileInfo(plot).Length > 1000);
            // The server saw the uploads and served them: two adapter copies each read from disk once.
            Assert.Equal(2, await server.MetricAsync("peftserve_adapter_cache_misses_total"));
        }
        finally { Directory.Delete(dir, true); }
    }
}
