using Serilog;

namespace PeftServe.Server;

public static class Program
{
    public static int Main(string[] args)
    {
        Log.Logger = new LoggerConfiguration().WriteTo.Console().CreateLogger();
        try
        {
            var builder = WebApplication.CreateBuilder(args);
            builder.Host.UseSerilog();
            var app = builder.Build();
            app.MapGet("/health", () => Results.Ok(new { status = "ok" }));
            app.Run();
            return 0;
        }
        finally { Log.CloseAndFlush(); }
    }
}
