using System.Net;
using System.Net.Sockets;
using System.Text;

namespace PeftServe.Trainer.Tests;

/// <summary>--upload: the adapter's two files and its name go to the given URL as one multipart POST.</summary>
public sealed class AdapterUploadTests(TrainerFixture f) : IClassFixture<TrainerFixture>
{
    private static int FreePort()
    {
        var l = new TcpListener(IPAddress.Loopback, 0);
        l.Start();
        int port = ((IPEndPoint)l.LocalEndpoint).Port;
        l.Stop();
        return port;
    }

    [Fact]
    public async Task UploadPostsTheNameAndBothFiles()
    {
        var options = f.Options("ia3", steps: 1);
        using (var run = new TrainingRun(options, f.Model)) run.Train();
        int port = FreePort();
        using var listener = new HttpListener();
        listener.Prefixes.Add($"http://127.0.0.1:{port}/v1/adapters/");
        listener.Start();
        var serve = Task.Run(async () =>
        {
            var ctx = await listener.GetContextAsync();
            using var ms = new MemoryStream();
            await ctx.Request.InputStream.CopyToAsync(ms);
            var seen = (ctx.Request.HttpMethod, ctx.Request.ContentType, ctx.Request.Headers["Authorization"], Body: Encoding.Latin1.GetString(ms.ToArray()));
            var reply = Encoding.UTF8.GetBytes("{\"name\":\"mine\"}");
            ctx.Response.StatusCode = 201;
            await ctx.Response.OutputStream.WriteAsync(reply);
            ctx.Response.Close();
            return seen;
        });
        var answer = await AdapterUpload.UploadAsync($"http://127.0.0.1:{port}/v1/adapters/", options.OutputDir, "mine", "key-1");
        var (method, contentType, auth, body) = await serve;
        Assert.Equal("{\"name\":\"mine\"}", answer);
        Assert.Equal("POST", method);
        Assert.StartsWith("multipart/form-data", contentType);
        Assert.Equal("Bearer key-1", auth);
        Assert.Contains("name=name", body);
        Assert.Contains("mine", body);
        Assert.Contains("filename=adapter_config.json", body);
        Assert.Contains("filename=adapter_model.safetensors", body);
        Assert.Contains("\"peft_type\": \"IA3\"", body);
    }

    [Fact]
    public async Task AFailedUploadSaysWhatTheServerAnswered()
    {
        var options = f.Options("bitfit", steps: 1);
        using (var run = new TrainingRun(options, f.Model)) run.Train();
        int port = FreePort();
        using var listener = new HttpListener();
        listener.Prefixes.Add($"http://127.0.0.1:{port}/");
        listener.Start();
        var serve = Task.Run(async () =>
        {
            var ctx = await listener.GetContextAsync();
            await ctx.Request.InputStream.CopyToAsync(Stream.Null);
            ctx.Response.StatusCode = 400;
            await ctx.Response.OutputStream.WriteAsync(Encoding.UTF8.GetBytes("bad adapter"));
            ctx.Response.Close();
        });
        var e = await Assert.ThrowsAsync<IOException>(() => AdapterUpload.UploadAsync($"http://127.0.0.1:{port}/", options.OutputDir, "x", null));
        await serve;
        Assert.Contains("400", e.Message);
        Assert.Contains("bad adapter", e.Message);
    }
}
