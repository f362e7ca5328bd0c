using PeftServe.Server.Hosting;
using StackExchange.Redis;

namespace PeftServe.Server.Replication;

/// <summary>Hears the other replicas' adapter-store changes and passes them to <see cref="AdapterChanges.ApplyAsync"/>:
/// from Redis pub/sub when configured (milliseconds), and from the store's version file, read every
/// <see cref="ServerOptions.StorePollMilliseconds"/> (the only way without Redis, and a safety net with
/// it: a message published while this replica was cut off from Redis is lost, the file is not).</summary>
public sealed class AdapterChangeListener(ModelHost host, AdapterChanges changes, ILogger<AdapterChangeListener> log,
    IConnectionMultiplexer? redis = null) : BackgroundService
{
    protected override async Task ExecuteAsync(CancellationToken stoppingToken)
    {
        while (!host.IsReady)
        {
            // ModelHost starts before this service; a failed start stops the host.
            await Task.Delay(50, stoppingToken);
        }
        if (redis is not null)
        {
            var queue = await redis.GetSubscriber().SubscribeAsync(AdapterChanges.Channel);
            queue.OnMessage(async message =>
            {
                if (StoreVersionFile.Parse(message.Message) is { } change) await changes.ApplyAsync(change, "Redis");
                else log.LogWarning("Ignored a malformed adapter-change message from Redis: {Message}", message.Message.ToString());
            });
            log.LogInformation("Listening for adapter-store changes on Redis channel {Channel} ({Status})", AdapterChanges.Channel.ToString(),
                redis.IsConnected ? "connected" : "not connected yet: reconnecting in the background");
        }
        await PollVersionFileAsync(stoppingToken);
    }

    private async Task PollVersionFileAsync(CancellationToken stoppingToken)
    {
        var store = host.Store.Directory;
        string? seen = StoreVersionFile.Read(store);
        var fingerprints = StoreVersionFile.Fingerprints(store);
        using var timer = new PeriodicTimer(TimeSpan.FromMilliseconds(changes.PollMilliseconds));
        while (await timer.WaitForNextTickAsync(stoppingToken))
        {
            try
            {
                var version = StoreVersionFile.Read(store);
                if (version == seen) continue;
                seen = version;
                // The named change, then every folder whose fingerprint moved (changes that came in between).
                var named = StoreVersionFile.Parse(version);
                if (named is not null) await changes.ApplyAsync(named, "version file");
                var now = StoreVersionFile.Fingerprints(store);
                foreach (var name in fingerprints.Keys.Union(now.Keys).Where(n => n != named?.Name))
                {
                    bool before = fingerprints.TryGetValue(name, out var a), after = now.TryGetValue(name, out var b);
                    if (before && after && a == b) continue;
                    if (changes.MadeHere(name, after ? b : null)) continue;
                    await changes.ApplyAsync(new AdapterChange(name, after ? "stored" : "deleted", "another replica"), "store fingerprints");
                }
                fingerprints = now;
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                log.LogWarning("Could not read the adapter store's version file in {Store}: {Reason}", store, e.Message);
            }
        }
    }
}
