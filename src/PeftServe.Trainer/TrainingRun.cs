using System.Diagnostics;
using System.Text.Json;
using PeftServe.Core.Adapters.Training;
using PeftServe.Core.Model;
using PeftServe.Core.Quantization;
using PeftServe.Core.Runtime;
using PeftServe.Core.SafeTensors;
using PeftServe.Core.Tokenization;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Trainer;

/// <summary>Everything <c>train</c> is told (the method's own options are in <see cref="Method"/>).</summary>
public sealed record TrainerOptions
{
    public required string MethodName { get; init; }
    public TrainingOptions Method { get; init; } = new();
    /// <summary>Model folder; null = the built-in default model.</summary>
    public string? ModelDir { get; init; }
    public required string DataPath { get; init; }
    public required string OutputDir { get; init; }
    public int MaxSteps { get; init; } = 100;
    /// <summary>Peak learning rate; null = the method's default.</summary>
    public double? LearningRate { get; init; }
    public int BatchSize { get; init; } = 4;
    public int GradientAccumulation { get; init; } = 1;
    public int MaxLength { get; init; } = 128;
    /// <summary>Pack examples end to end into blocks of MaxLength instead of padding each.</summary>
    public bool Packing { get; init; }
    public double ValidationFraction { get; init; } = 0.1;
    /// <summary>Validation loss every N steps (0 = only at the end).</summary>
    public int EvalEvery { get; init; } = 20;
    /// <summary>Checkpoint every N steps (0 = never; a final checkpoint is always written).</summary>
    public int SaveEvery { get; init; } = 50;
    /// <summary>Warmup steps; null = 10% of MaxSteps.</summary>
    public int? WarmupSteps { get; init; }
    public string Schedule { get; init; } = "cosine";
    public double MaxGradNorm { get; init; } = 1.0;
    public double WeightDecay { get; init; }
    public string Device { get; init; } = "cpu";
    /// <summary>Compute dtype; null = float32 on CPU, bfloat16 on CUDA (parameters stay float32).</summary>
    public string? DType { get; init; }
    public int Seed { get; init; } = 42;
    /// <summary>Continue from the latest checkpoint under OutputDir/checkpoints.</summary>
    public bool Resume { get; init; }
    /// <summary>Write loss.png beside the adapter.</summary>
    public bool Plot { get; init; } = true;
    /// <summary>Recompute each decoder layer in backward instead of keeping its activations (same
    /// losses and gradients; about a third more compute; activation memory of one layer instead of all).</summary>
    public bool GradientCheckpointing { get; init; }
    /// <summary>Random weights of the shape in ModelDir's config.json instead of a checkpoint (for
    /// measurements at real sizes); the tokenizer is the folder's, or the built-in model's if it has none.</summary>
    public bool RandomWeights { get; init; }
    /// <summary>Loss tokens whose logits are computed at once (null: about 64 MiB of float32 logits per chunk).</summary>
    public int? LossChunkTokens { get; init; }
}

/// <summary>One optimizer step: loss, learning rate, gradient norm before clipping, throughput, and
/// <paramref name="MemoryBytes"/> in use after the step (<see cref="DeviceMemory.UsedBytes"/>: device
/// used memory on CUDA, the process's working set on CPU).</summary>
public sealed record StepInfo(int Step, int MaxSteps, double Loss, double LearningRate, double GradNorm, double TokensPerSecond, int Tokens, long MemoryBytes = 0);
public sealed record EvalInfo(int Step, double Loss, double Perplexity);

/// <summary>What a training run reports as it goes (the console shows a progress bar; tests listen).</summary>
public interface ITrainingObserver
{
    void OnStart(TrainingRun run, int firstStep) { }
    void OnStep(StepInfo step) { }
    void OnEval(EvalInfo eval) { }
    void OnMessage(string message) { }
}

