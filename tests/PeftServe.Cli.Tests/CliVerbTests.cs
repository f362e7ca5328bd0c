using System.Text.Json;
using PeftServe.Core.SafeTensors;
using PeftServe.Tests;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Cli.Tests;

public sealed class CliVerbTests : IDisposable
{
    private readonly string _tmp = Directory.CreateTempSubdirectory("peftserve-cli-").FullName;

    public void Dispose() => Directory.Delete(_tmp, recursive: true);

    private static Tensor Expected(string name)
    {
        using var file = SafeTensorsFile.Open(TestData.ExpectedPath);
        return file.ToTensor(name);
    }

    [Fact]
    public void LogitsVerbMatchesReferenceEndToEnd()
    {
        var input = Path.Combine(_tmp, "in.safetensors");
        var output = Path.Combine(_tmp, "out.safetensors");
        using var ids = Expected("input_ids");
        SafeTensorsWriter.Write(input, [new("input_ids", ids)]);

        var (code, _, err) = CliRunner.Run("logits", "--model", TestData.TinyLlamaDir, "--input", input, "--output", output);
        Assert.True(code == 0, err);
        using var file = SafeTensorsFile.Open(output);
        using var logits = file.ToTensor("logits");
        using var expected = Expected("logits_base");
        Assert.Equal(ScalarType.Float32, logits.dtype);
        Assert.Equal(expected.shape, logits.shape);
        Assert.True((logits - expected).abs().max().item<float>() <= 1e-4f);
    }

    [Fact]
    public void LogitsVerbServesOneAdapterPerRow()
    {
        var input = Path.Combine(_tmp, "in.safetensors");
        var output = Path.Combine(_tmp, "out.safetensors");
        using var ids = Expected("input_ids");
        SafeTensorsWriter.Write(input, [new("input_ids", ids)]);
        var store = Path.Combine(TestData.FixturesDir, "tiny-llama-adapters");

        var (code, _, err) = CliRunner.Run("logits", "--model", TestData.TinyLlamaDir, "--input", input, "--output", output,
            "--adapter-store", store, "--adapters", $"prefix-6,{Path.Combine(store, "lora-r8-all")}");
        Assert.True(code == 0, err);
        using var file = SafeTensorsFile.Open(output);
        using var logits = file.ToTensor("logits");
        using var prefix = Expected("logits_prefix-6");
        using var lora = Expected("logits_lora-r8-all");
        Assert.True((logits[0] - prefix[0]).abs().max().item<float>() <= 1e-4f);
        Assert.True((logits[1] - lora[1]).abs().max().item<float>() <= 1e-4f);

        (code, _, err) = CliRunner.Run("logits", "--model", TestData.TinyLlamaDir, "--input", input, "--output", output,
            "--adapter-store", store, "--adapters", "ia3,-,-");
        Assert.Equal(1, code);
        Assert.Contains("3 adapters for 2 rows", err);
    }

    [Fact]
    public void GenerateWithAdapterMatchesPeftGreedy()
    {
        using var prompt = Expected("prompt_ids");
        using var greedy = Expected("greedy_llama-adapter-4x2");
        var (code, stdout, err) = CliRunner.Run("generate", "--model", TestData.TinyLlamaDir, "--prompt-ids",
            string.Join(",", prompt.data<long>().ToArray()), "--greedy", "--max-tokens", "16", "--ignore-eos", "--ids",
            "--adapter", TestData.AdapterDir("llama-adapter-4x2"));
        Assert.True(code == 0, err);
        Assert.Equal(greedy.data<long>().ToArray(), stdout.Split((char[]?)null, StringSplitOptions.RemoveEmptyEntries).Select(long.Parse).ToArray());
    }

