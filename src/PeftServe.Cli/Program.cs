using System.CommandLine;

namespace PeftServe.Cli;

public static class Program
{
    public static int Main(string[] args)
    {
        var root = new RootCommand("PeftServe: multi-adapter LLM inference on a frozen base model");
        return root.Parse(args).Invoke();
    }
}
