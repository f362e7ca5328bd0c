using System.Runtime.CompilerServices;
using System.Threading.Channels;
using PeftServe.Core.Generation;

namespace PeftServe.Core.Engine;

/// <summary>The tokens of one request as the engine produces them. Enumerate it once (await foreach);
/// the engine writes into an unbounded channel, so a slow reader never stalls the batch. When the
/// request fails (an adapter that cannot be loaded, say) the enumeration throws that error.</summary>
public sealed class GenerationStream : IAsyncEnumerable<GenerationEvent>
{
    private readonly Channel<GenerationEvent> _channel =
        Channel.CreateUnbounded<GenerationEvent>(new UnboundedChannelOptions { SingleReader = true, SingleWriter = true });
    private readonly TaskCompletionSource _done = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private int _completionTokens;

    internal GenerationStream(string id, int promptTokens)
    {
        Id = id;
        PromptTokens = promptTokens;
    }

    public string Id { get; }
    public int PromptTokens { get; }
    /// <summary>Tokens generated so far (the final count once <see cref="Completion"/> is done).</summary>
    public int CompletionTokens => Volatile.Read(ref _completionTokens);
    /// <summary>With <see cref="SamplingParams.PromptLogprobs"/>: one entry per prompt token (null for the first),
    /// set before the first generated token is written.</summary>
    public IReadOnlyList<TokenLogprob?>? PromptLogprobs { get; internal set; }
    /// <summary>Set when the request ends.</summary>
    public FinishReason? FinishReason { get; private set; }
    /// <summary>Completes when the request ends (faulted when it failed).</summary>
    public Task Completion => _done.Task;

    public async IAsyncEnumerator<GenerationEvent> GetAsyncEnumerator(CancellationToken cancellationToken = default)
    {
        await foreach (var e in _channel.Reader.ReadAllAsync(cancellationToken).ConfigureAwait(false))
            yield return e;
        await Completion.ConfigureAwait(false); // rethrows a failure
    }

    /// <summary>Reads the whole stream: the ids, the text and the finish reason.</summary>
    public async Task<(IReadOnlyList<int> Ids, string Text, FinishReason Finish)> CollectAsync(CancellationToken cancellationToken = default)
    {
        var ids = new List<int>();
        var text = new System.Text.StringBuilder();
        FinishReason finish = Generation.FinishReason.Length;
        await foreach (var e in WithCancellation(cancellationToken))
        {
            if (e.TokenId >= 0) ids.Add(e.TokenId);
            text.Append(e.Text);
            if (e.Finish is { } f) finish = f;
        }
        return (ids, text.ToString(), finish);
    }

    private ConfiguredCancelableAsyncEnumerable<GenerationEvent> WithCancellation(CancellationToken token) =>
        ((IAsyncEnumerable<GenerationEvent>)this).WithCancellation(token).ConfigureAwait(false);

    internal void Write(GenerationEvent e)
    {
        if (e.TokenId >= 0) Interlocked.Increment(ref _completionTokens);
        if (e.Finish is { } f) FinishReason = f;
        _channel.Writer.TryWrite(e);
        if (e.Finish is not null)
        {
            _channel.Writer.TryComplete();
            _done.TrySetResult();
        }
    }

    internal void Fail(Exception error)
    {
        _channel.Writer.TryComplete();
        _done.TrySetException(error);
    }
}
