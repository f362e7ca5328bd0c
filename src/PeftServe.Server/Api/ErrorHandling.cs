using System.Net;
using Microsoft.Extensions.Options;
using PeftServe.Server.Hosting;

namespace PeftServe.Server.Api;

/// <summary>Turns every failure of a request into an OpenAI-style error body with the right status
/// code, so that bad input never takes the server down: <see cref="ApiException"/>s as they say,
/// oversized or malformed requests as 400/413, anything unexpected as a logged 500.</summary>
public sealed class ErrorHandlingMiddleware(RequestDelegate next, ILogger<ErrorHandlingMiddleware> log)
{
    public async Task InvokeAsync(HttpContext context)
    {
        try { await next(context); }
        catch (OperationCanceledException) when (context.RequestAborted.IsCancellationRequested)
        {
            // The client went away; its request was cancelled. Nothing to answer.
        }
        catch (ApiException e)
        {
            if (context.Response.HasStarted) { log.LogWarning("Request failed after its response began: {Error}", e.Message); return; }
            if (e.RetryAfterSeconds is { } s) context.Response.Headers.RetryAfter = s.ToString(System.Globalization.CultureInfo.InvariantCulture);
            log.LogInformation("Refused {Method} {Path}: {Status} {Error}", context.Request.Method, context.Request.Path.Value, e.Status, e.Message);
            await OpenAiError.Result(e).ExecuteAsync(context);
        }
        catch (BadHttpRequestException e)
        {
            if (context.Response.HasStarted) return;
            await OpenAiError.Result(e.StatusCode, e.Message).ExecuteAsync(context);
        }
        catch (Exception e)
        {
            log.LogError(e, "Unhandled error in {Method} {Path} (request {RequestId})", context.Request.Method, context.Request.Path.Value, context.TraceIdentifier);
            if (context.Response.HasStarted) return;
            // The exception's text stays in the log: it may hold paths and internals.
            await OpenAiError.Result(500, $"internal server error (request {context.TraceIdentifier}; the details are in the server's log)").ExecuteAsync(context);
        }
    }
}

/// <summary>With no API keys configured the server is bound to loopback only; this refuses anything
/// that still arrives from elsewhere (behind a proxy, say).</summary>
public sealed class LoopbackOnlyMiddleware(RequestDelegate next, IOptions<ServerOptions> options)
{
    public async Task InvokeAsync(HttpContext context)
    {
        var remote = context.Connection.RemoteIpAddress;
        if (!options.Value.AuthEnabled && remote is not null && !IPAddress.IsLoopback(remote))
        {
            await OpenAiError.Result(403, "this server has no API keys configured and serves localhost only", code: "localhost_only").ExecuteAsync(context);
            return;
        }
        await next(context);
    }
}
