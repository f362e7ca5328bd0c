using SharpFuzz;

namespace PeftServe.Fuzz;

/// <summary>Fuzzing entry point (see tests/fuzz/README.md).
///   dotnet PeftServe.Fuzz.dll TARGET                  run under afl-fuzz (SharpFuzz persistent mode)
///   dotnet PeftServe.Fuzz.dll TARGET --replay DIR...  run every file of the folders once, outside AFL:
///                                                     exit code 1 if any escapes its parser's typed error</summary>
public static class Program
{
    public static int Main(string[] args)
    {
        if (args.Length == 0 || !FuzzTargets.All.TryGetValue(args[0], out var target))
        {
            Console.Error.WriteLine($"usage: PeftServe.Fuzz TARGET [--replay DIR...]; targets: {string.Join(", ", FuzzTargets.All.Keys)}");
            return 2;
        }
        if (args.Length > 1 && args[1] == "--replay")
        {
            int failures = 0, count = 0;
            foreach (var file in args[2..].Where(Directory.Exists).SelectMany(Directory.GetFiles).Where(f => !Path.GetFileName(f).StartsWith('.')).Order(StringComparer.Ordinal))
            {
                count++;
                try { target(File.ReadAllBytes(file)); }
                catch (Exception e)
                {
                    failures++;
                    Console.Error.WriteLine($"{file}: {e.GetType().Name}: {e.Message}");
                }
            }
            Console.WriteLine($"{args[0]}: {count} inputs, {failures} escaped their typed error");
            return failures == 0 ? 0 : 1;
        }
        Fuzzer.Run(stream =>
        {
            using var ms = new MemoryStream();
            stream.CopyTo(ms);
            target(ms.ToArray());
        });
        return 0;
    }
}
