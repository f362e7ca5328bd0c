using System.Net;
using System.Net.Http.Json;
using System.Text.Json;
using Microsoft.AspNetCore.Builder;
using PeftServe.Core.Model;
using PeftServe.Tests;

namespace PeftServe.Server.Tests;

/// <summary>The real server (Kestrel on a free loopback port) with the default model.</summary>
public sealed class ServerStartupTests : IAsyncLifetime
{
    private WebApplication _app = null!;
    private HttpClient _http = null!;

    public async Task InitializeAsync()
    {
        _app = Program.BuildApp(["--urls", "http://127.0.0.1:0"]);
        await _app.StartAsync();
        _http = new HttpClient { BaseAddress = new Uri(_app.Urls.First()) };
    }

    public async Task DisposeAsync()
    {
        _http.Dispose();
        await _app.StopAsync();
        await _app.DisposeAsync();
    }

    [Fact]
    public async Task HealthIsOkOnceTheModelIsLoaded()
    {
        var response = await _http.GetAsync("/health");
        Assert.Equal(HttpStatusCode.OK, response.StatusCode);
        var body = await response.Content.ReadFromJsonAsync<JsonElement>();
        Assert.Equal("ok", body.GetProperty("status").GetString());
    }

    [Fact]
    public async Task ModelsListsTheBaseModelInOpenAiShape()
    {
        var body = await _http.GetFromJsonAsync<JsonElement>("/v1/models");
        Assert.Equal("list", body.GetProperty("object").GetString());
        var model = Assert.Single(body.GetProperty("data").EnumerateArray());
        Assert.Equal("tiny-llama", model.GetProperty("id").GetString());
        Assert.Equal("model", model.GetProperty("object").GetString());
        Assert.True(model.GetProperty("created").GetInt64() > 0);
    }
}

public class ServerConfigurationTests
{
    [Fact]
    public async Task AnUnusableModelFolderStopsTheStartWithItsReason()
    {
        var dir = Directory.CreateTempSubdirectory().FullName;
        try
        {
            await using var app = Program.BuildApp(["--urls", "http://127.0.0.1:0", "--model", dir]);
            var e = await Assert.ThrowsAnyAsync<Exception>(() => app.StartAsync());
            Assert.Contains(dir, e.Message);
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public async Task ModelOptionsComeFromTheCommandLine()
    {
        await using var app = Program.BuildApp(["--urls", "http://127.0.0.1:0", "--model", TestData.TinyLlamaDir, "--model-name", "my-base"]);
        await app.StartAsync();
        using var http = new HttpClient { BaseAddress = new Uri(app.Urls.First()) };
        var body = await http.GetFromJsonAsync<JsonElement>("/v1/models");
        Assert.Equal("my-base", body.GetProperty("data")[0].GetProperty("id").GetString());
        await app.StopAsync();
    }
}
