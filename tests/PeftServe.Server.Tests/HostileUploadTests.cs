using System.Buffers.Binary;
using System.IO.Compression;
using System.Net;
using System.Net.Http.Json;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using PeftServe.Core.Adapters;
using PeftServe.Core.Model;
using PeftServe.Tests;

namespace PeftServe.Server.Tests;

/// <summary>Uploads made to break the server, as an attacker would send them: adapters whose config
/// disagrees with their tensors, malformed adapters, corrupt and oversized archives. Each is refused
/// with a 4xx naming the problem, nothing reaches the store, and no body echoes an exception.</summary>
public sealed class HostileUploadTests(ServerFixture fixture) : IClassFixture<ServerFixture>
{
    private TestServer S => fixture.Server;
    private static string Example(string name) => Path.Combine(TestData.RepoRoot, "adapters", name);

    private static (string Name, byte[] Data)[] Files(string dir) => Directory.GetFiles(dir).Select(f => (Path.GetFileName(f), File.ReadAllBytes(f))).ToArray();

    private static MultipartFormDataContent Form(string name, params (string Name, byte[] Data)[] files)
    {
        var form = new MultipartFormDataContent { { new StringContent(name), "name" } };
        foreach (var (file, data) in files) form.Add(new ByteArrayContent(data), "files", file);
        return form;
    }

    /// <summary>The example adapter's files with its config changed.</summary>
    private static (string, byte[])[] WithConfig(string example, Action<JsonObject> change)
    {
        var files = Files(Example(example));
        var i = Array.FindIndex(files, f => f.Name == AdapterFolder.ConfigFile);
        var config = (JsonObject)JsonNode.Parse(files[i].Data)!;
        change(config);
        files[i] = (AdapterFolder.ConfigFile, Encoding.UTF8.GetBytes(config.ToJsonString()));
        return files;
    }

    private async Task<JsonElement> Refused(HttpContent content, int status, string code, string messagePart, string name)
    {
        using var response = await S.Http.PostAsync("v1/adapters", content);
        var body = await response.Content.ReadAsStringAsync();
        Assert.True(status == (int)response.StatusCode, $"{(int)response.StatusCode}: {body}");
        var error = JsonDocument.Parse(body).RootElement.GetProperty("error");
        Assert.Equal(code, error.GetProperty("code").GetString());
        Assert.Contains(messagePart, error.GetProperty("message").GetString());
        foreach (var leak in new[] { "Exception", "   at ", S.Store }) Assert.DoesNotContain(leak, body);
        Assert.False(Directory.Exists(Path.Combine(S.Store, name)));
        Assert.DoesNotContain(Directory.GetDirectories(S.Store), d => Path.GetFileName(d).StartsWith('.'));
        return error;
    }

    [Fact]
    public async Task AConfigThatDisagreesWithItsTensorsIsRefusedNamingTheMismatch()
    {
        await Refused(Form("bad-rank", WithConfig("tiny-lora-r4-qv", c => c["r"] = 16)), 422, "invalid_adapter",
            "model.layers.0.self_attn.q_proj has rank 4 in its tensors, but the config gives it rank 16", "bad-rank");
        await Refused(Form("bad-targets", WithConfig("tiny-lora-r4-qv", c => c["target_modules"] = new JsonArray("k_proj", "o_proj"))), 422, "invalid_adapter",
            "the weights include model.layers.0.self_attn.q_proj, which the config does not target (target_modules [\"k_proj\", \"o_proj\"])", "bad-targets");
    }

    [Fact]
    public async Task MalformedAdaptersGet422NeverA500()
    {
        await Refused(Form("ff-null", WithConfig("tiny-ia3", c => c["feedforward_modules"] = new JsonArray("down_proj", null))), 422, "invalid_adapter",
            "'feedforward_modules' must be a list of module names (strings), but holds null", "ff-null");
        await Refused(Form("alpha-null", WithConfig("tiny-lora-r4-qv", c => c["alpha_pattern"] = new JsonObject { ["q_proj"] = null })), 422, "invalid_adapter",
            "'alpha_pattern' entry \"q_proj\" must be a number, but is null", "alpha-null");
        await Refused(Form("alpha-regex", WithConfig("tiny-lora-r4-qv", c => c["alpha_pattern"] = new JsonObject { ["q_proj)("] = 4 })), 422, "invalid_adapter",
            "is not a valid regular expression", "alpha-regex");
        await Refused(Form("huge-r", WithConfig("tiny-lora-r4-qv", c => c["r"] = 1e30)), 422, "invalid_adapter", "'r' must be an integer", "huge-r");
        // A layer index in Arabic-Indic digits: the name is refused, not parsed.
        var weights = Files(Example("tiny-lora-r4-qv")).Single(f => f.Name == AdapterFolder.WeightsFile).Data;
        var renamed = RenameTensor(weights, "model.layers.0.self_attn.q_proj.lora_A", "model.layers.\u0660.self_attn.q_proj.lora_A");
        await Refused(Form("digits", (AdapterFolder.ConfigFile, File.ReadAllBytes(Path.Combine(Example("tiny-lora-r4-qv"), AdapterFolder.ConfigFile))), (AdapterFolder.WeightsFile, renamed)),
            422, "invalid_adapter", "is not a LoRA weight", "digits");
    }

