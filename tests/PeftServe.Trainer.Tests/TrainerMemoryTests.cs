using System.Text.Json;
using PeftServe.Core.Adapters;
using PeftServe.Core.Adapters.Training;
using PeftServe.Core.Model;
using PeftServe.Tests;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Trainer.Tests;

/// <summary>What the trainer does to save memory must not change what it computes: gradient
/// checkpointing and the chunked loss give the same step losses and gradients (float32, CPU); a
/// training loop leaves no tensors behind; LoRA dropout acts in training only; a random-weights
/// model of a shape trains from the command line.</summary>
public sealed class TrainerMemoryTests(TrainerFixture f) : IClassFixture<TrainerFixture>
{
    private static readonly string[] AllLinears = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

    /// <summary>Losses of the first steps and, after each, every parameter's gradient, of two runs that
    /// differ only in <paramref name="change"/>.</summary>
    private void AssertSameSteps(TrainerOptions options, Func<TrainerOptions, TrainerOptions> change, int steps = 3)
    {
        using var a = new TrainingRun(options, f.Model);
        using var b = new TrainingRun(change(options) with { OutputDir = f.NewOutput("other") }, f.Model);
        for (int step = 1; step <= steps; step++)
        {
            var sa = a.TrainStep(step);
            var sb = b.TrainStep(step);
            Assert.True(Math.Abs(sa.Loss - sb.Loss) <= 1e-4, $"step {step}: loss {sa.Loss} vs {sb.Loss}");
            foreach (var ((name, pa), (_, pb)) in a.Adapter.Parameters.Zip(b.Adapter.Parameters))
            {
                using var ga = pa.grad ?? torch.zeros_like(pa);
                using var gb = pb.grad ?? torch.zeros_like(pb);
                double diff = (ga - gb).abs().max().item<float>(), scale = ga.abs().max().item<float>();
                Assert.True(diff <= 1e-4 * scale + 1e-9, $"step {step}, {name}: gradients differ by {diff:E2} (scale {scale:E2})");
            }
        }
    }

    [Theory]
    [InlineData("lora")]
    [InlineData("prefix")]
    [InlineData("prompt")]
    [InlineData("ptuning")]
    [InlineData("ia3")]
    [InlineData("llama-adapter")]
    [InlineData("bottleneck")]
    [InlineData("adamix")]
    [InlineData("bitfit")]
    public void GradientCheckpointingKeepsTheLossesAndGradients(string method)
    {
        var options = f.Options(method, steps: 3) with
        {
            Method = new TrainingOptions { LoraTargets = AllLinears, LoraDropout = 0.1, NumVirtualTokens = 4, NumExperts = 3 },
            GradientAccumulation = 2,
        };
        AssertSameSteps(options, o => o with { GradientCheckpointing = true });
    }

