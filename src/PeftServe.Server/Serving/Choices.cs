using System.Runtime.CompilerServices;
using System.Threading.Channels;
using PeftServe.Core.Engine;
using PeftServe.Core.Generation;
using PeftServe.Server.Api;

namespace PeftServe.Server.Serving;

/// <summary>The choices of one OpenAI request: n engine requests for each of its prompts (choice p * n + i is
/// prompt p's i-th), started together and cancelled together. With a seed, a prompt's choice i samples with
/// seed + i, so the choices differ and each repeats. When the client goes away or one choice fails, the others
/// stop too, and the failure is what the caller sees.</summary>
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

    /// <summary>Choices per prompt.</summary>
    public int PerPrompt { get; private init; } = 1;

    /// <summary>Every prompt counted once.</summary>
    public int PromptTokens => Generations.Where((_, i) => i % PerPrompt == 0).Sum(g => g.PromptTokens);
    public int CompletionTokens => Generations.Sum(g => g.CompletionTokens);

    /// <summary>Starts <see cref="GenerationSettings.N"/> requests per prompt; if one cannot start (a full queue),
    /// those already started are cancelled and the error is thrown.</summary>
    public static Choices Start(GenerationService service, string api, string modelId, GenerationSettings settings,
        IReadOnlyList<IReadOnlyList<int>> prompts, string? adapter, int defaultMaxTokens, CancellationToken aborted)
    {
        // Every prompt is checked (context length) before anything starts.
        var requests = prompts.SelectMany(prompt => Enumerable.Range(0, settings.N).Select(i =>
            service.Build(settings with { Seed = settings.Seed is { } seed ? unchecked(seed + i) : null }, prompt, adapter, defaultMaxTokens))).ToList();
        var cancel = CancellationTokenSource.CreateLinkedTokenSource(aborted);
        var started = new List<Generation>(requests.Count);
        try
        {
            foreach (var request in requests) started.Add(service.Start(api, modelId, request, cancel.Token));
        }
        catch
        {
            cancel.Cancel();
            cancel.Dispose();
            throw;
        }
        return new Choices(started, cancel) { PerPrompt = settings.N };
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