/// <summary>A training run: the frozen model, the adapter being trained, the data and the optimizer.
/// <see cref="Train"/> runs the steps; <see cref="Logits"/> evaluates the trained adapter in memory.</summary>
public sealed class TrainingRun : IDisposable
{
    private static readonly object GlobalGeneratorLock = new();
    private readonly bool _ownsModel;
    private readonly Dictionary<int, int[]> _epochOrders = [];

    public TrainerOptions Options { get; }
    public ITrainingMethod Method { get; }
    public LlamaModel Model { get; }
    public Tokenizer Tokenizer { get; }
    public TrainableAdapter Adapter { get; }
    public AdamW Optimizer { get; }
    public LrSchedule Schedule { get; }
    public List<Example> TrainSet { get; }
    public List<Example> ValidationSet { get; }
    public List<StepInfo> History { get; } = [];
    public List<EvalInfo> Evaluations { get; } = [];
    /// <summary>The last step done (0 before training).</summary>
    public int Step { get; private set; }
    public string ModelDir { get; }
    /// <summary>Where the tokenizer came from (ModelDir, or the built-in model's folder for a shape-only --random-weights folder).</summary>
    public string TokenizerDir { get; }
    /// <summary>The most memory in use after any step so far (<see cref="StepInfo.MemoryBytes"/>).</summary>
    public long PeakMemoryBytes { get; private set; }

    /// <summary>Peak learning rates that train each method well from scratch in a few hundred steps.</summary>
    public static double DefaultLearningRate(string method) => method switch
    {
        "prompt" or "prefix" or "ptuning" or "ia3" or "llama-adapter" => 1e-2,
        "bitfit" => 3e-3,
        _ => 1e-3,
    };

