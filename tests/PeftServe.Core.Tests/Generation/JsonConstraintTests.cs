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

    private static bool RecognizerAccepts(string text, JsonSchema? schema = null) =>
        JsonStates.Start((schema ?? JsonSchema.AnyObject).Root).Step(text) is not null;

    private static bool Completes(string text, JsonSchema? schema = null) =>
        JsonStates.Start((schema ?? JsonSchema.AnyObject).Root).Step(text)?.Done == true;

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
    public void CompleteDocuments(string text, bool valid) => Assert.Equal(valid, Completes(text));

    private static readonly JsonSchema Person = JsonSchema.Parse(System.Text.Json.Nodes.JsonNode.Parse("""
        {
          "type": "object",
          "properties": {
            "name": {"type": "string", "title": "Name"},
            "age": {"type": "integer"},
            "score": {"type": "number"},
            "tags": {"type": "array", "items": {"enum": ["red", "green"]}},
            "nickname": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "kind": {"const": "person"},
            "address": {"$ref": "#/$defs/address"}
          },
          "required": ["name", "age"],
          "additionalProperties": false,
          "$defs": {"address": {"type": "object", "properties": {"city": {"type": "string"}, "next": {"$ref": "#/$defs/address"}}, "required": ["city"]}}
        }
        """));

    [Theory]
    [InlineData("{\"name\": \"Ann\", \"age\": 31}", true)]
    [InlineData("{\"age\": -4, \"name\": \"B\", \"score\": 2.5e3, \"tags\": [\"red\", \"green\"], \"nickname\": null, \"kind\": \"person\"}", true)]
    [InlineData("{\"name\": \"C\", \"age\": 1, \"nickname\": \"cc\", \"address\": {\"city\": \"X\", \"next\": {\"city\": \"Y\", \"zip\": 5}}}", true)]
    [InlineData("{\"name\": \"Ann\"}", false)]                          // age is required
    [InlineData("{\"name\": \"Ann\", \"age\": 3.5}", false)]            // an integer
    [InlineData("{\"name\": \"Ann\", \"age\": 3, \"x\": 1}", false)]   // no other keys
    [InlineData("{\"name\": 5, \"age\": 3}", false)]
    [InlineData("{\"name\": \"A\", \"age\": 3, \"tags\": [\"blue\"]}", false)]
    [InlineData("{\"name\": \"A\", \"age\": 3, \"kind\": \"dog\"}", false)]
    [InlineData("{\"name\": \"A\", \"name\": \"B\", \"age\": 3}", false)]   // a key twice
    [InlineData("{\"name\": \"A\", \"age\": 3, \"address\": {\"next\": {}}}", false)]   // city is required, in every address
    public void SchemasAreHeld(string text, bool valid)
    {
        Assert.Equal(valid, Completes(text, Person));
        if (valid) JsonDocument.Parse(text).Dispose();
    }

    /// <summary>A definition that is an alternative of itself ("a": anyOf [a, null]) allows nothing new; it must not
    /// send the recognizer round in circles.</summary>
    [Fact]
    public void ASelfReferentialAlternativeEnds()
    {
        var schema = JsonSchema.Parse(System.Text.Json.Nodes.JsonNode.Parse(
            """{"type": "object", "properties": {"a": {"$ref": "#/$defs/a"}}, "$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "null"}]}}}"""));
        Assert.True(Completes("{\"a\": null}", schema));
        Assert.False(RecognizerAccepts("{\"a\": 1", schema));
    }

    [Fact]
    public void NestingStopsAtSixtyFourLevels()
    {
        Assert.True(RecognizerAccepts("{\"a\": " + new string('[', 63)));
        Assert.False(RecognizerAccepts("{\"a\": " + new string('[', 64)));
        Assert.False(OracleAccepts("{\"a\": " + new string('[', 64)));   // System.Text.Json's limit too
    }

    [Fact]
    public void AKeyMustStayAPrefixOfANameNotGivenYet()
    {
        Assert.True(RecognizerAccepts("{\"na", Person));
        Assert.False(RecognizerAccepts("{\"nx", Person));
        Assert.True(RecognizerAccepts("{\"name\": \"A\", \"ag", Person));
        Assert.False(RecognizerAccepts("{\"name\": \"A\", \"na", Person));
        Assert.False(RecognizerAccepts("{\"name\": \"A\" }", Person));   // closing before age
    }

    [Theory]
    [InlineData("""{"type": "object", "properties": {"a": {"type": "string", "pattern": "x+"}}}""", "pattern")]
    [InlineData("""{"type": "object", "properties": {"a": {"type": "integer", "minimum": 3}}}""", "minimum")]
    [InlineData("""{"type": "array"}""", "root")]
    [InlineData("""{"type": "object", "properties": {"a": {"$ref": "https://example.com/x"}}}""", "local references")]
    [InlineData("""{"type": "object", "properties": {"a\"b": {}}}""", "escape")]
    [InlineData("""{"type": "object", "required": ["x"], "additionalProperties": false}""", "required")]
    [InlineData("""{"type": "object", "properties": {"a": {"anyOf": [ALTERNATIVES]}}}""", "alternatives")]
    [InlineData("""{"type": "object", "properties": {"a": {"enum": [VALUES]}}}""", "at most 256")]
    public void WhatCannotBeHeldIsRefusedByName(string schema, string named)
    {
        schema = schema.Replace("ALTERNATIVES", string.Join(",", Enumerable.Repeat("""{"type": "string"}""", 65)))
            .Replace("VALUES", string.Join(",", Enumerable.Range(0, 300).Select(i => $"\"v{i}\"")));
        var e = Assert.Throws<ArgumentException>(() => JsonSchema.Parse(System.Text.Json.Nodes.JsonNode.Parse(schema)));
        Assert.Contains(named, e.Message);
    }

    /// <summary>A schema sent as a string (vLLM accepts both forms) whose text is not valid (a lone surrogate) is an
    /// argument error naming that, not an exception from deep inside the reader.</summary>
    [Fact]
    public void ASchemaStringThatIsNoValidTextIsRefused()
    {
        using var document = JsonDocument.Parse("\"{\\\"type\\\": \\\"obj\\ud800\\\"}\"");
        var e = Assert.Throws<ArgumentException>(() => JsonSchema.Parse(document.RootElement));
        Assert.Contains("not valid text", e.Message);
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
                Sampling = new SamplingParams { Temperature = 1f, Seed = (ulong)seed, MaxTokens = 48, StopTokenIds = tokenizer.EosTokenIds, Json = JsonSchema.AnyObject },
            }).CollectAsync();
            Assert.True(OracleAccepts(result.Text), $"seed {seed}: '{result.Text}' is no JSON prefix");
            if (result.Finish == FinishReason.Stop) JsonDocument.Parse(result.Text).Dispose();
        }

        var braces = new[] { "{", "}" }.Select(b => tokenizer.Encode(b, addSpecialTokens: false).Single()).ToDictionary(id => id, _ => 50f);
        var closed = await engine.Submit(new GenerationRequest
        {
            PromptIds = prompt,
            Sampling = new SamplingParams { Temperature = 0f, MaxTokens = 20, StopTokenIds = tokenizer.EosTokenIds, Json = JsonSchema.AnyObject, LogitBias = braces },
        }).CollectAsync();
        Assert.Equal(FinishReason.Stop, closed.Finish);
        Assert.Equal("{}", closed.Text.Trim());
        Assert.Equal(tokenizer.EosTokenIds[0], closed.Ids[^1]);

        // A schema with one possible object: with whitespace made unlikely, greedy decoding writes exactly it.
        var only = JsonSchema.Parse(System.Text.Json.Nodes.JsonNode.Parse("""{"type": "object", "properties": {"a": {"const": "b"}}, "required": ["a"], "additionalProperties": false}"""));
        var blanks = Enumerable.Range(0, tokenizer.VocabSize).Where(id => !tokenizer.IsSpecial(id) && tokenizer.Decode([id]) is { Length: > 0 } t && string.IsNullOrWhiteSpace(t))
            .ToDictionary(id => id, _ => -100f);
        var forced = await engine.Submit(new GenerationRequest
        {
            PromptIds = prompt,
            Sampling = new SamplingParams { Temperature = 0f, MaxTokens = 30, StopTokenIds = tokenizer.EosTokenIds, Json = only, LogitBias = blanks },
        }).CollectAsync();
        Assert.Equal(FinishReason.Stop, forced.Finish);
        Assert.Equal("{\"a\":\"b\"}", forced.Text);

        Assert.Throws<ArgumentException>(() =>
        {
            using var bare = new InferenceEngine(model, null, new EngineOptions());
            bare.Submit(new GenerationRequest { PromptIds = prompt, Sampling = SamplingParams.Greedy(2) with { Json = JsonSchema.AnyObject } });
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
        var json = new JsonConstraint(vocabulary, JsonSchema.AnyObject, stop);
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

        var start = new JsonConstraint(vocabulary, JsonSchema.AnyObject, stop).Allowed()!;
        Assert.True(start[tokenizer.Encode("{", addSpecialTokens: false)[^1]]);
        Assert.False(start[tokenizer.Encode("Hello", addSpecialTokens: false)[^1]]);
    }

    /// <summary>The mask walks the vocabulary in sorted order, sharing prefixes; at states all over a document (keys,
    /// strings, escapes, numbers, literals, an enum, anyOf alternatives, the end) it must equal feeding every token on
    /// its own.</summary>
    [Theory]
    [InlineData("llama2")]
    [InlineData("llama3")]
    [InlineData("qwen3")]
    public void TheSharedPrefixMaskEqualsFeedingEveryToken(string name)
    {
        var tokenizer = Tokenizer.FromDirectory(TestData.RealTokenizerDir(name));
        var vocabulary = JsonVocabulary.For(tokenizer);
        var schema = JsonSchema.Parse(System.Text.Json.Nodes.JsonNode.Parse("""
            {"type": "object", "properties": {
              "name": {"type": "string"}, "kind": {"enum": ["cat", "catalog", 12]},
              "n": {"anyOf": [{"type": "integer"}, {"type": "array", "items": {"type": "boolean"}}]}},
             "required": ["name"], "additionalProperties": false}
            """));
        var cases = new (JsonSchema Schema, string Text)[]
        {
            (JsonSchema.AnyObject, ""), (JsonSchema.AnyObject, "{"), (JsonSchema.AnyObject, "{\"na"), (JsonSchema.AnyObject, "{\"name\": "),
            (JsonSchema.AnyObject, "{\"name\": \"Zo"), (JsonSchema.AnyObject, "{\"a\": \"x\\"), (JsonSchema.AnyObject, "{\"a\": \"\\u00"),
            (JsonSchema.AnyObject, "{\"a\": [1, -2."), (JsonSchema.AnyObject, "{\"a\": tr"), (JsonSchema.AnyObject, "{\"a\": {}, "),
            (JsonSchema.AnyObject, "{\"a\": 1}"),
            (schema, "{"), (schema, "{\"na"), (schema, "{\"name\": \"x\", \"kind\": \"cat"), (schema, "{\"name\": \"x\", \"kind\": 1"),
            (schema, "{\"name\": \"x\", \"n\": "), (schema, "{\"name\": \"x\", \"n\": [tr"),
        };
        var stop = tokenizer.EosTokenIds;
        foreach (var (s, text) in cases)
        {
            var states = JsonStates.Start(s.Root).Step(text);
            Assert.NotNull(states);
            var expected = vocabulary.MaskByFeeding(states!, stop);
            var actual = vocabulary.ComputeMask(states!, stop);
            var differ = Enumerable.Range(0, expected.Length).Where(id => expected[id] != actual[id]).Take(5).ToArray();
            Assert.True(differ.Length == 0, $"{name} after '{text}': tokens {string.Join(", ", differ.Select(id => $"{id} '{tokenizer.Decode([id])}' (expected {expected[id]})"))}");
            Assert.Contains(true, actual);
        }
    }
}
