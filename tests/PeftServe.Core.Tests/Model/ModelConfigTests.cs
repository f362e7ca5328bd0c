using System.Text.Json.Nodes;
using PeftServe.Core.Model;
using PeftServe.Tests;

namespace PeftServe.Core.Tests.Model;

public class ModelConfigTests
{
    private static JsonObject Base(string extra = "") => (JsonObject)JsonNode.Parse($$"""
        { "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 100, "hidden_size": 64,
          "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2 {{extra.Replace('\'', '"')}} }
        """)!;

    [Fact]
    public void ReadsTheTinyLlamaConfig()
    {
        var c = ModelConfig.Load(TestData.TinyLlamaDir);
        Assert.Equal(("LlamaForCausalLM", 3, 64, 4, 2, 16, 384), (c.Architecture, c.NumLayers, c.HiddenSize, c.NumHeads, c.NumKvHeads, c.HeadDim, c.VocabSize));
        Assert.Equal(10000.0, c.Rope.Theta);        // from transformers 5's rope_parameters
        Assert.False(c.TieWordEmbeddings);
        Assert.Equal([2], c.EosTokenIds);
    }

    [Fact]
    public void ReadsTheLlama32OneBillionShapeUsedByTheTrainingBenchmark()
    {
        // loadtests/shapes/llama-3.2-1b: the public Llama-3.2-1B config's numbers.
        var c = ModelConfig.Load(Path.Combine(TestData.RepoRoot, "loadtests", "shapes", "llama-3.2-1b"));
        Assert.Equal((2048, 8192, 16, 32, 8, 64, 128256), (c.HiddenSize, c.IntermediateSize, c.NumLayers, c.NumHeads, c.NumKvHeads, c.HeadDim, c.VocabSize));
        Assert.True(c.TieWordEmbeddings);
        Assert.Equal(("llama3", 500000.0, 32.0, 8192), (c.Rope.Type, c.Rope.Theta, c.Rope.Factor, c.Rope.OriginalMaxPositionEmbeddings));
    }

    [Fact]
    public void OldStyleRopeKeysAndLlama3Scaling()
    {
        var c = ModelConfig.Parse(Base(", 'rope_theta': 500000.0, 'rope_scaling': {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0, 'original_max_position_embeddings': 8192} "));
        Assert.Equal(500000.0, c.Rope.Theta);
        Assert.Equal("llama3", c.Rope.Type);
        Assert.Equal(8.0, c.Rope.Factor);
        Assert.Equal(8, c.HeadDim);              // hidden / heads when head_dim is absent
    }

    [Fact]
    public void Llama3ScalingKeepsHighFrequenciesAndDividesLowOnes()
    {
        var rope = new RopeConfig { Theta = 500000, Type = "llama3", Factor = 8, LowFreqFactor = 1, HighFreqFactor = 4, OriginalMaxPositionEmbeddings = 8192 };
        var plain = RotaryEmbedding.InverseFrequencies(new RopeConfig { Theta = 500000 }, 128);
        var scaled = RotaryEmbedding.InverseFrequencies(rope, 128);
        for (int i = 0; i < plain.Length; i++)
        {
            double wavelen = 2 * Math.PI / plain[i];
            if (wavelen < 8192 / 4.0) Assert.Equal(plain[i], scaled[i]);
            else if (wavelen > 8192 / 1.0) Assert.Equal(plain[i] / 8, scaled[i], 1e-6 * plain[i]);
            else Assert.InRange(scaled[i], plain[i] / 8 * 0.999, plain[i] * 1.001);
        }
        Assert.Contains(plain.Zip(scaled), p => p.First == p.Second);
        Assert.Contains(plain.Zip(scaled), p => p.First != p.Second);
    }

    [Fact]
    public void LinearScalingDividesEveryFrequency()
    {
        var plain = RotaryEmbedding.InverseFrequencies(new RopeConfig(), 16);
        var scaled = RotaryEmbedding.InverseFrequencies(new RopeConfig { Type = "linear", Factor = 4 }, 16);
        Assert.All(plain.Zip(scaled), p => Assert.Equal(p.First / 4, p.Second, 1e-6));
    }

    [Fact]
    public void Qwen2HasQkvBiasAndExplicitHeadDimWins()
    {
        var json = Base(", 'head_dim': 32 ");
        json["architectures"] = new JsonArray("Qwen2ForCausalLM");
        json["model_type"] = "qwen2";
        json["tie_word_embeddings"] = true;
        var c = ModelConfig.Parse(json);
        Assert.True(c.QkvBias);
        Assert.False(c.OutputBias);
        Assert.True(c.TieWordEmbeddings);
        Assert.Equal(32, c.HeadDim);
    }

