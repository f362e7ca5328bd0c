using PeftServe.Core.SafeTensors;
using PeftServe.Tests;
using TorchSharp;

namespace PeftServe.Core.Tests.SafeTensors;

public sealed class SafeTensorsCheckpointTests : IDisposable
{
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    /// <summary>Two shards written separately and an index written by hand, the way transformers lays them out.</summary>
    private string BuildTwoShardCheckpoint(out Dictionary<string, torch.Tensor> tensors)
    {
        tensors = new Dictionary<string, torch.Tensor>
        {
            ["embed.weight"] = torch.arange(12, dtype: torch.ScalarType.Float32).reshape(3, 4),
            ["layers.0.weight"] = torch.arange(6, dtype: torch.ScalarType.Float32).reshape(2, 3).to(torch.ScalarType.BFloat16),
            ["layers.1.weight"] = torch.tensor(new long[] { 5, -6, 7 }),
            ["head.bias"] = torch.tensor(new float[] { 0.25f, -0.5f }).to(torch.ScalarType.Float16),
        };
        SafeTensorsWriter.Write(_dir.File("model-00001-of-00002.safetensors"),
            [new("embed.weight", tensors["embed.weight"]), new("layers.0.weight", tensors["layers.0.weight"])],
            new Dictionary<string, string> { ["format"] = "pt" });
        SafeTensorsWriter.Write(_dir.File("model-00002-of-00002.safetensors"),
            [new("layers.1.weight", tensors["layers.1.weight"]), new("head.bias", tensors["head.bias"])],
            new Dictionary<string, string> { ["format"] = "pt" });
        WriteIndex("""
            {
              "metadata": {"total_size": 84},
              "weight_map": {
                "embed.weight": "model-00001-of-00002.safetensors",
                "head.bias": "model-00002-of-00002.safetensors",
                "layers.0.weight": "model-00001-of-00002.safetensors",
                "layers.1.weight": "model-00002-of-00002.safetensors"
              }
            }
            """);
        return _dir.Path;
    }

    private string WriteIndex(string json, string baseName = "model")
    {
        var path = _dir.File(baseName + ".safetensors.index.json");
        File.WriteAllText(path, json);
        return path;
    }

    [Fact]
    public void TwoShardsAndAnIndexReadAsOneCheckpoint()
    {
        var folder = BuildTwoShardCheckpoint(out var originals);
        try
        {
            using var ckpt = SafeTensorsCheckpoint.Open(folder);
            Assert.True(ckpt.IsSharded);
            Assert.Equal(2, ckpt.Files.Count);
            Assert.Equal(["embed.weight", "head.bias", "layers.0.weight", "layers.1.weight"], ckpt.Names);
            Assert.Equal("84", ckpt.Metadata["total_size"]);
            Assert.True(ckpt.Contains("layers.1.weight"));
            Assert.False(ckpt.Contains("layers.2.weight"));
            Assert.Equal(SafeTensorDType.BF16, ckpt.Info("layers.0.weight").DType);
            Assert.Equal(new long[] { 2, 3 }, ckpt.Info("layers.0.weight").Shape);
            Assert.EndsWith("model-00002-of-00002.safetensors", ckpt.FileOf("head.bias").Path);

            foreach (var (name, original) in originals)
            {
                using var read = ckpt.ToTensor(name);
                Assert.Equal(original.dtype, read.dtype);
                Assert.Equal(original.shape, read.shape);
                Assert.True(read.bytes.SequenceEqual(original.bytes), name);
            }
            using var embed = ckpt.ToTensor("embed.weight", dtype: torch.ScalarType.Float64);
            Assert.Equal(66.0, embed.sum().item<double>());
            using var longs = ckpt.ToTensor("layers.1.weight");
            Assert.Equal(new long[] { 5, -6, 7 }, longs.data<long>().ToArray());

            // The index file itself is also a valid path to open.
            using var viaIndex = SafeTensorsCheckpoint.Open(_dir.File("model.safetensors.index.json"));
            Assert.Equal(4, viaIndex.Names.Count);
        }
        finally
        {
            foreach (var t in originals.Values) t.Dispose();
        }
    }

