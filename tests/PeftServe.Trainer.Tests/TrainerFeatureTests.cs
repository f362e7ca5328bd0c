using System.Text.Json;
using PeftServe.Core.Adapters;
using PeftServe.Core.Adapters.Training;
using PeftServe.Core.Templates;
using PeftServe.Core.Tokenization;
using PeftServe.Tests;
using TorchSharp;

namespace PeftServe.Trainer.Tests;

/// <summary>The trainer's own machinery: data and loss masks, packing, the split, the schedule,
/// gradient accumulation, reproducibility, checkpoints and resume, the plot and the command line.</summary>
public sealed class TrainerFeatureTests(TrainerFixture f) : IClassFixture<TrainerFixture>
{
    private static Tokenizer Tok => Tokenizer.FromDirectory(TestData.TinyLlamaDir);

    [Fact]
    public void PromptCompletionCountsOnlyTheCompletionAndItsEos()
    {
        var tok = Tok;
        using var doc = JsonDocument.Parse("""{"prompt": "say red:", "completion": " red red"}""");
        var ex = TrainingData.Tokenize(doc.RootElement, tok, "test");
        var prompt = tok.Encode("say red:", addSpecialTokens: true);
        var completion = tok.Encode(" red red", addSpecialTokens: false);
        Assert.Equal([.. prompt, .. completion, tok.EosTokenIds[0]], ex.Ids);
        Assert.Equal([.. prompt.Select(_ => false), .. completion.Select(_ => true), true], ex.Loss);
    }

    [Fact]
    public void PlainTextCountsEveryTokenButTheFirst()
    {
        using var doc = JsonDocument.Parse("""{"text": "blue cat sun"}""");
        var ex = TrainingData.Tokenize(doc.RootElement, Tok, "test");
        Assert.False(ex.Loss[0]);
        Assert.All(ex.Loss[1..], Assert.True);
        Assert.Equal(Tok.EosTokenIds[0], ex.Ids[^1]);
    }

    [Fact]
    public void ChatCountsOnlyAssistantTurnsOfTheRenderedTemplate()
    {
        var tok = Tok;
        var messages = new List<ChatMessage> { new("user", "repeat dog"), new("assistant", "dog dog"), new("user", "again"), new("assistant", "dog") };
        var ex = TrainingData.Chat(messages, tok, "test");
        var rendered = ChatTemplate.Render(tok.ChatTemplate!, messages, false, new Dictionary<string, object?> { ["bos_token"] = tok.BosToken, ["eos_token"] = tok.EosToken });
        Assert.Equal(rendered, tok.Decode(ex.Ids, skipSpecialTokens: false));
        // The counted tokens are exactly the two assistant replies with their end-of-turn marks.
        var learned = string.Concat(ex.Ids.Select((id, i) => ex.Loss[i] ? tok.Decode([id], skipSpecialTokens: false) : "\u0001"));
        var pieces = learned.Split('\u0001', StringSplitOptions.RemoveEmptyEntries);
        Assert.Equal(["dog dog<|im_end|>\n", "dog<|im_end|>\n"], pieces);
    }

    [Fact]
    public void PackingCutsTheConcatenationIntoBlocks()
    {
        var examples = new List<Example> { new([1, 2, 3, 4, 5], [false, true, true, true, true]), new([1, 6, 7], [false, true, true]) };
        var blocks = TrainingData.Pack(examples, 3);
        Assert.Equal([[1, 2, 3], [4, 5, 1], [6, 7]], blocks.Select(b => b.Ids).ToArray());
        Assert.All(blocks, b => Assert.False(b.Loss[0]));
        Assert.Equal([false, true, false], blocks[1].Loss);
    }

    [Fact]
    public void ValidationSplitIsSeededAndDisjoint()
    {
        var all = Enumerable.Range(0, 20).Select(i => new Example([i, i], [false, true])).ToList();
        var (train, val) = TrainingData.Split(all, 0.2, 1);
        Assert.Equal(4, val.Count);
        Assert.Equal(20, train.Concat(val).Select(e => e.Ids[0]).Distinct().Count());
        Assert.Equal(val.Select(e => e.Ids[0]), TrainingData.Split(all, 0.2, 1).Validation.Select(e => e.Ids[0]));
    }

