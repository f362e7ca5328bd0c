using PeftServe.Core.Adapters;
using PeftServe.Core.Engine;
using PeftServe.Core.Adapters.Training;
using PeftServe.Core.Generation;
using PeftServe.Core.Model;
using PeftServe.Tests;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Trainer.Tests;

/// <summary>Beyond one forward pass: the served adapters, all in one mixed batch of different prompt
/// lengths (left padding) and through the KV cache, generate what the trained adapters in memory do.</summary>
public sealed class ServedGenerationTests(TrainerFixture f) : IClassFixture<TrainerFixture>
{
    private static readonly string[] Methods = TrainingMethods.All.Where(m => !m.QuantizedBase).Select(m => m.Name).ToArray();

    [Fact]
    public void EveryTrainedAdapterGeneratesTheSameGreedyTokensWhenServedInOneMixedBatch()
    {
        var runs = Methods.Select(m => new TrainingRun(f.Options(m, f.CompletionData, steps: 15) with { LearningRate = TrainingRun.DefaultLearningRate(m) * 3 }, f.Model)).ToList();
        try
        {
            foreach (var r in runs) r.Train();
            // Prompts of different lengths, so the served batch left-pads.
            var prompts = runs.Select((_, i) => Enumerable.Range(0, 3 + i % 4).Select(j => 1 + (j * 37 + i * 11) % 380).ToArray()).ToArray();
            using var set = new AdapterManager(f.Model, new AdapterLimits(), null, 1L << 30);
            var served = runs.Select(r => (ResidentAdapter?)set.Acquire(r.Options.OutputDir)).ToArray();
            const int steps = 8;
            var rows = FixedBatch.Generate(f.Model, prompts, prompts.Select(_ => SamplingParams.Greedy(steps)).ToArray(), adapters: served).ToList();
            for (int i = 0; i < runs.Count; i++)
            {
                var expected = new List<int>(prompts[i]);
                for (int s = 0; s < steps; s++)
                {
                    using var ids = torch.tensor(expected.Select(x => (long)x).ToArray(), [1, expected.Count]);
                    using var logits = runs[i].Logits(ids);
                    expected.Add((int)logits[0, -1].argmax().item<long>());
                }
                var got = rows.Where(t => t.Row == i).Select(t => t.TokenId).ToArray();
                var want = expected.Skip(prompts[i].Length).ToArray();
                // The whole continuation: all steps tokens, each the trained model's.
                Assert.True(want.SequenceEqual(got), $"{Methods[i]}: served {string.Join(",", got)} vs trained {string.Join(",", want)}");
            }
        }
        finally { foreach (var r in runs) r.Dispose(); }
    }

    [Fact]
    public void PackedTrainingRunsOnBlocks()
    {
        var options = f.Options("lora", f.TextData, steps: 10) with { Packing = true, MaxLength = 16, LearningRate = 3e-3 };
        using var run = new TrainingRun(options, f.Model);
        Assert.All(run.TrainSet.Take(run.TrainSet.Count - 1), e => Assert.Equal(16, e.Ids.Length));
        double before = run.MeanLoss(run.TrainSet);
        run.Train();
        Assert.True(run.MeanLoss(run.TrainSet) < before);
    }

    [Fact]
    public void BFloat16ComputeTrainsFloat32ParametersAndServes()
    {
        using var bf16 = LlamaModel.Load(TestData.TinyLlamaDir, new ModelOptions { DType = ScalarType.BFloat16 });
        var options = f.Options("lora", steps: 15) with { LearningRate = 3e-3 };
        using var run = new TrainingRun(options, bf16);
        Assert.All(run.Adapter.Parameters, p => Assert.Equal(ScalarType.Float32, p.Value.dtype));
        double before = run.MeanLoss(run.TrainSet);
        run.Train();
        Assert.True(run.MeanLoss(run.TrainSet) < before - 0.02);
        using var ids = torch.tensor(new long[] { 1, 40, 50, 60, 70, 80 }, [1, 6]);
        using var trained = run.Logits(ids);
        using var set = new AdapterManager(bf16, new AdapterLimits(), null, 1L << 30);
        using var served = FullLogits.Compute(bf16, ids, [set.Acquire(options.OutputDir)]);
        // bfloat16 activations: the served path rounds the adapter's weights to bfloat16 on the device.
        Assert.True((trained - served).abs().max().item<float>() < 0.1);
    }
}
