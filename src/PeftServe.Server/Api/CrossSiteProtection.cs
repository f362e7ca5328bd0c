using System.Net;
using Microsoft.Extensions.Options;
using PeftServe.Server.Hosting;

namespace PeftServe.Server.Api;

/// <summary>Refuses what a web page open in the user's browser could make the browser send to this
/// server, which (with no keys) trusts anything from localhost:
/// <list type="bullet">
/// <item>a Host header the server does not answer to: a DNS-rebinding page reaches 127.0.0.1 under its
/// own domain name (400, code invalid_host);</item>
/// <item>a cross-origin request that changes state (POST, DELETE, ...) under /v1 or /hubs, or any
/// cross-origin hub connection (WebSockets are not subject to CORS), unless PeftServe:CorsOrigins
/// lists the origin (403, code cross_origin_refused).</item>
/// </list>
/// A request is cross-origin when its Origin is not the server's own, or its Sec-Fetch-Site says
/// "cross-site" or "same-site". Requests with neither header (curl, SDKs) are not browser requests and
/// pass. JSON endpoints also refuse non-JSON bodies (415, in <see cref="OpenAiEndpoints"/>), since a
/// page may POST text/plain without a CORS preflight.
///
/// Written here rather than with ASP.NET Core's HostFiltering middleware, which reads its list from the
/// top-level AllowedHosts setting, knows nothing of the loopback default, and answers with a bare 400.</summary>
public sealed class CrossSiteMiddleware(RequestDelegate next, IOptions<ServerOptions> options, ILogger<CrossSiteMiddleware> log)
{
    public async Task InvokeAsync(HttpContext context)
    {
        var o = options.Value;
        var request = context.Request;
        var host = request.Host.Host;
        if (!HostAllowed(host, o))
        {
            log.LogWarning("Refused {Method} {Path}: Host '{Host}' is not an allowed name", request.Method, request.Path.Value, host);
            await OpenAiError.Result(400, $"this server does not answer to the host name '{Shorten(host)}'; add it to PeftServe:AllowedHosts", code: "invalid_host")
                .ExecuteAsync(context);
            return;
        }
        var path = request.Path;
        bool hub = path.StartsWithSegments("/hubs");
        bool changesState = !(HttpMethods.IsGet(request.Method) || HttpMethods.IsHead(request.Method) || HttpMethods.IsOptions(request.Method));
        if ((hub || changesState && path.StartsWithSegments("/v1")) && CrossOrigin(request, out var origin) && !o.CorsOrigins.Contains(origin ?? "", StringComparer.OrdinalIgnoreCase))
        {
            log.LogWarning("Refused cross-origin {Method} {Path} from {Origin}", request.Method, path.Value, origin ?? request.Headers["Sec-Fetch-Site"].ToString());
            await OpenAiError.Result(403, $"cross-origin request refused{(origin is null ? "" : $" (origin {Shorten(origin)})")}; list the origin in PeftServe:CorsOrigins to allow it",
                code: "cross_origin_refused").ExecuteAsync(context);
            return;
        }
        await next(context);
    }

    /// <summary>Whether the browser says this request comes from another origin (its Origin, if sent, in <paramref name="origin"/>).</summary>
    internal static bool CrossOrigin(HttpRequest request, out string? origin)
    {
        origin = request.Headers.Origin.ToString() is { Length: > 0 } o ? o : null;
        var fetchSite = request.Headers["Sec-Fetch-Site"].ToString();
        if (fetchSite is "cross-site" or "same-site") return true;
        if (origin is null) return false;
        var own = $"{request.Scheme}://{request.Host.Value}";
        return !string.Equals(origin, own, StringComparison.OrdinalIgnoreCase);
    }

    /// <summary>Whether the Host header's name (port aside) is one the server answers to.</summary>
    internal static bool HostAllowed(string host, ServerOptions o)
    {
        if (o.AllowedHosts.Count > 0)
            return o.AllowedHosts.Any(allowed => allowed == "*"
                || string.Equals(host, allowed, StringComparison.OrdinalIgnoreCase)
                || allowed.StartsWith("*.", StringComparison.Ordinal) && host.EndsWith(allowed[1..], StringComparison.OrdinalIgnoreCase));
        if (o.AuthEnabled) return true;   // keys guard the API; a rebinding page does not have them
        return IsLoopbackName(host);
    }

    /// <summary>localhost, *.localhost (browsers resolve these to loopback themselves) and loopback addresses.</summary>
    internal static bool IsLoopbackName(string host) =>
        string.Equals(host, "localhost", StringComparison.OrdinalIgnoreCase)
        || host.EndsWith(".localhost", StringComparison.OrdinalIgnoreCase)
        || IPAddress.TryParse(host.Trim('[', ']'), out var ip) && IPAddress.IsLoopback(ip);

    private static string Shorten(string s) => s.Length <= 100 ? s : s[..97] + "...";
}