    [Fact]
    public void ScheduleWarmsUpThenDecays()
    {
        var cosine = new LrSchedule(1.0, 4, 14, "cosine");
        Assert.Equal([0.25, 0.5, 0.75, 1.0], Enumerable.Range(1, 4).Select(cosine.At));
        Assert.Equal(1.0, cosine.At(5), 12);
        Assert.Equal(0.5, cosine.At(10), 12);       // half way through the decay
        Assert.True(cosine.At(14) is > 0 and < 0.03);
        var linear = new LrSchedule(2.0, 0, 10, "linear");
        Assert.Equal(2.0, linear.At(1), 12);
        Assert.Equal(1.0, linear.At(6), 12);
        Assert.Throws<ArgumentException>(() => new LrSchedule(1, 0, 10, "step").At(1));
    }

    [Fact]
    public void SameSeedSameRunOnCpu()
    {
        double[] Losses()
        {
            using var run = new TrainingRun(f.Options("adamix", steps: 6), f.Model);
            run.Train();
            return run.History.Select(h => h.Loss).ToArray();
        }
        Assert.Equal(Losses(), Losses());
    }

    [Fact]
    public void RunsMadeAtTheSameTimeStartWhereARunMadeAloneStarts()
    {
        // Initial parameters come from TorchSharp's global generator: runs built on several threads at
        // once (as parallel test classes do) must not interleave their draws.
        TrainerOptions Big(string method) => f.Options(method, steps: 1) with
        {
            Method = new TrainingOptions { Rank = 64, LoraTargets = SyntheticAdapters.AllLinear, NumVirtualTokens = 32, EncoderHiddenSize = 256 },
        };
        float[] Initial(string method)
        {
            using var run = new TrainingRun(Big(method), f.Model);
            return run.Adapter.Parameters.SelectMany(p => p.Value.detach().cpu().data<float>().ToArray()).ToArray();
        }
        string[] methods = ["lora", "ptuning"];
        var alone = methods.ToDictionary(m => m, Initial);
        using var start = new Barrier(methods.Length);
        var mismatches = 0;
        var threads = methods.Select(m => new Thread(() =>
        {
            start.SignalAndWait();
            for (int i = 0; i < 12; i++)
                if (!Initial(m).AsSpan().SequenceEqual(alone[m])) Interlocked.Increment(ref mismatches);
        })).ToList();
        foreach (var t in threads) t.Start();
        foreach (var t in threads) t.Join();
        Assert.Equal(0, mismatches);
    }

    [Fact]
    public void ResumeContinuesExactlyWhereTheCheckpointLeftOff()
    {
        var full = f.Options("lora", steps: 8) with { GradientAccumulation = 2, BatchSize = 3 };
        using var straight = new TrainingRun(full, f.Model);
        straight.Train();

        var part = full with { OutputDir = f.NewOutput("resume"), SaveEvery = 4 };
        using (var first = new TrainingRun(part, f.Model))
        {
            // Interrupted during step 5, after the step-4 checkpoint was written.
            Assert.Throws<OperationCanceledException>(() => first.Train(new StopAt(5)));
        }
        Assert.True(Directory.Exists(Path.Combine(part.OutputDir, "checkpoints", "step-000004")));
        using var resumed = new TrainingRun(part with { Resume = true }, f.Model);
        resumed.Train();
        Assert.Equal(straight.History.Select(h => h.Loss), resumed.History.Select(h => h.Loss));
        foreach (var ((name, a), (_, b)) in straight.Adapter.Parameters.Zip(resumed.Adapter.Parameters))
            Assert.True((a - b).abs().max().item<float>() == 0, $"parameter {name} differs after resume");
    }

    private sealed class StopAt(int step) : ITrainingObserver
    {
        public void OnStep(StepInfo s) { if (s.Step == step) throw new OperationCanceledException(); }
    }

