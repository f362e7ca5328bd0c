using System.CommandLine;
using PeftServe.Cli.Commands;

namespace PeftServe.Cli;

public static class Program
{
    public static int Main(string[] args)
    {
        var root = new RootCommand("PeftServe: multi-adapter LLM inference on one frozen base model")
        {
            GenerateCommand.Create(),
            LogitsCommand.Create(),
            TokenizeCommand.Create(),
            BenchCommand.Create(),
            Nf4CheckCommand.Create(),
            SelfCheckCommand.Create(),
            PeftServe.Trainer.TrainCommand.Create(),
        };
        var parsed = root.Parse(args);
        // A contract for scripts: a bad command line is one line on stderr and exit code 2.
        if (parsed.Errors.Count > 0)
        {
            Console.Error.WriteLine($"error: {parsed.Errors[0].Message} (see --help)");
            return 2;
        }
        return parsed.Invoke();
    }
}
