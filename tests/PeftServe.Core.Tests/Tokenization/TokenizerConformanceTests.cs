using System.Text.Json;
using PeftServe.Core.Tokenization;
using PeftServe.Tests;

namespace PeftServe.Core.Tests.Tokenization;

/// <summary>Real Llama 2, Llama 3 and Qwen3 tokenizer files (from npm) and the tiny model's tokenizer,
/// against the ids and text Hugging Face transformers produced with them.</summary>
public class TokenizerConformanceTests
{
    private static readonly JsonElement Real = JsonDocument.Parse(File.ReadAllText(Path.Combine(TestData.FixturesDir, "real-tokenizers-expected.json"))).RootElement;

    public static TheoryData<string, int> Cases()
    {
        var data = new TheoryData<string, int>();
        foreach (var name in new[] { "llama2", "llama3", "qwen3" })
            for (int i = 0; i < Real.GetProperty(name).GetProperty("encode").GetArrayLength(); i++) data.Add(name, i);
        return data;
    }

    private static readonly Dictionary<string, Tokenizer> Loaded = [];
    private static Tokenizer Load(string name)
    {
        lock (Loaded)
        {
            if (!Loaded.TryGetValue(name, out var t)) Loaded[name] = t = Tokenizer.FromDirectory(TestData.RealTokenizerDir(name));
            return t;
        }
    }

    private static int[] Ids(JsonElement e) => e.EnumerateArray().Select(x => x.GetInt32()).ToArray();

    [Theory]
    [MemberData(nameof(Cases))]
    public void EncodeAndDecodeMatchHuggingFace(string name, int index)
    {
        var c = Real.GetProperty(name).GetProperty("encode")[index];
        var tokenizer = Load(name);
        var text = c.GetProperty("text").GetString()!;
        var expected = Ids(c.GetProperty("ids"));
        Assert.Equal(expected, tokenizer.Encode(text));
        Assert.Equal(c.GetProperty("decoded").GetString(), tokenizer.Decode(expected));
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void StreamingDecodeEqualsWholeDecode(string name, int index)
    {
        var c = Real.GetProperty(name).GetProperty("encode")[index];
        var tokenizer = Load(name);
        var ids = Ids(c.GetProperty("ids"));
        var stream = tokenizer.CreateStreamingDecoder();
        var pieces = ids.Select(stream.Push).Append(stream.Flush()).ToList();
        Assert.All(pieces, p => Assert.DoesNotContain('\uFFFD', p));
        Assert.Equal(tokenizer.Decode(ids), string.Concat(pieces));
    }

    [Theory]
    [InlineData("llama3")]
    [InlineData("qwen3")]
    public void ChatTextWithSpecialTokensEncodesAsHuggingFace(string name)
    {
        var chat = Real.GetProperty(name).GetProperty("chat");
        var tokenizer = Load(name);
        Assert.NotNull(tokenizer.ChatTemplate);
        Assert.Equal(Ids(chat.GetProperty("ids")), tokenizer.Encode(chat.GetProperty("text").GetString()!, addSpecialTokens: false));
    }

    [Fact]
    public void TinyModelTokenizerMatchesItsExpectations()
    {
        using var doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(TestData.FixturesDir, "tiny-llama-tokenizer-expected.json")));
        var tokenizer = Tokenizer.FromDirectory(TestData.TinyLlamaDir);
        Assert.Equal(Ids(doc.RootElement.GetProperty("ids")), tokenizer.Encode(doc.RootElement.GetProperty("text").GetString()!));
        Assert.Equal(Ids(doc.RootElement.GetProperty("chat")),
            tokenizer.Encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", addSpecialTokens: false));
        Assert.Equal(1, tokenizer.BosTokenId);
        Assert.Equal([2], tokenizer.EosTokenIds);
        Assert.Equal(384, tokenizer.VocabSize);
        Assert.Equal("Hello, world! The license grants you rights.", tokenizer.Decode(Ids(doc.RootElement.GetProperty("ids"))));
    }

    [Fact]
    public void SpecialTokensAreKeptOrSkippedOnDecode()
    {
        var tokenizer = Tokenizer.FromDirectory(TestData.TinyLlamaDir);
        var ids = tokenizer.Encode("<|im_start|>user\nHi<|im_end|>", addSpecialTokens: false);
        Assert.True(tokenizer.IsSpecial(ids[0]));
        Assert.Equal("user\nHi", tokenizer.Decode(ids));
        Assert.Equal("<|im_start|>user\nHi<|im_end|>", tokenizer.Decode(ids, skipSpecialTokens: false));
    }

    [Fact]
    public void BadTokenizerFilesAreClearErrors()
    {
        var dir = Directory.CreateTempSubdirectory().FullName;
        try
        {
            Assert.Contains("tokenizer.json: not found", Assert.Throws<InvalidDataException>(() => Tokenizer.FromDirectory(dir)).Message);
            File.WriteAllText(Path.Combine(dir, "tokenizer.json"), "{\"model\": {\"type\": \"BPE\", \"vocab\": {");
            Assert.Contains("invalid JSON", Assert.Throws<InvalidDataException>(() => Tokenizer.FromDirectory(dir)).Message);
            File.WriteAllText(Path.Combine(dir, "tokenizer.json"), "{\"model\": {\"type\": \"Unigram\", \"vocab\": []}}");
            Assert.Contains("Unigram", Assert.Throws<InvalidDataException>(() => Tokenizer.FromDirectory(dir)).Message);
        }
        finally { Directory.Delete(dir, true); }
    }
}
