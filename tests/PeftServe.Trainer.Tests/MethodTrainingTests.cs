using PeftServe.Core.Adapters;
using PeftServe.Core.Engine;
using PeftServe.Core.Adapters.Training;
using PeftServe.Core.Generation;
using PeftServe.Core.Model;
using PeftServe.Core.Quantization;
using PeftServe.Tests;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Trainer.Tests;

/// <summary>Each method: a few steps on the tiny model lower the training loss; the saved folder loads
/// through the serving code (AdapterManager) and gives the same logits as the trained adapter in memory.</summary>
public sealed class MethodTrainingTests(TrainerFixture f) : IClassFixture<TrainerFixture>
{
    public static TheoryData<string> Methods() => new(TrainingMethods.All.Select(m => m.Name));

    private static Tensor Inputs()
    {
        // Two rows of real token ids (equal length; the served path left-pads nothing then).
        return torch.tensor(new long[] { 1, 45, 67, 89, 120, 33, 200, 17, 1, 300, 12, 250, 7, 99, 150, 64 }, [2, 8]);
    }

    [Theory]
    [MemberData(nameof(Methods))]
    public void TrainingLowersLossAndTheServedAdapterGivesTheTrainedLogits(string method)
    {
        bool quantized = TrainingMethods.Get(method).QuantizedBase;
        using var nf4 = quantized ? LlamaModel.Load(TestData.TinyLlamaDir, new ModelOptions { Quantization = QuantizationMode.Nf4 }) : null;
        var model = nf4 ?? f.Model;
        var options = f.Options(method, steps: 25) with { LearningRate = TrainingRun.DefaultLearningRate(method) * 3 };
        using var run = new TrainingRun(options, model);
        double before = run.MeanLoss(run.TrainSet);
        run.Train();
        double after = run.MeanLoss(run.TrainSet);
        Assert.True(after < before - 0.05, $"{method}: training loss {before:F4} -> {after:F4} did not fall");
        Assert.True(run.History[^5..].Average(h => h.Loss) < run.History[..5].Average(h => h.Loss), $"{method}: logged step losses did not fall");

        using var ids = Inputs();
        using var trained = run.Logits(ids);
        using var set = new AdapterManager(model, new AdapterLimits(), null, 1L << 30);
        var served = set.Acquire(options.OutputDir);
        using var servedLogits = FullLogits.Compute(model, ids, [served, served]);
        double diff = (trained - servedLogits).abs().max().item<float>();
        Assert.True(diff < 1e-4, $"{method}: served logits differ from the trained model's by {diff:E2}");
        // The adapter changes the model: the logits are not the base model's.
        using var baseLogits = FullLogits.Compute(model, ids);
        Assert.True((servedLogits - baseLogits).abs().max().item<float>() > 1e-3, $"{method}: the served adapter leaves the base logits unchanged");
    }

    [Theory]
    [InlineData("lora")]
    [InlineData("ia3")]
    [InlineData("bitfit")]
    [InlineData("llama-adapter")]
    [InlineData("bottleneck")]
    [InlineData("adamix")]
    public void ZeroOrNearIdentityInitStartsAtTheBaseModel(string method)
    {
        using var run = new TrainingRun(f.Options(method), f.Model);
        using var ids = Inputs();
        using var start = run.Logits(ids);
        using var baseLogits = FullLogits.Compute(f.Model, ids);
        double diff = (start - baseLogits).abs().max().item<float>();
        // Exactly the base model for zero-init methods; bottleneck/AdaMix start within their tiny up-projection.
        Assert.True(diff < (method is "bottleneck" or "adamix" ? 5e-2 : 1e-6), $"{method}: the initial adapter moves the logits by {diff:E2}");
    }

    [Fact]
    public void LoraIsSavedInPeftFormat()
    {
        var options = f.Options("lora", steps: 2) with { Method = new TrainingOptions { Rank = 4, Alpha = 8, LoraTargets = ["q_proj", "down_proj"] } };
        using (var run = new TrainingRun(options, f.Model)) run.Train();
        using var folder = AdapterFolder.Open(options.OutputDir);
        Assert.Equal("LORA", folder.PeftType);
        Assert.Equal(4, folder.Int("r"));
        Assert.Equal(8.0, folder.Double("lora_alpha", 0));
        var names = folder.TensorNames.Order().ToArray();
        Assert.Equal(3 * 2 * 2, names.Length);
        Assert.Contains("model.layers.0.self_attn.q_proj.lora_A.weight", names);
        Assert.Contains("model.layers.2.mlp.down_proj.lora_B.weight", names);
        Assert.Equal([4L, 64L], folder.Info("model.layers.0.self_attn.q_proj.lora_A.weight").Shape);
        Assert.Equal([64L, 4L], folder.Info("model.layers.1.mlp.down_proj.lora_B.weight").Shape);
    }