    [Fact]
    public void WriteShardedSplitsTinyLlamaAndReadsItBackExactly()
    {
        using var source = SafeTensorsCheckpoint.Open(TestData.TinyLlamaDir);
        var tensors = source.Names.Select(n => new KeyValuePair<string, torch.Tensor>(n, source.ToTensor(n))).ToList();
        try
        {
            var index = SafeTensorsWriter.WriteSharded(_dir.Path, tensors, maxShardBytes: 300_000);
            Assert.Equal(_dir.File("model.safetensors.index.json"), index);
            using var sharded = SafeTensorsCheckpoint.Open(_dir.Path);
            Assert.True(sharded.Files.Count > 2);
            Assert.All(sharded.Files, f => Assert.Matches(@"model-\d{5}-of-\d{5}\.safetensors$", f.Path));
            // No shard exceeds the limit unless it holds a single tensor.
            Assert.All(sharded.Files, f => Assert.True(f.Tensors.Count == 1 || f.Tensors.Sum(t => t.ByteLength) <= 300_000));
            Assert.Equal(source.Names, sharded.Names);
            Assert.Equal(source.Names.Sum(n => source.Info(n).ByteLength).ToString(), sharded.Metadata["total_size"]);
            foreach (var name in source.Names)
                Assert.True(sharded.GetBytes(name).SequenceEqual(source.GetBytes(name)), name);
        }
        finally
        {
            foreach (var kv in tensors) kv.Value.Dispose();
        }
    }

    [Fact]
    public void SingleFileFolderAdapterFolderAndFilePath()
    {
        using var model = SafeTensorsCheckpoint.Open(TestData.TinyLlamaDir);
        Assert.False(model.IsSharded);
        Assert.Equal(30, model.Names.Count);
        Assert.Equal("pt", model.Metadata["format"]);
        Assert.Equal(new long[] { 384, 64 }, model.Info("lm_head.weight").Shape);

        var adapterDir = TestData.AdapterDir("lora-r8-all");
        using var adapter = SafeTensorsCheckpoint.Open(adapterDir, "adapter_model");
        Assert.Contains("base_model.model.model.layers.0.mlp.down_proj.lora_A.weight", adapter.Names);
        using var a = adapter.ToTensor("base_model.model.model.layers.0.mlp.down_proj.lora_A.weight");
        Assert.Equal(new long[] { 8, 160 }, a.shape);

        using var byPath = SafeTensorsCheckpoint.Open(Path.Combine(adapterDir, "adapter_model.safetensors"));
        Assert.Equal(adapter.Names, byPath.Names);

        // "model" is the default base name, and an adapter folder has none.
        var e = Assert.Throws<FileNotFoundException>(() => SafeTensorsCheckpoint.Open(adapterDir));
        Assert.Contains("model.safetensors.index.json", e.Message);
        Assert.Contains(adapterDir, e.Message);
    }

    [Fact]
    public void UnknownNameAndDisposal()
    {
        var folder = BuildTwoShardCheckpoint(out var originals);
        foreach (var t in originals.Values) t.Dispose();
        var ckpt = SafeTensorsCheckpoint.Open(folder);
        var e = Assert.Throws<KeyNotFoundException>(() => ckpt.Info("missing.weight"));
        Assert.Contains("'missing.weight'", e.Message);
        Assert.Contains("model.safetensors.index.json", e.Message);
        ckpt.Dispose();
        Assert.Throws<ObjectDisposedException>(() => ckpt.GetBytes("embed.weight").Length);
    }

