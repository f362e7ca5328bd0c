using System.CommandLine;

namespace PeftServe.Trainer;

public static class Program
{
    public static int Main(string[] args) => Run(args, error: null);

    /// <summary>The trainer with its messages and progress written to <paramref name="error"/> (null:
    /// the console's standard error), so that tests can read them without redirecting the process's
    /// Console.Error under other tests.</summary>
    internal static int Run(string[] args, TextWriter? error)
    {
        // The trainer is the one `train` verb: `PeftServe.Trainer --method lora ...` means `train --method lora ...`
        // (the same command the CLI offers as `peftserve cli train`).
        var root = new RootCommand("PeftServe trainer") { TrainCommand.Create(error) };
        if (args.Length == 0 || args[0] != "train") args = ["train", .. args];
        var parsed = root.Parse(args);
        if (parsed.Errors.Count > 0)
        {
            (error ?? Console.Error).WriteLine($"error: {parsed.Errors[0].Message} (see --help)");
            return 2;
        }
        return parsed.Invoke();
    }
}
