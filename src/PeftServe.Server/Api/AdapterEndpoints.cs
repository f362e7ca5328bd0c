using Microsoft.AspNetCore.Http.Features;
using Microsoft.Extensions.Options;
using PeftServe.Server.Adapters;
using PeftServe.Server.Hosting;
using PeftServe.Server.Replication;

namespace PeftServe.Server.Api;

/// <summary>/v1/adapters: upload (multipart: an adapter folder's files, or one .zip / .tar.gz), list,
/// show and delete. Uploads are validated against the base model and stored atomically; an adapter
/// can be used as a model id as soon as its upload returns.</summary>
public static class AdapterEndpoints
{
    public static void Map(WebApplication app)
    {
        app.MapGet("/v1/adapters", (ModelHost host) => Results.Ok(new { @object = "list", data = host.Store.List().Select(Dto) }));
        app.MapGet("/v1/adapters/{name}", (string name, ModelHost host) =>
            host.Store.Find(name) is { } e ? Results.Ok(Dto(e)) : NotFound(name));
        app.MapDelete("/v1/adapters/{name}", async (string name, ModelHost host, AdapterChanges changes, ILogger<AdapterStore> log) =>
        {
            if (!host.Store.Delete(name)) return NotFound(name);
            // Requests already running keep the copy they hold; later ones, on any replica, no longer find it.
            await changes.PublishAsync(name, "deleted");
            log.LogInformation("Deleted adapter {Adapter}", name);
            return Results.Ok(new { id = name, @object = "adapter", deleted = true });
        });
        app.MapPost("/v1/adapters", Upload).DisableAntiforgery();
    }

    private static IResult NotFound(string name) =>
        OpenAiError.Result(404, $"adapter '{name}' does not exist", "name", "adapter_not_found");

    private static object Dto(AdapterStore.Entry e) => new
    {
        id = e.Name, @object = "adapter", peft_type = e.PeftType, bytes = e.Bytes, created = e.Created.ToUnixTimeSeconds(),
    };

    /// <summary>At most MaxConcurrentUploads uploads are read and validated at once (each may be half a
    /// gigabyte of disk and a scan of it); one more is told to come back (429 with Retry-After).</summary>
    public sealed class UploadSlots(IOptions<ServerOptions> options)
    {
        public SemaphoreSlim Gate { get; } = new(Math.Max(1, options.Value.MaxConcurrentUploads));
    }

    private static async Task<IResult> Upload(HttpContext context, ModelHost host, AdapterChanges changes, IOptions<ServerOptions> options, UploadSlots slots, ILogger<AdapterStore> log)
    {
        var o = options.Value;
        if (!await slots.Gate.WaitAsync(0, context.RequestAborted))
            throw new ApiException(429, $"{o.MaxConcurrentUploads} uploads are being validated; try again shortly", "files", "uploads_busy") { RetryAfterSeconds = o.RetryAfterSeconds };
        try { return await UploadHeld(context, host, changes, o, log); }
        finally { slots.Gate.Release(); }
    }

    private static async Task<IResult> UploadHeld(HttpContext context, ModelHost host, AdapterChanges changes, ServerOptions o, ILogger<AdapterStore> log)
    {
        if (!context.Request.HasFormContentType)
            return OpenAiError.Result(415, "send the adapter as multipart/form-data: a 'name' field and the files (adapter_config.json and adapter_model.safetensors, or one .zip / .tar.gz)", "files");
        long limit = o.MaxUploadBytes + (1 << 20);
        if (context.Features.Get<IHttpMaxRequestBodySizeFeature>() is { IsReadOnly: false } size) size.MaxRequestBodySize = limit;
        if (context.Request.ContentLength > limit)
            return OpenAiError.Result(413, $"upload larger than {o.MaxUploadBytes} bytes", "files", "upload_too_large");
        IFormCollection form;
        try
        {
            form = await context.Request.ReadFormAsync(new FormOptions
            {
                MultipartBodyLengthLimit = limit,
                ValueCountLimit = 64,
                MultipartHeadersCountLimit = 16,
            }, context.RequestAborted);
        }
        catch (BadHttpRequestException e) when (e.StatusCode == 413) { return OpenAiError.Result(413, $"upload larger than {o.MaxUploadBytes} bytes", "files", "upload_too_large"); }
        catch (InvalidDataException) { return OpenAiError.Result(400, "malformed multipart upload (its boundaries or part headers are wrong, or a part is too large)", "files"); }

        var files = form.Files;
        string? name = form["name"].FirstOrDefault();
        if (string.IsNullOrWhiteSpace(name) && files.Count == 1)
            name = StripArchiveExtension(Path.GetFileName(files[0].FileName));
        if (string.IsNullOrWhiteSpace(name)) return OpenAiError.Result(400, "give the adapter a 'name' form field", "name");
        var streams = files.Select(f => (f.FileName, f.OpenReadStream(), f.Length)).ToList();
        try
        {
            // Unpacking and validation are file and CPU work: off the request's thread.
            var entry = await Task.Run(() => host.Store.Save(name, streams), context.RequestAborted);
            await changes.PublishAsync(name, "stored");
            log.LogInformation("Stored adapter {Adapter} ({PeftType}, {Bytes} bytes, {Files} files uploaded)", entry.Name, entry.PeftType, entry.Bytes, files.Count);
            return Results.Json(Dto(entry), statusCode: StatusCodes.Status201Created);
        }
        finally { foreach (var s in streams) s.Item2.Dispose(); }
    }

    private static string StripArchiveExtension(string fileName)
    {
        foreach (var ext in new[] { ".tar.gz", ".tgz", ".zip" })
            if (fileName.EndsWith(ext, StringComparison.OrdinalIgnoreCase)) return fileName[..^ext.Length];
        return "";
    }
}
