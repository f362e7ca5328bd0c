using System.CommandLine;
using PeftServe.Core.Quantization;
using PeftServe.Core.Runtime;

namespace PeftServe.Cli.Commands;

/// <summary><c>nf4-check</c>: on a CUDA machine, the fused NF4 kernel against the plain
/// dequantize-and-matmul path on random data (error and timing per shape).</summary>
internal static class Nf4CheckCommand
{
    public static Command Create()
    {
        var iterations = new Option<int>("--iterations") { Description = "timed calls per shape", DefaultValueFactory = _ => 200 };
        var command = new Command("nf4-check", "Check and time the fused NF4 CUDA kernel against the plain path (needs CUDA)") { iterations };
        command.SetAction(parse => CommonOptions.Run(() =>
        {
            DeviceSelection.ParseDevice("cuda");
            return Nf4KernelSelfCheck.Run(Console.Out, parse.GetValue(iterations));
        }));
        return command;
    }
}
