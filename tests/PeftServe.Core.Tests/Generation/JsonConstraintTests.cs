using System.Text;
using System.Text.Json;
using PeftServe.Core.Engine;
using PeftServe.Core.Generation;
using PeftServe.Core.Tokenization;
using PeftServe.Tests;

namespace PeftServe.Core.Tests.Generation;

/// <summary>JSON mode's recognizer against System.Text.Json's reader (an independent judge of JSON prefixes), and
/// JSON mode through the engine.</summary>
public sealed class JsonConstraintTests
{
    /// <summary>Whether <paramref name="text"/> can begin a JSON document whose top level is an object opened at once
    /// (JSON mode allows one whitespace character before it), as Utf8JsonReader judges it when told more may follow.</summary>
    private static bool OracleAccepts(string text)
    {
        int lead = text.Length > 0 && text[0] is ' ' or '\t' or '\n' or '\r' ? 1 : 0;
        if (text.Length > lead && text[lead] != '{') return false;
        var reader = new Utf8JsonReader(Encoding.UTF8.GetBytes(text), isFinalBlock: false, default);
        try
        {
            while (reader.Read()) { }
            return true;
        }
        catch (JsonException) { return false; }
    }

    private static bool RecognizerAccepts(string text)
    {
        var s = JsonState.Start;
        foreach (var c in text)
        {
            if (s.Step(c) is not { } next) return false;
            s = next;
        }
        return true;
    }

    /// <summary>A random walk over JSON-ish characters: at every step each candidate character is judged by both, and
    /// the walk goes on with one the reader accepts.</summary>
    [Fact]
    public void TheRecognizerJudgesPrefixesAsSystemTextJsonDoes()
    {
        const string alphabet = "{}[]\":,0019-.eE+truefalsnl\\/bu xA\n";
        var rng = new Random(42);
        int compared = 0;
        for (int walk = 0; walk < 60; walk++)
        {
            var text = new StringBuilder();
            for (int step = 0; step < 80; step++)
            {
                var accepted = new List<char>();
                foreach (var c in alphabet)
                {
                    var candidate = text.ToString() + c;
                    bool oracle = OracleAccepts(candidate), ours = RecognizerAccepts(candidate);
                    Assert.True(oracle == ours, $"'{candidate}': System.Text.Json {(oracle ? "accepts" : "refuses")}, ours {(ours ? "accepts" : "refuses")}");
                    compared++;
                    if (oracle) accepted.Add(c);
                }
                if (accepted.Count == 0) break;
                text.Append(accepted[rng.Next(accepted.Count)]);
            }
        }
        Assert.True(compared > 50_000);
    }

    [Theory]
    [InlineData("{}", true)]
    [InlineData("{\"a\": [1, -2.5e+3, true, null, {\"b\": \"x\\u00e9\\n\"}]}", true)]
    [InlineData(" {}", true)]
    [InlineData("  {}", false)]
    [InlineData("{\"a\": 01}", false)]
    [InlineData("[1]", false)]
    [InlineData("{\"a\" 1}", false)]
    [InlineData("{\"a\": tru}", false)]
    [InlineData("{} x", false)]
    public void CompleteDocuments(string text, bool valid)
    {
        JsonState? s = JsonState.Start;
        foreach (var c in text) if (s is not null) s = s.Value.Step(c);
        Assert.Equal(valid, s is { Mode: JsonMode.Done });
    }

    /// <summary>Through the engine on the fixture model: whatever it samples stays a prefix of one JSON object; with
    /// the braces made likely, the object closes and the stop token ends it at once.</summary>
    [Fact]
    public async Task TheEngineKeepsTheOutputAPrefixOfOneObject()
    {
        var tokenizer = Tokenizer.FromDirectory(TestData.TinyLlamaDir);
        using var model = Core.Model.LlamaModel.Load(TestData.TinyLlamaDir, new Core.Model.ModelOptions());
        await using var engine = new InferenceEngine(model, tokenizer, new EngineOptions());
        var prompt = tokenizer.Encode("Answer in JSON:");
        for (int seed = 0; seed < 6; seed++)
        {
            var result = await engine.Submit(new GenerationRequest
            {
                PromptIds = prompt,
                Sampling = new SamplingParams { Temperature = 1f, Seed = (ulong)seed, MaxTokens = 48, StopTokenIds = tokenizer.EosTokenIds, JsonObject = true },
            }).CollectAsync();
            Assert.True(OracleAccepts(result.Text), $"seed {seed}: '{result.Text}' is no JSON prefix");
            if (result.Finish == FinishReason.Stop) JsonDocument.Parse(result.Text).Dispose();
        }

        var braces = new[] { "{", "}" }.Select(b => tokenizer.Encode(b, addSpecialTokens: false).Single()).ToDictionary(id => id, _ => 50f);
        var closed = await engine.Submit(new GenerationRequest
        {
            PromptIds = prompt,
            Sampling = new SamplingParams { Temperature = 0f, MaxTokens = 20, StopTokenIds = tokenizer.EosTokenIds, JsonObject = true, LogitBias = braces },
        }).CollectAsync();
        Assert.Equal(FinishReason.Stop, closed.Finish);
        Assert.Equal("{}", closed.Text.Trim());
        Assert.Equal(tokenizer.EosTokenIds[0], closed.Ids[^1]);

        Assert.Throws<ArgumentException>(() =>
        {
            using var bare = new InferenceEngine(model, null, new EngineOptions());
            bare.Submit(new GenerationRequest { PromptIds = prompt, Sampling = SamplingParams.Greedy(2) with { JsonObject = true } });
        });
    }
}

/// <summary>JSON mode on real vocabularies (Llama 2's SentencePiece with byte fallback, Llama 3's byte-level BPE,
/// Qwen's): a JSON document as the tokenizer itself splits it is allowed token by token and ends complete, and
/// prose cannot start an object.</summary>
public sealed class JsonConstraintRealTokenizerTests
{
    [Theory]
    [InlineData("llama2")]
    [InlineData("llama3")]
    [InlineData("qwen3")]
    public void ADocumentAsTheTokenizerSplitsItIsAllowedStepByStep(string name)
    {
        var tokenizer = Tokenizer.FromDirectory(TestData.RealTokenizerDir(name));
        var vocabulary = JsonVocabulary.For(tokenizer);
        const string document = "{\"name\": \"Zoë — 東京\", \"tags\": [\"a\\\"b\", \"\\u00e9\"], \"n\": [1, -2.5e3, true, null], \"deep\": {\"x\": {}}}";
        var ids = tokenizer.Encode(document, addSpecialTokens: false);
        var stop = tokenizer.EosTokenIds;
        var json = new JsonObjectConstraint(vocabulary, stop);
        foreach (var id in ids)
        {
            var allowed = json.Allowed()!;
            Assert.True(allowed[id], $"{name}: token {id} '{tokenizer.Decode([id])}' refused after {json}");
            json.Advance(id);
        }
        Assert.True(json.Complete);
        var done = json.Allowed()!;
        Assert.All(stop, id => Assert.True(done[id]));
        Assert.Equal(stop.Count, done.Count(a => a));

        var start = new JsonObjectConstraint(vocabulary, stop).Allowed()!;
        Assert.True(start[tokenizer.Encode("{", addSpecialTokens: false)[^1]]);
        Assert.False(start[tokenizer.Encode("Hello", addSpecialTokens: false)[^1]]);
    }
}
