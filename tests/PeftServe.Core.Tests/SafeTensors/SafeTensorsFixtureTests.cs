using System.Buffers.Binary;
using PeftServe.Core.SafeTensors;
using PeftServe.Tests;
using TorchSharp;

namespace PeftServe.Core.Tests.SafeTensors;

/// <summary>Reads the real fixture files; expected values were taken from the files with an
/// independent (Python struct) reader.</summary>
public class SafeTensorsFixtureTests
{
    private static string ModelPath => Path.Combine(TestData.TinyLlamaDir, "model.safetensors");

    [Fact]
    public void TinyLlamaHeaderListsEveryWeightWithShapeAndDtype()
    {
        using var file = SafeTensorsFile.Open(ModelPath);
        Assert.Equal(30, file.Tensors.Count);
        Assert.Equal("pt", file.Metadata["format"]);
        Assert.All(file.Tensors, t => Assert.Equal(SafeTensorDType.F32, t.DType));

        var embed = file.Info("model.embed_tokens.weight");
        Assert.Equal(new long[] { 384, 64 }, embed.Shape);
        Assert.Equal(98304, embed.Begin);
        Assert.Equal(196608, embed.End);
        Assert.Equal(384 * 64, embed.ElementCount);
        Assert.Equal(384 * 64 * 4, embed.ByteLength);

        Assert.Equal(new long[] { 64, 160 }, file.Info("model.layers.0.mlp.down_proj.weight").Shape);
        Assert.True(file.Contains("model.norm.weight"));
        Assert.True(file.Contains("model.layers.2.self_attn.v_proj.weight"));
        Assert.False(file.Contains("model.layers.3.self_attn.v_proj.weight"));
    }

    [Fact]
    public void TinyLlamaEmbeddingValuesMatchBetweenBytesAndTensor()
    {
        using var file = SafeTensorsFile.Open(ModelPath);
        const string name = "model.embed_tokens.weight";
        var bytes = file.GetBytes(name);
        Assert.Equal(384 * 64 * 4, bytes.Length);
        Assert.Equal(-0.023868810385465622f, BinaryPrimitives.ReadSingleLittleEndian(bytes));
        Assert.Equal(0.10956680774688721f, BinaryPrimitives.ReadSingleLittleEndian(bytes[4..]));

        using var t = file.ToTensor(name);
        Assert.Equal(torch.ScalarType.Float32, t.dtype);
        Assert.Equal(new long[] { 384, 64 }, t.shape);
        Assert.Equal(DeviceType.CPU, t.device_type);
        Assert.Equal(-0.023868810385465622f, t[0, 0].item<float>());
        Assert.Equal(0.14690548181533813f, t[0, 2].item<float>());
        Assert.Equal(-0.03626692295074463f, t[5, 3].item<float>());
        Assert.Equal(3.311600000980718, t.to(torch.ScalarType.Float64).sum().item<double>(), 6);
        // Every element, not just a few: the tensor's bytes are the file's bytes.
        Assert.True(bytes.SequenceEqual(t.bytes));
    }

    [Fact]
    public void ExpectedFileHoldsInt64Float32AndUInt8Tensors()
    {
        using var file = SafeTensorsFile.Open(TestData.ExpectedPath);
        Assert.Equal(24, file.Tensors.Count);
        Assert.Empty(file.Metadata);

        using var greedy = file.ToTensor("greedy_base");
        Assert.Equal(torch.ScalarType.Int64, greedy.dtype);
        Assert.Equal(new long[] { 1, 16 }, greedy.shape);
        Assert.Equal(new long[] { 294, 294, 294, 313, 130, 203, 245, 313, 203, 43, 187, 150, 187, 150, 187, 203 },
            greedy.data<long>().ToArray());

        using var prompt = file.ToTensor("prompt_ids");
        Assert.Equal(new long[] { 1, 17, 42, 99, 7, 250 }, prompt.data<long>().ToArray());
        Assert.Equal(250, BinaryPrimitives.ReadInt64LittleEndian(file.GetBytes("prompt_ids")[40..]));

        var packedInfo = file.Info("nf4_packed");
        Assert.Equal(SafeTensorDType.U8, packedInfo.DType);
        using var packed = file.ToTensor("nf4_packed");
        Assert.Equal(torch.ScalarType.Byte, packed.dtype);
        Assert.Equal(new byte[] { 62, 17, 173, 75, 38, 87, 26, 2 }, packed.data<byte>().ToArray()[..8]);
        Assert.Equal(632290, packed.to(torch.ScalarType.Int64).sum().item<long>());
        Assert.Equal(632290, file.GetBytes("nf4_packed").ToArray().Sum(b => (long)b));

        using var logits = file.ToTensor("logits_base");
        Assert.Equal(new long[] { 2, 12, 384 }, logits.shape);
        Assert.Equal(0.37909144163131714f, logits[0, 0, 1].item<float>());
        Assert.Equal(-332.027226966773, logits.to(torch.ScalarType.Float64).sum().item<double>(), 3);
    }

    [Fact]
    public void ToTensorConvertsDtypeOnlyWhenAsked()
    {
        using var file = SafeTensorsFile.Open(TestData.ExpectedPath);
        using var asDouble = file.ToTensor("prompt_ids", dtype: torch.ScalarType.Float64);
        Assert.Equal(torch.ScalarType.Float64, asDouble.dtype);
        Assert.Equal(new double[] { 1, 17, 42, 99, 7, 250 }, asDouble.data<double>().ToArray());

        using var asHalf = file.ToTensor("logits_base", torch.CPU, torch.ScalarType.Float16);
        Assert.Equal(torch.ScalarType.Float16, asHalf.dtype);
        Assert.Equal(0.37909144163131714, asHalf[0, 0, 1].to(torch.ScalarType.Float64).item<double>(), 3);
    }

    [Fact]
    public void AdapterFileReads()
    {
        using var file = SafeTensorsFile.Open(Path.Combine(TestData.AdapterDir("lora-r8-all"), "adapter_model.safetensors"));
        var a = file.Info("base_model.model.model.layers.0.mlp.down_proj.lora_A.weight");
        Assert.Equal(new long[] { 8, 160 }, a.Shape);
        var b = file.Info("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight");
        Assert.Equal(new long[] { 64, 8 }, b.Shape);
        using var t = file.ToTensor(a.Name);
        Assert.True(file.GetBytes(a.Name).SequenceEqual(t.bytes));
    }
}
