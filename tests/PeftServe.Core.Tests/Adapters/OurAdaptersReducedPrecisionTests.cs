using PeftServe.Core.Adapters;
using PeftServe.Core.Engine;
using PeftServe.Core.Generation;
using PeftServe.Core.Model;
using PeftServe.Core.Tests.SafeTensors;
using PeftServe.Tests;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Tests.Adapters;

/// <summary>Our three methods on a bfloat16 model (the CUDA compute dtype, run here on the CPU): slots
/// in bfloat16, norm biases folded through bfloat16 weights. The logits must land near the float64
/// formula, and far nearer to it than to the base model's.</summary>
public sealed class OurAdaptersReducedPrecisionTests : IDisposable
{
    private readonly LlamaModel _model = LlamaModel.Load(TestData.TinyLlamaDir, new ModelOptions { DType = ScalarType.BFloat16 });
    private readonly TempDir _dir = new();
    private readonly AdapterManager _set;

    public OurAdaptersReducedPrecisionTests() => _set = new AdapterManager(_model, new AdapterLimits(), null, 1L << 30);

    public void Dispose()
    {
        _set.Dispose();
        _model.Dispose();
        _dir.Dispose();
    }

    [Fact]
    public void MixedBatchInBFloat16FollowsTheFormula()
    {
        var bottleneck = BottleneckSpec.Random(51, 8, "both", "gelu");
        var adamix = AdaMixSpec.Random(52, 2, 16, "attention", "silu");
        var bitfit = BitFitSpec.Random(53, ["k_proj", "o_proj", "gate_proj", "input_layernorm", "post_attention_layernorm"], [0, 1, 2]);
        ResidentAdapter?[] rows =
        [
            _set.Acquire(bottleneck.Write(_dir.Path, "bottleneck")),
            _set.Acquire(adamix.Write(_dir.Path, "adamix")),
            _set.Acquire(bitfit.Write(_dir.Path, "bitfit")),
            null,
        ];
        ReferenceHooks?[] hooks = [bottleneck.Hooks(), adamix.Averaged().Hooks(), bitfit.Hooks(), null];
        var ids = new[] { 1, 17, 200, 45, 3, 99, 250, 7, 64, 128 };
        using var batch = torch.tensor(ids.Select(x => (long)x).ToArray()).unsqueeze(0).expand(rows.Length, ids.Length).contiguous();
        using var logits = FullLogits.Compute(_model, batch, rows);
        var baseline = ReferenceLlama.Tiny.Logits(ids);
        for (int i = 0; i < rows.Length; i++)
        {
            var expected = ReferenceLlama.Tiny.Logits(ids, hooks[i]);
            double error = OurAdapterTesting.MaxDifference(expected, logits[i]);
            Assert.True(error < 0.1, $"row {i}: bfloat16 logits are {error:G3} from the formula");
            if (hooks[i] is not null)
            {
                double fromBase = OurAdapterTesting.MaxDifference(baseline, logits[i]);
                Assert.True(fromBase > 5 * error, $"row {i}: {error:G3} from the formula but only {fromBase:G3} from the base model");
            }
        }
    }
}
