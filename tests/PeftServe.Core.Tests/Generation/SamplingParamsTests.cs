using PeftServe.Core.Generation;

namespace PeftServe.Core.Tests.Generation;

public class SamplingParamsTests
{
    [Fact]
    public void DefaultsAreValidAndMatchOpenAi()
    {
        var p = new SamplingParams();
        p.Validate();
        Assert.Equal(1.0f, p.Temperature);
        Assert.Equal(1.0f, p.TopP);
        Assert.Equal(0, p.TopK);
        Assert.Null(p.Seed);
        Assert.Equal(16, p.MaxTokens);
        Assert.Empty(p.StopTokenIds);
        Assert.Equal(0f, p.PresencePenalty);
        Assert.Equal(0f, p.FrequencyPenalty);
        Assert.False(p.IsGreedy);
    }

    [Fact]
    public void GreedyHasZeroTemperatureAndTheGivenMaxTokens()
    {
        var p = SamplingParams.Greedy(7);
        p.Validate();
        Assert.Equal(0f, p.Temperature);
        Assert.Equal(7, p.MaxTokens);
        Assert.True(p.IsGreedy);
    }

    public static TheoryData<string, string> InvalidCases() => new()
    {
        { "temperature=-0.1", "temperature" },
        { "temperature=NaN", "temperature" },
        { "temperature=+inf", "temperature" },
        { "top_p=0", "top_p" },
        { "top_p=-0.5", "top_p" },
        { "top_p=1.01", "top_p" },
        { "top_p=NaN", "top_p" },
        { "top_k=-1", "top_k" },
        { "max_tokens=0", "max_tokens" },
        { "max_tokens=-3", "max_tokens" },
        { "presence=2.5", "presence_penalty" },
        { "frequency=NaN", "frequency_penalty" },
        { "stop=-1", "stop token" },
    };

    private static SamplingParams Make(string which) => which switch
    {
        "temperature=-0.1" => new() { Temperature = -0.1f },
        "temperature=NaN" => new() { Temperature = float.NaN },
        "temperature=+inf" => new() { Temperature = float.PositiveInfinity },
        "top_p=0" => new() { TopP = 0f },
        "top_p=-0.5" => new() { TopP = -0.5f },
        "top_p=1.01" => new() { TopP = 1.01f },
        "top_p=NaN" => new() { TopP = float.NaN },
        "top_k=-1" => new() { TopK = -1 },
        "max_tokens=0" => new() { MaxTokens = 0 },
        "max_tokens=-3" => new() { MaxTokens = -3 },
        "presence=2.5" => new() { PresencePenalty = 2.5f },
        "frequency=NaN" => new() { FrequencyPenalty = float.NaN },
        "stop=-1" => new() { StopTokenIds = [2, -1] },
        _ => throw new ArgumentOutOfRangeException(nameof(which)),
    };

    [Theory]
    [MemberData(nameof(InvalidCases))]
    public void ValidateRejectsInvalidValuesWithAClearMessage(string which, string fieldInMessage)
    {
        var ex = Assert.Throws<ArgumentException>(() => Make(which).Validate());
        Assert.Contains(fieldInMessage, ex.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void ValidateAcceptsBoundaryValues()
    {
        new SamplingParams { Temperature = 0f, TopP = 1f, TopK = 0, MaxTokens = 1 }.Validate();
        new SamplingParams { Temperature = 1e-4f, TopP = 1e-6f, TopK = 1, PresencePenalty = -2f, FrequencyPenalty = 2f, StopTokenIds = [0, 5] }.Validate();
    }

    [Fact]
    public void WithResolvedSeedKeepsAnExplicitSeedAndFillsAMissingOne()
    {
        var seeded = new SamplingParams { Seed = 123 };
        Assert.Same(seeded, seeded.WithResolvedSeed());

        var unseeded = new SamplingParams { Temperature = 0.7f };
        var a = unseeded.WithResolvedSeed();
        var b = unseeded.WithResolvedSeed();
        Assert.NotNull(a.Seed);
        Assert.NotNull(b.Seed);
        Assert.NotEqual(a.Seed, b.Seed); // 64 random bits each
        Assert.Equal(0.7f, a.Temperature);
        Assert.Null(unseeded.Seed);
    }
}