    [Fact]
    public void Nf4LogitsAndGreedyMatchTheReferenceQuantizedModel()
    {
        var input = Path.Combine(_tmp, "in.safetensors");
        var output = Path.Combine(_tmp, "out.safetensors");
        using var ids = Expected("input_ids");
        SafeTensorsWriter.Write(input, [new("input_ids", ids)]);
        var (code, _, err) = CliRunner.Run("logits", "--model", TestData.TinyLlamaDir, "--input", input, "--output", output, "--quantize", "nf4");
        Assert.True(code == 0, err);
        using (var file = SafeTensorsFile.Open(output))
        using (var logits = file.ToTensor("logits"))
        using (var expected = Expected("logits_nf4"))
            Assert.True((logits - expected).abs().max().item<float>() <= 1e-4f);

        using var prompt = Expected("prompt_ids");
        using var greedy = Expected("greedy_nf4");
        (code, var stdout, err) = CliRunner.Run("generate", "--model", TestData.TinyLlamaDir, "--prompt-ids",
            string.Join(",", prompt.data<long>().ToArray()), "--greedy", "--max-tokens", "16", "--ignore-eos", "--ids", "--quantize", "nf4");
        Assert.True(code == 0, err);
        Assert.Equal(greedy.data<long>().ToArray(), stdout.Split((char[]?)null, StringSplitOptions.RemoveEmptyEntries).Select(long.Parse).ToArray());
    }

    [Fact]
    public void BenchDrivesTheEngineAndReportsThroughputAndLatencies()
    {
        var json = Path.Combine(_tmp, "bench.json");
        var (code, _, err) = CliRunner.Run("bench", "--requests", "6", "--concurrency", "3", "--adapters", "0,2", "--prompt-tokens", "8",
            "--max-tokens", "5", "--warmup", "0", "--json", json);
        Assert.True(code == 0, err);
        using var doc = JsonDocument.Parse(File.ReadAllText(json));
        var results = doc.RootElement.GetProperty("results").EnumerateArray().ToArray();
        Assert.Equal([0, 2], results.Select(r => r.GetProperty("adapters").GetInt32()));
        foreach (var r in results)
        {
            Assert.Equal("engine", r.GetProperty("mode").GetString());
            Assert.Equal(6, r.GetProperty("requests").GetInt32());
            Assert.True(r.GetProperty("output_tokens_per_second").GetDouble() > 0);
            var ttft = r.GetProperty("ttft_ms").EnumerateArray().Select(x => x.GetDouble()).ToArray();
            Assert.True(ttft[0] > 0 && ttft[0] <= ttft[1] && ttft[1] <= ttft[2], string.Join(",", ttft));
        }
        // With two adapters, both went through the adapter cache (each read from disk once).
        Assert.Equal(2, results[1].GetProperty("adapter_cache").GetProperty("disk_loads").GetInt32());
    }

    [Fact]
    public void GenerateGreedyIdsMatchReference()
    {
        using var prompt = Expected("prompt_ids");
        using var greedy = Expected("greedy_base");
        var (code, stdout, err) = CliRunner.Run("generate", "--model", TestData.TinyLlamaDir, "--prompt-ids",
            string.Join(",", prompt.data<long>().ToArray()), "--greedy", "--max-tokens", "16", "--ignore-eos", "--ids");
        Assert.True(code == 0, err);
        var ids = stdout.Split((char[]?)null, StringSplitOptions.RemoveEmptyEntries).Select(long.Parse).ToArray();
        Assert.Equal(greedy.data<long>().ToArray(), ids);
    }

    [Fact]
    public void GenerateTextWithTheDefaultModelSaysItIsTheDefault()
    {
        var (code, stdout, err) = CliRunner.Run("generate", "--prompt", "Hello", "--max-tokens", "8", "--seed", "3", "--temperature", "0.8");
        Assert.True(code == 0, err);
        Assert.Contains("meaningless", err);
        Assert.NotEmpty(stdout.Trim());
        // Same seed, same text.
        Assert.Equal(stdout, CliRunner.Run("generate", "--prompt", "Hello", "--max-tokens", "8", "--seed", "3", "--temperature", "0.8").StdOut);
    }

