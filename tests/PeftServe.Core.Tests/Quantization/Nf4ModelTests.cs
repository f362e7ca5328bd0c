using PeftServe.Core.Engine;
using PeftServe.Core.Generation;
using PeftServe.Core.Model;
using PeftServe.Core.Quantization;
using PeftServe.Core.SafeTensors;
using PeftServe.Core.Tests.Model;
using PeftServe.Tests;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Tests.Quantization;

/// <summary>The tiny Llama quantized to NF4 at load time, against transformers' logits and greedy
/// tokens with every decoder linear replaced by its NF4 round trip (logits_nf4, greedy_nf4).</summary>
public sealed class Nf4ModelTests : IClassFixture<Nf4ModelFixture>
{
    private readonly Nf4ModelFixture _f;

    public Nf4ModelTests(Nf4ModelFixture fixture) => _f = fixture;

    [Fact]
    public void BatchOfTwoMatchesReferenceNf4Logits()
    {
        using var logits = _f.FullForward(_f.Model, _f.Expected["input_ids"]);
        LlamaConformanceTests.AssertClose(_f.Expected["logits_nf4"], logits);
    }

    [Fact]
    public void Nf4LogitsAreNotTheFloatLogits()
    {
        // The fixture says NF4 moves the logits by up to ~0.74: the quantized path must really be taken.
        using var logits = _f.FullForward(_f.Model, _f.Expected["input_ids"]);
        using var diff = (logits - _f.Expected["logits_base"]).abs().max();
        Assert.True(diff.item<float>() > 0.1f, $"NF4 logits within {diff.item<float>()} of the float ones");
    }

    [Fact]
    public void GreedyDecodingMatchesReferenceNf4Tokens()
    {
        var prompt = _f.Expected["prompt_ids"][0].data<long>().Select(x => (int)x).ToArray();
        var expected = _f.Expected["greedy_nf4"][0].data<long>().Select(x => (int)x).ToArray();
        Assert.Equal(16, expected.Length);
        var tokens = FixedBatch.Generate(_f.Model, [prompt], [SamplingParams.Greedy(16)])
            .Select(t => t.TokenId).ToArray();
        Assert.Equal(expected, tokens);
    }

    [Fact]
    public void WeightSummaryReportsNf4BytesPerParameter()
    {
        var m = _f.Model;
        var c = m.Config;
        long q = (long)c.NumHeads * c.HeadDim, kv = (long)c.NumKvHeads * c.HeadDim;
        long perLayer = (q + 2 * kv) * c.HiddenSize + c.HiddenSize * q + 3L * c.IntermediateSize * c.HiddenSize;
        Assert.Equal(perLayer * c.NumLayers, m.DecoderLinearParameters);
        Assert.Equal(m.DecoderLinearParameters * 9 / 16, m.DecoderLinearBytes);   // 4 bits + 32 bits per 64
        Assert.Equal(0.5625, m.DecoderLinearBytesPerParameter, 12);
        Assert.Equal("NF4", m.DecoderLinearFormat);
        Assert.Contains("0.562 bytes/parameter", m.WeightSummary);
        Assert.Contains("NF4", m.WeightSummary);

        using var dense = LlamaModel.Load(TestData.TinyLlamaDir, new ModelOptions());
        Assert.Equal(4.0, dense.DecoderLinearBytesPerParameter, 12);
        Assert.Equal(dense.WeightBytes - m.WeightBytes, dense.DecoderLinearBytes - m.DecoderLinearBytes);
    }

    [Fact]
    public void DoubleQuantizedModelStaysCloseToNf4()
    {
        using var model = LlamaModel.Load(TestData.TinyLlamaDir, new ModelOptions { Quantization = QuantizationMode.Nf4, DoubleQuant = true });
        Assert.Equal("NF4 (double-quantized absmax)", model.DecoderLinearFormat);
        Assert.True(model.DecoderLinearBytesPerParameter < 0.5625);
        using var logits = _f.FullForward(model, _f.Expected["input_ids"]);
        using var diff = (logits - _f.Expected["logits_nf4"]).abs().max();
        // The absmax values move by under 1% (DoubleQuantTests): the logits move, a little.
        Assert.InRange(diff.item<float>(), 1e-7f, 0.05f);
    }

    [Fact]
    public void LayerNotAWholeNumberOfBlocksIsAClearError()
    {
        // hidden 12: q_proj is [12,12] = 144 elements, not a multiple of 64.
        var config = new ModelConfig
        {
            VocabSize = 16, HiddenSize = 12, IntermediateSize = 32, NumLayers = 1, NumHeads = 2, NumKvHeads = 1, HeadDim = 6,
        };
        var e = Assert.Throws<ModelLoadException>(() =>
            LlamaModel.CreateRandom(config, new ModelOptions { Quantization = QuantizationMode.Nf4 }).Dispose());
        Assert.Contains("model.layers.0.self_attn.q_proj.weight", e.Message);
        Assert.Contains("64", e.Message);
        // The same model unquantized is fine.
        LlamaModel.CreateRandom(config, new ModelOptions()).Dispose();
    }
}

public sealed class Nf4ModelFixture : IDisposable
{
    public LlamaModel Model { get; } = LlamaModel.Load(TestData.TinyLlamaDir, new ModelOptions { Quantization = QuantizationMode.Nf4 });
    public Dictionary<string, Tensor> Expected { get; }

    public Nf4ModelFixture()
    {
        using var file = SafeTensorsFile.Open(TestData.ExpectedPath);
        Expected = file.Tensors.ToDictionary(t => t.Name, t => file.ToTensor(t.Name));
    }

    /// <summary>Logits for every position of unpadded ids [B,T], in float32.</summary>
    public Tensor FullForward(LlamaModel model, Tensor ids)
    {
        long b = ids.shape[0], t = ids.shape[1];
        using var positions = torch.arange(t).unsqueeze(0).expand(b, t).contiguous();
        return model.Forward(ids, positions, new ChunkKvCache()).to(ScalarType.Float32);
    }

    public void Dispose()
    {
        Model.Dispose();
        foreach (var t in Expected.Values) t.Dispose();
    }
}
