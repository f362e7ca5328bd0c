using System.CommandLine;
using PeftServe.Core.Adapters;
using PeftServe.Core.Engine;
using PeftServe.Core.Generation;

namespace PeftServe.Cli.Commands;

/// <summary><c>generate</c>: continue one prompt, printing the continuation as it is produced.</summary>
internal static class GenerateCommand
{
    public static Command Create()
    {
        var model = CommonOptions.Model();
        var device = CommonOptions.Device();
        var dtype = CommonOptions.DType();
        var quantize = CommonOptions.Quantize();
        var doubleQuant = CommonOptions.DoubleQuant();
        var prompt = new Option<string?>("--prompt") { Description = "prompt text (tokenized with the model's tokenizer, BOS added as the model expects)" };
        var promptIds = new Option<string?>("--prompt-ids") { Description = "prompt as comma-separated token ids, e.g. 1,17,42" };
        var maxTokens = new Option<int>("--max-tokens") { Description = "tokens to generate", DefaultValueFactory = _ => 64 };
        var greedy = new Option<bool>("--greedy") { Description = "pick the most likely token every step (temperature 0)" };
        var temperature = new Option<float>("--temperature") { Description = "sampling temperature (0 = greedy)", DefaultValueFactory = _ => 1.0f };
        var topP = new Option<float>("--top-p") { Description = "nucleus sampling: keep the smallest set of tokens with this much probability", DefaultValueFactory = _ => 1.0f };
        var topK = new Option<int>("--top-k") { Description = "keep only the K most likely tokens (0 = off)" };
        var seed = new Option<ulong?>("--seed") { Description = "random seed; the same seed gives the same text" };
        var ids = new Option<bool>("--ids") { Description = "print token ids instead of text" };
        var ignoreEos = new Option<bool>("--ignore-eos") { Description = "do not stop at the end-of-sequence token" };
        var stopIds = new Option<string?>("--stop-ids") { Description = "extra comma-separated token ids that end generation" };
        var adapter = new Option<string?>("--adapter") { Description = "adapter folder, or a name in the adapter store" };
        var store = CommonOptions.AdapterStore();

        var command = new Command("generate", "Generate a continuation of a prompt")
        {
            model, prompt, promptIds, maxTokens, greedy, temperature, topP, topK, seed, ids, ignoreEos, stopIds, adapter, store, quantize, doubleQuant, device, dtype,
        };
        command.Validators.Add(r =>
        {
            bool hasText = r.GetValue(prompt) is not null, hasIds = r.GetValue(promptIds) is not null;
            if (hasText == hasIds) r.AddError("give exactly one of --prompt or --prompt-ids");
            if (r.GetValue(greedy) && r.GetResult(temperature) is { Implicit: false })
                r.AddError("--greedy and --temperature exclude each other");
        });
        command.SetAction(parse => CommonOptions.Run(() =>
        {
            var tokenizer = CommonOptions.LoadTokenizer(parse.GetValue(model));
            using var llm = CommonOptions.LoadModel(parse.GetValue(model), CommonOptions.ParseModelOptions(parse.GetValue(device)!, parse.GetValue(dtype), parse.GetValue(quantize), parse.GetValue(doubleQuant)));
            int[] promptTokens = parse.GetValue(promptIds) is { } idList
                ? ParseIds(idList, "--prompt-ids")
                : tokenizer.Encode(parse.GetValue(prompt)!, addSpecialTokens: true);
            var stops = new List<int>();
            if (!parse.GetValue(ignoreEos)) stops.AddRange(tokenizer.EosTokenIds.Concat(llm.Config.EosTokenIds).Distinct());
            if (parse.GetValue(stopIds) is { } extra) stops.AddRange(ParseIds(extra, "--stop-ids"));
            var sampling = new SamplingParams
            {
                Temperature = parse.GetValue(greedy) ? 0f : parse.GetValue(temperature),
                TopP = parse.GetValue(topP),
                TopK = parse.GetValue(topK),
                Seed = parse.GetValue(seed),
                MaxTokens = parse.GetValue(maxTokens),
                StopTokenIds = stops,
            };

            bool printIds = parse.GetValue(ids);
            // Through the serving engine, exactly as a request to the server runs (paged KV cache, adapter
            // manager, CUDA graphs on a GPU), sized for this one request.
            var limits = new AdapterLimits();
            int columns = promptTokens.Length + limits.MaxVirtualTokens + sampling.MaxTokens + 1;
            using var engine = new InferenceEngine(llm, tokenizer, new EngineOptions
            {
                MaxBatchSize = 1,
                AdapterStore = parse.GetValue(store),
                AdapterLimits = limits,
                PrefillChunkTokens = Math.Max(512, promptTokens.Length + limits.MaxVirtualTokens),
                KvCacheBlocks = (columns + 15) / 16 + 2,
            });
            var stream = engine.Submit(new GenerationRequest { PromptIds = promptTokens, Sampling = sampling, Adapter = parse.GetValue(adapter) });
            var separator = "";
            foreach (var e in stream.ToBlockingEnumerable())
            {
                if (e.TokenId < 0) continue;
                if (printIds)
                {
                    Console.Write(separator + e.TokenId);
                    separator = " ";
                }
                else Console.Write(e.Text);
                Console.Out.Flush();
            }
            Console.WriteLine();
            return 0;
        }));
        return command;
    }

    internal static int[] ParseIds(string text, string option)
    {
        var parts = text.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        if (parts.Length == 0) throw new ArgumentException($"{option}: no token ids given");
        return parts.Select(p => int.TryParse(p, out var v) && v >= 0 ? v
            : throw new ArgumentException($"{option}: '{p}' is not a token id")).ToArray();
    }
}
