using Microsoft.Extensions.Options;
using PeftServe.Server.Hosting;

namespace PeftServe.Server.Api;

/// <summary>Bearer API keys from configuration (PeftServe:ApiKeys, PeftServe:AdminKeys). With no keys
/// configured every request is let through, and Program binds to localhost only.</summary>
public sealed class ApiKeyMiddleware(RequestDelegate next, IOptions<ServerOptions> options)
{
    public async Task InvokeAsync(HttpContext context)
    {
        var o = options.Value;
        var path = context.Request.Path;
        bool open = path.StartsWithSegments("/health") || path.StartsWithSegments("/metrics") || !path.StartsWithSegments("/v1") && !path.StartsWithSegments("/hubs");
        if (!o.AuthEnabled || open)
        {
            await next(context);
            return;
        }
        var key = Token(context);
        bool admin = key is not null && o.AdminKeys.Contains(key);
        bool user = admin || key is not null && o.ApiKeys.Contains(key);
        if (!user)
        {
            await OpenAiError.Result(401, "missing or invalid API key (send 'Authorization: Bearer KEY')", code: "invalid_api_key").ExecuteAsync(context);
            return;
        }
        bool changesAdapters = path.StartsWithSegments("/v1/adapters") && (HttpMethods.IsPost(context.Request.Method) || HttpMethods.IsDelete(context.Request.Method))
            || path.StartsWithSegments("/v1/load_lora_adapter") || path.StartsWithSegments("/v1/unload_lora_adapter");
        if (changesAdapters && !admin)
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
