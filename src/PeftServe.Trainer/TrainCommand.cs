using System.CommandLine;
using PeftServe.Core.Adapters;
using PeftServe.Core.Adapters.Training;
using PeftServe.Core.Model;
using PeftServe.Core.SafeTensors;
using PeftServe.Core.Templates;

namespace PeftServe.Trainer;

/// <summary><c>train</c>: trains an adapter of one method on a frozen base model and writes the adapter
/// folder the server loads (plus loss.png, training_log.json and checkpoints/).</summary>
public static class TrainCommand
{
    /// <summary>The train command; its messages and progress go to <paramref name="error"/> (null: standard error).</summary>
    public static Command Create(TextWriter? error = null)
    {
        var methods = string.Join("|", TrainingMethods.All.Select(m => m.Name));
        var method = new Option<string>("--method")
        {
            Required = true,
            Description = $"{methods}:\n" + string.Join("\n", TrainingMethods.All.Select(m => $"  {m.Name}: {m.Description}")),
        };
        var model = new Option<string?>("--model") { Description = "Hugging Face model folder (config.json, *.safetensors, tokenizer.json); default: the built-in tiny Llama" };
        var data = new Option<string>("--data")
        {
            Required = true,
            Description = "JSONL, one object a line: {\"text\": ...}, {\"prompt\": ..., \"completion\": ...} (loss on the completion) or " +
                          "{\"messages\": [{\"role\", \"content\"}, ...]} (rendered with the model's chat template; loss on assistant turns)",
        };
        var output = new Option<string>("--output") { Required = true, Description = "adapter folder to write (adapter_config.json, adapter_model.safetensors, loss.png, training_log.json, checkpoints/)" };
        var maxSteps = new Option<int>("--max-steps") { Description = "optimizer steps", DefaultValueFactory = _ => 100 };
        var lr = new Option<double?>("--lr") { Description = "peak learning rate (default per method: 1e-3 for lora/qlora/bottleneck/adamix, 3e-3 bitfit, 1e-2 prompt/prefix/ptuning/ia3/llama-adapter)" };
        var batch = new Option<int>("--batch-size") { Description = "examples per micro-batch", DefaultValueFactory = _ => 4 };
        var accum = new Option<int>("--grad-accum") { Description = "micro-batches per optimizer step (gradient accumulation)", DefaultValueFactory = _ => 1 };
        var maxLength = new Option<int>("--max-length") { Description = "tokens per example (longer ones are cut); the block length with --packing", DefaultValueFactory = _ => 128 };
        var packing = new Option<bool>("--packing") { Description = "pack examples end to end into --max-length blocks instead of padding each" };
        var valFraction = new Option<double>("--val-fraction") { Description = "share of examples held out for validation", DefaultValueFactory = _ => 0.1 };
        var evalEvery = new Option<int>("--eval-every") { Description = "validation loss and perplexity every N steps (and at the end)", DefaultValueFactory = _ => 20 };
        var saveEvery = new Option<int>("--save-every") { Description = "checkpoint every N steps under OUTPUT/checkpoints (0: only the final one)", DefaultValueFactory = _ => 50 };
        var resume = new Option<bool>("--resume") { Description = "continue from the latest checkpoint under OUTPUT/checkpoints (same options)" };
        var warmup = new Option<int?>("--warmup-steps") { Description = "linear warmup steps (default 10% of --max-steps)" };
        var schedule = new Option<string>("--schedule") { Description = "decay after warmup: cosine, linear or constant", DefaultValueFactory = _ => "cosine" };
        var clip = new Option<double>("--max-grad-norm") { Description = "clip the gradients' global L2 norm (0: no clipping)", DefaultValueFactory = _ => 1.0 };
        var wd = new Option<double>("--weight-decay") { Description = "AdamW decoupled weight decay", DefaultValueFactory = _ => 0.0 };
        var device = new Option<string>("--device") { Description = "cpu, cuda or cuda:N", DefaultValueFactory = _ => "cpu" };
        var dtype = new Option<string?>("--dtype") { Description = "compute dtype: float32 (CPU default) or bfloat16 (CUDA default; the adapter's parameters stay float32)" };
        var seed = new Option<int>("--seed") { Description = "seed of the init, the data order and AdaMix routing (CPU runs are reproducible)", DefaultValueFactory = _ => 42 };
        var logEvery = new Option<int>("--log-every") { Description = "with redirected output: a log line every N steps", DefaultValueFactory = _ => 10 };
        var noPlot = new Option<bool>("--no-plot") { Description = "do not write loss.png" };
        var upload = new Option<string?>("--upload") { Description = "after training, POST the adapter to a running server's upload endpoint at this URL (API key from PEFTSERVE_API_KEY)" };
        var uploadName = new Option<string?>("--upload-name") { Description = "name to upload under (default: the output folder's name)" };
        var checkpointing = new Option<bool>("--gradient-checkpointing") { Description = "recompute each decoder layer in backward instead of keeping its activations (same losses; far less memory, about a third more compute)" };
        var randomWeights = new Option<bool>("--random-weights") { Description = "random weights of the shape in --model's config.json (no checkpoint needed; for measurements); the tokenizer is the folder's, or the built-in model's if it has none" };
        // Method options.
        var rank = new Option<int>("--rank") { Description = "lora/qlora: rank r", DefaultValueFactory = _ => 8 };
        var alpha = new Option<double?>("--lora-alpha") { Description = "lora/qlora: alpha (scale alpha/r; default 2r)" };
        var loraDropout = new Option<double>("--lora-dropout") { Description = "lora/qlora: dropout on the LoRA inputs while training (saved as lora_dropout; never applied when serving)", DefaultValueFactory = _ => 0.0 };
        var useDora = new Option<bool>("--use-dora") { Description = "lora/qlora: DoRA, a trained magnitude per output of each target (saved as PEFT's use_dora)" };
        var modulesToSave = new Option<string?>("--modules-to-save") { Description = "lora/qlora: comma-separated modules trained whole and saved with the adapter: lm_head, embed_tokens (PEFT's modules_to_save)" };
        var targets = new Option<string>("--lora-targets") { Description = "lora/qlora: comma-separated modules among q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", DefaultValueFactory = _ => "q_proj,v_proj" };
        var virtualTokens = new Option<int>("--num-virtual-tokens") { Description = "prompt/prefix/ptuning: virtual tokens", DefaultValueFactory = _ => 8 };
        var initText = new Option<string?>("--prompt-init-text") { Description = "prompt: initialise from this text's token embeddings (default: random)" };
        var encoderHidden = new Option<int>("--encoder-hidden-size") { Description = "prefix: reparameterization MLP width; ptuning: prompt encoder width", DefaultValueFactory = _ => 64 };
        var encoderType = new Option<string>("--encoder-type") { Description = "ptuning: prompt encoder, mlp or lstm", DefaultValueFactory = _ => "mlp" };
        var noProjection = new Option<bool>("--no-prefix-projection") { Description = "prefix: train the prefixes directly instead of through the MLP" };
        var adapterLen = new Option<int>("--adapter-len") { Description = "llama-adapter: adaption prompt length", DefaultValueFactory = _ => 10 };
        var adapterLayers = new Option<int>("--adapter-layers") { Description = "llama-adapter: top layers with an adaption prompt", DefaultValueFactory = _ => 2 };
        var reduction = new Option<int>("--reduction-factor") { Description = "bottleneck/adamix: bottleneck dimension = hidden / this", DefaultValueFactory = _ => 16 };
        var placement = new Option<string>("--placement") { Description = "bottleneck/adamix: attention, mlp or both", DefaultValueFactory = _ => "both" };
        var nonLinearity = new Option<string>("--non-linearity") { Description = "bottleneck/adamix: relu, gelu, silu or tanh", DefaultValueFactory = _ => "relu" };
        var experts = new Option<int>("--num-experts") { Description = "adamix: experts per module", DefaultValueFactory = _ => 4 };
        var bitfitSubset = new Option<string>("--bitfit-subset") { Description = "bitfit: all (every projection bias) or query-mlp (q_proj and up_proj biases)", DefaultValueFactory = _ => "all" };

        var command = new Command("train", "Train an adapter (LoRA, QLoRA, prefix, prompt, P-tuning, IA3, LLaMA-Adapter, bottleneck, AdaMix, BitFit) on a frozen base model")
        {
            method, model, data, output, maxSteps, lr, batch, accum, maxLength, packing, valFraction, evalEvery, saveEvery, resume,
            warmup, schedule, clip, wd, device, dtype, seed, logEvery, noPlot, upload, uploadName, checkpointing, randomWeights,
            rank, alpha, loraDropout, targets, useDora, modulesToSave, virtualTokens, initText, encoderHidden, encoderType, noProjection, adapterLen, adapterLayers,
            reduction, placement, nonLinearity, experts, bitfitSubset,
        };
        var err = error ?? Console.Error;
        command.SetAction(parse => Run(() =>
        {
            var options = new TrainerOptions
            {
                MethodName = parse.GetValue(method)!,
                ModelDir = parse.GetValue(model),
                DataPath = parse.GetValue(data)!,
                OutputDir = parse.GetValue(output)!,
                MaxSteps = parse.GetValue(maxSteps),
                LearningRate = parse.GetValue(lr),
                BatchSize = parse.GetValue(batch),
                GradientAccumulation = parse.GetValue(accum),
                MaxLength = parse.GetValue(maxLength),
                Packing = parse.GetValue(packing),
                ValidationFraction = parse.GetValue(valFraction),
                EvalEvery = parse.GetValue(evalEvery),
                SaveEvery = parse.GetValue(saveEvery),
                Resume = parse.GetValue(resume),
                WarmupSteps = parse.GetValue(warmup),
                Schedule = parse.GetValue(schedule)!,
                MaxGradNorm = parse.GetValue(clip),
                WeightDecay = parse.GetValue(wd),
                Device = parse.GetValue(device)!,
                DType = parse.GetValue(dtype),
                Seed = parse.GetValue(seed),
                Plot = !parse.GetValue(noPlot),
                GradientCheckpointing = parse.GetValue(checkpointing),
                RandomWeights = parse.GetValue(randomWeights),
                Method = new TrainingOptions
                {
                    Rank = parse.GetValue(rank),
                    Alpha = parse.GetValue(alpha),
                    LoraDropout = parse.GetValue(loraDropout),
                    LoraTargets = parse.GetValue(targets)!.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries),
                    UseDora = parse.GetValue(useDora),
                    ModulesToSave = parse.GetValue(modulesToSave)?.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries) ?? [],
                    NumVirtualTokens = parse.GetValue(virtualTokens),
                    PromptInitText = parse.GetValue(initText),
                    EncoderHiddenSize = parse.GetValue(encoderHidden),
                    EncoderType = parse.GetValue(encoderType)!,
                    PrefixProjection = !parse.GetValue(noProjection),
                    AdapterLength = parse.GetValue(adapterLen),
                    AdapterLayers = parse.GetValue(adapterLayers),
                    ReductionFactor = parse.GetValue(reduction),
                    Placement = parse.GetValue(placement)!,
                    NonLinearity = parse.GetValue(nonLinearity)!,
                    NumExperts = parse.GetValue(experts),
                    BitFitSubset = parse.GetValue(bitfitSubset)!,
                },
            };
            if (options.ModelDir is null) err.WriteLine("note: no --model given: training on the built-in tiny Llama (random weights)");
            using var run = new TrainingRun(options);
            if (run.TokenizerDir != run.ModelDir) err.WriteLine($"note: {run.ModelDir} has no tokenizer.json: using the built-in tiny model's tokenizer");
            if (error is not null || Console.IsOutputRedirected || Console.IsErrorRedirected) run.Train(new LineObserver(err, parse.GetValue(logEvery)));
            else ProgressBarTraining.Run(run);
            var last = run.History[^1];
            err.WriteLine($"wrote {options.MethodName} adapter to {options.OutputDir} (final training loss {last.Loss:F4}" +
                (run.Evaluations.Count > 0 ? $", validation loss {run.Evaluations[^1].Loss:F4}, perplexity {run.Evaluations[^1].Perplexity:F2})" : ")"));
            if (parse.GetValue(upload) is { } url)
            {
                var name = parse.GetValue(uploadName) ?? Path.GetFileName(Path.GetFullPath(options.OutputDir).TrimEnd('/'));
                var answer = AdapterUpload.UploadAsync(url, options.OutputDir, name, Environment.GetEnvironmentVariable("PEFTSERVE_API_KEY")).GetAwaiter().GetResult();
                err.WriteLine($"uploaded as '{name}' to {url}: {answer}");
            }
            return 0;
        }, err));
        return command;
    }

    /// <summary>Expected failures become "error: ..." on one line and exit code 1 (PEFTSERVE_DEBUG=1 adds the trace).</summary>
    public static int Run(Func<int> body, TextWriter? error = null)
    {
        var err = error ?? Console.Error;
        try { return body(); }
        catch (Exception e) when (e is ModelLoadException or SafeTensorsFormatException or AdapterException or ArgumentException
            or InvalidDataException or IOException or UnauthorizedAccessException or JinjaException or HttpRequestException
            or System.Text.Json.JsonException or InvalidOperationException or NotSupportedException)
        {
            Console.Out.Flush();
            err.WriteLine($"error: {e.Message}");
            if (Environment.GetEnvironmentVariable("PEFTSERVE_DEBUG") == "1") err.WriteLine(e);
            return 1;
        }
    }
}
