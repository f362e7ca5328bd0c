using System.Formats.Tar;
using System.IO.Compression;
using System.Net;
using System.Net.Http.Json;
using System.Text.Json;
using PeftServe.Core.Adapters;
using PeftServe.Core.Model;
using PeftServe.Tests;

namespace PeftServe.Server.Tests;

/// <summary>POST/GET/DELETE /v1/adapters against the real server and its own store.</summary>
public sealed class AdapterUploadTests(ServerFixture fixture) : IClassFixture<ServerFixture>
{
    private TestServer S => fixture.Server;
    private static string Example(string name) => Path.Combine(TestData.RepoRoot, "adapters", name);

    private static MultipartFormDataContent Folder(string? name, string dir)
    {
        var form = new MultipartFormDataContent();
        if (name is not null) form.Add(new StringContent(name), "name");
        foreach (var f in Directory.GetFiles(dir)) form.Add(new ByteArrayContent(File.ReadAllBytes(f)), "files", Path.GetFileName(f));
        return form;
    }

    private static MultipartFormDataContent OneFile(string? name, byte[] bytes, string fileName)
    {
        var form = new MultipartFormDataContent();
        if (name is not null) form.Add(new StringContent(name), "name");
        form.Add(new ByteArrayContent(bytes), "files", fileName);
        return form;
    }

    private static byte[] Zip(params (string Name, byte[] Data)[] entries)
    {
        using var ms = new MemoryStream();
        using (var zip = new ZipArchive(ms, ZipArchiveMode.Create, leaveOpen: true))
            foreach (var (n, d) in entries)
            {
                using var s = zip.CreateEntry(n).Open();
                s.Write(d);
            }
        return ms.ToArray();
    }

    private static byte[] TarGz(string folder, string dir)
    {
        using var ms = new MemoryStream();
        using (var gz = new GZipStream(ms, CompressionLevel.Fastest, leaveOpen: true))
        using (var tar = new TarWriter(gz))
            foreach (var f in Directory.GetFiles(dir)) tar.WriteEntry(f, $"{folder}/{Path.GetFileName(f)}");
        return ms.ToArray();
    }

    private static (string, byte[])[] Files(string dir) => Directory.GetFiles(dir).Select(f => (Path.GetFileName(f), File.ReadAllBytes(f))).ToArray();

    private async Task<string> GreedyChat(string model)
    {
        var body = await S.PostJsonAsync("v1/chat/completions", new { model, max_tokens = 10, temperature = 0, messages = new[] { new { role = "user", content = "Hi" } } });
        return body.GetProperty("choices")[0].GetProperty("message").GetProperty("content").GetString()!;
    }

    private async Task<List<string>> ModelIds() =>
        (await S.Http.GetFromJsonAsync<JsonElement>("v1/models")).GetProperty("data").EnumerateArray().Select(m => m.GetProperty("id").GetString()!).ToList();

    private void AssertNoLeftovers() =>
        Assert.DoesNotContain(Directory.GetDirectories(S.Store), d => Path.GetFileName(d).StartsWith('.'));

    [Fact]
    public async Task AnUploadedFolderIsServableAtOnceAndBehavesLikeTheOriginal()
    {
        using var response = await S.Http.PostAsync("v1/adapters", Folder("uploaded-lora", Example("tiny-lora-r8-all")));
        Assert.Equal(HttpStatusCode.Created, response.StatusCode);
        var entry = await response.Content.ReadFromJsonAsync<JsonElement>();
        Assert.Equal("uploaded-lora", entry.GetProperty("id").GetString());
        Assert.Equal("LORA", entry.GetProperty("peft_type").GetString());
        Assert.Contains("uploaded-lora", await ModelIds());
        Assert.Equal(await GreedyChat("tiny-lora-r8-all"), await GreedyChat("uploaded-lora"));
        var listed = await S.Http.GetFromJsonAsync<JsonElement>("v1/adapters");
        Assert.Contains(listed.GetProperty("data").EnumerateArray(), a => a.GetProperty("id").GetString() == "uploaded-lora");
        var one = await S.Http.GetFromJsonAsync<JsonElement>("v1/adapters/uploaded-lora");
        Assert.True(one.GetProperty("bytes").GetInt64() > 0);

        using var again = await S.Http.PostAsync("v1/adapters", Folder("uploaded-lora", Example("tiny-lora-r8-all")));
        Assert.Equal(HttpStatusCode.Conflict, again.StatusCode);
        AssertNoLeftovers();
    }