    /// <summary>Loads everything. <paramref name="model"/> shares an already loaded base (not disposed here);
    /// it must match what the method needs (NF4 for qlora).</summary>
    public TrainingRun(TrainerOptions options, LlamaModel? model = null)
    {
        Options = options;
        Method = TrainingMethods.Get(options.MethodName);
        if ((options.Method.UseDora || options.Method.ModulesToSave.Count > 0) && Method is not Core.Adapters.Lora.LoraTrainingMethod)
            throw new ArgumentException($"--use-dora and --modules-to-save apply to lora and qlora, not {Method.Name}");
        if (options.MaxSteps < 1) throw new ArgumentException("--max-steps must be at least 1");
        if (options.BatchSize < 1) throw new ArgumentException("--batch-size must be at least 1");
        if (options.GradientAccumulation < 1) throw new ArgumentException("--grad-accum must be at least 1");
        if (options.MaxLength < 2) throw new ArgumentException("--max-length must be at least 2");
        if (options.LossChunkTokens is < 1) throw new ArgumentException("the loss chunk must hold at least one token");
        var (dir, _) = DefaultModel.Resolve(options.ModelDir);
        ModelDir = dir;
        if (!Directory.Exists(dir)) throw new ModelLoadException($"--model {dir}: no such folder");
        // A shape folder for --random-weights may hold only config.json: any tokenizer then does.
        TokenizerDir = options.RandomWeights && !File.Exists(Path.Combine(dir, "tokenizer.json")) ? DefaultModel.Directory : dir;
        Tokenizer = Tokenizer.FromDirectory(TokenizerDir);

        var all = TrainingData.Load(options.DataPath, Tokenizer, options.MaxLength);
        var (train, val) = TrainingData.Split(all, options.ValidationFraction, options.Seed);
        TrainSet = options.Packing ? TrainingData.Pack(train, options.MaxLength) : train;
        ValidationSet = options.Packing ? TrainingData.Pack(val, options.MaxLength) : val;
        if (TrainSet.Count == 0) throw new InvalidDataException($"{options.DataPath}: no training examples after the validation split");

        if (model is null)
        {
            var device = DeviceSelection.ParseDevice(options.Device);
            var modelOptions = new ModelOptions
            {
                Device = device,
                DType = DeviceSelection.ParseDType(options.DType, device),
                Quantization = Method.QuantizedBase ? QuantizationMode.Nf4 : QuantizationMode.None,
            };
            if (options.RandomWeights)
                lock (GlobalGeneratorLock) Model = LlamaModel.CreateRandom(ModelConfig.Load(dir), modelOptions, options.Seed);
            else Model = LlamaModel.Load(dir, modelOptions);
            _ownsModel = true;
        }
        else Model = model;
        if (TokenizerDir != dir && Tokenizer.VocabSize > Model.Config.VocabSize)
            throw new ArgumentException($"--random-weights: {dir} has no tokenizer.json and the built-in one has {Tokenizer.VocabSize} tokens, more than the shape's vocabulary of {Model.Config.VocabSize}");
        if (Method.QuantizedBase && Model.DecoderLinearFormat.StartsWith("NF4", StringComparison.Ordinal) is false)
            throw new ArgumentException("qlora trains on an NF4-quantized base; the given model is not quantized");

        var baseName = options.ModelDir is null ? "peftserve-default-tiny-llama" : Path.GetFileName(dir.TrimEnd('/'));
        // The methods initialise from torch's global generator: seeded and drawn under one lock, so that
        // runs made at the same time on other threads (tests) cannot interleave their draws.
        lock (GlobalGeneratorLock)
        {
            torch.manual_seed(options.Seed);
            Adapter = Method.Create(Model, options.Method with { Tokenizer = Tokenizer, BaseModelName = options.Method.BaseModelName is "" ? baseName : options.Method.BaseModelName });
        }
        // Past a sliding window, full attention (ours) and the model's windowed attention differ: refuse, as serving caps there.
        if (Model.Config.SlidingWindow is { } window && options.MaxLength + Adapter.VirtualTokens > window)
        {
            Adapter.Dispose();
            if (_ownsModel) Model.Dispose();
            throw new ArgumentException($"--max-length {options.MaxLength}{(Adapter.VirtualTokens > 0 ? $" plus {Adapter.VirtualTokens} virtual tokens" : "")} " +
                                        $"exceeds the model's sliding attention window of {window} positions");
        }
        Optimizer = new AdamW(Adapter.Parameters) { WeightDecay = options.WeightDecay };
        int warmup = options.WarmupSteps ?? options.MaxSteps / 10;
        Schedule = new LrSchedule(options.LearningRate ?? DefaultLearningRate(Method.Name), warmup, options.MaxSteps, options.Schedule);
        Schedule.At(1); // validates the kind
    }


    public string CheckpointsDir => Path.Combine(Options.OutputDir, "checkpoints");

    /// <summary>Trainable parameters and their share of the base model's.</summary>
    public (long Trainable, long Total, double Percent) ParameterShare
    {
        get
        {
            long p = Adapter.ParameterCount, total = Model.TotalParameters;
            return (p, total, 100.0 * p / total);
        }
    }

    /// <summary>Runs steps Step+1..MaxSteps (resuming first when asked), then writes the adapter, the
    /// final checkpoint, the log and the plot.</summary>
    public void Train(ITrainingObserver? observer = null)
    {
        observer ??= new NullObserver();
        if (Options.Resume) ResumeFromLatest(observer);
        observer.OnStart(this, Step + 1);
        while (Step < Options.MaxSteps)
        {
            var info = TrainStep(Step + 1);
            Step++;
            History.Add(info);
            observer.OnStep(info);
            if (Options.EvalEvery > 0 && Step % Options.EvalEvery == 0 && Step < Options.MaxSteps && ValidationSet.Count > 0)
                Evaluate(observer);
            if (Options.SaveEvery > 0 && Step % Options.SaveEvery == 0 && Step < Options.MaxSteps) SaveCheckpoint();
        }
        if (ValidationSet.Count > 0 && (Evaluations.Count == 0 || Evaluations[^1].Step != Step)) Evaluate(observer);
        SaveCheckpoint();
        SaveAdapter(Options.OutputDir);
        WriteLog();
        if (Options.Plot)
        {
            try { LossPlot.Write(Path.Combine(Options.OutputDir, "loss.png"), History, Evaluations, $"{Method.Name} on {Path.GetFileName(ModelDir.TrimEnd('/'))}"); }
            catch (Exception e) when (e is not OutOfMemoryException) { observer.OnMessage($"warning: loss plot not written: {e.Message}"); }
        }
    }

