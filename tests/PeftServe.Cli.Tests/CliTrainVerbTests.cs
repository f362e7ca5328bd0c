using PeftServe.Core.SafeTensors;
using PeftServe.Tests;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Cli.Tests;

/// <summary>The CLI's <c>train</c> verb (the trainer's command): an adapter trained from the command line
/// is then served by the CLI's own <c>logits</c> verb.</summary>
public sealed class CliTrainVerbTests : IDisposable
{
    private readonly string _tmp = Directory.CreateTempSubdirectory("peftserve-cli-train-").FullName;

    public void Dispose() => Directory.Delete(_tmp, recursive: true);

    [Fact]
    public void TrainThenServeTheAdapter()
    {
        var data = Path.Combine(_tmp, "data.jsonl");
        File.WriteAllLines(data, Enumerable.Range(0, 8).Select(i => $$"""{"prompt": "say {{i}}:", "completion": " {{i}} {{i}}"}"""));
        var adapter = Path.Combine(_tmp, "trained-prompt");
        var (code, _, err) = CliRunner.Run("train", "--method", "prompt", "--model", TestData.TinyLlamaDir, "--data", data,
            "--output", adapter, "--max-steps", "5", "--num-virtual-tokens", "4", "--no-plot");
        Assert.True(code == 0, err);
        Assert.Contains("trainable parameters: 256 of", err);

        var input = Path.Combine(_tmp, "in.safetensors");
        var output = Path.Combine(_tmp, "out.safetensors");
        using (var ids = torch.tensor(new long[] { 1, 20, 30, 40 }, [1, 4])) SafeTensorsWriter.Write(input, [new("input_ids", ids)]);
        (code, _, err) = CliRunner.Run("logits", "--model", TestData.TinyLlamaDir, "--input", input, "--output", output, "--adapters", adapter);
        Assert.True(code == 0, err);
        (code, _, err) = CliRunner.Run("logits", "--model", TestData.TinyLlamaDir, "--input", input, "--output", output + ".base");
        Assert.True(code == 0, err);
        using var a = SafeTensorsFile.Open(output);
        using var b = SafeTensorsFile.Open(output + ".base");
        using var la = a.ToTensor("logits");
        using var lb = b.ToTensor("logits");
        Assert.True((la - lb).abs().max().item<float>() > 1e-3, "the trained prompt adapter does not change the logits");
    }

    [Fact]
    public void TwoProcessesWithTheSameSeedWriteTheSameAdapter()
    {
        // Data order and AdaMix routing are seeded the same way in every process.
        var data = Path.Combine(_tmp, "data.jsonl");
        File.WriteAllLines(data, Enumerable.Range(0, 12).Select(i => $$"""{"text": "word {{i}} and {{i * 7 % 5}} again"}"""));
        byte[] Train(string name)
        {
            var dir = Path.Combine(_tmp, name);
            var (code, _, err) = CliRunner.Run("train", "--method", "adamix", "--model", TestData.TinyLlamaDir, "--data", data,
                "--output", dir, "--max-steps", "6", "--batch-size", "3", "--no-plot", "--seed", "9");
            Assert.True(code == 0, err);
            return File.ReadAllBytes(Path.Combine(dir, "adapter_model.safetensors"));
        }
        Assert.Equal(Train("a"), Train("b"));
    }

    [Fact]
    public void TrainHelpExplainsTheMethods()
    {
        var (code, stdout, _) = CliRunner.Run("train", "--help");
        Assert.Equal(0, code);
        foreach (var m in new[] { "lora", "qlora", "prefix", "prompt", "ptuning", "ia3", "llama-adapter", "bottleneck", "adamix", "bitfit", "--resume", "--packing" })
            Assert.Contains(m, stdout);
    }
}