    [Fact]
    public async Task ZipAndTarGzArchivesAreUnpacked()
    {
        using var zip = await S.Http.PostAsync("v1/adapters", OneFile("zipped-ia3", Zip(Files(Example("tiny-ia3"))), "a.zip"));
        Assert.Equal(HttpStatusCode.Created, zip.StatusCode);
        Assert.Equal(await GreedyChat("tiny-ia3"), await GreedyChat("zipped-ia3"));

        // Name taken from the archive; the files inside one top-level folder.
        using var tgz = await S.Http.PostAsync("v1/adapters", OneFile(null, TarGz("prefix", Example("tiny-prefix-6")), "tarred-prefix.tar.gz"));
        Assert.Equal(HttpStatusCode.Created, tgz.StatusCode);
        Assert.Equal(await GreedyChat("tiny-prefix-6"), await GreedyChat("tarred-prefix"));
        AssertNoLeftovers();
    }

    [Fact]
    public async Task BadUploadsAreRefusedAndLeaveNothingBehind()
    {
        var files = Files(Example("tiny-lora-r4-qv"));
        var bad = new (string Case, HttpContent Content, int Status)[]
        {
            ("unsafe name", Folder("../escape", Example("tiny-lora-r4-qv")), 400),
            ("hidden name", Folder(".hidden", Example("tiny-lora-r4-qv")), 400),
            ("zip slip", OneFile("slip", Zip([("../../evil/adapter_config.json", files[0].Item2), .. files]), "x.zip"), 400),
            ("absolute entry", OneFile("abs", Zip([("/etc/adapter_config.json", files[0].Item2)]), "x.zip"), 400),
            ("too many entries", OneFile("many", Zip(Enumerable.Range(0, 40).Select(i => ($"f{i}/README.md", new byte[1])).ToArray()), "x.zip"), 400),
            ("unknown file", OneFile("odd", "#!/bin/sh"u8.ToArray(), "run.sh"), 400),
            ("not an archive", OneFile("junk", "not a zip"u8.ToArray(), "junk.zip"), 400),
            ("no config", OneFile("noconfig", File.ReadAllBytes(Path.Combine(Example("tiny-lora-r4-qv"), "adapter_model.safetensors")), "adapter_model.safetensors"), 422),
            ("no files", new MultipartFormDataContent { { new StringContent("empty"), "name" } }, 400),
            ("not multipart", JsonContent.Create(new { name = "x" }), 415),
        };
        foreach (var (name, content, status) in bad)
        {
            using var response = await S.Http.PostAsync("v1/adapters", content);
            Assert.True(status == (int)response.StatusCode, $"{name}: {(int)response.StatusCode} {await response.Content.ReadAsStringAsync()}");
            var error = (await response.Content.ReadFromJsonAsync<JsonElement>()).GetProperty("error");
            Assert.False(string.IsNullOrEmpty(error.GetProperty("message").GetString()));
        }
        Assert.False(Directory.Exists(Path.Combine(Path.GetDirectoryName(S.Store)!, "evil")));
        Assert.Equal(TestServer.StoreAdapters.Length, Directory.GetDirectories(S.Store).Count(d => TestServer.StoreAdapters.Contains(Path.GetFileName(d))));
        Assert.DoesNotContain("noconfig", await ModelIds());
        AssertNoLeftovers();
    }

