using Microsoft.AspNetCore.SignalR;
using Microsoft.Extensions.Options;
using PeftServe.Server.Hosting;
using PeftServe.Server.Hubs;
using StackExchange.Redis;

namespace PeftServe.Server.Replication;

/// <summary>One change of the adapter store: <see cref="Kind"/> is "stored" or "deleted"; <see cref="Origin"/>
/// is the replica that made it.</summary>
public sealed record AdapterChange(string Name, string Kind, string Origin);

/// <summary>Tells every replica that shares the adapter store what this one changed, so that none
/// keeps serving a deleted or replaced adapter from its engine's caches (host memory and device slots).
/// This replica drops its cached copy at once; the others hear of it through Redis pub/sub when
/// <see cref="ServerOptions.Redis"/> is set, and through the store's version file in any case
/// (<see cref="AdapterChangeListener"/>). SignalR clients get an "adaptersChanged" message (through the
/// Redis backplane, on every replica).</summary>
public sealed class AdapterChanges(ModelHost host, IHubContext<ChatHub> hub, IOptions<ServerOptions> options,
    ILogger<AdapterChanges> log, IConnectionMultiplexer? redis = null)
{
    /// <summary>The Redis channel the replicas publish store changes on.</summary>
    public static readonly RedisChannel Channel = RedisChannel.Literal("peftserve:adapter-changes");

    /// <summary>This process, as the other replicas see it in a change's origin.</summary>
    public string ReplicaId { get; } = $"{Environment.MachineName}-{Environment.ProcessId}-{Guid.NewGuid().ToString("N")[..8]}";

    public bool UsesRedis => redis is not null;

    /// <summary>This replica stored ("stored") or deleted ("deleted") an adapter in the store.</summary>
    public async Task PublishAsync(string name, string kind)
    {
        var change = new AdapterChange(name, kind, ReplicaId);
        host.Engine.InvalidateAdapter(name);
        _madeHere[name] = StoreVersionFile.Fingerprint(host.Store.Directory, name);
        try { StoreVersionFile.Write(host.Store.Directory, change); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            log.LogError("Could not write the store's version file in {Store}: {Reason}; replicas without Redis will not see {Kind} {Adapter}",
                host.Store.Directory, e.Message, kind, name);
        }
        if (redis is not null)
        {
            try { await redis.GetSubscriber().PublishAsync(Channel, StoreVersionFile.Format(change)); }
            catch (RedisException e)
            {
                log.LogError("Could not publish {Kind} {Adapter} on Redis: {Reason}; the others notice it through the version file", kind, name, e.Message);
            }
        }
        await NotifyClientsAsync(change);
        log.LogInformation("Adapter {Adapter} {Kind}; told the other replicas ({Transport})", name, kind, redis is null ? "version file" : "Redis and version file");
    }

    /// <summary>Another replica changed the store: forget any cached copy of that adapter. Without the
    /// Redis backplane, this replica tells its own SignalR clients (with it, the origin told everyone).</summary>
    public async Task ApplyAsync(AdapterChange change, string via)
    {
        if (change.Origin == ReplicaId || !host.IsReady) return;
        host.Engine.InvalidateAdapter(change.Name);
        log.LogInformation("Adapter {Adapter} {Kind} by replica {Origin} (heard through {Via}): cached copies dropped", change.Name, change.Kind, change.Origin, via);
        if (redis is null) await NotifyClientsAsync(change);
    }

    /// <summary>Whether the store's folder for <paramref name="name"/> (<paramref name="fingerprint"/>, null when
    /// absent) is as this replica's own last change left it. The version file names only the last change, so a
    /// poll that finds several folders moved uses this to tell its own changes from the others': without it,
    /// an adapter this replica stored and already loaded would be dropped and read again.</summary>
    public bool MadeHere(string name, string? fingerprint) =>
        _madeHere.TryGetValue(name, out var own) && own == fingerprint;

    private readonly System.Collections.Concurrent.ConcurrentDictionary<string, string?> _madeHere = new(StringComparer.Ordinal);

    private async Task NotifyClientsAsync(AdapterChange change)
    {
        try { await hub.Clients.All.SendAsync("adaptersChanged", new { name = change.Name, change = change.Kind }); }
        catch (Exception e) when (e is RedisException or IOException or InvalidOperationException)
        {
            log.LogWarning("Could not tell SignalR clients that {Adapter} was {Kind}: {Reason}", change.Name, change.Kind, e.Message);
        }
    }

    internal int PollMilliseconds => Math.Max(20, options.Value.StorePollMilliseconds);
}
