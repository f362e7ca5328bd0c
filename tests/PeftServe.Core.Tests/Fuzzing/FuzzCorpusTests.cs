using PeftServe.Fuzz;
using PeftServe.Tests;

namespace PeftServe.Core.Tests.Fuzzing;

/// <summary>Every seed of the fuzz corpus and every crash the fuzzers found (tests/fuzz/regressions)
/// goes through its harness here, without AFL: each parser may refuse an input only with its typed
/// error. A crash found later is kept by dropping its file into tests/fuzz/regressions/TARGET.</summary>
public sealed class FuzzCorpusTests
{
    public static TheoryData<string, string> Inputs()
    {
        var data = new TheoryData<string, string>();
        foreach (var target in FuzzTargets.All.Keys)
            foreach (var kind in new[] { "corpus", "regressions" })
            {
                var dir = Path.Combine(TestData.RepoRoot, "tests", "fuzz", kind, target);
                foreach (var file in Directory.GetFiles(dir).Where(f => !Path.GetFileName(f).StartsWith('.')).Order(StringComparer.Ordinal))
                    data.Add(target, Path.GetRelativePath(TestData.RepoRoot, file));
            }
        return data;
    }

    [Theory]
    [MemberData(nameof(Inputs))]
    public void EveryKnownInputEndsInItsParsersTypedError(string target, string file) =>
        FuzzTargets.All[target](File.ReadAllBytes(Path.Combine(TestData.RepoRoot, file)));

    /// <summary>SharpFuzz reads the first input from stdin as soon as the fork server is up, which can be
    /// before AFL++ has written it: the first run may see no bytes. Every harness must then still reach its
    /// (instrumented) parser, or AFL++ aborts with "No instrumentation detected"; and it must not crash.</summary>
    [Theory]
    [MemberData(nameof(Targets))]
    public void AnEmptyInputEndsInItsParsersTypedError(string target) => FuzzTargets.All[target]([]);

    public static TheoryData<string> Targets() => new(FuzzTargets.All.Keys);

    [Fact]
    public void EveryTargetHasSeeds()
    {
        foreach (var target in FuzzTargets.All.Keys)
            Assert.NotEmpty(Directory.GetFiles(Path.Combine(TestData.RepoRoot, "tests", "fuzz", "corpus", target)));
    }
}
