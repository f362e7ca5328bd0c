using System.Diagnostics;
using System.Text.RegularExpressions;
using PeftServe.Core.Cuda;
using PeftServe.Tests;

namespace PeftServe.Core.Tests.Kernels;

/// <summary>Every kernel file compiled to PTX on the CPU machine, for each element type and the compile-time constants
/// the host passes, with clang's CUDA mode (Debian's clang; ./peftserve test installs it) standing in for NVRTC. The
/// source is exactly what NVRTC is handed (<see cref="KernelModule.Source"/>), and every kernel it declares must come
/// out as an entry point. GPU time is scarce: a kernel that does not compile should fail here, not in a GPU session.
/// (clang is not NVRTC: it checks the C++ and the code generation for sm_80, not NVRTC's own limits, and never runs
/// the code; the GPU's selfcheck does that.)</summary>
public sealed partial class KernelCompileTests
{
    public static TheoryData<string, string, string> Cases()
    {
        var data = new TheoryData<string, string, string>();
        foreach (var type in new[] { "bf16_t", "f16_t", "float" })
        {
            data.Add("fused.cu", type, "");
            data.Add("bgmv.cu", type, "-DSHRINK_RANKS=2");
            data.Add("bgmv.cu", type, "-DSHRINK_RANKS=4");
            data.Add("adaption_prompt.cu", type, "");
            data.Add("paged_attention.cu", type, "-DHEAD_DIM=128 -DGROUP=4 -DWARPS=16");
            data.Add("paged_attention.cu", type, "-DHEAD_DIM=64 -DGROUP=7 -DWARPS=8");
        }
        foreach (var tiles in new[] { "1", "2", "4" }) data.Add("nf4.cu", "", "-DMMA_MT=" + tiles);
        foreach (var depth in new[] { "1", "3" }) data.Add("nf4.cu", "", "-DMMA_MT=2 -DMMA_PREFETCH=" + depth);
        foreach (var tiles in new[] { "1", "2" }) data.Add("nf4.cu", "", $"-DMMA_MT={tiles} -DMMA_PREFETCH=2 -DMMA_XSMEM=1");
        data.Add("nf4.cu", "", "-DMMA_MT=1 -DMMA_PREFETCH=3 -DMMA_XSMEM=1");
        return data;
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void CompilesToPtxWithEveryKernel(string file, string elementType, string defines)
    {
        var clang = Clang ?? throw new InvalidOperationException("clang++ is missing: ./peftserve test installs Debian's clang (or set PEFTSERVE_CLANG)");
        var source = KernelModule.Source(file);
        var dir = Directory.CreateTempSubdirectory("peftserve-kernel-");
        try
        {
            var cu = Path.Combine(dir.FullName, file);
            var ptx = Path.Combine(dir.FullName, "out.ptx");
            File.WriteAllText(cu, source);
            var shim = Path.Combine(TestData.RepoRoot, "tests", "PeftServe.Core.Tests", "Kernels", "clang_cuda_shim.h");
            var args = $"-x cuda --cuda-device-only --cuda-gpu-arch=sm_80 -nocudainc -nocudalib -std=c++17 -S -o \"{ptx}\" -include \"{shim}\" " +
                       (elementType == "" ? "" : $"-DELEM_TYPE={elementType} ") + defines + $" \"{cu}\"";
            var (status, output) = Run(clang, args);
            Assert.True(status == 0, $"{file} {elementType} {defines}: clang failed\n{output}");
            var entries = Entry().Matches(File.ReadAllText(ptx)).Select(m => m.Groups[1].Value).ToHashSet();
            var declared = Declared().Matches(source).Select(m => m.Groups[1].Value).ToArray();
            Assert.NotEmpty(declared);
            foreach (var name in declared.Where(n => !n.Contains('#')))   // macro-made names are counted below
                Assert.Contains(name, entries);
            Assert.True(entries.Count >= declared.Length, $"{file}: {entries.Count} entry points for {declared.Length} kernel declarations");
        }
        finally
        {
            dir.Delete(recursive: true);
        }
    }

    /// <summary>PEFTSERVE_CLANG, else clang++-14 or clang++ on the PATH, else null.</summary>
    private static readonly string? Clang = Environment.GetEnvironmentVariable("PEFTSERVE_CLANG") is { Length: > 0 } c ? c
        : new[] { "clang++-14", "clang++" }.FirstOrDefault(name => (Environment.GetEnvironmentVariable("PATH") ?? "")
            .Split(Path.PathSeparator).Any(d => File.Exists(Path.Combine(d, name))));

    private static (int Status, string Output) Run(string program, string args)
    {
        using var process = Process.Start(new ProcessStartInfo(program, args) { RedirectStandardError = true, RedirectStandardOutput = true })!;
        var stderr = process.StandardError.ReadToEndAsync();
        var stdout = process.StandardOutput.ReadToEnd();
        process.WaitForExit();
        return (process.ExitCode, stdout + stderr.Result);
    }

    [GeneratedRegex(@"\.entry\s+([A-Za-z0-9_]+)\s*\(")]
    private static partial Regex Entry();

    [GeneratedRegex(@"extern ""C"" __global__ void (?:__launch_bounds__\([^)]*\) )?([A-Za-z0-9_#]+)\(")]
    private static partial Regex Declared();
}