    [Fact]
    public void PrefixIsSavedAsPlainPrefixesThroughTheReparameterization()
    {
        var options = f.Options("prefix", steps: 3) with { Method = new TrainingOptions { NumVirtualTokens = 5, EncoderHiddenSize = 16 } };
        using var run = new TrainingRun(options, f.Model);
        Assert.Contains(run.Adapter.Parameters, p => p.Name.StartsWith("transform.", StringComparison.Ordinal));
        run.Train();
        using var folder = AdapterFolder.Open(options.OutputDir);
        Assert.Equal("PREFIX_TUNING", folder.PeftType);
        Assert.False(folder.Bool("prefix_projection", true));
        Assert.Equal(["prompt_embeddings"], folder.TensorNames.ToArray());
        var c = f.Model.Config;
        Assert.Equal([5L, 2L * c.NumLayers * c.NumKvHeads * c.HeadDim], folder.Info("prompt_embeddings").Shape);
    }

    [Fact]
    public void PromptTuningFromTextStartsAtTheTextsEmbeddings()
    {
        var options = f.Options("prompt") with { Method = new TrainingOptions { NumVirtualTokens = 6, PromptInitText = "red cat" } };
        using var run = new TrainingRun(options, f.Model);
        var ids = run.Tokenizer.Encode("red cat", addSpecialTokens: false);
        using var expected = f.Model.Embed(torch.tensor(Enumerable.Range(0, 6).Select(i => (long)ids[i % ids.Length]).ToArray()));
        var prompts = run.Adapter.Parameters.Single().Value;
        Assert.Equal(0.0, (prompts - expected).abs().max().item<float>(), 6);
    }

    [Fact]
    public void PTuningWithAnLstmEncoderTrainsAndServes()
    {
        var options = f.Options("ptuning", steps: 15) with { LearningRate = 3e-2, Method = new TrainingOptions { EncoderType = "lstm", NumVirtualTokens = 4, EncoderHiddenSize = 16 } };
        using var run = new TrainingRun(options, f.Model);
        Assert.Contains(run.Adapter.Parameters, p => p.Name.StartsWith("lstm_head.", StringComparison.Ordinal));
        double before = run.MeanLoss(run.TrainSet);
        run.Train();
        Assert.True(run.MeanLoss(run.TrainSet) < before);
        using var ids = Inputs();
        using var trained = run.Logits(ids);
        using var set = new AdapterManager(f.Model, new AdapterLimits(), null, 1L << 30);
        var served = set.Acquire(options.OutputDir);
        using var servedLogits = FullLogits.Compute(f.Model, ids, [served, served]);
        Assert.True((trained - servedLogits).abs().max().item<float>() < 1e-4);
    }

    [Fact]
    public void BitFitQueryMlpSubsetHoldsOnlyQueryAndUpBiases()
    {
        var options = f.Options("bitfit", steps: 2) with { Method = new TrainingOptions { BitFitSubset = "query-mlp" } };
        using (var run = new TrainingRun(options, f.Model)) run.Train();
        using var folder = AdapterFolder.Open(options.OutputDir);
        Assert.All(folder.TensorNames, n => Assert.True(n.EndsWith("q_proj.bias", StringComparison.Ordinal) || n.EndsWith("up_proj.bias", StringComparison.Ordinal), n));
        Assert.Equal(2 * f.Model.Config.NumLayers, folder.TensorNames.Count);
    }

    [Fact]
    public void AdaMixRoutesStochasticallyInTrainingAndAveragesInEvaluation()
    {
        var options = f.Options("adamix", steps: 10) with { Method = new TrainingOptions { NumExperts = 3 } };
        using var run = new TrainingRun(options, f.Model);
        run.Train();
        using var ids = Inputs();
        using var eval1 = run.Logits(ids);
        using var eval2 = run.Logits(ids);
        Assert.Equal(0.0, (eval1 - eval2).abs().max().item<float>());          // evaluation is deterministic (averaged)
        // Training-mode forwards route through random experts: two draws differ.
        var pos = torch.arange(8L).unsqueeze(0).expand(2, 8);
        run.Adapter.Training = true;
        run.Adapter.ForwardSeed = 1;
        var diffs = new List<double>();
        using (torch.no_grad())
        {
            using var a = f.Model.Forward(ids, pos, new ChunkKvCache(), adapters: run.Adapter);
            using (var again = f.Model.Forward(ids, pos, new ChunkKvCache(), adapters: run.Adapter))
                Assert.Equal(0.0, (a - again).abs().max().item<float>());   // one seed, one routing (so a recomputed layer routes the same)
            for (int i = 2; i < 6; i++)
            {
                run.Adapter.ForwardSeed = i;
                using var b = f.Model.Forward(ids, pos, new ChunkKvCache(), adapters: run.Adapter);
                diffs.Add((a - b).abs().max().item<float>());
            }
        }
        Assert.Contains(diffs, d => d > 1e-5);
        using var folder = AdapterFolder.Open(options.OutputDir);
        Assert.Equal(3, folder.Int("num_experts"));
        Assert.Contains("model.layers.0.mlp_adapter.experts.2.up.weight", folder.TensorNames);
    }
}
