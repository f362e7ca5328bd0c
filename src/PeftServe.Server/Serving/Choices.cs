using System.Runtime.CompilerServices;
using System.Threading.Channels;
using PeftServe.Core.Engine;
using PeftServe.Core.Generation;
using PeftServe.Server.Api;

namespace PeftServe.Server.Serving;

/// <summary>The n choices of one OpenAI request: n engine requests for one prompt, started together and
/// cancelled together. With a seed, choice i samples with seed + i, so the choices differ and each repeats.
/// When the client goes away or one choice fails, the others stop too, and the failure is what the caller sees.</summary>
public sealed class Choices : IDisposable
{
    private readonly CancellationTokenSource _cancel;
    private Exception? _failure;
    private Task? _pumps;   // every choice read to its end (or failed), once ReadAllAsync has started

    private Choices(IReadOnlyList<Generation> generations, CancellationTokenSource cancel)
    {
        Generations = generations;
        _cancel = cancel;
    }

    public IReadOnlyList<Generation> Generations { get; }

    /// <summary>The response's id suffix: the first choice's engine request id.</summary>
    public string Id => Generations[0].Id;

    public int PromptTokens => Generations[0].PromptTokens;
    public int CompletionTokens => Generations.Sum(g => g.CompletionTokens);

    /// <summary>Starts <see cref="GenerationSettings.N"/> requests; if one cannot start (a full queue), those
    /// already started are cancelled and the error is thrown.</summary>
    public static Choices Start(GenerationService service, string api, string modelId, GenerationSettings settings,
        IReadOnlyList<int> prompt, string? adapter, int defaultMaxTokens, CancellationToken aborted)
    {
        var cancel = CancellationTokenSource.CreateLinkedTokenSource(aborted);
        var started = new List<Generation>(settings.N);
        try
        {
            for (int i = 0; i < settings.N; i++)
            {
                var request = service.Build(settings with { Seed = settings.Seed is { } seed ? unchecked(seed + i) : null }, prompt, adapter, defaultMaxTokens);
                started.Add(service.Start(api, modelId, request, cancel.Token));
            }
        }
        catch
        {
            cancel.Cancel();
            cancel.Dispose();
            throw;
        }
        return new Choices(started, cancel);
    }

    /// <summary>Every choice's events as they come, with the choice's index. Read it once.</summary>
    public async IAsyncEnumerable<(int Index, GenerationEvent Event)> ReadAllAsync([EnumeratorCancellation] CancellationToken cancellationToken = default)
    {
        var merged = Channel.CreateUnbounded<(int, GenerationEvent)>(new UnboundedChannelOptions { SingleReader = true });
        _pumps = Task.WhenAll(Generations.Select((g, i) => Pump(g, i, merged.Writer)));
        _ = _pumps.ContinueWith(_ => merged.Writer.TryComplete(Volatile.Read(ref _failure)), TaskScheduler.Default);
        await foreach (var item in merged.Reader.ReadAllAsync(cancellationToken).ConfigureAwait(false))
            yield return item;
    }

    private async Task Pump(Generation generation, int index, ChannelWriter<(int, GenerationEvent)> merged)
    {
        try
        {
            await foreach (var e in generation.WithCancellation(_cancel.Token).ConfigureAwait(false))
                merged.TryWrite((index, e));
        }
        catch (Exception e)
        {
            // The first failure is kept and stops the others; their cancellations are not failures of their own.
            Interlocked.CompareExchange(ref _failure, e, null);
            try { _cancel.Cancel(); }
            catch (ObjectDisposedException) { }
        }
    }

    public void Dispose()
    {
        // Choices never read, or still running when the caller gave up: stop them.
        if (_pumps is not { IsCompleted: true }) _cancel.Cancel();
        _cancel.Dispose();
    }
}