    /// <summary>A safetensors file with one tensor's name replaced (data offsets are relative to the data section, so they hold).</summary>
    private static byte[] RenameTensor(byte[] file, string from, string to)
    {
        long n = BinaryPrimitives.ReadInt64LittleEndian(file);
        var header = Encoding.UTF8.GetString(file, 8, (int)n).TrimEnd();
        Assert.Contains(from, header);
        var bytes = Encoding.UTF8.GetBytes(header.Replace(from, to));
        int length = (bytes.Length + 7) / 8 * 8;
        var result = new byte[8 + length + (file.Length - 8 - n)];
        BinaryPrimitives.WriteInt64LittleEndian(result, length);
        result.AsSpan(8, length).Fill((byte)' ');
        bytes.CopyTo(result, 8);
        file.AsSpan(8 + (int)n).CopyTo(result.AsSpan(8 + length));
        return result;
    }

    internal static byte[] Zip(CompressionLevel level, params (string Name, byte[] Data)[] entries)
    {
        using var ms = new MemoryStream();
        using (var zip = new ZipArchive(ms, ZipArchiveMode.Create, leaveOpen: true))
            foreach (var (n, d) in entries)
            {
                using var s = zip.CreateEntry(n, level).Open();
                s.Write(d);
            }
        return ms.ToArray();
    }

    /// <summary>Overwrites the uncompressed size of entry <paramref name="name"/> in the central directory and its local header.</summary>
    internal static void SetZipSize(byte[] zip, string name, uint size)
    {
        var nameBytes = Encoding.UTF8.GetBytes(name);
        for (int i = 0; i + 46 < zip.Length; i++)
        {
            uint sig = BinaryPrimitives.ReadUInt32LittleEndian(zip.AsSpan(i));
            if (sig == 0x02014b50 && zip.AsSpan(i + 46, nameBytes.Length).SequenceEqual(nameBytes))
            {
                BinaryPrimitives.WriteUInt32LittleEndian(zip.AsSpan(i + 24), size);
                int local = (int)BinaryPrimitives.ReadUInt32LittleEndian(zip.AsSpan(i + 42));
                BinaryPrimitives.WriteUInt32LittleEndian(zip.AsSpan(local + 22), size);
                return;
            }
        }
        throw new InvalidOperationException($"entry {name} not found");
    }

    [Fact]
    public async Task AZipWhoseDirectoryUnderstatesAnEntryIsRefusedNotTruncated()
    {
        var readme = Encoding.ASCII.GetBytes(string.Concat(Enumerable.Repeat("An adapter's README. ", 60)));
        var zip = Zip(CompressionLevel.Optimal, [.. Files(Example("tiny-ia3")).Where(f => f.Name != "README.md"), ("README.md", readme)]);
        SetZipSize(zip, "README.md", 40);   // the data still inflates to 1260 bytes
        await Refused(new MultipartFormDataContent { { new ByteArrayContent(zip), "files", "short.zip" } }, 400, "invalid_archive",
            "archive entry 'README.md' holds more than the 40 bytes the archive declares", "short");
    }

    [Fact]
    public async Task AZipEntryWithABadCrcIsRefused()
    {
        var zip = Zip(CompressionLevel.NoCompression, [.. Files(Example("tiny-ia3")).Where(f => f.Name != "README.md"), ("README.md", "hello adapter"u8.ToArray())]);
        int at = zip.AsSpan().IndexOf("hello adapter"u8);
        zip[at] = (byte)'j';
        await Refused(new MultipartFormDataContent { { new ByteArrayContent(zip), "files", "crc.zip" } }, 400, "invalid_archive",
            "archive entry 'README.md' fails its CRC-32 check", "crc");
    }

    /// <summary>A ustar header block (checksum filled in).</summary>
    internal static byte[] TarHeader(string name, long size, char type)
    {
        var h = new byte[512];
        Encoding.ASCII.GetBytes(name).CopyTo(h, 0);
        Encoding.ASCII.GetBytes("0000644\0").CopyTo(h, 100);
        Encoding.ASCII.GetBytes("0000000\0").CopyTo(h, 108);
        Encoding.ASCII.GetBytes("0000000\0").CopyTo(h, 116);
        Encoding.ASCII.GetBytes(Convert.ToString(size, 8).PadLeft(11, '0') + "\0").CopyTo(h, 124);
        Encoding.ASCII.GetBytes("00000000000\0").CopyTo(h, 136);
        h[156] = (byte)type;
        Encoding.ASCII.GetBytes("ustar\0" + "00").CopyTo(h, 257);
        for (int i = 148; i < 156; i++) h[i] = (byte)' ';
        int sum = h.Sum(b => b);
        Encoding.ASCII.GetBytes(Convert.ToString(sum, 8).PadLeft(6, '0') + "\0 ").CopyTo(h, 148);
        return h;
    }

