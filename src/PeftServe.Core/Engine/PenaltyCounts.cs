using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Engine;

/// <summary>How often each token was generated so far, per running sequence that uses presence or
/// frequency penalties, kept on the device and updated there from each step's sampled ids: nothing is
/// rebuilt from the host token lists per step. A sequence takes a row of the table when it first samples
/// (filled once from what it generated before, if it was preempted and recomputed) and gives it back
/// when it stops running.</summary>
internal sealed class PenaltyCounts(int capacity, int vocab, Device device) : IDisposable
{
    private Tensor? _counts;   // [capacity + 2, V] float32: the rows, then a sink row (writes of rows without one) and a zero row
    private Tensor? _prompt;   // [capacity + 2, V] uint8: 1 where the token is in the row's prompt (repetition penalty only)
    private readonly Stack<int> _free = new(Enumerable.Range(0, capacity).Reverse());
    private int Sink => capacity;
    private int Zero => capacity + 1;

    /// <summary>Gives <paramref name="s"/> a row holding the counts of the tokens it generated so far.</summary>
    public void Acquire(Sequence s)
    {
        if (s.PenaltyRow >= 0) return;
        if (!_free.TryPop(out int row)) throw new InvalidOperationException("no penalty-count row is free");
        // The tables outlive this call: made before its dispose scope.
        _counts ??= torch.zeros([capacity + 2, vocab], ScalarType.Float32, device);
        if (s.Sampling.RepetitionPenalty != 1f) _prompt ??= torch.zeros([capacity + 2, vocab], ScalarType.Byte, device);
        using var scope = torch.NewDisposeScope();
        _counts[row].zero_();
        if (s.Generated > 0)
        {
            var ids = s.Tokens.Skip(s.PromptLength).Select(t => (long)t).ToArray();
            _counts[row].index_put_(torch.ones(ids.Length, ScalarType.Float32, device), [torch.tensor(ids, device: device)], accumulate: true);
        }
        if (_prompt is not null) _prompt[row].zero_();
        if (s.Sampling.RepetitionPenalty != 1f)
        {
            var ids = s.Tokens.Take(s.PromptLength).Select(t => (long)t).ToArray();
            _prompt![row].index_fill_(0, torch.tensor(ids, device: device), 1);
        }
        s.PenaltyRow = row;
    }

    public void Release(Sequence s)
    {
        if (s.PenaltyRow < 0) return;
        _free.Push(s.PenaltyRow);
        s.PenaltyRow = -1;
    }

    /// <summary>The rows' device indices into the table for one step (uploaded before the forward): where to
    /// read their counts, and where to record their sampled tokens. Null when no row uses penalties.</summary>
    public (Tensor Read, Tensor Write)? Indices(IReadOnlyList<Sequence> rows)
    {
        if (!rows.Any(r => r.PenaltyRow >= 0)) return null;
        var read = rows.Select(r => (long)(r.PenaltyRow >= 0 ? r.PenaltyRow : Zero)).ToArray();
        var write = rows.Select(r => (long)(r.PenaltyRow >= 0 ? r.PenaltyRow : Sink)).ToArray();
        return (torch.tensor(read, device: device), torch.tensor(write, device: device));
    }

    /// <summary>[B, V] counts of the rows (zeros for rows without penalties), and [B, V] prompt-token marks when some
    /// row uses a repetition penalty (else null).</summary>
    public (Tensor Counts, Tensor? Prompt) Read(Tensor readIndex) => (_counts!.index_select(0, readIndex), _prompt?.index_select(0, readIndex));

    /// <summary>Adds the step's sampled ids [B] to the rows' counts, on the device.</summary>
    public void Record(Tensor writeIndex, Tensor sampled) =>
        _counts!.index_put_(torch.ones(sampled.shape[0], ScalarType.Float32, device), [writeIndex, sampled], accumulate: true);

    public void Dispose()
    {
        _counts?.Dispose();
        _prompt?.Dispose();
    }
}