    [Theory]
    [InlineData("{\"weight_map\": {", null, "not valid JSON")]
    [InlineData("[]", null, "not a JSON object")]
    [InlineData("{\"metadata\": {}}", null, "no \"weight_map\"")]
    [InlineData("{\"weight_map\": [\"a\"]}", null, "\"weight_map\" is not a JSON object")]
    [InlineData("{\"weight_map\": {\"embed.weight\": 1}}", "embed.weight", "not a string")]
    [InlineData("{\"metadata\": 5, \"weight_map\": {}}", null, "\"metadata\" is not a JSON object")]
    public void MalformedIndex(string json, string? tensor, string complaint)
    {
        var index = WriteIndex(json);
        var e = Assert.Throws<SafeTensorsFormatException>(() => SafeTensorsCheckpoint.Open(_dir.Path).Dispose());
        Assert.Equal(index, e.FilePath);
        Assert.Contains(index, e.Message);
        Assert.Equal(tensor, e.TensorName);
        if (tensor is not null) Assert.Contains($"'{tensor}'", e.Message);
        Assert.Contains(complaint, e.Message);
    }

    [Fact]
    public void ShardFileMissing()
    {
        BuildTwoShardCheckpoint(out var originals);
        foreach (var t in originals.Values) t.Dispose();
        File.Delete(_dir.File("model-00002-of-00002.safetensors"));
        var e = Assert.Throws<SafeTensorsFormatException>(() => SafeTensorsCheckpoint.Open(_dir.Path).Dispose());
        Assert.Equal(_dir.File("model.safetensors.index.json"), e.FilePath);
        Assert.Equal("head.bias", e.TensorName);
        Assert.Contains("'head.bias'", e.Message);
        Assert.Contains("model-00002-of-00002.safetensors", e.Message);
        Assert.Contains("does not exist", e.Message);
    }

    [Fact]
    public void TensorListedInIndexButAbsentFromItsShard()
    {
        BuildTwoShardCheckpoint(out var originals);
        foreach (var t in originals.Values) t.Dispose();
        var index = WriteIndex("""
            {"weight_map": {
              "embed.weight": "model-00001-of-00002.safetensors",
              "head.bias": "model-00001-of-00002.safetensors"
            }}
            """);
        var e = Assert.Throws<SafeTensorsFormatException>(() => SafeTensorsCheckpoint.Open(_dir.Path).Dispose());
        Assert.Equal(_dir.File("model-00001-of-00002.safetensors"), e.FilePath);
        Assert.Equal("head.bias", e.TensorName);
        Assert.Contains("'head.bias'", e.Message);
        Assert.Contains(index, e.Message);
        Assert.Contains("does not hold it", e.Message);
    }

    [Theory]
    [InlineData("../outside.safetensors", "outside the index's folder")]
    [InlineData("/etc/passwd", "relative to the index's folder")]
    [InlineData("", "relative to the index's folder")]
    public void ShardPathMustStayInTheFolder(string shard, string complaint)
    {
        var index = WriteIndex("{\"weight_map\": {\"w\": \"" + shard + "\"}}");
        var e = Assert.Throws<SafeTensorsFormatException>(() => SafeTensorsCheckpoint.Open(_dir.Path).Dispose());
        Assert.Equal(index, e.FilePath);
        Assert.Equal("w", e.TensorName);
        Assert.Contains(complaint, e.Message);
    }

    [Fact]
    public void CorruptShardIsReportedByItsOwnPath()
    {
        BuildTwoShardCheckpoint(out var originals);
        foreach (var t in originals.Values) t.Dispose();
        var shard = _dir.File("model-00002-of-00002.safetensors");
        File.WriteAllBytes(shard, new byte[] { 1, 2, 3 });
        var e = Assert.Throws<SafeTensorsFormatException>(() => SafeTensorsCheckpoint.Open(_dir.Path).Dispose());
        Assert.Equal(shard, e.FilePath);
        Assert.Contains("shorter than the 8-byte", e.Message);
    }

    [Fact]
    public void SingleFilePreferredOverIndexAndMissingFolderIsClear()
    {
        using var t = torch.ones(2);
        SafeTensorsWriter.Write(_dir.File("model.safetensors"), [new("only", t)]);
        WriteIndex("this index is broken and must not be read");
        using var ckpt = SafeTensorsCheckpoint.Open(_dir.Path);
        Assert.Equal(["only"], ckpt.Names);

        var missing = Path.Combine(_dir.Path, "nowhere");
        var e = Assert.Throws<FileNotFoundException>(() => SafeTensorsCheckpoint.Open(missing));
        Assert.Contains(missing, e.Message);
    }
}
