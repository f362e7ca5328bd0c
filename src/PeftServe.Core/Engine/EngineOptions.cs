using PeftServe.Core.Adapters;

namespace PeftServe.Core.Engine;

/// <summary>How the serving engine schedules requests and sizes its caches.</summary>
public sealed record EngineOptions
{
    /// <summary>Most sequences decoded together in one step.</summary>
    public int MaxBatchSize { get; init; } = 32;
    /// <summary>Most requests waiting to be admitted; a request beyond it is refused (<see cref="QueueFullException"/>).</summary>
    public int MaxQueueLength { get; init; } = 256;
    /// <summary>Most prompt tokens prefilled in one step, over all sequences; a longer prompt is prefilled in
    /// chunks of at most this many tokens, with decode steps of the running batch in between.</summary>
    public int PrefillChunkTokens { get; init; } = 512;
    /// <summary>Most tokens (prompt + generated, cached or to be) the running sequences may hold together; 0 = only the KV cache's size bounds it.</summary>
    public int MaxTokensInFlight { get; init; }
    /// <summary>Tokens per KV-cache block.</summary>
    public int KvBlockSize { get; init; } = 16;
    /// <summary>Share of the device memory free after loading the model that the KV cache takes (on CPU: of
    /// the memory available to the process, capped by <see cref="KvCacheMaxBytes"/>).</summary>
    public double KvCacheFraction { get; init; } = 0.9;
    /// <summary>Upper bound of the KV cache in bytes (0 = none on CUDA; 1 GiB by default on CPU, where memory is shared with everything else).</summary>
    public long KvCacheMaxBytes { get; init; }
    /// <summary>Exact number of KV blocks, overriding the fraction (tests, benchmarks).</summary>
    public int? KvCacheBlocks { get; init; }
    /// <summary>The adapter store: request adapter names resolve to its subfolders.</summary>
    public string? AdapterStore { get; init; } = "adapters";
    /// <summary>Bytes of validated adapters kept in host memory (the middle cache tier).</summary>
    public long HostCacheBytes { get; init; } = 2L << 30;
    /// <summary>Ranks, sizes and device slots per method.</summary>
    public AdapterLimits AdapterLimits { get; init; } = new();
    /// <summary>On CUDA, capture decode steps as CUDA graphs and replay them (needs the native helper,
    /// native/build.sh); off, or where it cannot be had, decode steps run eagerly (same tokens).</summary>
    public bool CudaGraphs { get; init; } = true;

    public void Validate()
    {
        if (MaxBatchSize < 1) throw new ArgumentException("MaxBatchSize must be at least 1");
        if (MaxQueueLength < 0) throw new ArgumentException("MaxQueueLength must be at least 0");
        if (PrefillChunkTokens < 1) throw new ArgumentException("PrefillChunkTokens must be at least 1");
        if (MaxTokensInFlight < 0) throw new ArgumentException("MaxTokensInFlight must be at least 0");
        if (KvBlockSize < 1) throw new ArgumentException("KvBlockSize must be at least 1");
        if (!(KvCacheFraction > 0 && KvCacheFraction <= 1)) throw new ArgumentException("KvCacheFraction must be in (0, 1]");
        if (KvCacheBlocks is < 1) throw new ArgumentException("KvCacheBlocks must be at least 1");
        if (HostCacheBytes < 0) throw new ArgumentException("HostCacheBytes must be at least 0");
        if (AdapterLimits.SlotsPerMethod < 1) throw new ArgumentException("SlotsPerMethod must be at least 1");
        if (AdapterLimits.EmbeddingSlots < 0) throw new ArgumentException("EmbeddingSlots must be at least 0");
    }
}