    [Fact]
    public void MistralIsAccepted() =>
        Assert.Equal("MistralForCausalLM", ModelConfig.Parse(Base().Also(j => j["architectures"] = new JsonArray("MistralForCausalLM"))).Architecture);

    [Theory]
    [InlineData(", 'hidden_act': 'gelu' ", "hidden_act")]
    [InlineData(", 'rope_scaling': {'rope_type': 'yarn', 'factor': 4} ", "yarn")]
    public void UnsupportedFeaturesAreNamed(string extra, string named)
    {
        var e = Assert.Throws<ModelLoadException>(() => ModelConfig.Parse(Base(extra)));
        Assert.Contains(named, e.Message);
    }

    [Fact]
    public void MissingKeyAndUnknownArchitectureAreClearErrors()
    {
        var json = Base();
        json.Remove("vocab_size");
        Assert.Contains("vocab_size", Assert.Throws<ModelLoadException>(() => ModelConfig.Parse(json)).Message);
        json = Base();
        json["architectures"] = new JsonArray("GPT2LMHeadModel");
        json["model_type"] = "gpt2";
        Assert.Contains("GPT2LMHeadModel", Assert.Throws<ModelLoadException>(() => ModelConfig.Parse(json)).Message);
    }

    private static JsonObject Qwen2(string extra) => (JsonObject)JsonNode.Parse($$"""
        { "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 100, "hidden_size": 64, "max_position_embeddings": 32768,
          "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2 {{extra.Replace('\'', '"')}} }
        """)!;

    [Fact]
    public void SlidingWindowsCapTheSequenceWhereTheModelUsesThem()
    {
        // Mistral 7B v0.1: a 4096-position window within 32768 positions; v0.2 and later: none.
        var v01 = ModelConfig.Parse(Base(", 'max_position_embeddings': 32768, 'sliding_window': 4096"));
        Assert.Equal((4096, 4096), (v01.SlidingWindow, v01.MaxSequenceLength));
        Assert.Null(ModelConfig.Parse(Base(", 'max_position_embeddings': 32768, 'sliding_window': null")).SlidingWindow);
        Assert.Null(ModelConfig.Parse(Base(", 'sliding_window': 4096, 'use_sliding_window': false")).SlidingWindow);
        Assert.Equal(32768, ModelConfig.Parse(Base(", 'max_position_embeddings': 32768")).MaxSequenceLength);
        // A window wider than the positions changes nothing.
        Assert.Equal(2048, ModelConfig.Parse(Base(", 'max_position_embeddings': 2048, 'sliding_window': 4096")).MaxSequenceLength);

        // Qwen2 writes sliding_window but uses it only with use_sliding_window, on layers from max_window_layers on.
        Assert.Null(ModelConfig.Parse(Qwen2(", 'sliding_window': 4096, 'use_sliding_window': false, 'max_window_layers': 2")).SlidingWindow);
        Assert.Null(ModelConfig.Parse(Qwen2(", 'sliding_window': 4096, 'max_window_layers': 2")).SlidingWindow);
        Assert.Null(ModelConfig.Parse(Qwen2(", 'sliding_window': 4096, 'use_sliding_window': true, 'max_window_layers': 4")).SlidingWindow);
        Assert.Equal(4096, ModelConfig.Parse(Qwen2(", 'sliding_window': 4096, 'use_sliding_window': true, 'max_window_layers': 2")).MaxSequenceLength);
        Assert.Null(ModelConfig.Parse(Base(", 'sliding_window': 4096, 'layer_types': ['full_attention', 'full_attention']")).SlidingWindow);
        Assert.Equal(4096, ModelConfig.Parse(Base(", 'sliding_window': 4096, 'layer_types': ['full_attention', 'sliding_attention']")).SlidingWindow);

        Assert.Contains("sliding_window", Assert.Throws<ModelLoadException>(() => ModelConfig.Parse(Base(", 'sliding_window': 'wide'"))).Message);
        Assert.Contains("sliding_window", Assert.Throws<ModelLoadException>(() => ModelConfig.Parse(Base(", 'sliding_window': 0"))).Message);
    }

    [Fact]
    public void MissingConfigFileNamesThePath()
    {
        var dir = Directory.CreateTempSubdirectory().FullName;
        try { Assert.Contains(Path.Combine(dir, "config.json"), Assert.Throws<ModelLoadException>(() => ModelConfig.Load(dir)).Message); }
        finally { Directory.Delete(dir, true); }
    }
}

internal static class JsonTestExtensions
{
    public static JsonObject Also(this JsonObject o, Action<JsonObject> change) { change(o); return o; }
}
