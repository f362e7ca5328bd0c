using System.Text;
using PeftServe.Core.Adapters;
using PeftServe.Core.Generation;
using PeftServe.Core.Tokenization;

namespace PeftServe.Core.Engine;

/// <summary>One request inside the engine. Its columns are the adapter's virtual tokens (if any, at
/// positions 0..V-1) followed by its tokens (the prompt, then what was generated); column c sits at
/// position c. <see cref="Cached"/> columns have keys and values in the KV cache. Every forward pass
/// computes the next uncached columns; the pass that reaches the last column samples a new token.
/// A preempted sequence keeps its tokens and starts again from Cached = 0 (recomputation): the
/// counter-based sampler then draws exactly the tokens it would have drawn.</summary>
internal sealed class Sequence(GenerationRequest request, GenerationStream stream, SamplingParams sampling, string? adapterPath, long order)
{
    public GenerationRequest Request { get; } = request;
    public GenerationStream Stream { get; } = stream;
    public SamplingParams Sampling { get; } = sampling;
    public ulong Seed { get; } = sampling.Seed!.Value;
    public string? AdapterPath { get; } = adapterPath;
    /// <summary>Arrival order: the newest running sequence is the one preempted.</summary>
    public long Order { get; } = order;

    public ResidentAdapter? Adapter { get; set; }
    public bool AdapterAsked { get; set; }
    public List<int> Tokens { get; } = [.. request.PromptIds];
    public int PromptLength { get; } = request.PromptIds.Count;
    public int Generated => Tokens.Count - PromptLength;
    public int Virtual => Adapter?.VirtualTokens ?? 0;
    public int Columns => Virtual + Tokens.Count;
    public int Cached { get; set; }
    public List<int> Blocks { get; } = [];
    /// <summary>This sequence's row in the device penalty-count table, or -1 (see <see cref="PenaltyCounts"/>).</summary>
    public int PenaltyRow { get; set; } = -1;
    /// <summary>Set when a pass this sequence was in failed: it then runs alone until a pass succeeds (and is
    /// failed if its lone pass fails), so one request's failure never ends the others.</summary>
    public bool Suspect { get; set; }
    /// <summary>Whether repetition, presence or frequency penalties apply to this sequence.</summary>
    public bool UsesPenalties => Sampling.PresencePenalty != 0 || Sampling.FrequencyPenalty != 0 || Sampling.RepetitionPenalty != 1;
    public volatile bool CancelRequested;
    public CancellationTokenRegistration Registration { get; set; }
    public DateTime Arrived { get; } = DateTime.UtcNow;
    public bool Finished { get; private set; }

    /// <summary>Per prompt token, its log probabilities as the prefill computed them (when asked; recomputation after a
    /// preemption writes the same again).</summary>
    public TokenLogprob?[]? PromptLogprobs { get; } = sampling.PromptLogprobs is null ? null : new TokenLogprob?[request.PromptIds.Count];

    /// <summary>Columns a forward pass still has to compute before the next token can be sampled.</summary>
    public int Remaining => Columns - Cached;
    public bool InPrefill => Remaining > 1 || Generated == 0;

    /// <summary>Guided JSON's recognizer (null without it).</summary>
    public JsonConstraint? Json { get; set; }

    private StreamingDecoder? _decoder;
    private readonly StringBuilder _held = new();

    public void AttachTokenizer(Tokenizer? tokenizer) => _decoder = tokenizer?.CreateStreamingDecoder();

    /// <summary>Takes a sampled token and streams it. Returns true when the sequence is finished.</summary>
    public bool Accept(int token, int maxColumns, TokenLogprob? logprob = null)
    {
        Tokens.Add(token);
        Json?.Advance(token);
        int index = Generated - 1;
        if (index == 0 && PromptLogprobs is not null) Stream.PromptLogprobs = PromptLogprobs;
        bool stopToken = Sampling.StopTokenIds.Contains(token);
        var piece = stopToken || _decoder is null ? "" : _decoder.Push(token);
        _held.Append(piece);
        FinishReason? finish = stopToken ? FinishReason.Stop
            : Generated >= Sampling.MaxTokens || Columns >= maxColumns ? FinishReason.Length
            : null;
        if (finish is not null && !stopToken && _decoder is not null) _held.Append(_decoder.Flush());
        // A stop string ends the text where it starts; text that may still become one is held back.
        var text = _held.ToString();
        int stopAt = FirstStop(text);
        if (stopAt >= 0)
        {
            Emit(new GenerationEvent(token, text[..stopAt], index, FinishReason.Stop, logprob));
            return true;
        }
        int release = finish is null ? text.Length - HeldSuffix(text) : text.Length;
        _held.Remove(0, release);
        Emit(new GenerationEvent(token, text[..release], index, finish, logprob));
        return finish is not null;
    }

    public void Cancel() => Emit(new GenerationEvent(-1, "", Generated, FinishReason.Cancelled));

    public void Fail(Exception error)
    {
        if (Finished) return;
        Finished = true;
        Registration.Dispose();
        Stream.Fail(error);
    }

    private void Emit(GenerationEvent e)
    {
        if (Finished) return;
        if (e.Finish is not null)
        {
            Finished = true;
            Registration.Dispose();
        }
        Stream.Write(e);
    }

    private int FirstStop(string text)
    {
        int best = -1;
        foreach (var s in Request.StopStrings)
        {
            if (s.Length == 0) continue;
            int i = text.IndexOf(s, StringComparison.Ordinal);
            if (i >= 0 && (best < 0 || i < best)) best = i;
        }
        return best;
    }

    /// <summary>Length of the longest suffix of <paramref name="text"/> that begins some stop string.</summary>
    private int HeldSuffix(string text)
    {
        int held = 0;
        foreach (var s in Request.StopStrings)
            for (int n = Math.Min(s.Length - 1, text.Length); n > held; n--)
                if (text.AsSpan(text.Length - n).SequenceEqual(s.AsSpan(0, n))) { held = n; break; }
        return held;
    }
}