    /// <summary>One optimizer step over GradientAccumulation micro-batches.</summary>
    public StepInfo TrainStep(int step)
    {
        var watch = Stopwatch.StartNew();
        Adapter.Training = true;
        Optimizer.ZeroGrad();
        long first = (long)(step - 1) * Options.GradientAccumulation;
        var micro = Enumerable.Range(0, Options.GradientAccumulation).Select(i => MicroBatch(first + i)).ToArray();
        int lossTokens = micro.Sum(m => m.Sum(e => e.LossTokens));
        int tokens = micro.Sum(m => m.Sum(e => e.Ids.Length));
        double lossSum = 0;
        for (int i = 0; i < micro.Length; i++)
        {
            using var scope = torch.NewDisposeScope();
            // Random draws (dropout, AdaMix routing) are seeded per micro-batch, so a resumed run and a
            // layer recomputed in backward draw the same.
            Adapter.ForwardSeed = Seeds.Mix(Options.Seed, first + i, 1);
            Tensor sum;
            // The forward pass's own tensors are released before backward starts: autograd then holds
            // the only references to the activations, and frees each as backward passes it.
            using (var forward = torch.NewDisposeScope()) sum = LossSum(micro[i]).Sum.MoveToOuterDisposeScope();
            (sum / lossTokens).backward();
            lossSum += sum.item<float>();
        }
        double norm = Optimizer.ClipGradients(Options.MaxGradNorm);
        double lr = Schedule.At(step);
        Optimizer.Update(lr);
        double seconds = Math.Max(watch.Elapsed.TotalSeconds, 1e-9);
        long memory = DeviceMemory.UsedBytes(Model.Device);
        PeakMemoryBytes = Math.Max(PeakMemoryBytes, memory);
        return new StepInfo(step, Options.MaxSteps, lossSum / lossTokens, lr, norm, tokens / seconds, tokens, memory);
    }

    /// <summary>Micro-batch number <paramref name="index"/> of an endless stream of seeded epochs.</summary>
    private Example[] MicroBatch(long index)
    {
        int perEpoch = (TrainSet.Count + Options.BatchSize - 1) / Options.BatchSize;
        int epoch = (int)(index / perEpoch), j = (int)(index % perEpoch);
        if (!_epochOrders.TryGetValue(epoch, out var order))
        {
            order = Enumerable.Range(0, TrainSet.Count).ToArray();
            new Random(Seeds.Mix(Options.Seed, epoch, 2)).Shuffle(order);
            _epochOrders[epoch] = order;
        }
        return order.Skip(j * Options.BatchSize).Take(Options.BatchSize).Select(i => TrainSet[i]).ToArray();
    }

