using System.Security.Cryptography;
using System.Text;
using Microsoft.Extensions.Options;
using PeftServe.Server.Hosting;

namespace PeftServe.Server.Api;

/// <summary>The configured keys, kept as SHA-256 digests and compared in constant time, so that how
/// long a refusal takes tells nothing about how much of a guessed key was right (or how long a real
/// key is: every digest has the same length).</summary>
public sealed class KeyRing
{
    private readonly byte[][] _users, _admins;
    private readonly byte[]? _metrics;

    public KeyRing(ServerOptions o)
    {
        _admins = o.AdminKeys.Select(Digest).ToArray();
        _users = o.ApiKeys.Select(Digest).ToArray();
        _metrics = string.IsNullOrEmpty(o.MetricsKey) ? null : Digest(o.MetricsKey);
    }

    public bool MetricsProtected => _metrics is not null;

    public bool IsAdmin(string? key) => key is not null && AnyMatches(_admins, Digest(key));
    public bool IsUser(string? key) => key is not null && (AnyMatches(_users, Digest(key)) || AnyMatches(_admins, Digest(key)));
    public bool MayReadMetrics(string? key) =>
        _metrics is null || key is not null && (CryptographicOperations.FixedTimeEquals(_metrics, Digest(key)) || AnyMatches(_admins, Digest(key)));

    /// <summary>Compares against every key, without stopping at the first match.</summary>
    private static bool AnyMatches(byte[][] keys, byte[] digest)
    {
        bool found = false;
        foreach (var k in keys) found |= CryptographicOperations.FixedTimeEquals(k, digest);
        return found;
    }

    private static byte[] Digest(string key) => SHA256.HashData(Encoding.UTF8.GetBytes(key));
}

/// <summary>Bearer API keys from configuration (PeftServe:ApiKeys, PeftServe:AdminKeys, and
/// PeftServe:MetricsKey for /metrics). With no API keys configured every API request is let
/// through, and Program binds to localhost only.</summary>
public sealed class ApiKeyMiddleware(RequestDelegate next, IOptions<ServerOptions> options, KeyRing keys)
{
    public async Task InvokeAsync(HttpContext context)
    {
        var o = options.Value;
        var path = context.Request.Path;
        if (path.StartsWithSegments("/metrics"))
        {
            if (keys.MayReadMetrics(Token(context))) await next(context);
            else await OpenAiError.Result(401, "/metrics needs the metrics key (send 'Authorization: Bearer KEY')", code: "invalid_api_key").ExecuteAsync(context);
            return;
        }
        bool api = path.StartsWithSegments("/v1") || path.StartsWithSegments("/hubs") || path.StartsWithSegments("/tokenize") || path.StartsWithSegments("/detokenize") || LoraxEndpoints.Owns(path);
        bool open = path.StartsWithSegments("/health") || !api;
        if (!o.AuthEnabled || open)
        {
            await next(context);
            return;
        }
        var key = Token(context);
        if (!keys.IsUser(key))
        {
            await OpenAiError.Result(401, "missing or invalid API key (send 'Authorization: Bearer KEY')", code: "invalid_api_key").ExecuteAsync(context);
            return;
        }
        bool changesAdapters = path.StartsWithSegments("/v1/adapters") && (HttpMethods.IsPost(context.Request.Method) || HttpMethods.IsDelete(context.Request.Method))
            || path.StartsWithSegments("/v1/load_lora_adapter") || path.StartsWithSegments("/v1/unload_lora_adapter");
        if (changesAdapters && !keys.IsAdmin(key))
        {
            await OpenAiError.Result(403, "uploading or deleting adapters needs an admin key", code: "admin_key_required").ExecuteAsync(context);
            return;
        }
        await next(context);
    }

    /// <summary>The bearer token, or SignalR's access_token query parameter (browsers cannot set headers on WebSockets).</summary>
    private static string? Token(HttpContext context)
    {
        var header = context.Request.Headers.Authorization.ToString();
        if (header.StartsWith("Bearer ", StringComparison.OrdinalIgnoreCase)) return header["Bearer ".Length..].Trim();
        return context.Request.Path.StartsWithSegments("/hubs") ? context.Request.Query["access_token"].ToString() is { Length: > 0 } t ? t : null : null;
    }
}
