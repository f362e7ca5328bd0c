using PeftServe.Core.Generation;
using PeftServe.Core.Model;
using PeftServe.Core.Tokenization;

namespace PeftServe.Core.Engine;

/// <summary>One token of a fixed batch: row, token id, its index in the row's continuation, and why the row
/// stopped when this was its last token.</summary>
public readonly record struct GeneratedToken(int Row, int TokenId, int Index, FinishReason? Finish);

/// <summary>Generation for a fixed set of prompts that start together, through the serving engine (its
/// paged KV cache, adapter manager and decode steps, CUDA graphs included): the path every user request
/// takes, so tools and tests that want "these prompts, these adapters, give me the tokens" check exactly
/// what is served.</summary>
public static class FixedBatch
{
    /// <summary>As below, with each row's adapter given as one placed elsewhere (read again from its folder).</summary>
    public static IReadOnlyList<GeneratedToken> Generate(LlamaModel model, IReadOnlyList<int[]> prompts, IReadOnlyList<SamplingParams> sampling,
        IReadOnlyList<Adapters.ResidentAdapter?> adapters, EngineOptions? options = null) =>
        Generate(model, prompts, sampling, adapters.Select(a => a?.Adapter.SourcePath).ToList(), options: options);

    /// <summary>Generates for every prompt with its sampling parameters and adapter (a name in
    /// <paramref name="adapterStore"/> or a folder path; null for the base model), all admitted together.
    /// Returns every row's tokens, ordered as decode steps produce them (by index, then row).</summary>
    public static IReadOnlyList<GeneratedToken> Generate(LlamaModel model, IReadOnlyList<int[]> prompts, IReadOnlyList<SamplingParams> sampling,
        IReadOnlyList<string?>? adapters = null, string? adapterStore = null, EngineOptions? options = null, Tokenizer? tokenizer = null,
        CancellationToken cancellation = default)
    {
        if (sampling.Count != prompts.Count) throw new ArgumentException("one SamplingParams per prompt is required");
        if (adapters is not null && adapters.Count != prompts.Count) throw new ArgumentException("one adapter entry (or null) per prompt is required");
        if (prompts.Count == 0) return [];
        options ??= new EngineOptions();
        int longest = prompts.Max(p => p.Length) + sampling.Max(p => p.MaxTokens) + options.AdapterLimits.MaxVirtualTokens + 1;
        options = options with
        {
            MaxBatchSize = Math.Max(options.MaxBatchSize, prompts.Count),
            MaxQueueLength = Math.Max(options.MaxQueueLength, prompts.Count),
            PrefillChunkTokens = Math.Max(options.PrefillChunkTokens, prompts.Sum(p => p.Length + options.AdapterLimits.MaxVirtualTokens)),
            AdapterStore = adapterStore,
            // Room for every row at full length: nothing is preempted, so the rows run as one batch throughout.
            KvCacheBlocks = options.KvCacheBlocks ?? prompts.Count * ((longest + options.KvBlockSize - 1) / options.KvBlockSize) + 2,
        };
        using var engine = new InferenceEngine(model, tokenizer, options);
        var streams = prompts.Select((p, i) => engine.Submit(new GenerationRequest
        {
            PromptIds = p,
            Sampling = sampling[i],
            Adapter = adapters?[i],
        }, cancellation)).ToArray();
        var tokens = new List<GeneratedToken>();
        for (int row = 0; row < streams.Length; row++)
            foreach (var e in streams[row].ToBlockingEnumerable(cancellation))
                if (e.TokenId >= 0) tokens.Add(new GeneratedToken(row, e.TokenId, e.Index, e.Finish));
        return tokens.OrderBy(t => t.Index).ThenBy(t => t.Row).ToList();
    }
}