    /// <summary>Summed cross-entropy over the batch's loss tokens (float32) and their count; records
    /// autograd when grad mode is on. Only the loss tokens' hidden states go through the LM head, in
    /// chunks (<see cref="LlamaModel.LmHeadLossSum"/>): the logits of the whole batch never exist at once.</summary>
    private (Tensor Sum, int Count) LossSum(IReadOnlyList<Example> batch)
    {
        int n = Adapter.VirtualTokens, t = batch.Max(e => e.Ids.Length), b = batch.Count;
        var ids = new long[b * (n + t)];
        var pos = new long[b * (n + t)];
        var rows = new List<long>();    // flat [B*(n+t)] index of the column that predicts each loss token
        var targets = new List<long>();
        for (int r = 0; r < b; r++)
        {
            var e = batch[r];
            for (int c = 0; c < n + t; c++)
            {
                int j = c - n;
                bool real = j < e.Ids.Length;
                ids[r * (n + t) + c] = j >= 0 && real ? e.Ids[j] : 0;
                pos[r * (n + t) + c] = real ? c : -1;
            }
            for (int j = 1; j < e.Ids.Length; j++)
                if (e.Loss[j])
                {
                    rows.Add((long)r * (n + t) + n + j - 1);
                    targets.Add(e.Ids[j]);
                }
        }
        var dev = Model.Device;
        var hidden = Model.FinalHiddenStates(torch.tensor(ids, [b, n + t], device: dev), torch.tensor(pos, [b, n + t], device: dev),
            Adapter, checkpointLayers: Options.GradientCheckpointing && torch.is_grad_enabled());
        var picked = hidden.reshape(-1, hidden.shape[^1]).index_select(0, torch.tensor(rows.ToArray(), device: dev));
        var sum = Model.LmHeadLossSum(picked, torch.tensor(targets.ToArray(), device: dev), LossChunkRows, Adapter.LmHead(picked));
        return (sum, targets.Count);
    }

    private int LossChunkRows => Options.LossChunkTokens ?? Model.DefaultLossChunkRows;

    /// <summary>Mean validation loss and perplexity with the adapter as served (AdaMix averaged).</summary>
    public EvalInfo Evaluate(ITrainingObserver? observer = null)
    {
        double loss = MeanLoss(ValidationSet);
        var info = new EvalInfo(Step, loss, Math.Exp(loss));
        Evaluations.Add(info);
        observer?.OnEval(info);
        return info;
    }

    /// <summary>Mean loss per loss token over <paramref name="examples"/>, in evaluation mode (no autograd).</summary>
    public double MeanLoss(IReadOnlyList<Example> examples)
    {
        Adapter.Training = false;
        double sum = 0;
        int count = 0;
        using (torch.no_grad())
            for (int i = 0; i < examples.Count; i += Options.BatchSize)
            {
                using var scope = torch.NewDisposeScope();
                var (s, c) = LossSum(examples.Skip(i).Take(Options.BatchSize).ToList());
                sum += s.item<float>();
                count += c;
            }
        Adapter.Training = true;
        return count == 0 ? double.NaN : sum / count;
    }

    /// <summary>Logits [B,T,V] (float32, CPU) of equal-length rows <paramref name="inputIds"/> [B,T] with the
    /// trained adapter as it stands in memory (evaluation mode), virtual columns cut off.</summary>
    public Tensor Logits(Tensor inputIds)
    {
        using var scope = torch.NewDisposeScope();
        using var _ = torch.no_grad();
        Adapter.Training = false;
        int n = Adapter.VirtualTokens;
        long b = inputIds.shape[0], t = inputIds.shape[1];
        var ids = torch.cat([torch.zeros([b, n], ScalarType.Int64), inputIds.cpu().to(ScalarType.Int64)], 1).to(Model.Device);
        var pos = torch.arange(n + t, dtype: ScalarType.Int64).unsqueeze(0).expand(b, n + t).contiguous().to(Model.Device);
        var logits = Model.Forward(ids, pos, new ChunkKvCache(), adapters: Adapter);
        Adapter.Training = true;
        return logits[.., n.., ..].to(ScalarType.Float32).cpu().MoveToOuterDisposeScope();
    }

    public void SaveAdapter(string dir)
    {
        Directory.CreateDirectory(dir);
        Adapter.Training = false;
        Adapter.Save(dir);
        Adapter.Training = true;
    }

    // ---- checkpoints ----

    private sealed record CheckpointState(int Step, string Method, int Seed, List<StepInfo> History, List<EvalInfo> Evaluations);

