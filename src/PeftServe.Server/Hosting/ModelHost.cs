using Microsoft.Extensions.Options;
using PeftServe.Core.Model;
using PeftServe.Core.Runtime;
using PeftServe.Core.Tokenization;

namespace PeftServe.Server.Hosting;

/// <summary>Owns the base model and its tokenizer for the server's lifetime: loads them at startup
/// (failing the start with a clear reason if the folder is unusable) and frees them at shutdown.</summary>
public sealed class ModelHost(IOptions<ServerOptions> options, ILogger<ModelHost> log) : IHostedService, IDisposable
{
    private LlamaModel? _model;

    public bool IsReady => _model is not null;
    public LlamaModel Model => _model ?? throw new InvalidOperationException("the model is not loaded yet");
    public Tokenizer Tokenizer { get; private set; } = null!;
    public string ModelName { get; private set; } = "";
    public DateTimeOffset LoadedAt { get; private set; }

    public Task StartAsync(CancellationToken cancellationToken)
    {
        var o = options.Value;
        var (dir, isDefault) = DefaultModel.Resolve(o.Model);
        if (isDefault) log.LogWarning("{Notice}", DefaultModel.Notice);
        if (!Directory.Exists(dir)) throw new ModelLoadException($"model folder {dir} does not exist");
        var device = DeviceSelection.ParseDevice(o.Device);
        var dtype = DeviceSelection.ParseDType(o.DType, device);
        var started = System.Diagnostics.Stopwatch.StartNew();
        Tokenizer = Tokenizer.FromDirectory(dir);
        _model = LlamaModel.Load(dir, new ModelOptions { Device = device, DType = dtype });
        ModelName = !string.IsNullOrWhiteSpace(o.ModelName) ? o.ModelName : isDefault ? "tiny-llama" : Path.GetFileName(dir.TrimEnd('/'));
        LoadedAt = DateTimeOffset.UtcNow;
        var c = _model.Config;
        log.LogInformation(
            "Loaded {Model} ({Architecture}: {Layers} layers, hidden {Hidden}, vocab {Vocab}) on {Device} as {DType}: {WeightMiB:F1} MiB of weights in {Seconds:F1} s",
            ModelName, c.Architecture, c.NumLayers, c.HiddenSize, c.VocabSize, device, dtype, _model.WeightBytes / 1048576.0, started.Elapsed.TotalSeconds);
        return Task.CompletedTask;
    }

    public Task StopAsync(CancellationToken cancellationToken) => Task.CompletedTask;

    public void Dispose() => _model?.Dispose();
}
