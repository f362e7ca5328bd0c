using PeftServe.Core.Adapters;
using PeftServe.Core.Adapters.Training;
using PeftServe.Core.Engine;
using PeftServe.Core.Generation;
using PeftServe.Core.Model;
using PeftServe.Core.Quantization;
using PeftServe.Tests;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Trainer.Tests;

/// <summary>The trainer's DoRA (--use-dora) and saved modules (--modules-to-save): training lowers the loss, the
/// folder is PEFT's layout, and the server gives the trained model's logits within 1e-4. (That Hugging Face PEFT
/// loads these folders to the same logits is checked on the GPU machine: loadtests/gpu/peft_variants.sh.)</summary>
public sealed class LoraVariantTrainingTests(TrainerFixture f) : IClassFixture<TrainerFixture>
{
    private static readonly string[] AllLinears = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

    private static Tensor Inputs() => torch.tensor(new long[] { 1, 45, 67, 89, 120, 33, 200, 17, 1, 300, 12, 250, 7, 99, 150, 64 }, [2, 8]);

    public static TheoryData<string, bool, string, double> Cases() => new()
    {
        { "lora", true, "", 0.0 },
        { "lora", true, "", 0.2 },                      // DoRA's base term through the dropped-out input, as PEFT does
        { "lora", false, "lm_head", 0.0 },
        { "lora", false, "embed_tokens,lm_head", 0.0 },
        { "lora", true, "lm_head", 0.0 },
        { "qlora", true, "", 0.0 },
    };

    [Theory]
    [MemberData(nameof(Cases))]
    public void TrainedVariantsAreServedWithTheTrainedLogits(string method, bool dora, string modules, double dropout)
    {
        var saved = modules.Split(',', StringSplitOptions.RemoveEmptyEntries);
        using var nf4 = method == "qlora" ? LlamaModel.Load(TestData.TinyLlamaDir, new ModelOptions { Quantization = QuantizationMode.Nf4 }) : null;
        var model = nf4 ?? f.Model;
        var options = f.Options(method, steps: 20) with
        {
            LearningRate = TrainingRun.DefaultLearningRate(method) * 3,
            Method = new TrainingOptions { LoraTargets = AllLinears, UseDora = dora, ModulesToSave = saved, LoraDropout = dropout },
        };
        using var run = new TrainingRun(options, model);
        double before = run.MeanLoss(run.TrainSet);
        run.Train();
        double after = run.MeanLoss(run.TrainSet);
        Assert.True(after < before - 0.05, $"training loss {before:F4} -> {after:F4} did not fall");

        using (var folder = AdapterFolder.Open(options.OutputDir))
        {
            Assert.Equal(dora, folder.Bool("use_dora"));
            Assert.Equal(dora, folder.TensorNames.Contains("model.layers.2.mlp.down_proj.lora_magnitude_vector"));
            Assert.Equal(saved.Contains("lm_head"), folder.TensorNames.Contains("lm_head.weight"));
            Assert.Equal(saved.Contains("embed_tokens"), folder.TensorNames.Contains("model.embed_tokens.weight"));
        }

        using var ids = Inputs();
        using var trained = run.Logits(ids);
        using var manager = new AdapterManager(model, new AdapterLimits(), null, 1L << 30);
        var served = manager.Acquire(options.OutputDir);
        Assert.Equal(saved.Length > 0 ? "lora-embeddings" : "lora", served.Pool.Method.Name);
        using var servedLogits = FullLogits.Compute(model, ids, [served, served]);
        double diff = (trained - servedLogits).abs().max().item<float>();
        Assert.True(diff < 1e-4, $"served logits differ from the trained model's by {diff:E2}");
    }

    [Fact]
    public void DoraStartsAtTheBaseModel()
    {
        // B = 0 and the magnitude is ||W||'s rows: the scale is exactly 1.
        var options = f.Options("lora") with { Method = new TrainingOptions { LoraTargets = AllLinears, UseDora = true } };
        using var run = new TrainingRun(options, f.Model);
        using var ids = Inputs();
        using var start = run.Logits(ids);
        using var baseLogits = FullLogits.Compute(f.Model, ids);
        Assert.True((start - baseLogits).abs().max().item<float>() < 1e-5);
        Assert.Contains(run.Adapter.Parameters, p => p.Name.EndsWith("lora_magnitude_vector", StringComparison.Ordinal));
    }

    [Fact]
    public void TheChunkedLossGivesATrainedLmHeadTheGradientOfThePlainLoss()
    {
        torch.manual_seed(3);
        var hidden = torch.randn(7, 16).requires_grad_(true);
        var head = torch.randn(11, 16).requires_grad_(true);
        var targets = torch.tensor(new long[] { 0, 3, 10, 4, 4, 1, 9 });
        var chunked = f.Model.LmHeadLossSum(hidden, targets, chunkRows: 3, lmHead: head);
        chunked.backward();
        var (gh, gw) = (hidden.grad!.clone(), head.grad!.clone());
        hidden.grad!.zero_();
        head.grad!.zero_();
        var plain = nn.functional.cross_entropy(nn.functional.linear(hidden, head), targets, reduction: nn.Reduction.Sum);
        plain.backward();
        Assert.True(Math.Abs(chunked.item<float>() - plain.item<float>()) < 1e-4);
        Assert.True((gh - hidden.grad!).abs().max().item<float>() < 1e-5);
        Assert.True((gw - head.grad!).abs().max().item<float>() < 1e-5);
    }

    [Fact]
    public void VariantOptionsOfOtherMethodsAreRefused()
    {
        var options = f.Options("ia3") with { Method = new TrainingOptions { UseDora = true } };
        Assert.Contains("--use-dora", Assert.Throws<ArgumentException>(() => new TrainingRun(options, f.Model).Dispose()).Message);
        var unknown = f.Options("lora") with { Method = new TrainingOptions { ModulesToSave = ["model.norm"] } };
        Assert.Contains("model.norm", Assert.Throws<ArgumentException>(() => new TrainingRun(unknown, f.Model).Dispose()).Message);
    }
}
