using System.CommandLine;
using PeftServe.Core.Adapters;
using PeftServe.Core.Engine;
using PeftServe.Core.Generation;
using PeftServe.Core.Model;
using PeftServe.Core.SafeTensors;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Cli.Commands;

/// <summary><c>logits</c>: a full forward pass over given token ids; writes the logits.</summary>
internal static class LogitsCommand
{
    public static Command Create()
    {
        var model = CommonOptions.Model();
        var device = CommonOptions.Device();
        var dtype = CommonOptions.DType();
        var quantize = CommonOptions.Quantize();
        var doubleQuant = CommonOptions.DoubleQuant();
        var input = new Option<string>("--input") { Description = "safetensors file holding input_ids [B,T] int64", Required = true };
        var output = new Option<string>("--output") { Description = "safetensors file to write logits [B,T,V] float32 to", Required = true };
        var adapters = new Option<string?>("--adapters") { Description = "one adapter per row, comma-separated: a folder or a name in the store, '-' for none" };
        var store = CommonOptions.AdapterStore();

        var command = new Command("logits", "Compute next-token logits for every position of a batch of token ids")
        {
            model, input, output, adapters, store, quantize, doubleQuant, device, dtype,
        };
        command.SetAction(parse => CommonOptions.Run(() =>
        {
            using var llm = CommonOptions.LoadModel(parse.GetValue(model), CommonOptions.ParseModelOptions(parse.GetValue(device)!, parse.GetValue(dtype), parse.GetValue(quantize), parse.GetValue(doubleQuant)));
            var inputPath = parse.GetValue(input)!;
            using var file = SafeTensorsFile.Open(inputPath);
            if (!file.Contains("input_ids")) throw new InvalidDataException($"{inputPath}: no tensor named input_ids");
            using var ids = file.ToTensor("input_ids", llm.Device);
            if (ids.dim() != 2 || ids.dtype != ScalarType.Int64)
                throw new InvalidDataException($"{inputPath}: input_ids must be [B,T] int64, not {ids.dtype} [{string.Join(",", ids.shape)}]");
            long v = llm.Config.VocabSize;
            if (ids.NumberOfElements > 0 && (ids.min().item<long>() < 0 || ids.max().item<long>() >= v))
                throw new InvalidDataException($"{inputPath}: input_ids hold ids outside the vocabulary 0..{v - 1}");

            long b = ids.shape[0], t = ids.shape[1];
            // Every row's adapter is held at once: as many vocabulary slots as rows (allocated only if one needs them).
            var limits = new AdapterLimits();
            using var adapterManager = new AdapterManager(llm, limits with { EmbeddingSlots = Math.Max(limits.EmbeddingSlots, (int)b) }, parse.GetValue(store), hostCacheBytes: 1L << 30);
            var rowAdapters = ParseAdapters(parse.GetValue(adapters), (int)b, adapterManager);
            using var result = FullLogits.Compute(llm, ids, rowAdapters);
            SafeTensorsWriter.Write(parse.GetValue(output)!, [new("logits", result)]);
            Console.Error.WriteLine($"wrote logits [{b},{t},{v}] to {parse.GetValue(output)}");
            return 0;
        }));
        return command;
    }

    /// <summary>"a,b,-": one entry per row; a single entry applies to every row.</summary>
    private static ResidentAdapter?[] ParseAdapters(string? spec, int rows, AdapterManager set)
    {
        if (string.IsNullOrWhiteSpace(spec)) return new ResidentAdapter?[rows];
        var names = spec.Split(',', StringSplitOptions.TrimEntries);
        if (names.Length == 1) names = Enumerable.Repeat(names[0], rows).ToArray();
        if (names.Length != rows) throw new ArgumentException($"--adapters names {names.Length} adapters for {rows} rows (give one per row, or one for all)");
        return names.Select(n => n is "-" or "" ? null : set.Acquire(n)).ToArray();
    }
}
