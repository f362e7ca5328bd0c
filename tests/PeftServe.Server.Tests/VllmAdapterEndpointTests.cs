using System.Net;
using System.Net.Http.Headers;
using System.Net.Http.Json;
using System.Text.Json;
using PeftServe.Tests;

namespace PeftServe.Server.Tests;

/// <summary>vLLM's POST /v1/load_lora_adapter and /v1/unload_lora_adapter: adapters of any method are
/// copied from an adapter root into the store; nothing outside the roots can be read.</summary>
public sealed class VllmAdapterEndpointTests : IAsyncLifetime
{
    private string _roots = null!, _outside = null!;
    private TestServer _server = null!;
    private TestServer S => _server;
    private static string Example(string name) => Path.Combine(TestData.RepoRoot, "adapters", name);

    public async Task InitializeAsync()
    {
        _roots = Directory.CreateTempSubdirectory("peftserve-roots-").FullName;
        _outside = Directory.CreateTempSubdirectory("peftserve-outside-").FullName;
        TestServer.CopyDir(Example("tiny-lora-r4-qv"), Path.Combine(_roots, "sql-lora"));
        TestServer.CopyDir(Example("tiny-prefix-6"), Path.Combine(_roots, "nested", "prefix"));
        TestServer.CopyDir(Example("tiny-lora-r8-all"), Path.Combine(_roots, "other-lora"));
        TestServer.CopyDir(Example("tiny-ia3"), Path.Combine(_outside, "secret"));
        // A link out of the root, a link to a file outside, and a link that stays inside.
        Directory.CreateSymbolicLink(Path.Combine(_roots, "escape"), Path.Combine(_outside, "secret"));
        Directory.CreateDirectory(Path.Combine(_roots, "file-escape"));
        File.Copy(Path.Combine(Example("tiny-ia3"), "adapter_config.json"), Path.Combine(_roots, "file-escape", "adapter_config.json"));
        File.CreateSymbolicLink(Path.Combine(_roots, "file-escape", "adapter_model.safetensors"), Path.Combine(_outside, "secret", "adapter_model.safetensors"));
        Directory.CreateSymbolicLink(Path.Combine(_roots, "alias"), Path.Combine(_roots, "nested", "prefix"));
        _server = await TestServer.StartAsync("--adapter-roots", _roots + ":/nonexistent-root");
    }

    public async Task DisposeAsync()
    {
        await _server.DisposeAsync();
        Directory.Delete(_roots, true);
        Directory.Delete(_outside, true);
    }

    private Task<HttpResponseMessage> Load(object body) => S.Http.PostAsJsonAsync("v1/load_lora_adapter", body);
    private Task<HttpResponseMessage> Unload(object body) => S.Http.PostAsJsonAsync("v1/unload_lora_adapter", body);

    private static async Task<JsonElement> Error(HttpResponseMessage r, HttpStatusCode status)
    {
        Assert.Equal(status, r.StatusCode);
        return (await r.Content.ReadFromJsonAsync<JsonElement>()).GetProperty("error");
    }

    private async Task<string> Greedy(string model)
    {
        var body = await S.PostJsonAsync("v1/completions", new { model, prompt = "Once upon", max_tokens = 8, temperature = 0, ignore_eos = true });
        return body.GetProperty("choices")[0].GetProperty("text").GetString()!;
    }

    private async Task<List<string>> ModelIds() =>
        (await S.Http.GetFromJsonAsync<JsonElement>("v1/models")).GetProperty("data").EnumerateArray().Select(m => m.GetProperty("id").GetString()!).ToList();

    [Fact]
    public async Task AdaptersOfAnyMethodAreLoadedFromARootAndUnloaded()
    {
        using (var r = await Load(new { lora_name = "sql", lora_path = Path.Combine(_roots, "sql-lora"), base_model_name = "ignored" }))
        {
            Assert.Equal(HttpStatusCode.OK, r.StatusCode);
            Assert.Equal("Success: LoRA adapter 'sql' added successfully.", await r.Content.ReadAsStringAsync());
        }
        Assert.Contains("sql", await ModelIds());
        Assert.Equal(await Greedy("tiny-lora-r4-qv"), await Greedy("sql"));   // the same weights as the store's copy

        // A prefix adapter (not LoRA), reached through a link that stays inside the root.
        using (var r = await Load(new { lora_name = "pre", lora_path = Path.Combine(_roots, "alias") }))
            Assert.Equal(HttpStatusCode.OK, r.StatusCode);
        Assert.Equal(await Greedy("tiny-prefix-6"), await Greedy("pre"));

        // The same files again (another replica's syncer): success. Other files under the name: vLLM's 400.
        using (var r = await Load(new { lora_name = "sql", lora_path = Path.Combine(_roots, "sql-lora") }))
            Assert.Equal(HttpStatusCode.OK, r.StatusCode);
        using (var r = await Load(new { lora_name = "sql", lora_path = Path.Combine(_roots, "other-lora") }))
            Assert.Equal("The lora adapter 'sql' has already been loaded.", (await Error(r, HttpStatusCode.BadRequest)).GetProperty("message").GetString());
        Assert.Equal(await Greedy("tiny-lora-r4-qv"), await Greedy("sql"));
        // load_inplace replaces it, and the new weights are served at once.
        using (var r = await Load(new { lora_name = "sql", lora_path = Path.Combine(_roots, "other-lora"), load_inplace = true }))
            Assert.Equal(HttpStatusCode.OK, r.StatusCode);
        Assert.Equal(await Greedy("tiny-lora-r8-all"), await Greedy("sql"));

        using (var r = await Unload(new { lora_name = "sql" }))
        {
            Assert.Equal(HttpStatusCode.OK, r.StatusCode);
            Assert.Equal("Success: LoRA adapter 'sql' removed successfully.", await r.Content.ReadAsStringAsync());
        }
        Assert.DoesNotContain("sql", await ModelIds());
        Assert.Equal(HttpStatusCode.NotFound, (await S.Http.PostAsJsonAsync("v1/completions", new { model = "sql", prompt = "x" })).StatusCode);
        using (var r = await Unload(new { lora_name = "sql" }))
            Assert.Equal("The lora adapter 'sql' cannot be found.", (await Error(r, HttpStatusCode.NotFound)).GetProperty("message").GetString());
        Assert.True(File.Exists(Path.Combine(_roots, "sql-lora", "adapter_config.json")), "unloading must not touch the source folder");
    }

