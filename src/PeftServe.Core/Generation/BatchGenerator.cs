using PeftServe.Core.Adapters;
using PeftServe.Core.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Generation;

public enum FinishReason { Stop, Length, Cancelled }

/// <summary>One token produced for one row of a batch; <see cref="Finish"/> is set on the row's last token.</summary>
public readonly record struct GeneratedToken(int Row, int TokenId, int Index, FinishReason? Finish);

/// <summary>Generates continuations for a fixed batch of prompts that start together: one batched
/// prefill (prompts left-padded to a common length, padding masked through positions), then one
/// batched decode step per token. Each step's sampled ids stay on the device as the next input; the
/// host reads them once per step to stream them and to check stop conditions. (The serving engine
/// adds continuous batching on top of the same model forward.)</summary>
public sealed class BatchGenerator(LlamaModel model)
{
    /// <summary>Generates for every prompt; <paramref name="adapters"/> (optional) names each row's
    /// resident adapter or null.</summary>
    public IEnumerable<GeneratedToken> Generate(IReadOnlyList<int[]> prompts, IReadOnlyList<SamplingParams> parameters,
        CancellationToken cancellation = default, IReadOnlyList<ResidentAdapter?>? adapters = null)
    {
        if (prompts.Count == 0) yield break;
        if (parameters.Count != prompts.Count) throw new ArgumentException("one SamplingParams per prompt is required");
        foreach (var p in parameters) p.Validate();
        if (prompts.Any(p => p.Length == 0)) throw new ArgumentException("every prompt needs at least one token");
        var vocab = model.Config.VocabSize;
        foreach (var id in prompts.SelectMany(p => p))
            if (id < 0 || id >= vocab) throw new ArgumentException($"token id {id} is outside the vocabulary (0..{vocab - 1})");

        adapters ??= new ResidentAdapter?[prompts.Count];
        if (adapters.Count != prompts.Count) throw new ArgumentException("one adapter entry (or null) per prompt is required");
        var layout = SequenceLayout.Build(prompts, adapters.Select(a => a?.VirtualTokens ?? 0).ToArray());
        int batch = prompts.Count, promptLen = layout.Length, maxNew = parameters.Max(p => p.MaxTokens);
        var seeds = parameters.Select(p => p.WithResolvedSeed().Seed!.Value).ToArray();
        var steps = new long[batch];
        var done = new bool[batch];

        using var cache = new KvCache(model.Config, batch, promptLen + maxNew, model.DType, model.Device);
        var (ids, positions) = layout.ToTensors(model.Device);
        // Prefill carries the virtual columns; decode steps have none.
        using var prefillAdapters = AdapterBatch.Create(adapters, layout.VirtualStart, model.Device);
        using var decodeAdapters = AdapterBatch.Create(adapters, Enumerable.Repeat(-1, batch).ToArray(), model.Device);
        try
        {
            for (int step = 0; step < maxNew; step++)
            {
                long[] sampled;
                Tensor nextIds, nextPositions;
                using (var scope = torch.NewDisposeScope())
                {
                    var logits = model.Forward(ids, positions, cache, lastTokenOnly: true, step == 0 ? prefillAdapters : decodeAdapters)[.., 0, ..];
                    var next = Sampler.Sample(logits, parameters, seeds, steps);
                    sampled = next.cpu().data<long>().ToArray();        // the one host sync per step
                    nextIds = next.view(batch, 1).MoveToOuterDisposeScope();
                    nextPositions = (positions[.., ^1..] + 1).MoveToOuterDisposeScope();
                }
                ids.Dispose();
                positions.Dispose();
                (ids, positions) = (nextIds, nextPositions);

                bool cancelled = cancellation.IsCancellationRequested;
                for (int row = 0; row < batch; row++)
                {
                    if (done[row]) continue;
                    int token = (int)sampled[row];
                    var p = parameters[row];
                    FinishReason? finish = cancelled ? FinishReason.Cancelled
                        : p.StopTokenIds.Contains(token) ? FinishReason.Stop
                        : steps[row] + 1 >= p.MaxTokens ? FinishReason.Length
                        : null;
                    yield return new GeneratedToken(row, token, (int)steps[row], finish);
                    steps[row]++;
                    done[row] = finish is not null;
                }
                if (done.All(d => d)) yield break;
            }
        }
        finally
        {
            ids.Dispose();
            positions.Dispose();
        }
    }

}

/// <summary>Rows of a batch right-aligned in one [B,T] block: each row is its adapter's virtual
/// columns (if any) followed by its tokens, preceded by padding. Virtual columns take positions
/// 0..n-1 and the tokens n.., as Hugging Face PEFT numbers them; padding gets position -1, which the
/// KV cache never lets anything attend to.</summary>
public sealed record SequenceLayout(long[] Ids, long[] Positions, int Rows, int Length, int[] VirtualStart)
{
    public static SequenceLayout Build(IReadOnlyList<int[]> prompts, IReadOnlyList<int> virtualTokens)
    {
        int rows = prompts.Count, length = prompts.Select((p, r) => p.Length + virtualTokens[r]).Max();
        var ids = new long[rows * length];
        var pos = new long[rows * length];
        var virtualStart = new int[rows];
        for (int r = 0; r < rows; r++)
        {
            int n = virtualTokens[r], pad = length - n - prompts[r].Length;
            virtualStart[r] = n > 0 ? pad : -1;
            for (int t = 0; t < length; t++)
            {
                int i = r * length + t;
                ids[i] = t < pad + n ? 0 : prompts[r][t - pad - n];
                pos[i] = t < pad ? -1 : t - pad;
            }
        }
        return new SequenceLayout(ids, pos, rows, length, virtualStart);
    }

    public (Tensor Ids, Tensor Positions) ToTensors(Device device) =>
        (torch.tensor(Ids, [Rows, Length], device: device), torch.tensor(Positions, [Rows, Length], device: device));
}
