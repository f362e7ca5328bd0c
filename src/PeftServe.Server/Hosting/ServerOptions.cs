namespace PeftServe.Server.Hosting;

/// <summary>The "PeftServe" configuration section (appsettings.json, PEFTSERVE__* variables, switches).</summary>
public sealed class ServerOptions
{
    public const string Section = "PeftServe";

    /// <summary>Hugging Face model folder; empty means the built-in tiny Llama.</summary>
    public string? Model { get; set; }
    /// <summary>The id clients use for the base model; default: the folder's name.</summary>
    public string? ModelName { get; set; }
    public string Device { get; set; } = "cpu";
    public string? DType { get; set; }
    /// <summary>none or nf4: how the decoder's linear layers store their weights.</summary>
    public string Quantize { get; set; } = "none";
    /// <summary>With nf4: quantize the absmax values too (QLoRA double quantization).</summary>
    public bool DoubleQuant { get; set; }
    public string AdapterStore { get; set; } = "adapters";
    /// <summary>Bearer keys for the API; empty means no authentication (then only localhost is served).</summary>
    public List<string> ApiKeys { get; set; } = [];
    /// <summary>Keys that may also upload and delete adapters.</summary>
    public List<string> AdminKeys { get; set; } = [];
    /// <summary>Largest adapter upload, in bytes.</summary>
    public long MaxUploadBytes { get; set; } = 512L << 20;
    /// <summary>Most files in one upload, or entries in one archive.</summary>
    public int MaxUploadFiles { get; set; } = 16;
    /// <summary>Uploads validated at once; one more is answered 429 with Retry-After.</summary>
    public int MaxConcurrentUploads { get; set; } = 2;

    /// <summary>Browser origins ("https://app.example.com") allowed to call the API cross-origin (CORS).
    /// Any other cross-origin request that changes state, and any cross-origin hub connection, is
    /// refused: without it, every web page the local user opens could drive a localhost server.</summary>
    public List<string> CorsOrigins { get; set; } = [];
    /// <summary>Host names the server answers to (the Host header, port aside; "*.example.com" covers
    /// subdomains). Empty: loopback names only when the server has no keys (and so listens on loopback),
    /// any name otherwise. Guards against DNS rebinding.</summary>
    public List<string> AllowedHosts { get; set; } = [];
    /// <summary>When set, /metrics needs "Authorization: Bearer MetricsKey" (an admin key also works).</summary>
    public string? MetricsKey { get; set; }
    /// <summary>On SIGTERM, how long running requests may take to finish before they are cancelled.</summary>
    public int DrainSeconds { get; set; } = 30;

    // The engine's knobs (see PeftServe.Core.Engine.EngineOptions).
    public int MaxBatchSize { get; set; } = 32;
    public int MaxQueueLength { get; set; } = 256;
    public int PrefillChunkTokens { get; set; } = 512;
    public int KvBlockSize { get; set; } = 16;
    public double KvCacheFraction { get; set; } = 0.9;
    public long KvCacheMaxBytes { get; set; }
    public int? KvCacheBlocks { get; set; }
    public long HostCacheBytes { get; set; } = 2L << 30;
    public int SlotsPerMethod { get; set; } = 16;
    /// <summary>On CUDA, replay decode steps from captured CUDA graphs (needs the native helper; off: eager).</summary>
    public bool CudaGraphs { get; set; } = true;
    /// <summary>Device slots for LoRA adapters with a saved lm_head/embed_tokens or LoRA on them (each slot holds two
    /// vocabulary x hidden matrices); 0 refuses such adapters.</summary>
    public int EmbeddingSlots { get; set; } = 2;
    public int MaxAdapterRank { get; set; } = 64;

    /// <summary>Seconds a client is told to wait (Retry-After) when the queue is full.</summary>
    public int RetryAfterSeconds { get; set; } = 1;
    /// <summary>max_tokens when a chat request gives none (bounded by what the KV cache holds).</summary>
    public int DefaultChatMaxTokens { get; set; } = 256;

    // Replicas (docs/deploy.md).
    /// <summary>StackExchange.Redis configuration ("host:port", ...): adapter-store changes go out over
    /// Redis pub/sub and SignalR uses the Redis backplane. Empty: the store's version file is polled.</summary>
    public string? Redis { get; set; }
    /// <summary>Folders that POST /v1/load_lora_adapter may read adapters from, separated by ':'
    /// (as in PATH). Empty: that endpoint refuses every path.</summary>
    public string? AdapterRoots { get; set; }
    /// <summary>How often, without Redis, the store's version file is read to notice other replicas' changes.</summary>
    public int StorePollMilliseconds { get; set; } = 250;

    public bool AuthEnabled => ApiKeys.Count > 0 || AdminKeys.Count > 0;
}
