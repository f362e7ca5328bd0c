using PeftServe.Server.Hosting;
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
        ["--adapter-store"] = "PeftServe:AdapterStore",
    };

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

    public static WebApplication BuildApp(string[] args)
    {
        var builder = WebApplication.CreateBuilder(new WebApplicationOptions { Args = args });
        builder.Configuration.AddCommandLine(args, SwitchMappings);
        builder.Services.AddSerilog((services, config) => config
            .ReadFrom.Configuration(builder.Configuration)
            .MinimumLevel.Override("Microsoft.AspNetCore", LogEventLevel.Warning)
            .Enrich.FromLogContext()
            .WriteTo.Console());
        builder.Services.Configure<ServerOptions>(builder.Configuration.GetSection(ServerOptions.Section));
        builder.Services.AddSingleton<ModelHost>();
        builder.Services.AddHostedService(sp => sp.GetRequiredService<ModelHost>());

        var app = builder.Build();
        app.UseSerilogRequestLogging();
        app.MapGet("/health", (ModelHost host) => host.IsReady
            ? Results.Ok(new { status = "ok", model = host.ModelName })
            : Results.Json(new { status = "loading" }, statusCode: StatusCodes.Status503ServiceUnavailable));
        app.MapGet("/v1/models", (ModelHost host) => Results.Ok(new
        {
            @object = "list",
            data = new[] { new { id = host.ModelName, @object = "model", created = host.LoadedAt.ToUnixTimeSeconds(), owned_by = "peftserve" } },
        }));
        return app;
    }
}
