using Microsoft.Extensions.Options;
using PeftServe.Server.Serving;

namespace PeftServe.Server.Hosting;

/// <summary>Graceful shutdown (SIGTERM): from its first moment new requests are refused (503, and
/// /health says "draining"), while running ones, SSE and SignalR alike, keep their connections and
/// finish; shutdown goes on once none is left or DrainSeconds have passed, then cancels the rest.
///
/// Shutdown begins with IHostApplicationLifetime.ApplicationStopping, whose callbacks run
/// last-registered first. SignalR closes every connection from its own callback, registered when the
/// hub was mapped; this one is registered later (when the host starts), so it runs first and holds
/// shutdown, Kestrel and SignalR included, until the drain is over.</summary>
public sealed class ShutdownDrain(ModelHost host, ServerMetrics metrics, IHostApplicationLifetime lifetime, IOptions<ServerOptions> options, ILogger<ShutdownDrain> log)
    : IHostedService
{
    public Task StartAsync(CancellationToken cancellationToken)
    {
        lifetime.ApplicationStopping.Register(Drain);
        return Task.CompletedTask;
    }

    public Task StopAsync(CancellationToken cancellationToken) => Task.CompletedTask;

    private void Drain()
    {
        host.BeginDrain();
        var clock = System.Diagnostics.Stopwatch.StartNew();
        var limit = TimeSpan.FromSeconds(options.Value.DrainSeconds);
        log.LogInformation("Shutting down: draining {Count} running requests (at most {Seconds} s)", metrics.InFlight.Value, limit.TotalSeconds);
        while (clock.Elapsed < limit && Busy()) Thread.Sleep(50);
        if (Busy())
        {
            log.LogWarning("Drain time over: cancelling {Count} requests still running", metrics.InFlight.Value);
            return;
        }
        // The last request's closing events ([DONE], the hub's completion) follow its last token.
        Thread.Sleep(250);
        log.LogInformation("Drained in {Seconds:F1} s", clock.Elapsed.TotalSeconds);
    }

    private bool Busy() => metrics.InFlight.Value > 0 || host.IsReady && host.Engine.Stats is { } s && s.Running + s.Waiting > 0;
}
