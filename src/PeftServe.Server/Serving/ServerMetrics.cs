using Prometheus;
using PeftServe.Server.Hosting;

namespace PeftServe.Server.Serving;

/// <summary>The server's Prometheus metrics, in a registry of its own (so several servers in one
/// process, as in the tests, do not share counts). Engine figures (queue depth, batch size, KV cache,
/// adapter cache) are read from the engine's stats just before each scrape.</summary>
public sealed class ServerMetrics
{
    public CollectorRegistry Registry { get; } = Prometheus.Metrics.NewCustomRegistry();

    public Counter Requests { get; }
    public Counter PromptTokens { get; }
    public Counter CompletionTokens { get; }
    public Histogram TimeToFirstToken { get; }
    public Histogram InterTokenLatency { get; }
    public Histogram RequestDuration { get; }
    public Gauge InFlight { get; }

    private readonly Gauge _queueDepth, _queueCapacity, _running, _batchSize, _kvFree, _kvTotal, _adaptersResident, _slotsHeld, _hostCacheBytes;
    private readonly Counter _steps, _cacheHits, _cacheMisses, _cacheEvictions, _adapterLoads, _preemptions, _engineRequests;

    public ServerMetrics(ModelHost host)
    {
        var f = Prometheus.Metrics.WithCustomRegistry(Registry);
        Requests = f.CreateCounter("peftserve_requests_total", "Generation requests by API, model (base or adapter) and outcome.",
            new CounterConfiguration { LabelNames = ["api", "model", "outcome"] });
        PromptTokens = f.CreateCounter("peftserve_prompt_tokens_total", "Prompt tokens of admitted requests.", new CounterConfiguration { LabelNames = ["model"] });
        CompletionTokens = f.CreateCounter("peftserve_completion_tokens_total", "Generated tokens.", new CounterConfiguration { LabelNames = ["model"] });
        double[] latencyBuckets = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30];
        TimeToFirstToken = f.CreateHistogram("peftserve_time_to_first_token_seconds", "From the request's arrival to its first generated token.",
            new HistogramConfiguration { LabelNames = ["api"], Buckets = latencyBuckets });
        InterTokenLatency = f.CreateHistogram("peftserve_inter_token_latency_seconds", "Between consecutive generated tokens of one request.",
            new HistogramConfiguration { LabelNames = ["api"], Buckets = latencyBuckets });
        RequestDuration = f.CreateHistogram("peftserve_request_duration_seconds", "Whole generation requests.",
            new HistogramConfiguration { LabelNames = ["api"], Buckets = Histogram.ExponentialBuckets(0.01, 2, 14) });
        InFlight = f.CreateGauge("peftserve_requests_in_flight", "Generation requests being served (queued or running).");

        _queueDepth = f.CreateGauge("peftserve_queue_depth", "Requests waiting to be admitted into the batch.");
        _queueCapacity = f.CreateGauge("peftserve_queue_capacity", "Most requests that may wait; beyond it requests get 429.");
        _running = f.CreateGauge("peftserve_running_sequences", "Sequences in the running batch.");
        _batchSize = f.CreateGauge("peftserve_batch_size", "Rows of the last decode step.");
        _kvFree = f.CreateGauge("peftserve_kv_cache_blocks_free", "Free KV-cache blocks.");
        _kvTotal = f.CreateGauge("peftserve_kv_cache_blocks_total", "Usable KV-cache blocks.");
        _adaptersResident = f.CreateGauge("peftserve_adapters_device_resident", "Adapters held in device slots.");
        _slotsHeld = f.CreateGauge("peftserve_adapter_slots_held", "Device adapter slots held by running sequences (0 when idle).");
        _hostCacheBytes = f.CreateGauge("peftserve_adapter_host_cache_bytes", "Bytes of adapters kept in host memory.");
        _steps = f.CreateCounter("peftserve_engine_steps_total", "Engine scheduler iterations that ran a forward pass.");
        _cacheHits = f.CreateCounter("peftserve_adapter_cache_hits_total", "Adapter lookups found in a cache tier.", new CounterConfiguration { LabelNames = ["tier"] });
        _cacheMisses = f.CreateCounter("peftserve_adapter_cache_misses_total", "Adapter lookups that had to read the store.");
        _cacheEvictions = f.CreateCounter("peftserve_adapter_cache_evictions_total", "Adapters evicted from a cache tier.", new CounterConfiguration { LabelNames = ["tier"] });
        _adapterLoads = f.CreateCounter("peftserve_adapter_loads_total", "Adapters loaded into a tier.", new CounterConfiguration { LabelNames = ["tier"] });
        _preemptions = f.CreateCounter("peftserve_engine_preemptions_total", "Sequences preempted for KV-cache room.");
        _engineRequests = f.CreateCounter("peftserve_engine_requests_total", "Requests the engine ended, by outcome.", new CounterConfiguration { LabelNames = ["outcome"] });

        Registry.AddBeforeCollectCallback(() =>
        {
            if (!host.IsReady) return;
            var s = host.Engine.Stats;
            _queueDepth.Set(s.Waiting);
            _queueCapacity.Set(s.QueueCapacity);
            _running.Set(s.Running);
            _batchSize.Set(s.LastBatchSize);
            _kvFree.Set(s.KvBlocksFree);
            _kvTotal.Set(s.KvBlocksTotal);
            _steps.IncTo(s.Steps);
            _preemptions.IncTo(s.Preemptions);
            _engineRequests.WithLabels("finished").IncTo(s.RequestsFinished);
            _engineRequests.WithLabels("cancelled").IncTo(s.RequestsCancelled);
            _engineRequests.WithLabels("failed").IncTo(s.RequestsFailed);
            var a = s.Adapters;
            _cacheHits.WithLabels("device").IncTo(a.DeviceHits);
            _cacheHits.WithLabels("host").IncTo(a.HostHits);
            _cacheMisses.IncTo(a.Misses);
            _cacheEvictions.WithLabels("device").IncTo(a.DeviceEvictions);
            _cacheEvictions.WithLabels("host").IncTo(a.HostEvictions);
            _adapterLoads.WithLabels("disk").IncTo(a.DiskLoads);
            _adapterLoads.WithLabels("device").IncTo(a.DeviceLoads);
            _adaptersResident.Set(a.DeviceResident);
            _slotsHeld.Set(host.Engine.Adapters.HeldSlots);
            _hostCacheBytes.Set(a.HostBytes);
        });
    }
}
