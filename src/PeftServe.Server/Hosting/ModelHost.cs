using Microsoft.Extensions.Options;
using PeftServe.Core.Adapters;
using PeftServe.Core.Engine;
using PeftServe.Core.Model;
using PeftServe.Core.Quantization;
using PeftServe.Core.Runtime;
using PeftServe.Core.Tokenization;
using PeftServe.Server.Adapters;

namespace PeftServe.Server.Hosting;

/// <summary>Owns the base model, its tokenizer, the serving engine and the adapter store for the
/// server's lifetime: loads them at startup (failing the start with a clear reason if the folder is
/// unusable), stops the engine at shutdown (running requests are cancelled) and frees the model.</summary>
public sealed class ModelHost(IOptions<ServerOptions> options, ILogger<ModelHost> log, ILoggerFactory loggers) : IHostedService, IAsyncDisposable
{
    private LlamaModel? _model;
    private InferenceEngine? _engine;
    private volatile bool _draining;

    public bool IsReady => _engine is not null;
    /// <summary>True from the start of shutdown: new requests are refused (503), running ones finish.</summary>
    public bool Draining => _draining;
    public LlamaModel Model => _model ?? throw new InvalidOperationException("the model is not loaded yet");
    public InferenceEngine Engine => _engine ?? throw new InvalidOperationException("the engine is not started yet");
    public AdapterStore Store { get; private set; } = null!;
    public Tokenizer Tokenizer { get; private set; } = null!;
    public string ModelName { get; private set; } = "";
    public DateTimeOffset LoadedAt { get; private set; }

    /// <summary>The engine's options as the server's configuration describes them.</summary>
    public static EngineOptions EngineOptionsFrom(ServerOptions o) => new()
    {
        MaxBatchSize = o.MaxBatchSize,
        MaxQueueLength = o.MaxQueueLength,
        PrefillChunkTokens = o.PrefillChunkTokens,
        KvBlockSize = o.KvBlockSize,
        KvCacheFraction = o.KvCacheFraction,
        KvCacheMaxBytes = o.KvCacheMaxBytes,
        KvCacheBlocks = o.KvCacheBlocks,
        AdapterStore = Path.GetFullPath(o.AdapterStore),
        HostCacheBytes = o.HostCacheBytes,
        AdapterLimits = new AdapterLimits { SlotsPerMethod = o.SlotsPerMethod, EmbeddingSlots = o.EmbeddingSlots, MaxRank = o.MaxAdapterRank },
        CudaGraphs = o.CudaGraphs,
    };

    public static ModelOptions ModelOptionsFrom(ServerOptions o)
    {
        var device = DeviceSelection.ParseDevice(o.Device);
        var mode = (o.Quantize ?? "none").Trim().ToLowerInvariant() switch
        {
            "none" or "" => QuantizationMode.None,
            "nf4" => QuantizationMode.Nf4,
            var other => throw new ArgumentException($"--quantize must be none or nf4, not '{other}'"),
        };
        if (o.DoubleQuant && mode != QuantizationMode.Nf4) throw new ArgumentException("--double-quant needs --quantize nf4");
        return new ModelOptions { Device = device, DType = DeviceSelection.ParseDType(o.DType, device), Quantization = mode, DoubleQuant = o.DoubleQuant };
    }

    public Task StartAsync(CancellationToken cancellationToken)
    {
        var o = options.Value;
        var (dir, isDefault) = DefaultModel.Resolve(o.Model);
        if (isDefault) log.LogWarning("{Notice}", DefaultModel.Notice);
        if (!Directory.Exists(dir)) throw new ModelLoadException($"model folder {dir} does not exist");
        var modelOptions = ModelOptionsFrom(o);
        var engineOptions = EngineOptionsFrom(o);
        engineOptions.Validate();
        var started = System.Diagnostics.Stopwatch.StartNew();
        Tokenizer = Tokenizer.FromDirectory(dir);
        _model = LlamaModel.Load(dir, modelOptions);
        ModelName = !string.IsNullOrWhiteSpace(o.ModelName) ? o.ModelName : isDefault ? "tiny-llama" : Path.GetFileName(dir.TrimEnd('/'));
        var c = _model.Config;
        log.LogInformation(
            "Loaded {Model} ({Architecture}: {Layers} layers, hidden {Hidden}, vocab {Vocab}) on {Device} as {DType}: {WeightMiB:F1} MiB of weights ({Weights}) in {Seconds:F1} s",
            ModelName, c.Architecture, c.NumLayers, c.HiddenSize, c.VocabSize, modelOptions.Device, modelOptions.DType,
            _model.WeightBytes / 1048576.0, _model.WeightSummary, started.Elapsed.TotalSeconds);
        Store = new AdapterStore(o.AdapterStore, c, engineOptions.AdapterLimits,
            new UploadLimits { MaxBytes = o.MaxUploadBytes, MaxFiles = o.MaxUploadFiles }, loggers.CreateLogger<AdapterStore>());
        if (Store.RemoveLeftovers() is > 0 and var n) log.LogWarning("Removed {Count} unfinished uploads or deletes from {Store}", n, Store.Directory);
        _engine = new InferenceEngine(_model, Tokenizer, engineOptions, loggers.CreateLogger<InferenceEngine>());
        LoadedAt = DateTimeOffset.UtcNow;
        log.LogInformation("Serving {Model} with {Adapters} adapters from {Store}", ModelName, Store.List().Count, Store.Directory);
        return Task.CompletedTask;
    }

    /// <summary>Refuse new requests from now on (see <see cref="ShutdownDrain"/>).</summary>
    public void BeginDrain() => _draining = true;

    public async Task StopAsync(CancellationToken cancellationToken)
    {
        _draining = true;
        if (_engine is { } engine)
        {
            // Running requests get until the host's shutdown timeout to finish, then are cancelled.
            try { await engine.StopAsync(cancellationToken); }
            catch (OperationCanceledException) { }
        }
    }

    public async ValueTask DisposeAsync()
    {
        if (_engine is { } engine)
        {
            _engine = null;
            await engine.DisposeAsync();
        }
        _model?.Dispose();
        _model = null;
    }
}