    [Fact]
    public async Task PathsOutsideTheRootsAreRefused()
    {
        var secret = Path.Combine(_outside, "secret");
        (object Body, HttpStatusCode Status, string Code)[] cases =
        [
            (new { lora_name = "x", lora_path = secret }, HttpStatusCode.BadRequest, "lora_path_not_allowed"),
            (new { lora_name = "x", lora_path = Path.Combine(_roots, "..", Path.GetFileName(_outside), "secret") }, HttpStatusCode.BadRequest, "lora_path_not_allowed"),
            (new { lora_name = "x", lora_path = Path.Combine(_roots, "escape") }, HttpStatusCode.BadRequest, "lora_path_not_allowed"),
            (new { lora_name = "x", lora_path = Path.Combine(_roots, "file-escape") }, HttpStatusCode.BadRequest, "lora_path_not_allowed"),
            (new { lora_name = "x", lora_path = "sql-lora" }, HttpStatusCode.BadRequest, "lora_path_not_allowed"),
            (new { lora_name = "x", lora_path = "/etc" }, HttpStatusCode.BadRequest, "lora_path_not_allowed"),
            (new { lora_name = "x", lora_path = Path.Combine(S.Store, "tiny-ia3") }, HttpStatusCode.BadRequest, "lora_path_not_allowed"),
            (new { lora_name = "x", lora_path = Path.Combine(_roots, "missing") }, HttpStatusCode.NotFound, "adapter_not_found"),
            (new { lora_name = "../x", lora_path = Path.Combine(_roots, "sql-lora") }, HttpStatusCode.BadRequest, ""),
        ];
        foreach (var (body, status, code) in cases)
        {
            using var r = await Load(body);
            var error = await Error(r, status);
            if (code.Length > 0) Assert.Equal(code, error.GetProperty("code").GetString());
        }
        using (var r = await Load(new { lora_name = "x" }))
            Assert.Equal("Both 'lora_name' and 'lora_path' must be provided.", (await Error(r, HttpStatusCode.BadRequest)).GetProperty("message").GetString());
        using (var r = await S.Http.PostAsync("v1/load_lora_adapter", new StringContent("{not json", System.Text.Encoding.UTF8, "application/json")))
            await Error(r, HttpStatusCode.BadRequest);
        using (var r = await Unload(new { }))
            await Error(r, HttpStatusCode.BadRequest);
        Assert.DoesNotContain("x", await ModelIds());
        Assert.Equal(TestServer.StoreAdapters.Order(), Directory.GetDirectories(S.Store).Select(Path.GetFileName).Order()!);
        // The server goes on serving.
        Assert.NotEmpty(await Greedy("tiny-ia3"));
    }

    [Fact]
    public async Task OnlyAdminKeysMayLoadAndUnload()
    {
        await using var s = await TestServer.StartAsync("--PeftServe:ApiKeys:0", "user-key", "--PeftServe:AdminKeys:0", "admin-key", "--adapter-roots", _roots);
        HttpRequestMessage Request(string path, string key, object body)
        {
            var r = new HttpRequestMessage(HttpMethod.Post, path) { Content = JsonContent.Create(body) };
            r.Headers.Authorization = new AuthenticationHeaderValue("Bearer", key);
            return r;
        }
        var load = new { lora_name = "keyed", lora_path = Path.Combine(_roots, "sql-lora") };
        Assert.Equal(HttpStatusCode.Forbidden, (await s.Http.SendAsync(Request("v1/load_lora_adapter", "user-key", load))).StatusCode);
        Assert.Equal(HttpStatusCode.Unauthorized, (await s.Http.PostAsJsonAsync("v1/load_lora_adapter", load)).StatusCode);
        Assert.Equal(HttpStatusCode.OK, (await s.Http.SendAsync(Request("v1/load_lora_adapter", "admin-key", load))).StatusCode);
        Assert.Equal(HttpStatusCode.Forbidden, (await s.Http.SendAsync(Request("v1/unload_lora_adapter", "user-key", new { lora_name = "keyed" }))).StatusCode);
        Assert.Equal(HttpStatusCode.OK, (await s.Http.SendAsync(Request("v1/unload_lora_adapter", "admin-key", new { lora_name = "keyed" }))).StatusCode);
    }
}
