using System.CommandLine;

namespace PeftServe.Trainer;

public static class Program
{
    public static int Main(string[] args)
    {
        // The trainer is the one `train` verb: `PeftServe.Trainer --method lora ...` means `train --method lora ...`
        // (the same command the CLI offers as `peftserve cli train`).
        var root = new RootCommand("PeftServe trainer") { TrainCommand.Create() };
        if (args.Length == 0 || args[0] != "train") args = ["train", .. args];
        var parsed = root.Parse(args);
        if (parsed.Errors.Count > 0)
        {
            Console.Error.WriteLine($"error: {parsed.Errors[0].Message} (see --help)");
            return 2;
        }
        return parsed.Invoke();
    }
}