    /// <summary>A .tar.gz whose first header is a PAX (or GNU long-name) header declaring <paramref name="size"/>
    /// bytes, followed by a few megabytes of zeros (a few kilobytes compressed).</summary>
    internal static byte[] HugeHeaderTarGz(char type, long size)
    {
        using var ms = new MemoryStream();
        using (var gz = new GZipStream(ms, CompressionLevel.Optimal, leaveOpen: true))
        {
            gz.Write(TarHeader(type == 'x' ? "PaxHeaders/adapter" : "././@LongLink", size, type));
            var zeros = new byte[1 << 20];
            for (int i = 0; i < 4; i++) gz.Write(zeros);
        }
        return ms.ToArray();
    }

    [Theory]
    [InlineData('x')]
    [InlineData('L')]
    public async Task AHugeTarExtendedHeaderIsA400AndAllocatesNothingLikeItsSize(char type)
    {
        var archive = HugeHeaderTarGz(type, 1_400_000_000);
        var store = new Adapters.AdapterStore(Directory.CreateTempSubdirectory("peftserve-tar-").FullName, ModelConfig.Load(TestData.TinyLlamaDir),
            new AdapterLimits(), new Adapters.UploadLimits());
        long before = GC.GetAllocatedBytesForCurrentThread();
        var e = Assert.Throws<Api.ApiException>(() => store.Save("huge", [("huge.tar.gz", new MemoryStream(archive), archive.Length)]));
        long allocated = GC.GetAllocatedBytesForCurrentThread() - before;
        Assert.Equal(400, e.Status);
        Assert.Contains("extended header declares 1400000000 bytes", e.Message);
        Assert.True(allocated < 16 << 20, $"reading the archive allocated {allocated >> 20} MiB");
        Directory.Delete(store.Directory, true);

        await Refused(new MultipartFormDataContent { { new ByteArrayContent(archive), "files", "huge.tar.gz" } }, 400, "invalid_archive", "extended header declares", "huge");
    }

    [Fact]
    public async Task ATarGzWithinTheLimitsStillUnpacksWithLongNames()
    {
        // PAX path records and GNU long names (as GNU tar and Python write them) are read.
        using var ms = new MemoryStream();
        using (var gz = new GZipStream(ms, CompressionLevel.Fastest, leaveOpen: true))
        using (var tar = new System.Formats.Tar.TarWriter(gz, System.Formats.Tar.TarEntryFormat.Pax))
            foreach (var (file, data) in Files(Example("tiny-lora-r4-qv")))
                tar.WriteEntry(new System.Formats.Tar.PaxTarEntry(System.Formats.Tar.TarEntryType.RegularFile, new string('d', 120) + "/" + file)
                    { DataStream = new MemoryStream(data) });
        using var response = await S.Http.PostAsync("v1/adapters", new MultipartFormDataContent { { new ByteArrayContent(ms.ToArray()), "files", "long-names.tar.gz" } });
        Assert.Equal(HttpStatusCode.Created, response.StatusCode);
        using var del = await S.Http.DeleteAsync("v1/adapters/long-names");
    }

    [Fact]
    public async Task UploadsAreValidatedAFewAtATimeAndTheRestAreToldToRetry()
    {
        await using var server = await TestServer.StartAsync("--max-concurrent-uploads", "1");
        // The one upload slot is taken (as by an upload in progress): the next upload is told to come back.
        var slots = (Api.AdapterEndpoints.UploadSlots)server.App.Services.GetService(typeof(Api.AdapterEndpoints.UploadSlots))!;
        Assert.True(await slots.Gate.WaitAsync(0));
        try
        {
            using var busy = await server.Http.PostAsync("v1/adapters", Form("fast", Files(Example("tiny-ia3"))));
            Assert.Equal(HttpStatusCode.TooManyRequests, busy.StatusCode);
            Assert.Equal(TimeSpan.FromSeconds(1), busy.Headers.RetryAfter!.Delta);
            Assert.Equal("uploads_busy", (await busy.Content.ReadFromJsonAsync<JsonElement>()).GetProperty("error").GetProperty("code").GetString());
            Assert.False(Directory.Exists(Path.Combine(server.Store, "fast")));
        }
        finally { slots.Gate.Release(); }
        using var free = await server.Http.PostAsync("v1/adapters", Form("fast", Files(Example("tiny-ia3"))));
        Assert.Equal(HttpStatusCode.Created, free.StatusCode);
        // A refused upload gives its slot back: a second one goes through too.
        using var bad = await server.Http.PostAsync("v1/adapters", Form("probe", ("run.sh", "#!/bin/sh"u8.ToArray())));
        Assert.Equal(HttpStatusCode.BadRequest, bad.StatusCode);
        using var again = await server.Http.PostAsync("v1/adapters", Form("fast-2", Files(Example("tiny-ia3"))));
        Assert.Equal(HttpStatusCode.Created, again.StatusCode);
    }
}
