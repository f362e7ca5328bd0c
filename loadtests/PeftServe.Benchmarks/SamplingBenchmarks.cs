using BenchmarkDotNet.Attributes;
using PeftServe.Core.Generation;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Benchmarks;

/// <summary>One sampling step over batch 32 and a 32,000-token vocabulary on the CPU, from parameter upload to the
/// ids (and log probabilities) on the host: what each per-request option adds to plain sampling. The options are
/// computed only for batches that use them, so "sampled" is what every other request still pays.</summary>
[MemoryDiagnoser(false)]
public class SamplingBenchmarks
{
    private const int Batch = 32, Vocab = 32_000;

    /// <summary>greedy; sampled (temperature, top-p 0.9, top-k 50); logprobs (sampled, plus 5 alternatives per row);
    /// penalties (sampled, with repetition, presence and frequency penalties); bias (sampled, 20 logit biases and
    /// min-p per row); json (sampled, with a JSON-mode mask per row).</summary>
    [Params("greedy", "sampled", "logprobs", "penalties", "bias", "json")]
    public string Options { get; set; } = "sampled";

    private Tensor _logits = null!, _counts = null!, _prompt = null!;
    private SamplingParams[] _rows = null!;
    private ulong[] _seeds = null!;
    private long[] _steps = null!;
    private bool[][]? _allowed;

    [GlobalSetup]
    public void Setup()
    {
        torch.set_num_threads(1);
        var generator = new Generator(7);
        _logits = torch.randn([Batch, Vocab], generator: generator) * 3;
        _counts = torch.randint(0, 2, [Batch, Vocab], generator: generator).to_type(ScalarType.Float32);
        _prompt = torch.randint(0, 2, [Batch, Vocab], generator: generator).to_type(ScalarType.Byte);
        var rng = new Random(7);
        var sampled = new SamplingParams { Temperature = 0.8f, TopP = 0.9f, TopK = 50, MaxTokens = 64 };
        _rows = Enumerable.Range(0, Batch).Select(r => Options switch
        {
            "greedy" => SamplingParams.Greedy(64),
            "logprobs" => sampled with { Logprobs = 5 },
            "penalties" => sampled with { RepetitionPenalty = 1.2f, PresencePenalty = 0.5f, FrequencyPenalty = 0.3f },
            "bias" => sampled with { MinP = 0.05f, LogitBias = Enumerable.Range(0, 20).ToDictionary(_ => rng.Next(Vocab), _ => (float)rng.NextDouble() * 10 - 5) },
            _ => sampled,
        }).ToArray();
        _seeds = Enumerable.Range(0, Batch).Select(r => (ulong)r).ToArray();
        _steps = new long[Batch];
        // JSON mode: inside a string most of the vocabulary stays allowed; the mask's cost is building and uploading it.
        _allowed = Options == "json" ? Enumerable.Range(0, Batch).Select(_ => Enumerable.Range(0, Vocab).Select(_ => rng.Next(10) > 0).ToArray()).ToArray() : null;
    }

    [Benchmark]
    public long SampleStep()
    {
        using var scope = torch.NewDisposeScope();
        using var batch = Sampler.Prepare(_rows, _seeds, _steps, Vocab, _logits.device);
        if (_allowed is not null) Sampler.Restrict(batch, _allowed);
        bool penalties = Options == "penalties";
        var ids = Sampler.Sample(_logits, batch, penalties ? _counts : null, penalties ? _prompt : null);
        if (Options == "logprobs")
        {
            using var packed = Sampler.PackLogprobs(_logits, ids, 5);
            return (long)packed.cpu().data<double>()[0];
        }
        return ids.cpu().data<long>()[0];
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _logits.Dispose();
        _counts.Dispose();
        _prompt.Dispose();
    }
}
