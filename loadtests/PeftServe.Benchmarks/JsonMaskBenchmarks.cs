using BenchmarkDotNet.Attributes;
using PeftServe.Core.Generation;
using PeftServe.Core.Tokenization;
using PeftServe.Tests;

namespace PeftServe.Benchmarks;

/// <summary>Guided JSON: building one token mask that is not cached yet (the first time a request reaches a state),
/// on real vocabularies (Llama 2: 32,000 tokens; Llama 3: 128,256; Qwen3: 151,669), by feeding every token's text on
/// its own (the reference) and by walking the texts in sorted order with shared prefixes (what serving uses).</summary>
[MemoryDiagnoser(false)]
public class JsonMaskBenchmarks
{
    [Params("llama2", "llama3", "qwen3")]
    public string Tokenizer { get; set; } = "llama3";

    /// <summary>Where in a document: before the object, after "{" (a key must come), after a colon (any value), in a
    /// number, and inside a string (most tokens allowed by their flags).</summary>
    [Params("start", "key", "value", "number", "string")]
    public string State { get; set; } = "value";

    private JsonVocabulary _vocabulary = null!;
    private JsonStates _states = null!;
    private IReadOnlyList<int> _stop = null!;

    [GlobalSetup]
    public void Setup()
    {
        var tokenizer = Core.Tokenization.Tokenizer.FromDirectory(TestData.RealTokenizerDir(Tokenizer));
        _vocabulary = JsonVocabulary.For(tokenizer);
        _stop = tokenizer.EosTokenIds;
        var text = State switch
        {
            "start" => "",
            "key" => "{",
            "value" => "{\"a\": ",
            "number" => "{\"a\": [1, -2.",
            _ => "{\"a\": \"Zo",
        };
        _states = JsonStates.Start(JsonSchema.AnyObject.Root).Step(text)!;
        _vocabulary.ComputeMask(_states, _stop);   // sorts the vocabulary once, as the first mask of a tokenizer does
    }

    [Benchmark(Baseline = true)]
    public bool[] FeedEveryToken() => _vocabulary.MaskByFeeding(_states, _stop);

    [Benchmark]
    public bool[] SharedPrefixes() => _vocabulary.ComputeMask(_states, _stop);
}