    public string SaveCheckpoint()
    {
        using var scope = torch.NewDisposeScope();
        var dir = Path.Combine(CheckpointsDir, $"step-{Step:D6}");
        Directory.CreateDirectory(dir);
        using (torch.no_grad())
        {
            var tensors = Adapter.Parameters.Select(p => new KeyValuePair<string, Tensor>("param." + p.Name, p.Value.detach().cpu()))
                .Concat(Optimizer.State().Select(s => new KeyValuePair<string, Tensor>(s.Key, s.Value.cpu()))).ToList();
            SafeTensorsWriter.Write(Path.Combine(dir, "state.safetensors"), tensors);
        }
        File.WriteAllText(Path.Combine(dir, "trainer_state.json"),
            JsonSerializer.Serialize(new CheckpointState(Step, Method.Name, Options.Seed, History, Evaluations), new JsonSerializerOptions { WriteIndented = true }));
        return dir;
    }

    private void ResumeFromLatest(ITrainingObserver observer)
    {
        var latest = Directory.Exists(CheckpointsDir)
            ? Directory.GetDirectories(CheckpointsDir, "step-*").Where(d => File.Exists(Path.Combine(d, "trainer_state.json"))).Order(StringComparer.Ordinal).LastOrDefault()
            : null;
        if (latest is null) { observer.OnMessage($"--resume: no checkpoint under {CheckpointsDir}; starting from step 1"); return; }
        var state = JsonSerializer.Deserialize<CheckpointState>(File.ReadAllText(Path.Combine(latest, "trainer_state.json")))
            ?? throw new InvalidDataException($"{latest}: unreadable trainer_state.json");
        if (state.Method != Method.Name) throw new ArgumentException($"--resume: {latest} was trained with --method {state.Method}, not {Method.Name}");
        using var file = SafeTensorsFile.Open(Path.Combine(latest, "state.safetensors"));
        var tensors = file.Tensors.ToDictionary(t => t.Name, t => file.ToTensor(t.Name, Model.Device));
        try
        {
            Adapter.LoadParameters(tensors.Where(kv => kv.Key.StartsWith("param.", StringComparison.Ordinal)).ToDictionary(kv => kv.Key["param.".Length..], kv => kv.Value));
            Optimizer.LoadState(tensors, state.Step);
        }
        finally { foreach (var t in tensors.Values) t.Dispose(); }
        Step = state.Step;
        History.Clear();
        History.AddRange(state.History);
        Evaluations.Clear();
        Evaluations.AddRange(state.Evaluations);
        observer.OnMessage($"resumed from {latest} (step {Step})");
    }

    private void WriteLog()
    {
        var share = ParameterShare;
        var log = new
        {
            method = Method.Name,
            model = Options.ModelDir is null ? "(built-in default model)" : ModelDir,
            steps = Step,
            trainable_parameters = share.Trainable,
            model_parameters = share.Total,
            trainable_percent = share.Percent,
            train_examples = TrainSet.Count,
            validation_examples = ValidationSet.Count,
            device = Model.Device.ToString(),
            dtype = Model.DType.ToString(),
            base_format = Model.DecoderLinearFormat,
            random_weights = Options.RandomWeights,
            gradient_checkpointing = Options.GradientCheckpointing,
            batch_size = Options.BatchSize,
            max_length = Options.MaxLength,
            history = History,
            evaluations = Evaluations,
            // Device used memory after the steps (CUDA: the driver's used memory, as nvidia-smi shows it).
            peak_memory_bytes = PeakMemoryBytes,
            peak_working_set_bytes = Process.GetCurrentProcess().PeakWorkingSet64,
        };
        File.WriteAllText(Path.Combine(Options.OutputDir, "training_log.json"), JsonSerializer.Serialize(log, new JsonSerializerOptions { WriteIndented = true }));
    }

    public void Dispose()
    {
        Optimizer.Dispose();
        Adapter.Dispose();
        if (_ownsModel) Model.Dispose();
    }

    private sealed class NullObserver : ITrainingObserver;
}
