using System.Net;
using PeftServe.Server.Api;
using PeftServe.Server.Hosting;
using PeftServe.Server.Hubs;
using PeftServe.Server.Replication;
using PeftServe.Server.Serving;
using Prometheus;
using Serilog;
using Serilog.Events;

namespace PeftServe.Server;

public sealed class Program
{
    /// <summary>Command-line switches and the configuration keys they set; every option can also come
    /// from appsettings.json ("PeftServe" section) or the environment (PEFTSERVE__MODEL, ...).</summary>
    internal static readonly Dictionary<string, string> SwitchMappings = new()
    {
        ["--model"] = "PeftServe:Model",
        ["--model-name"] = "PeftServe:ModelName",
        ["--device"] = "PeftServe:Device",
        ["--dtype"] = "PeftServe:DType",
        ["--quantize"] = "PeftServe:Quantize",
        ["--double-quant"] = "PeftServe:DoubleQuant",
        ["--adapter-store"] = "PeftServe:AdapterStore",
        ["--max-batch-size"] = "PeftServe:MaxBatchSize",
        ["--max-queue-length"] = "PeftServe:MaxQueueLength",
        ["--prefill-chunk-tokens"] = "PeftServe:PrefillChunkTokens",
        ["--kv-block-size"] = "PeftServe:KvBlockSize",
        ["--kv-cache-fraction"] = "PeftServe:KvCacheFraction",
        ["--kv-cache-max-bytes"] = "PeftServe:KvCacheMaxBytes",
        ["--kv-cache-blocks"] = "PeftServe:KvCacheBlocks",
        ["--host-cache-bytes"] = "PeftServe:HostCacheBytes",
        ["--slots-per-method"] = "PeftServe:SlotsPerMethod",
        ["--cuda-graphs"] = "PeftServe:CudaGraphs",
        ["--embedding-slots"] = "PeftServe:EmbeddingSlots",
        ["--max-upload-bytes"] = "PeftServe:MaxUploadBytes",
        ["--redis"] = "PeftServe:Redis",
        ["--adapter-roots"] = "PeftServe:AdapterRoots",
        ["--max-concurrent-uploads"] = "PeftServe:MaxConcurrentUploads",
        ["--metrics-key"] = "PeftServe:MetricsKey",
        ["--drain-seconds"] = "PeftServe:DrainSeconds",
    };

    /// <summary>Switches that may stand alone (meaning true).</summary>
    private static readonly string[] Flags = ["--double-quant"];

    public static int Main(string[] args)
    {
        Log.Logger = new LoggerConfiguration()
            .MinimumLevel.Override("Microsoft.AspNetCore", LogEventLevel.Warning)
            .Enrich.FromLogContext()
            .WriteTo.Console()
            .CreateBootstrapLogger();
        try
        {
            BuildApp(args).Run();
            return 0;
        }
        catch (Exception e) when (e is not HostAbortedException)
        {
            Log.Fatal("PeftServe could not start: {Reason}", e.Message);
            return 1;
        }
        finally { Log.CloseAndFlush(); }
    }

    /// <summary>"--double-quant" alone becomes "--double-quant=true" (the configuration reader wants a value).</summary>
    internal static string[] NormalizeFlags(string[] args)
    {
        var result = new List<string>();
        for (int i = 0; i < args.Length; i++)
        {
            bool bare = Flags.Contains(args[i]) && (i + 1 >= args.Length || !bool.TryParse(args[i + 1], out _));
            result.Add(bare ? args[i] + "=true" : args[i]);
        }
        return result.ToArray();
    }