    [Fact]
    public void TokenizeTextAndChatMatchHuggingFace()
    {
        using var doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(TestData.FixturesDir, "tiny-llama-tokenizer-expected.json")));
        var text = doc.RootElement.GetProperty("text").GetString()!;
        var ids = doc.RootElement.GetProperty("ids").EnumerateArray().Select(e => e.GetInt32()).ToArray();
        var chatIds = doc.RootElement.GetProperty("chat").EnumerateArray().Select(e => e.GetInt32()).ToArray();

        var (code, stdout, err) = CliRunner.Run("tokenize", "--model", TestData.TinyLlamaDir, "--text", text);
        Assert.True(code == 0, err);
        Assert.Equal(ids, JsonSerializer.Deserialize<int[]>(stdout));

        var messages = Path.Combine(_tmp, "chat.json");
        File.WriteAllText(messages, """[{"role": "user", "content": "Hi"}]""");
        (code, stdout, err) = CliRunner.Run("tokenize", "--model", TestData.TinyLlamaDir, "--chat", messages, "--add-generation-prompt");
        Assert.True(code == 0, err);
        Assert.Equal(chatIds, JsonSerializer.Deserialize<int[]>(stdout));
        Assert.Contains("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", err);
    }

    [Fact]
    public void TokenizeAcceptsAFolderWithOnlyTokenizerFiles()
    {
        var dir = Path.Combine(_tmp, "tok");
        Directory.CreateDirectory(dir);
        foreach (var f in new[] { "tokenizer.json", "tokenizer_config.json" })
            File.Copy(Path.Combine(TestData.TinyLlamaDir, f), Path.Combine(dir, f));
        var (code, stdout, err) = CliRunner.Run("tokenize", "--model", dir, "--text", "Hello");
        Assert.True(code == 0, err);
        Assert.Equal(1, JsonSerializer.Deserialize<int[]>(stdout)![0]);   // BOS
    }

    [Theory]
    [InlineData(2, "generate", "--prompt", "x", "--prompt-ids", "1,2")]           // both prompt forms
    [InlineData(2, "generate", "--max-tokens", "many", "--prompt", "x")]           // not a number
    [InlineData(2, "logits", "--input", "a.safetensors")]                          // --output missing
    [InlineData(2, "tokenize", "--text", "a", "--bogus")]                          // unknown option
    [InlineData(1, "generate", "--model", "/nonexistent/model", "--prompt", "x")]  // bad model folder
    [InlineData(1, "generate", "--prompt-ids", "1,x,3")]                           // bad id
    [InlineData(1, "generate", "--prompt-ids", "1,99999")]                         // id outside vocab
    [InlineData(1, "logits", "--input", "/nonexistent.safetensors", "--output", "/tmp/o.safetensors")]
    [InlineData(1, "generate", "--prompt", "x", "--device", "tpu")]
    [InlineData(1, "generate", "--prompt", "x", "--adapter", "no-such-adapter")]
    public void BadInputIsOneClearLineAndANonZeroExit(int expectedCode, params string[] args)
    {
        var (code, _, err) = CliRunner.Run(args);
        Assert.Equal(expectedCode, code);
        var lines = err.Split('\n', StringSplitOptions.RemoveEmptyEntries).Where(l => !l.StartsWith("note:")).ToArray();
        Assert.Single(lines);
        Assert.StartsWith("error: ", lines[0]);
        Assert.DoesNotContain("   at ", err);   // no stack trace
    }

    [Fact]
    public void BadModelFolderErrorNamesTheProblem()
    {
        var dir = Path.Combine(_tmp, "broken");
        Directory.CreateDirectory(dir);
        File.WriteAllText(Path.Combine(dir, "config.json"), "{ not json");
        File.Copy(Path.Combine(TestData.TinyLlamaDir, "tokenizer.json"), Path.Combine(dir, "tokenizer.json"));
        var (code, _, err) = CliRunner.Run("generate", "--model", dir, "--prompt-ids", "1,2");
        Assert.Equal(1, code);
        Assert.Contains("config.json", err);
    }
}
