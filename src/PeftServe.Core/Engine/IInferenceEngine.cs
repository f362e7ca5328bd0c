using PeftServe.Core.Generation;

namespace PeftServe.Core.Engine;

/// <summary>One generation request as the engine sees it: token ids in, token ids (and text) out.
/// The engine knows nothing of HTTP or chat; the server turns API calls into these.</summary>
public sealed record GenerationRequest
{
    /// <summary>The prompt's token ids (at least one).</summary>
    public required IReadOnlyList<int> PromptIds { get; init; }
    /// <summary>An adapter's name in the adapter store (or a folder path); null serves the base model.</summary>
    public string? Adapter { get; init; }
    public SamplingParams Sampling { get; init; } = new();
    /// <summary>Text that ends generation when it appears in the output; the stop text itself is not returned.</summary>
    public IReadOnlyList<string> StopStrings { get; init; } = [];
    /// <summary>An id for logs and metrics; the engine makes one when null.</summary>
    public string? Id { get; init; }
}

/// <summary>One generated token of one request. <see cref="Text"/> is the text this token completes
/// (possibly empty: a character can span tokens, and text that may begin a stop string is held back).
/// <see cref="Finish"/> is set on the last event of a request; a request that ends by a stop string
/// or by cancellation may end with an event that carries no token (<see cref="TokenId"/> = -1).</summary>
public readonly record struct GenerationEvent(int TokenId, string Text, int Index, FinishReason? Finish, TokenLogprob? Logprob = null);

/// <summary>A generated token's log probability and the most likely tokens' (best first), when the request asked
/// for them (<see cref="SamplingParams.Logprobs"/>).</summary>
public sealed record TokenLogprob(int TokenId, float Logprob, IReadOnlyList<(int TokenId, float Logprob)> Top);

/// <summary>Thrown by <see cref="IInferenceEngine.Submit"/> when the waiting queue is full: the request
/// was refused at once and nothing of it is kept, so the caller may retry later.</summary>
public sealed class QueueFullException(int capacity)
    : Exception($"the request queue is full ({capacity} requests waiting); retry later")
{
    public int Capacity { get; } = capacity;
}

/// <summary>Thrown by <see cref="IInferenceEngine.Submit"/> after the engine began shutting down.</summary>
/// <summary>A request's forward pass failed when it ran alone (for example out of device memory for its
/// prompt): that request ends with this error; the engine and every other request go on.</summary>
public sealed class EngineStepException(string message, Exception inner) : Exception(message, inner);

public sealed class EngineStoppedException() : Exception("the engine is shutting down and takes no new requests");

/// <summary>A continuous-batching engine over one base model and its adapters.</summary>
public interface IInferenceEngine
{
    /// <summary>Queues a request and returns its stream of tokens at once. Throws
    /// <see cref="ArgumentException"/> for invalid input (empty prompt, ids outside the vocabulary, bad
    /// sampling parameters, prompt + max_tokens beyond what the KV cache can ever hold),
    /// <see cref="Adapters.AdapterException"/> when the named adapter does not exist,
    /// <see cref="QueueFullException"/> when the queue is full and <see cref="EngineStoppedException"/>
    /// after shutdown began. An adapter that exists but fails to load faults the stream with an
    /// <see cref="Adapters.AdapterException"/>. Cancelling <paramref name="cancellation"/> ends the
    /// request (finish reason Cancelled) and frees its KV blocks and adapter slot at once.</summary>
    GenerationStream Submit(GenerationRequest request, CancellationToken cancellation = default);

    /// <summary>A snapshot of queue, batch, KV cache and adapter cache figures.</summary>
    EngineStats Stats { get; }
}

/// <summary>Figures for logs and metrics; counters count since the engine started.</summary>
public sealed record EngineStats
{
    public int Waiting { get; init; }
    public int Running { get; init; }
    public int QueueCapacity { get; init; }
    public int MaxBatchSize { get; init; }
    public int KvBlocksTotal { get; init; }
    public int KvBlocksFree { get; init; }
    public int KvBlockSize { get; init; }
    /// <summary>Size of the batch of the last decode step.</summary>
    public int LastBatchSize { get; init; }
    public long Steps { get; init; }
    public long RequestsFinished { get; init; }
    public long RequestsCancelled { get; init; }
    public long RequestsFailed { get; init; }
    public long PromptTokens { get; init; }
    public long GeneratedTokens { get; init; }
    public long Preemptions { get; init; }
    public AdapterCacheStats Adapters { get; init; } = new();

    // --- Adapter names of running and waiting requests (read-only snapshot; issue 14: the gateway's
    //     vllm:lora_requests_info). Names as the requests gave them, distinct and sorted.
    /// <summary>Adapters of the sequences in the running batch.</summary>
    public IReadOnlyList<string> RunningAdapters { get; init; } = [];
    /// <summary>Adapters of the requests not yet admitted (queued, or preempted and waiting again).</summary>
    public IReadOnlyList<string> WaitingAdapters { get; init; } = [];
    // --- end of the adapter-name snapshot
}

/// <summary>The three-tier adapter cache's counters: a device hit finds the adapter in a device slot,
/// a host hit in host memory, a miss reads it from disk.</summary>
public sealed record AdapterCacheStats
{
    public long DeviceHits { get; init; }
    public long HostHits { get; init; }
    public long Misses { get; init; }
    /// <summary>Adapters read from disk and validated.</summary>
    public long DiskLoads { get; init; }
    /// <summary>Adapters copied from host memory into a device slot.</summary>
    public long DeviceLoads { get; init; }
    public long DeviceEvictions { get; init; }
    public long HostEvictions { get; init; }
    public int DeviceResident { get; init; }
    public long HostBytes { get; init; }
}