    [Fact]
    public void ChunkedLossKeepsTheLossesAndGradients()
    {
        // Chunks of 5 loss tokens against the default (the tiny vocabulary fits every token in one chunk).
        var options = f.Options("lora", f.CompletionData, steps: 3) with { Method = new TrainingOptions { LoraTargets = AllLinears } };
        AssertSameSteps(options, o => o with { LossChunkTokens = 5 });
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void TrainingStepsLeaveNoTensorsBehind(bool checkpoint)
    {
        // Whatever a step makes, it frees (or hands to autograd, which frees it in backward): the live
        // tensor handles on this thread are the same after every step, checkpoints included.
        var options = f.Options("lora", steps: 8) with { GradientCheckpointing = checkpoint, GradientAccumulation = 2 };
        using var run = new TrainingRun(options, f.Model);
        run.TrainStep(1);
        var live = new List<long>();
        for (int step = 2; step <= 6; step++)
        {
            run.TrainStep(step);
            if (step == 4) run.SaveCheckpoint();
            live.Add(DisposeScopeManager.Statistics.ThreadTotalLiveCount);
        }
        Assert.True(live.Distinct().Count() == 1, $"live tensors after steps 2..6: {string.Join(", ", live)}");
    }

    [Fact]
    public void LoraDropoutActsInTrainingOnlyAndIsRecordedButNotServed()
    {
        var options = f.Options("lora", steps: 4) with { Method = new TrainingOptions { LoraDropout = 0.5, LoraTargets = AllLinears } };
        using var run = new TrainingRun(options, f.Model);
        run.Train();
        var ids = torch.tensor(new long[] { 1, 45, 67, 89, 120, 33, 200, 17 }, [1, 8]);
        var pos = torch.arange(8L).unsqueeze(0);
        Tensor TrainingModeLogits(int seed)
        {
            run.Adapter.Training = true;
            run.Adapter.ForwardSeed = seed;
            using var _ = torch.no_grad();
            return f.Model.Forward(ids, pos, new ChunkKvCache(), adapters: run.Adapter);
        }
        using var eval = run.Logits(ids);                      // evaluation mode: no dropout, deterministic
        using var eval2 = run.Logits(ids);
        Assert.Equal(0.0, (eval - eval2).abs().max().item<float>());
        using var t1 = TrainingModeLogits(1);
        using var t1Again = TrainingModeLogits(1);
        using var t2 = TrainingModeLogits(2);
        Assert.Equal(0.0, (t1 - t1Again).abs().max().item<float>());     // one seed, one mask
        Assert.True((t1 - t2).abs().max().item<float>() > 1e-4, "two dropout masks gave the same logits");
        Assert.True((t1 - eval).abs().max().item<float>() > 1e-4, "training mode applies no dropout");

        using var folder = AdapterFolder.Open(options.OutputDir);
        Assert.Equal(0.5, folder.Config["lora_dropout"]!.GetValue<double>());
        // The server reads the folder and applies no dropout: its logits are the evaluation-mode ones.
        using var set = new Core.Engine.AdapterManager(f.Model, new AdapterLimits(), null, 1L << 30);
        var served = set.Acquire(options.OutputDir);
        using var servedLogits = Core.Generation.FullLogits.Compute(f.Model, ids, [served]);
        Assert.True((servedLogits - eval).abs().max().item<float>() < 1e-4);
    }

    [Fact]
    public void RandomWeightsOfAShapeTrainFromTheCommandLine()
    {
        // A shape folder holds only config.json: the weights are random and the tokenizer is the built-in one.
        var shape = Path.Combine(f.Dir, "shape-" + Guid.NewGuid().ToString("N")[..6]);
        Directory.CreateDirectory(shape);
        File.Copy(Path.Combine(TestData.TinyLlamaDir, "config.json"), Path.Combine(shape, "config.json"));
        var output = f.NewOutput("random");
        var error = new StringWriter();
        var saved = Console.Error;
        Console.SetError(error);
        int code;
        try
        {
            code = Program.Main(["--method", "qlora", "--model", shape, "--random-weights", "--data", f.TextData, "--output", output,
                "--max-steps", "3", "--gradient-checkpointing", "--rank", "4", "--lora-dropout", "0.1", "--no-plot", "--log-every", "1"]);
        }
        finally { Console.SetError(saved); }
        var text = error.ToString();
        Assert.True(code == 0, text);
        Assert.Contains("has no tokenizer.json: using the built-in tiny model's tokenizer", text);
        Assert.Contains("(random weights)", text);
        Assert.Contains("gradient_checkpointing=on", text);
        Assert.Contains("memory_mib=", text);
        using var log = JsonDocument.Parse(File.ReadAllText(Path.Combine(output, "training_log.json")));
        Assert.True(log.RootElement.GetProperty("gradient_checkpointing").GetBoolean());
        Assert.True(log.RootElement.GetProperty("random_weights").GetBoolean());
        Assert.StartsWith("NF4", log.RootElement.GetProperty("base_format").GetString());
        Assert.True(log.RootElement.GetProperty("peak_memory_bytes").GetInt64() > 0);
        Assert.All(log.RootElement.GetProperty("history").EnumerateArray(), h => Assert.True(h.GetProperty("MemoryBytes").GetInt64() > 0));
        // Without --random-weights the same folder is refused: it has no weights.
        Assert.Equal(1, Program.Main(["--method", "lora", "--model", shape, "--data", f.TextData, "--output", f.NewOutput("refused")]));
    }
}