    public static WebApplication BuildApp(string[] args)
    {
        args = NormalizeFlags(args);
        var builder = WebApplication.CreateBuilder(new WebApplicationOptions
        {
            Args = args,
            ContentRootPath = AppContext.BaseDirectory,
            WebRootPath = Path.Combine(AppContext.BaseDirectory, "wwwroot"),
        });
        builder.Configuration.AddCommandLine(args, SwitchMappings);
        builder.Services.AddSerilog((services, config) => config
            .ReadFrom.Configuration(builder.Configuration)
            .MinimumLevel.Override("Microsoft.AspNetCore", LogEventLevel.Warning)
            .Enrich.FromLogContext()
            .WriteTo.Console());
        builder.Services.Configure<ServerOptions>(builder.Configuration.GetSection(ServerOptions.Section));
        var serverOptions = builder.Configuration.GetSection(ServerOptions.Section).Get<ServerOptions>() ?? new ServerOptions();

        // No keys: bind to loopback only, whatever --urls said.
        string? localOnlyNotice = null;
        if (!serverOptions.AuthEnabled)
        {
            var urls = builder.Configuration["urls"] ?? "http://localhost:5000";
            var (bound, changed) = LoopbackUrls(urls);
            builder.WebHost.UseUrls(bound);
            localOnlyNotice = changed
                ? $"No API keys configured: listening on localhost only ({bound}, not {urls}); set PeftServe:ApiKeys to serve other hosts"
                : $"No API keys configured: listening on localhost only ({bound})";
        }

        // SIGTERM: running requests get DrainSeconds to finish (ShutdownDrain), then the rest of shutdown.
        builder.Services.Configure<HostOptions>(o => o.ShutdownTimeout = TimeSpan.FromSeconds(serverOptions.DrainSeconds + 15));
        builder.Services.AddSingleton(new KeyRing(serverOptions));
        if (serverOptions.CorsOrigins.Count > 0)
            builder.Services.AddCors(o => o.AddDefaultPolicy(p => p.WithOrigins([.. serverOptions.CorsOrigins]).AllowAnyHeader().AllowAnyMethod().AllowCredentials()));
        builder.Services.AddSingleton<ModelHost>();
        builder.Services.AddHostedService(sp => sp.GetRequiredService<ModelHost>());
        builder.Services.AddHostedService<ShutdownDrain>();
        builder.Services.AddSingleton<ServerMetrics>();
        builder.Services.AddSingleton<AdapterEndpoints.UploadSlots>();
        builder.Services.AddSingleton<GenerationService>();
        var signalR = builder.Services.AddSignalR(o => o.MaximumReceiveMessageSize = 1 << 20);
        ReplicaServices.Add(builder.Services, signalR, serverOptions);

        var app = builder.Build();
        if (localOnlyNotice is not null)
            app.Lifetime.ApplicationStarted.Register(() => app.Logger.LogWarning("{Notice}", localOnlyNotice));
        else
            app.Lifetime.ApplicationStarted.Register(() => app.Logger.LogInformation("API keys required: {Users} user keys, {Admins} admin keys", serverOptions.ApiKeys.Count, serverOptions.AdminKeys.Count));

        app.UseSerilogRequestLogging(o => o.GetLevel = (ctx, _, e) =>
            e is not null || ctx.Response.StatusCode >= 500 ? LogEventLevel.Error
            : ctx.Request.Path.StartsWithSegments("/health") || ctx.Request.Path.StartsWithSegments("/metrics") ? LogEventLevel.Debug
            : LogEventLevel.Information);
        app.UseMiddleware<ErrorHandlingMiddleware>();
        app.UseMiddleware<LoopbackOnlyMiddleware>();
        if (serverOptions.CorsOrigins.Count > 0) app.UseCors();   // answers preflights before the checks below
        app.UseMiddleware<CrossSiteMiddleware>();
        app.UseMiddleware<ApiKeyMiddleware>();
        app.UseDefaultFiles();
        app.UseStaticFiles();

        // The model is loaded before Kestrel listens (ModelHost.StartAsync), so no request sees it
        // loading; after SIGTERM the server drains, and says so, so that balancers stop sending.
        app.MapGet("/health", (ModelHost host) => host.Draining
            ? Results.Json(new { status = "draining", model = host.ModelName }, statusCode: StatusCodes.Status503ServiceUnavailable)
            : Results.Ok(new { status = "ok", model = host.ModelName }));
        var metrics = app.Services.GetRequiredService<ServerMetrics>();
        GatewayMetrics.Map(app, metrics.Registry);   // ours, then the inference gateway's vllm:* metrics
        OpenAiEndpoints.Map(app);
        TokenizeEndpoints.Map(app);
        LoraxEndpoints.Map(app);
        AdapterEndpoints.Map(app);
        ReplicaServices.Map(app);
        app.MapHub<ChatHub>("/hubs/chat");
        app.Map("/v1/{**rest}", (HttpContext ctx) =>
            OpenAiError.Result(404, $"no such endpoint: {ctx.Request.Method} {ctx.Request.Path}", code: "unknown_url"));
        return app;
    }

    /// <summary>The URLs with every non-loopback host replaced by 127.0.0.1 (and whether any was).</summary>
    internal static (string Urls, bool Changed) LoopbackUrls(string urls)
    {
        bool changed = false;
        var result = urls.Split(';', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).Select(u =>
        {
            int scheme = u.IndexOf("://", StringComparison.Ordinal);
            if (scheme < 0) return u;
            var rest = u[(scheme + 3)..];
            string host, tail;
            if (rest.StartsWith('['))
            {
                int close = rest.IndexOf(']');
                host = rest[..(close + 1)];
                tail = rest[(close + 1)..];
            }
            else
            {
                int end = rest.IndexOfAny([':', '/']);
                host = end < 0 ? rest : rest[..end];
                tail = end < 0 ? "" : rest[end..];
            }
            bool loopback = host == "localhost" || IPAddress.TryParse(host.Trim('[', ']'), out var ip) && IPAddress.IsLoopback(ip);
            if (loopback) return u;
            changed = true;
            return u[..(scheme + 3)] + "127.0.0.1" + tail;
        });
        return (string.Join(';', result), changed);
    }
}
