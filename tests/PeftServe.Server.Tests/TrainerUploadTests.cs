using PeftServe.Core.Adapters;
using PeftServe.Core.Engine;
using PeftServe.Core.Generation;
using PeftServe.Core.Model;
using PeftServe.Core.Tokenization;
using PeftServe.Tests;
using PeftServe.Trainer;

namespace PeftServe.Server.Tests;

/// <summary>The trainer and the server meet: an adapter the trainer made, sent with the trainer's own
/// uploader (what `train --upload URL` does), is listed and served at once, and generates what the
/// core library generates with the same adapter.</summary>
public sealed class TrainerUploadTests
{
    [Theory]
    [InlineData("trained-lora")]
    [InlineData("trained-prefix")]
    [InlineData("trained-bottleneck")]
    public async Task ATrainedAdapterUploadedByTheTrainerIsServedAtOnce(string example)
    {
        await using var server = await TestServer.StartAsync();
        var source = Path.Combine(TestData.RepoRoot, "adapters", example);
        var name = "uploaded-" + example;
        await AdapterUpload.UploadAsync(server.Url + "/v1/adapters", source, name, apiKey: null);

        var models = await server.Http.GetStringAsync("v1/models");
        Assert.Contains($"\"{name}\"", models);

        int[] prompt = [1, 17, 42, 99, 7];
        var body = await server.PostJsonAsync("v1/completions", new { model = name, prompt, max_tokens = 10, temperature = 0, ignore_eos = true });
        var text = body.GetProperty("choices")[0].GetProperty("text").GetString();

        using var model = LlamaModel.Load(TestData.TinyLlamaDir, new ModelOptions());
        using var adapters = new AdapterManager(model, new AdapterLimits(), null, 1L << 30);
        var ids = FixedBatch.Generate(model, [prompt], [SamplingParams.Greedy(10)], adapters: [adapters.Acquire(source)]).Select(t => t.TokenId).ToArray();
        Assert.Equal(Tokenizer.FromDirectory(TestData.TinyLlamaDir).Decode(ids), text);
        var baseIds = FixedBatch.Generate(model, [prompt], [SamplingParams.Greedy(10)]).Select(t => t.TokenId).ToArray();
        Assert.NotEqual(baseIds, ids);   // the adapter was applied, not just the base model
    }
}