    [Fact]
    public async Task AnAdapterForAnotherModelShapeIsRefusedWith422()
    {
        var config = ModelConfig.Load(TestData.TinyLlamaDir);
        var dir = Directory.CreateTempSubdirectory().FullName;
        try
        {
            SyntheticAdapters.Lora(dir, config with { HiddenSize = 2 * config.HiddenSize, HeadDim = 2 * config.HeadDim }, rank: 4, seed: 1, ["q_proj"]);
            using var response = await S.Http.PostAsync("v1/adapters", Folder("wrong-shape", dir));
            Assert.Equal(HttpStatusCode.UnprocessableEntity, response.StatusCode);
            Assert.Equal("invalid_adapter", (await response.Content.ReadFromJsonAsync<JsonElement>()).GetProperty("error").GetProperty("code").GetString());
            Assert.False(Directory.Exists(Path.Combine(S.Store, "wrong-shape")));
            AssertNoLeftovers();
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public async Task DoraAndSavedLmHeadAdaptersAreServedAndAnUnsupportedVariantIsA422NamingIt()
    {
        var config = ModelConfig.Load(TestData.TinyLlamaDir);
        var root = Directory.CreateTempSubdirectory().FullName;
        try
        {
            var baseText = await GreedyChat("tiny-llama");
            foreach (var (name, dir) in new[] { ("up-dora", SyntheticAdapters.Dora(Path.Combine(root, "dora"), config, 4, 1)),
                         ("up-head", SyntheticAdapters.LoraWithSavedLmHead(Path.Combine(root, "head"), config, 4, 2)) })
            {
                using var up = await S.Http.PostAsync("v1/adapters", Folder(name, dir));
                Assert.True(up.StatusCode == HttpStatusCode.Created, $"{name}: {(int)up.StatusCode} {await up.Content.ReadAsStringAsync()}");
                Assert.NotEqual(baseText, await GreedyChat(name));
            }
            var qalora = SyntheticAdapters.Lora(Path.Combine(root, "qalora"), config, 4, 3, ["q_proj"]);
            var path = Path.Combine(qalora, AdapterFolder.ConfigFile);
            var json = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(path))!.AsObject();
            json["use_qalora"] = true;
            File.WriteAllText(path, json.ToJsonString());
            using var refused = await S.Http.PostAsync("v1/adapters", Folder("up-qalora", qalora));
            Assert.Equal(HttpStatusCode.UnprocessableEntity, refused.StatusCode);
            var error = (await refused.Content.ReadFromJsonAsync<JsonElement>()).GetProperty("error");
            Assert.Contains("use_qalora", error.GetProperty("message").GetString());
            AssertNoLeftovers();
        }
        finally { Directory.Delete(root, true); }
    }

    [Fact]
    public async Task DeletingAnAdapterLetsItsRunningRequestsFinish()
    {
        using (var up = await S.Http.PostAsync("v1/adapters", Folder("short-lived", Example("tiny-lora-r4-qv"))))
            Assert.Equal(HttpStatusCode.Created, up.StatusCode);
        using var request = new HttpRequestMessage(HttpMethod.Post, "v1/completions")
        {
            Content = JsonContent.Create(new { model = "short-lived", prompt = "Go", max_tokens = 200, ignore_eos = true, stream = true }),
        };
        using var response = await S.Http.SendAsync(request, HttpCompletionOption.ResponseHeadersRead);
        Assert.Equal(HttpStatusCode.OK, response.StatusCode); // headers come with the first token: the adapter is loaded
        using (var del = await S.Http.DeleteAsync("v1/adapters/short-lived"))
            Assert.Equal(HttpStatusCode.OK, del.StatusCode);
        var events = (await response.Content.ReadAsStringAsync()).Split("\n\n", StringSplitOptions.RemoveEmptyEntries);
        Assert.Equal("data: [DONE]", events[^1]);
        var last = JsonDocument.Parse(events[^2]["data: ".Length..]).RootElement;
        Assert.Equal("length", last.GetProperty("choices")[0].GetProperty("finish_reason").GetString());

        Assert.DoesNotContain("short-lived", await ModelIds());
        Assert.Equal(HttpStatusCode.NotFound, (await S.Http.GetAsync("v1/adapters/short-lived")).StatusCode);
        Assert.Equal(HttpStatusCode.NotFound, (await S.Http.DeleteAsync("v1/adapters/short-lived")).StatusCode);
        using var after = await S.Http.PostAsJsonAsync("v1/completions", new { model = "short-lived", prompt = "Go" });
        Assert.Equal(HttpStatusCode.NotFound, after.StatusCode);
    }
}

public sealed class AdapterStoreTests
{
    [Fact]
    public void LeftoversOfACrashedUploadAreRemovedAndNeverListed()
    {
        var dir = Directory.CreateTempSubdirectory().FullName;
        try
        {
            Directory.CreateDirectory(Path.Combine(dir, ".upload-0123"));
            File.WriteAllText(Path.Combine(dir, ".upload-0123", "adapter_config.json"), "{}");
            TestServer.CopyDir(Path.Combine(TestData.RepoRoot, "adapters", "tiny-ia3"), Path.Combine(dir, "kept"));
            var store = new Adapters.AdapterStore(dir, ModelConfig.Load(TestData.TinyLlamaDir), new AdapterLimits(), new Adapters.UploadLimits());
            Assert.Equal(["kept"], store.List().Select(e => e.Name));
            Assert.Equal(1, store.RemoveLeftovers());
            Assert.False(Directory.Exists(Path.Combine(dir, ".upload-0123")));
            Assert.True(Directory.Exists(Path.Combine(dir, "kept")));
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void AnArchiveThatUnpacksBeyondTheLimitIsRefused()
    {
        var dir = Directory.CreateTempSubdirectory().FullName;
        try
        {
            var store = new Adapters.AdapterStore(dir, ModelConfig.Load(TestData.TinyLlamaDir), new AdapterLimits(), new Adapters.UploadLimits { MaxBytes = 4096 });
            using var ms = new MemoryStream();
            using (var zip = new ZipArchive(ms, ZipArchiveMode.Create, leaveOpen: true))
            using (var s = zip.CreateEntry("README.md", CompressionLevel.Optimal).Open()) s.Write(new byte[1 << 20]); // 1 MiB of zeros, a few KiB packed
            ms.Position = 0;
            var e = Assert.Throws<Api.ApiException>(() => store.Save("bomb", [("bomb.zip", ms, ms.Length)]));
            Assert.Equal(413, e.Status);
            Assert.Empty(Directory.GetDirectories(dir));
        }
        finally { Directory.Delete(dir, true); }
    }
}
