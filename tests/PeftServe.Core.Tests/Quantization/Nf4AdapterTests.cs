using PeftServe.Core.Adapters;
using PeftServe.Core.Engine;
using PeftServe.Core.Generation;
using PeftServe.Core.Model;
using PeftServe.Core.Quantization;
using PeftServe.Core.SafeTensors;
using PeftServe.Core.Tests.Adapters;
using PeftServe.Core.Tests.Model;
using PeftServe.Core.Tests.SafeTensors;
using PeftServe.Tests;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Tests.Quantization;

/// <summary>The QLoRA setting: every adapter method on the 4-bit base. On an NF4 base an adapter must
/// act exactly as it does on a dense model whose weights are the NF4 round trip of the originals (the
/// base is frozen and only dequantized on the fly), so each method, alone and all in one mixed batch,
/// is held to that dense twin; and the engine serves them on the 4-bit base too.</summary>
public sealed class Nf4AdapterTests : IDisposable
{
    private static readonly string FixtureStore = Path.Combine(TestData.FixturesDir, "tiny-llama-adapters");
    private readonly TempDir _dir = new();
    private readonly LlamaModel _nf4 = LlamaModel.Load(TestData.TinyLlamaDir, new ModelOptions { Quantization = QuantizationMode.Nf4 });
    private readonly LlamaModel _twin;
    private readonly string[] _adapters;
    private readonly Tensor _ids;

    public Nf4AdapterTests()
    {
        _twin = LlamaModel.Load(WriteRoundTripCheckpoint(Path.Combine(_dir.Path, "twin")), new ModelOptions());
        var ours = Path.Combine(_dir.Path, "store");
        _adapters =
        [
            .. AdapterConformanceTests.FixtureAdapters.Select(a => Path.Combine(FixtureStore, a)),
            BottleneckSpec.Random(41, 8, "both", "gelu").Write(ours, "bottleneck"),
            AdaMixSpec.Random(42, 3, 4, "mlp", "relu").Write(ours, "adamix"),
            BitFitSpec.Random(43, ["q_proj", "up_proj", "input_layernorm"], [0, 1, 2]).Write(ours, "bitfit"),
        ];
        using var file = SafeTensorsFile.Open(TestData.ExpectedPath);
        _ids = file.ToTensor("input_ids");
    }

    public void Dispose()
    {
        _nf4.Dispose();
        _twin.Dispose();
        _ids.Dispose();
        _dir.Dispose();
    }

    /// <summary>The default model with every decoder linear weight replaced by its NF4 round trip.</summary>
    private static string WriteRoundTripCheckpoint(string dir)
    {
        Directory.CreateDirectory(dir);
        File.Copy(Path.Combine(TestData.TinyLlamaDir, "config.json"), Path.Combine(dir, "config.json"));
        using var source = SafeTensorsFile.Open(Path.Combine(TestData.TinyLlamaDir, "model.safetensors"));
        var linears = new[] { "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj" };
        var tensors = source.Tensors.Select(info =>
        {
            var t = source.ToTensor(info.Name);
            if (info.Name.StartsWith("model.layers.", StringComparison.Ordinal) && linears.Any(l => info.Name.EndsWith($"{l}.weight", StringComparison.Ordinal)))
            {
                using var q = Nf4Weight.Quantize(t);
                var original = t;
                t = q.Dequantize();
                original.Dispose();
            }
            return new KeyValuePair<string, Tensor>(info.Name, t);
        }).ToList();
        SafeTensorsWriter.Write(Path.Combine(dir, "model.safetensors"), tensors);
        foreach (var t in tensors) t.Value.Dispose();
        return dir;
    }

    [Fact]
    public void TheTwinIsTheQuantizedBase()
    {
        using var a = FullLogits.Compute(_nf4, _ids);
        using var b = FullLogits.Compute(_twin, _ids);
        LlamaConformanceTests.AssertClose(a, b);
        using var dense = LlamaModel.Load(TestData.TinyLlamaDir, new ModelOptions());
        using var c = FullLogits.Compute(dense, _ids);
        Assert.True((a - c).abs().max().item<float>() > 1e-3f, "quantization must change the logits, or this test proves nothing");
    }

    [Fact]
    public void EveryMethodInOneMixedBatchOnTheNf4BaseMatchesItsDenseTwin()
    {
        using var onNf4 = new AdapterManager(_nf4, new AdapterLimits(), null, 1L << 30);
        using var onTwin = new AdapterManager(_twin, new AdapterLimits(), null, 1L << 30);
        var rows = _adapters.Append(null).ToArray();
        using var ids = torch.stack(rows.Select((_, i) => _ids[i % 2]).ToArray());
        using var nf4 = FullLogits.Compute(_nf4, ids, rows.Select(a => a is null ? null : onNf4.Acquire(a)).ToArray());
        using var twin = FullLogits.Compute(_twin, ids, rows.Select(a => a is null ? null : onTwin.Acquire(a)).ToArray());
        using var baseOnly = FullLogits.Compute(_nf4, ids);
        for (int i = 0; i < rows.Length; i++)
        {
            LlamaConformanceTests.AssertClose(twin[i], nf4[i]);
            if (rows[i] is not null)
                Assert.True((nf4[i] - baseOnly[i]).abs().max().item<float>() > 1e-4f, $"{rows[i]} changes nothing on the NF4 base");
        }
    }

    [Fact]
    public async Task TheEngineServesEveryMethodOnTheNf4Base()
    {
        using var file = SafeTensorsFile.Open(TestData.ExpectedPath);
        using var promptTensor = file.ToTensor("prompt_ids");
        var prompt = promptTensor[0].data<long>().Select(x => (int)x).ToArray();
        await using var engine = new InferenceEngine(_nf4, null, new EngineOptions { AdapterStore = null, KvBlockSize = 4 });
        var streams = _adapters.Select(a => engine.Submit(new GenerationRequest { PromptIds = prompt, Adapter = a, Sampling = SamplingParams.Greedy(12) })).ToList();
        using var onTwin = new AdapterManager(_twin, new AdapterLimits(), null, 1L << 30);
        for (int i = 0; i < _adapters.Length; i++)
        {
            var expected = FixedBatch.Generate(_twin, [prompt], [SamplingParams.Greedy(12)], adapters: [onTwin.Acquire(_adapters[i])]).Select(t => t.TokenId).ToArray();
            Assert.Equal(expected, (await streams[i].CollectAsync().WaitAsync(TimeSpan.FromSeconds(60))).Ids);
        }
    }
}
