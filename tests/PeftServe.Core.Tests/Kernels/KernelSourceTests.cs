using System.Text.RegularExpressions;
using PeftServe.Core.Cuda;
using PeftServe.Tests;

namespace PeftServe.Core.Tests.Kernels;

/// <summary>What NVRTC is handed for each kernel file (the GPU compiles it; the CI machine can still read it):
/// every <c>#include "*.cuh"</c> pasted in once, and every kernel starting with <c>wait_for_prior_kernels()</c>, as
/// programmatic dependent launch (on by default on sm_90+) needs: a kernel launched that way that touched memory before
/// the wait could read what the kernel before it has not finished writing.</summary>
public sealed partial class KernelSourceTests
{
    public static TheoryData<string> KernelFiles() =>
        new(Directory.GetFiles(Path.Combine(TestData.RepoRoot, "src", "PeftServe.Core", "Kernels"), "*.cu").Select(Path.GetFileName).Order(StringComparer.Ordinal)!);

    [Theory]
    [MemberData(nameof(KernelFiles))]
    public void IncludesArePastedOnce(string file)
    {
        var source = KernelModule.Source(file);
        Assert.DoesNotMatch(new Regex(@"^\s*#include", RegexOptions.Multiline), source);
        Assert.Single(Regex.Matches(source, @"void wait_for_prior_kernels\(\)"));
    }

    [Theory]
    [MemberData(nameof(KernelFiles))]
    public void EveryKernelFirstWaitsForThePriorKernels(string file)
    {
        var source = KernelModule.Source(file);
        var kernels = Kernel().Matches(source);
        Assert.NotEmpty(kernels);
        foreach (Match kernel in kernels)
        {
            var name = kernel.Groups[1].Value;
            var body = BodyAfter(source, kernel.Index + kernel.Length);
            // A kernel that forwards to a device function (a template instance) waits there, first thing.
            if (!body.StartsWith("wait_for_prior_kernels();", StringComparison.Ordinal) && Call().Match(body) is { Success: true } call)
            {
                var definition = new Regex($@"void\s+{Regex.Escape(call.Groups[1].Value)}\s*\(").Match(source);
                Assert.True(definition.Success, $"{file}: kernel {name} calls {call.Groups[1].Value}, which is not defined in the file");
                body = BodyAfter(source, definition.Index + definition.Length);
            }
            Assert.True(body.StartsWith("wait_for_prior_kernels();", StringComparison.Ordinal), $"{file}: kernel {name} does not start with wait_for_prior_kernels()");
        }
    }

    /// <summary>The statements of the first body ({...}) at or after <paramref name="from"/>, without the braces
    /// and leading white space (macro line continuations removed).</summary>
    private static string BodyAfter(string source, int from)
    {
        int open = source.IndexOf('{', from), depth = 0, i = open;
        for (; i < source.Length; i++)
        {
            if (source[i] == '{') depth++;
            else if (source[i] == '}' && --depth == 0) break;
        }
        return source[(open + 1)..i].Replace("\\\n", "\n").TrimStart();
    }

    [GeneratedRegex(@"extern ""C"" __global__ void (?:__launch_bounds__\([^)]*\) )?([A-Za-z0-9_#]+)\(")]
    private static partial Regex Kernel();

    [GeneratedRegex(@"^([A-Za-z_][A-Za-z0-9_]*)\s*(?:<[^>]*>)?\s*\(")]
    private static partial Regex Call();
}
