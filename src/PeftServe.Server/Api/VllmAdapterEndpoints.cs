using System.Text.Json;
using PeftServe.Core.Adapters;
using PeftServe.Server.Adapters;
using PeftServe.Server.Hosting;
using PeftServe.Server.Replication;

namespace PeftServe.Server.Api;

/// <summary>vLLM's runtime adapter API, so that the inference gateway's adapter syncer and other vLLM
/// tooling drive PeftServe unchanged (admin key required):
/// <list type="bullet">
/// <item><c>POST /v1/load_lora_adapter {"lora_name", "lora_path", "load_inplace"?}</c> copies the adapter
/// folder at lora_path (inside an adapter root) into the store as lora_name, validated as an upload is.
/// Any of our methods, not only LoRA.</item>
/// <item><c>POST /v1/unload_lora_adapter {"lora_name"}</c> removes it from the store.</item>
/// </list>
/// As in vLLM, success is 200 with a plain-text line, and errors are JSON error objects (ours have
/// OpenAI's shape, as vLLM's current ones do) with vLLM's messages and status codes. One difference,
/// because the store is shared: loading a name that already holds the very same files succeeds (another
/// replica loaded it first), so the syncer on every replica may load the same adapter.</summary>
public static class VllmAdapterEndpoints
{
    public static void Map(WebApplication app)
    {
        app.MapPost("/v1/load_lora_adapter", Load);
        app.MapPost("/v1/unload_lora_adapter", Unload);
    }

    private static async Task<IResult> Load(HttpContext context, ModelHost host, AdapterRoots roots, AdapterChanges changes, ILogger<AdapterStore> log)
    {
        var body = await ReadBody(context);
        string? name = Text(body, "lora_name"), path = Text(body, "lora_path");
        bool inPlace = body.TryGetProperty("load_inplace", out var p) && p.ValueKind == JsonValueKind.True;
        if (string.IsNullOrEmpty(name) || string.IsNullOrEmpty(path))
            return OpenAiError.Result(400, "Both 'lora_name' and 'lora_path' must be provided.", string.IsNullOrEmpty(name) ? "lora_name" : "lora_path");
        if (!host.IsReady) return OpenAiError.Result(503, "the model is still loading", code: "model_loading");
        if (!AdapterNames.IsSafe(name))
            return OpenAiError.Result(400, $"lora_name '{name}' is not allowed: use letters, digits, '.', '_' and '-' (not first), at most 128 characters", "lora_name");
        var (folder, files) = roots.Resolve(path);
        if (folder == host.Store.Directory || folder.StartsWith(host.Store.Directory + "/", StringComparison.Ordinal))
            return OpenAiError.Result(400, $"lora_path '{path}' is inside the adapter store: adapters there are served under their folder's name already", "lora_path", "lora_path_not_allowed");

        var target = Path.Combine(host.Store.Directory, name);
        if (host.Store.Find(name) is not null)
        {
            if (SameFiles(files, target)) return Loaded(name);   // another replica (or an earlier call) loaded these very files
            if (!inPlace) return AlreadyLoaded(name);
            // load_inplace: replace the stored adapter (running requests finish on the copy they hold).
            host.Store.Delete(name);
            await changes.PublishAsync(name, "deleted");
        }
        try { Store(host, name, files); }
        catch (ApiException e) when (e.Status == 409)
        {
            // Another replica stored this name between our look and our rename.
            return SameFiles(files, target) ? Loaded(name) : AlreadyLoaded(name);
        }
        catch (ApiException e) when (e.Status == 422)
        {
            return OpenAiError.Result(400, e.Message, "lora_path", e.Code);   // vLLM answers 400 for an adapter it cannot load
        }
        await changes.PublishAsync(name, "stored");
        log.LogInformation("Loaded adapter {Adapter} from {Path} into the store", name, folder);
        return Loaded(name);
    }

    private static async Task<IResult> Unload(HttpContext context, ModelHost host, AdapterChanges changes, ILogger<AdapterStore> log)
    {
        var body = await ReadBody(context);
        var name = Text(body, "lora_name");
        if (string.IsNullOrEmpty(name))
            return OpenAiError.Result(400, body.TryGetProperty("lora_int_id", out _)
                ? "give 'lora_name': PeftServe adapters have names, not integer ids"
                : "either 'lora_name' and 'lora_int_id' needs to be provided.", "lora_name");
        if (!host.IsReady) return OpenAiError.Result(503, "the model is still loading", code: "model_loading");
        if (!host.Store.Delete(name))
            return OpenAiError.Result(404, $"The lora adapter '{name}' cannot be found.", "lora_name", "adapter_not_found");
        await changes.PublishAsync(name, "deleted");
        log.LogInformation("Unloaded adapter {Adapter}: removed from the store", name);
        return Results.Text($"Success: LoRA adapter '{name}' removed successfully.", "text/plain; charset=utf-8", statusCode: 200);
    }

    private static IResult Loaded(string name) =>
        Results.Text($"Success: LoRA adapter '{name}' added successfully.", "text/plain; charset=utf-8", statusCode: 200);

    private static IResult AlreadyLoaded(string name) =>
        OpenAiError.Result(400, $"The lora adapter '{name}' has already been loaded.", "lora_name", "adapter_exists");

    /// <summary>Copies the files into the store through the upload path (validation, atomic rename).</summary>
    private static void Store(ModelHost host, string name, IReadOnlyList<(string Name, string RealPath)> files)
    {
        var streams = files.Select(f => (f.Name, (Stream)File.OpenRead(f.RealPath), new FileInfo(f.RealPath).Length)).ToList();
        try { host.Store.Save(name, streams); }
        finally { foreach (var s in streams) s.Item2.Dispose(); }
    }

    /// <summary>Whether the stored adapter holds exactly these files, byte for byte.</summary>
    private static bool SameFiles(IReadOnlyList<(string Name, string RealPath)> files, string storedFolder)
    {
        try
        {
            var stored = AdapterRoots.AdapterFiles.Where(n => File.Exists(Path.Combine(storedFolder, n))).Order(StringComparer.Ordinal);
            if (!stored.SequenceEqual(files.Select(f => f.Name).Order(StringComparer.Ordinal))) return false;
            foreach (var (fileName, real) in files)
            {
                using var a = File.OpenRead(real);
                using var b = File.OpenRead(Path.Combine(storedFolder, fileName));
                if (a.Length != b.Length) return false;
                var bufA = new byte[1 << 16];
                var bufB = new byte[1 << 16];
                int n;
                while ((n = a.ReadAtLeast(bufA, bufA.Length, throwOnEndOfStream: false)) > 0)
                {
                    if (b.ReadAtLeast(bufB.AsSpan(0, n), n, throwOnEndOfStream: false) != n || !bufA.AsSpan(0, n).SequenceEqual(bufB.AsSpan(0, n))) return false;
                }
            }
            return true;
        }
        catch (IOException) { return false; }   // deleted meanwhile
    }

    private static async Task<JsonElement> ReadBody(HttpContext context)
    {
        using var reader = new StreamReader(context.Request.Body);
        var text = await reader.ReadToEndAsync(context.RequestAborted);
        try
        {
            var body = JsonDocument.Parse(text).RootElement;
            return body.ValueKind == JsonValueKind.Object ? body : throw new ApiException(400, "the request body must be a JSON object");
        }
        catch (JsonException e) { throw new ApiException(400, $"the request body is not valid JSON: {e.Message}"); }
    }

    private static string? Text(JsonElement body, string property) =>
        body.TryGetProperty(property, out var v) && v.ValueKind == JsonValueKind.String ? v.GetString() : null;
}
