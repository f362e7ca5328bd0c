using Microsoft.AspNetCore.SignalR;
using PeftServe.Server.Adapters;
using PeftServe.Server.Api;
using PeftServe.Server.Hosting;
using PeftServe.Server.Serving;
using StackExchange.Redis;

namespace PeftServe.Server.Replication;

/// <summary>What a replica behind the inference gateway needs on top of the single server: the
/// gateway's metrics, vLLM's adapter endpoints, store-change notices between replicas, and (with
/// --redis) Redis pub/sub and the SignalR Redis backplane. docs/deploy.md explains the deployment.</summary>
public static class ReplicaServices
{
    /// <summary>SignalR's Redis channels start with this, so they do not mix with other users of the Redis.</summary>
    public const string SignalRChannelPrefix = "peftserve-signalr";

    public static void Add(IServiceCollection services, ISignalRServerBuilder signalR, ServerOptions options)
    {
        services.AddSingleton(new AdapterRoots(options.AdapterRoots));
        services.AddSingleton<AdapterChanges>();
        services.AddHostedService<AdapterChangeListener>();
        services.AddSingleton<GatewayMetrics>();
        if (string.IsNullOrWhiteSpace(options.Redis)) return;

        // AbortOnConnectFail = false: the server starts (and serves) while Redis is down, and the client
        // reconnects in the background; meanwhile the store's version file carries the changes.
        ConfigurationOptions Redis()
        {
            var config = ConfigurationOptions.Parse(options.Redis);
            config.AbortOnConnectFail = false;
            return config;
        }
        services.AddSingleton<IConnectionMultiplexer>(_ => ConnectionMultiplexer.Connect(Redis()));
        signalR.AddStackExchangeRedis(o =>
        {
            o.Configuration = Redis();
            o.Configuration.ChannelPrefix = RedisChannel.Literal(SignalRChannelPrefix);
        });
    }

    public static void Map(WebApplication app)
    {
        VllmAdapterEndpoints.Map(app);
    }
}
