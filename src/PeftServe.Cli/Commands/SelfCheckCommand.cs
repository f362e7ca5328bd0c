using System.CommandLine;
using PeftServe.Core.Runtime;

namespace PeftServe.Cli.Commands;

/// <summary><c>selfcheck</c>: the GPU test lane (kernels against tensor ops, Hugging Face conformance in float32
/// and bfloat16 with eager and graphed decode, our methods against the CPU). Needs CUDA.</summary>
internal static class SelfCheckCommand
{
    public static Command Create()
    {
        var fixtures = new Option<string>("--fixtures") { Description = "folder with tiny-llama-expected.safetensors and tiny-llama-adapters/", DefaultValueFactory = _ => "tests/fixtures" };
        var model = CommonOptions.Model();
        var command = new Command("selfcheck", "Run the GPU conformance checks (kernels, Hugging Face fixtures, graphs vs eager); needs CUDA") { fixtures, model };
        command.SetAction(parse => CommonOptions.Run(() =>
        {
            DeviceSelection.ParseDevice("cuda");
            var (dir, _) = DefaultModel.Resolve(parse.GetValue(model));
            return GpuConformance.Run(Console.Out, parse.GetValue(fixtures)!, dir);
        }));
        return command;
    }
}
