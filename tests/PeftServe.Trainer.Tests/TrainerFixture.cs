using System.Text.Json;
using PeftServe.Core.Model;
using PeftServe.Tests;

namespace PeftServe.Trainer.Tests;

/// <summary>The default tiny model (float32, CPU), loaded once, and small JSONL files in a temp folder.</summary>
public sealed class TrainerFixture : IDisposable
{
    public LlamaModel Model { get; } = LlamaModel.Load(TestData.TinyLlamaDir, new ModelOptions());
    public string Dir { get; } = Directory.CreateTempSubdirectory("peftserve-trainer-tests-").FullName;
    public string TextData { get; }
    public string CompletionData { get; }
    public string ChatData { get; }

    public TrainerFixture()
    {
        var rng = new Random(3);
        string[] words = ["red", "green", "blue", "cat", "dog", "sun"];
        // Text from a small vocabulary in a fixed rhythm: easy to learn in a few steps.
        TextData = Write("text.jsonl", Enumerable.Range(0, 16).Select(i => new { text = string.Join(" ", Enumerable.Range(0, 8).Select(j => words[(i + j) % 3])) }));
        CompletionData = Write("completion.jsonl", Enumerable.Range(0, 16).Select(i =>
        {
            var w = words[rng.Next(words.Length)];
            return new { prompt = $"say {w}:", completion = $" {w} {w} {w}" };
        }));
        ChatData = Write("chat.jsonl", Enumerable.Range(0, 8).Select(i =>
        {
            var w = words[i % words.Length];
            return new { messages = new[] { new { role = "user", content = $"repeat {w}" }, new { role = "assistant", content = $"{w} {w}" } } };
        }));
    }

    private string Write(string name, IEnumerable<object> rows)
    {
        var path = Path.Combine(Dir, name);
        File.WriteAllLines(path, rows.Select(r => JsonSerializer.Serialize(r)));
        return path;
    }

    public string NewOutput(string name) => Path.Combine(Dir, name + "-" + Guid.NewGuid().ToString("N")[..8]);

    public TrainerOptions Options(string method, string? data = null, int steps = 20) => new()
    {
        MethodName = method,
        ModelDir = TestData.TinyLlamaDir,
        DataPath = data ?? TextData,
        OutputDir = NewOutput(method),
        MaxSteps = steps,
        BatchSize = 4,
        ValidationFraction = 0,
        EvalEvery = 0,
        SaveEvery = 0,
        Plot = false,
        Seed = 5,
    };

    public void Dispose()
    {
        Model.Dispose();
        try { Directory.Delete(Dir, recursive: true); } catch (IOException) { }
    }
}