    [Fact]
    public void GradientAccumulationEqualsOneLargerBatch()
    {
        // 2 x 4 examples accumulated take the same step as one batch of 8 (the loss is the mean over the step's tokens).
        var small = f.Options("bitfit", steps: 1) with { BatchSize = 4, GradientAccumulation = 2, MaxGradNorm = 0 };
        var large = small with { BatchSize = 8, GradientAccumulation = 1, OutputDir = f.NewOutput("large") };
        using var a = new TrainingRun(small, f.Model);
        using var b = new TrainingRun(large, f.Model);
        var sa = a.TrainStep(1);
        var sb = b.TrainStep(1);
        Assert.True(Math.Abs(sb.Loss - sa.Loss) < 1e-5, $"{sa.Loss} vs {sb.Loss}");
        // Same gradients (Adam's first step is about lr·sign(g), so compare what it was given).
        foreach (var ((name, pa), (_, pb)) in a.Adapter.Parameters.Zip(b.Adapter.Parameters))
        {
            double diff = (pa.grad! - pb.grad!).abs().max().item<float>(), scale = pb.grad!.abs().max().item<float>();
            Assert.True(diff <= 1e-5 * scale + 1e-9, $"{name}: gradients differ by {diff:E2} (scale {scale:E2})");
        }
    }

    [Fact]
    public void ValidationIsReportedAndThePlotAndLogAreWritten()
    {
        var options = f.Options("prompt", f.CompletionData, steps: 10) with { ValidationFraction = 0.25, EvalEvery = 5, Plot = true };
        using var run = new TrainingRun(options, f.Model);
        run.Train();
        Assert.Equal([5, 10], run.Evaluations.Select(e => e.Step));
        Assert.All(run.Evaluations, e => Assert.Equal(Math.Exp(e.Loss), e.Perplexity, 9));
        var png = File.ReadAllBytes(Path.Combine(options.OutputDir, "loss.png"));
        Assert.Equal([0x89, (byte)'P', (byte)'N', (byte)'G'], png[..4]);
        Assert.True(png.Length > 5000);
        using var log = JsonDocument.Parse(File.ReadAllText(Path.Combine(options.OutputDir, "training_log.json")));
        Assert.Equal(run.Adapter.ParameterCount, log.RootElement.GetProperty("trainable_parameters").GetInt64());
        Assert.Equal(10, log.RootElement.GetProperty("history").GetArrayLength());
    }

    [Fact]
    public void TheCommandTrainsFromTheCommandLine()
    {
        var output = f.NewOutput("cli");
        // Its own writer, not Console.SetError: other test classes write to the console meanwhile.
        var error = new StringWriter();
        int code = Program.Run(["--method", "ia3", "--model", TestData.TinyLlamaDir, "--data", f.ChatData, "--output", output,
            "--max-steps", "4", "--eval-every", "2", "--val-fraction", "0.25", "--no-plot", "--log-every", "1"], error);
        var text = error.ToString();
        Assert.True(code == 0, text);
        Assert.Contains("trainable parameters: 672 of", text);
        Assert.Contains("step=4/4 loss=", text);
        Assert.Contains("val_ppl=", text);
        Assert.True(File.Exists(Path.Combine(output, "adapter_model.safetensors")));
        Assert.Equal(2, Program.Run(["--method", "lora", "--data", f.TextData], TextWriter.Null));            // --output missing
        Assert.Equal(1, Program.Run(["--method", "nope", "--data", f.TextData, "--output", output], TextWriter.Null));
    }

    /// <summary>Past a model's sliding attention window our full attention would differ from the model's: training
    /// sequences (virtual tokens included) must fit in the window.</summary>
    [Fact]
    public void TrainingSequencesLongerThanASlidingWindowAreRefused()
    {
        using var windowed = Core.Model.LlamaModel.CreateRandom(f.Model.Config with { SlidingWindow = 24 }, new Core.Model.ModelOptions(), seed: 2);
        var tooLong = Assert.Throws<ArgumentException>(() => new TrainingRun(f.Options("lora", steps: 1) with { MaxLength = 32 }, windowed));
        Assert.Contains("sliding attention window of 24", tooLong.Message);
        var withVirtual = Assert.Throws<ArgumentException>(() => new TrainingRun(
            f.Options("prompt", steps: 1) with { MaxLength = 20, Method = new TrainingOptions { NumVirtualTokens = 6 } }, windowed));
        Assert.Contains("plus 6 virtual tokens", withVirtual.Message);
        using var fits = new TrainingRun(f.Options("lora", steps: 1) with { MaxLength = 24 }, windowed);
        fits.Train();
    }
}
