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
    public IEnumerable<GeneratedToken> Generate(IReadOnlyList<int[]> prompts, IReadOnlyList<SamplingParams> parameters,
        CancellationToken cancellation = default)
    {
        if (prompts.Count == 0) yield break;
        if (parameters.Count != prompts.Count) throw new ArgumentException("one SamplingParams per prompt is required");
        foreach (var p in parameters) p.Validate();
        if (prompts.Any(p => p.Length == 0)) throw new ArgumentException("every prompt needs at least one token");
        var vocab = model.Config.VocabSize;
        foreach (var id in prompts.SelectMany(p => p))
            if (id < 0 || id >= vocab) throw new ArgumentException($"token id {id} is outside the vocabulary (0..{vocab - 1})");

        int batch = prompts.Count, promptLen = prompts.Max(p => p.Length), maxNew = parameters.Max(p => p.MaxTokens);
        var seeds = parameters.Select(p => p.WithResolvedSeed().Seed!.Value).ToArray();
        var steps = new long[batch];
        var done = new bool[batch];

        using var cache = new KvCache(model.Config, batch, promptLen + maxNew, model.DType, model.Device);
        var (ids, positions) = LeftPad(prompts, promptLen, model.Device);
        try
        {
            for (int step = 0; step < maxNew; step++)
            {
                long[] sampled;
                Tensor nextIds, nextPositions;
                using (var scope = torch.NewDisposeScope())
                {
                    var logits = model.Forward(ids, positions, cache, lastTokenOnly: true)[.., 0, ..];
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

    /// <summary>Prompts right-aligned in a [B,T] block; padding columns get position -1.</summary>
    internal static (Tensor Ids, Tensor Positions) LeftPad(IReadOnlyList<int[]> prompts, int length, Device device)
    {
        var ids = new long[prompts.Count * length];
        var pos = new long[prompts.Count * length];
        for (int r = 0; r < prompts.Count; r++)
        {
            int pad = length - prompts[r].Length;
            for (int t = 0; t < length; t++)
            {
                ids[r * length + t] = t < pad ? 0 : prompts[r][t - pad];
                pos[r * length + t] = t < pad ? -1 : t - pad;
            }
        }
        return (torch.tensor(ids, [prompts.Count, length], device: device),
                torch.tensor(pos, [prompts.Count, length], device: device));
    }
}
