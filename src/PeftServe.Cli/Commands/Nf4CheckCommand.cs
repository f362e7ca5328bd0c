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
        var rows = new Option<int[]>("--rows")
        {
            Description = $"activation rows to check (1 to {Nf4CudaKernel.MaxSplitRows}; default {string.Join(",", Nf4KernelSelfCheck.Rows)})",
            AllowMultipleArgumentsPerToken = true,
        };
        var bf16Only = new Option<bool>("--bf16-only") { Description = "skip the fp16 cases" };
        var command = new Command("nf4-check", "Check and time the fused NF4 CUDA kernel against the plain path (needs CUDA)") { iterations, rows, bf16Only };
        command.SetAction(parse => CommonOptions.Run(() =>
        {
            var selected = parse.GetValue(rows) is { Length: > 0 } r ? r : null;
            if (selected?.FirstOrDefault(n => n < 1 || n > Nf4CudaKernel.MaxSplitRows) is int bad and not 0)
                throw new ArgumentException($"--rows: {bad} is outside 1 to {Nf4CudaKernel.MaxSplitRows}");
            DeviceSelection.ParseDevice("cuda");
            return Nf4KernelSelfCheck.Run(Console.Out, parse.GetValue(iterations), includeFp16: !parse.GetValue(bf16Only), rowCounts: selected);
        }));
        return command;
    }
}
