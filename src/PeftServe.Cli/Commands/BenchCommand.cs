using System.CommandLine;
using System.Diagnostics;
using System.Text.Json;
using PeftServe.Core.Adapters;
using PeftServe.Core.Cuda;
using PeftServe.Core.Engine;
using PeftServe.Core.Generation;
using PeftServe.Core.Model;
using PeftServe.Core.Runtime;
using Spectre.Console;

namespace PeftServe.Cli.Commands;

/// <summary><c>bench</c>: generation throughput and latency of the model on synthetic requests:
/// waves of --concurrency requests decoded together, each with --prompt-tokens random prompt tokens
/// and exactly --max-tokens generated tokens, over --adapters distinct synthetic adapters.
/// --concurrency and --adapters also take comma-separated lists: every combination is measured in one
/// process on the same loaded model (the GPU's time is precious).</summary>
internal static class BenchCommand
{
    public static Command Create()
    {
        var model = CommonOptions.Model();
        var device = CommonOptions.Device();
        var dtype = CommonOptions.DType();
        var quantize = CommonOptions.Quantize();
        var doubleQuant = CommonOptions.DoubleQuant();
        var randomWeights = new Option<bool>("--random-weights") { Description = "random weights of the shape in --model's config.json (no checkpoint needed)" };
        var requests = new Option<int>("--requests") { Description = "requests per measurement (at least --concurrency)", DefaultValueFactory = _ => 0 };
        var concurrency = new Option<string>("--concurrency") { Description = "requests decoded together (the batch size); a list like 1,16,32 measures each", DefaultValueFactory = _ => "1" };
        var promptTokens = new Option<int>("--prompt-tokens") { Description = "prompt length of every request", DefaultValueFactory = _ => 128 };
        var maxTokens = new Option<int>("--max-tokens") { Description = "tokens generated per request", DefaultValueFactory = _ => 128 };
        var warmup = new Option<int>("--warmup") { Description = "least untimed warm-up rounds per measurement; more run until two in a row agree within 5% (JIT tiers, graph capture)", DefaultValueFactory = _ => 2 };
        var repeats = new Option<int>("--repeats") { Description = "timed runs per measurement: the median is reported, with the slowest and fastest", DefaultValueFactory = _ => 3 };
        var json = new Option<string?>("--json") { Description = "also write the figures to this JSON file" };
        var adapters = new Option<string>("--adapters") { Description = "distinct synthetic adapters, assigned to requests round robin (0 = base model only); a list measures each", DefaultValueFactory = _ => "0" };
        var rank = new Option<int>("--lora-rank") { Description = "rank of the synthetic LoRA adapters (all linear layers)", DefaultValueFactory = _ => 16 };
        var methods = new Option<string>("--adapter-methods")
        {
            Description = "comma-separated methods the synthetic adapters cycle through: lora, dora (LoRA with DoRA), lora-lm-head (LoRA with a saved lm_head), " +
                          "prefix, prompt, ptuning, ia3, llama-adapter, bottleneck, adamix, bitfit",
            DefaultValueFactory = _ => "lora",
        };

        var mode = new Option<string>("--mode")
        {
            Description = "engine: requests through the serving engine (continuous batching, paged KV cache, adapter cache), --concurrency clients each " +
                          "sending one request after another; waves: fixed batches that start and end together (the raw decode step)",
            DefaultValueFactory = _ => "engine",
        };
        mode.AcceptOnlyFromAmong("engine", "waves");
        var kvBlocks = new Option<int?>("--kv-blocks") { Description = "KV cache blocks (default: what the requests in flight need, with a margin)" };
        var graphs = new Option<bool>("--no-cuda-graphs") { Description = "run decode steps eagerly even where CUDA graphs are available" };

        var command = new Command("bench", "Measure generation throughput and latency on synthetic requests")
        {
            model, randomWeights, requests, concurrency, promptTokens, maxTokens, adapters, rank, methods, warmup, repeats, json, quantize, doubleQuant, device, dtype, mode, kvBlocks, graphs,
        };
        command.SetAction(parse => CommonOptions.Run(() =>
        {
            var batches = ParseList(parse.GetValue(concurrency)!, "--concurrency", min: 1);
            var adapterCounts = ParseList(parse.GetValue(adapters)!, "--adapters", min: 0);
            int promptLen = parse.GetValue(promptTokens), newTokens = parse.GetValue(maxTokens);
            if (promptLen < 1 || newTokens < 1) throw new ArgumentException("--prompt-tokens and --max-tokens must be at least 1");
            var methodList = parse.GetValue(methods)!.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries);

            var options = CommonOptions.ParseModelOptions(parse.GetValue(device)!, parse.GetValue(dtype), parse.GetValue(quantize), parse.GetValue(doubleQuant));
            using var llm = LoadForBench(parse.GetValue(model), options, parse.GetValue(randomWeights));
            int most = adapterCounts.Max();
            var scratch = Directory.CreateTempSubdirectory("peftserve-bench-");
            var adapterNames = Enumerable.Range(0, most)
                .Select(i => Path.GetFileName(MakeAdapter(Path.Combine(scratch.FullName, $"a{i}"), methodList[i % methodList.Length], llm.Config, parse.GetValue(rank), i)))
                .ToArray();
            bool engineMode = parse.GetValue(mode) == "engine";
            var results = new List<BenchResult>();
            var table = new Table().AddColumns("mode", "concurrency", "adapters", "decode tok/s (min-max)", "output tok/s", "TTFT p50/p90/p99 ms", "ITL p50/p90/p99 ms");
            try
            {
                foreach (var batch in batches)
                    foreach (var count in adapterCounts)
                    {
                        int total = Math.Max(parse.GetValue(requests), batch);
                        int virtualTokens = methodList.Any(m => m is "prefix" or "prompt" or "ptuning") ? 16 : 0;
                        // The KV cache holds what the requests in flight need (with a margin), not most of the device.
                        int perRequest = (promptLen + virtualTokens + newTokens + 16) / 16 + 1;
                        var engineOptions = new EngineOptions
                        {
                            MaxBatchSize = batch, MaxQueueLength = Math.Max(256, batch), AdapterStore = scratch.FullName,
                            KvCacheBlocks = parse.GetValue(kvBlocks) ?? batch * perRequest * 5 / 4 + 16,
                            PrefillChunkTokens = engineMode ? Math.Max(512, promptLen + virtualTokens) : batch * (promptLen + virtualTokens),
                            AdapterLimits = new AdapterLimits
                            {
                                MaxRank = parse.GetValue(rank), SlotsPerMethod = Math.Max(1, Math.Min(count, 64)),
                                // A saved lm_head per adapter: as many vocabulary slots as such adapters (up to 8), none otherwise.
                                EmbeddingSlots = methodList.Contains("lora-lm-head") ? Math.Max(1, Math.Min(count, 8)) : 0,
                            },
                            CudaGraphs = !parse.GetValue(graphs),
                            // Every synthetic adapter fits in the host tier (S-LoRA keeps them all in host memory);
                            // the device slots are fewer than the adapters when there are more than 64.
                            HostCacheBytes = 24L << 30,
                        };
                        var names = adapterNames.Take(count).ToArray();
                        var r = engineMode
                            ? Repeat(parse.GetValue(warmup), parse.GetValue(repeats), engineOptions, llm, engine => MeasureEngine(engine, llm, batch, total, promptLen, newTokens, names))
                            : Repeat(parse.GetValue(warmup), parse.GetValue(repeats), engineOptions, llm, engine => MeasureWaves(engine, llm, batch, total, promptLen, newTokens, names));
                        r = r with { AdapterMethods = count == 0 ? "" : string.Join(",", methodList.Take(count).Distinct()), LoraRank = parse.GetValue(rank), Mode = parse.GetValue(mode)! };
                        results.Add(r);
                        table.AddRow(r.Mode, $"{batch}", count == 0 ? "base" : $"{count} ({r.AdapterMethods})",
                            $"{r.DecodeTokensPerSecond:F1} ({r.DecodeRange[0]:F0}-{r.DecodeRange[1]:F0})", $"{r.OutputTokensPerSecond:F1}",
                            $"{r.TtftMs[0]:F1} / {r.TtftMs[1]:F1} / {r.TtftMs[2]:F1}", $"{r.ItlMs[0]:F2} / {r.ItlMs[1]:F2} / {r.ItlMs[2]:F2}");
                        Console.Error.WriteLine($"bench: {r.Mode}, concurrency {batch}, adapters {count}: decode {r.DecodeTokensPerSecond:F1} tok/s " +
                                                $"({r.DecodeRange[0]:F1}-{r.DecodeRange[1]:F1} over {r.Runs} runs), output {r.OutputTokensPerSecond:F1} tok/s, ITL p50 {r.ItlMs[0]:F2} ms, decode {r.DecodeMode}");
                    }
            }
            finally { scratch.Delete(recursive: true); }
            AnsiConsole.MarkupLine($"[bold]{llm.Config.Architecture}[/] {llm.Config.NumLayers}x{llm.Config.HiddenSize} on {llm.Device} {llm.DType}, " +
                                   $"{llm.WeightBytes / (double)(1L << 30):F2} GiB of weights ({Markup.Escape(llm.WeightSummary)}), prompt {promptLen}, {newTokens} new tokens");
            AnsiConsole.Write(table);
            if (parse.GetValue(json) is { } path)
                File.WriteAllText(path, JsonSerializer.Serialize(new
                {
                    model = llm.Config.Architecture, layers = llm.Config.NumLayers, hidden = llm.Config.HiddenSize, device = llm.Device.ToString(),
                    dtype = llm.DType.ToString(), weight_bytes = llm.WeightBytes, weights = llm.WeightSummary,
                    decoder_linear_bytes = llm.DecoderLinearBytes, quantization = options.Quantization.ToString(), prompt_tokens = promptLen, max_tokens = newTokens, results,
                }, new JsonSerializerOptions { WriteIndented = true, PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower }));
            return 0;
        }));
        return command;
    }

    public sealed record BenchResult(int Concurrency, int Requests, int Adapters, double OutputTokensPerSecond, double DecodeTokensPerSecond,
        double[] TtftMs, double[] ItlMs, double WallSeconds)
    {
        public string AdapterMethods { get; init; } = "";
        public int LoraRank { get; init; }
        public string Mode { get; init; } = "";
        public long Preemptions { get; init; }
        public AdapterCacheStats? AdapterCache { get; init; }
        /// <summary>Slowest and fastest decode tokens/s over the timed runs (the reported figure is their median).</summary>
        public double[] DecodeRange { get; init; } = [0, 0];
        public int Runs { get; init; } = 1;
        public int WarmupRounds { get; init; }
        /// <summary>How decode steps ran: "cuda graphs" or "eager (why)".</summary>
        public string DecodeMode { get; init; } = "";
    }

    /// <summary>One engine for a measurement: warm-up rounds (at least <paramref name="warmup"/>, then until two
    /// rounds in a row agree on decode tokens/s within 5%, at most 8 more: JIT tiers and graph captures settle),
    /// then <paramref name="repeats"/> timed rounds. Reports the median round (by decode tokens/s) with the range.</summary>
    private static BenchResult Repeat(int warmup, int repeats, EngineOptions options, LlamaModel llm, Func<InferenceEngine, BenchResult> round)
    {
        using var engine = new InferenceEngine(llm, null, options);
        int rounds = 0;
        double previous = double.NaN;
        while (true)
        {
            var r = round(engine);
            rounds++;
            bool steady = !double.IsNaN(previous) && Math.Abs(r.DecodeTokensPerSecond - previous) <= 0.05 * Math.Max(previous, 1e-9);
            if (rounds >= warmup && (steady || rounds >= warmup + 8)) break;
            previous = r.DecodeTokensPerSecond;
        }
        // With PEFTSERVE_PROFILER_RANGE=1 on CUDA, a profiler started with collection off sees only the timed rounds;
        // with =decode, only the decode steps of the first timed wave (MeasureWaves marks them).
        bool mark = ProfilerRange.Requested && llm.Device.type == TorchSharp.DeviceType.CUDA;
        int ordinal = Math.Max(0, (int)llm.Device.index);
        bool marksRounds = mark && !ProfilerRange.DecodeOnly;
        if (marksRounds) ProfilerRange.Start(ordinal);
        if (mark && ProfilerRange.DecodeOnly) Volatile.Write(ref _decodeWindowDevice, ordinal);
        var timed = Enumerable.Range(0, Math.Max(1, repeats)).Select(_ => round(engine)).OrderBy(r => r.DecodeTokensPerSecond).ToList();
        Volatile.Write(ref _decodeWindowDevice, -1);
        if (marksRounds) ProfilerRange.Stop(ordinal);
        var median = timed[timed.Count / 2];
        return median with
        {
            DecodeRange = [timed[0].DecodeTokensPerSecond, timed[^1].DecodeTokensPerSecond],
            Runs = timed.Count,
            WarmupRounds = rounds,
            DecodeMode = engine.DecodeMode,
        };
    }

    /// <summary>The CUDA device whose next wave's decode steps are to be marked for a profiler, or -1.</summary>
    private static int _decodeWindowDevice = -1;

    /// <summary>Waves of <paramref name="batch"/> requests submitted together, each decoded to the end before the
    /// next wave. Decode tokens/s counts, per wave, the tokens after the last row's first token over the time
    /// from then to the wave's end: the steady decode rate of a full batch.</summary>
    private static BenchResult MeasureWaves(InferenceEngine engine, LlamaModel llm, int batch, int total, int promptLen, int newTokens, string[] adapters)
    {
        var rng = new Random(1234);
        var sampling = SamplingParams.Greedy(newTokens);   // no stop tokens: exactly newTokens each
        var ttft = new List<double>();
        var itl = new List<double>();
        long outputTokens = 0, decodeTokens = 0;
        double decodeSeconds = 0;
        var before = engine.Stats;
        var wall = Stopwatch.StartNew();
        for (int done = 0, wave = 0; done < total; done += batch, wave++)
        {
            long start = Stopwatch.GetTimestamp();
            var streams = Enumerable.Range(0, batch).Select(r => engine.Submit(new GenerationRequest
            {
                PromptIds = Enumerable.Range(0, promptLen).Select(_ => rng.Next(3, llm.Config.VocabSize)).ToArray(),
                Sampling = sampling,
                Adapter = adapters.Length == 0 ? null : adapters[(wave * batch + r) % adapters.Length],
            })).ToArray();
            // A profiler's window (PEFTSERVE_PROFILER_RANGE=decode) opens once every row has its first token.
            int markDevice = Interlocked.Exchange(ref _decodeWindowDevice, -1), waitingForFirst = batch;
            // Every stream is read as its tokens arrive (all readers start before any is awaited).
            var readers = streams.Select(stream => Task.Run(async () =>
            {
                var stamps = new List<long>();
                await foreach (var e in stream)
                {
                    if (e.TokenId < 0) continue;
                    stamps.Add(Stopwatch.GetTimestamp());
                    if (stamps.Count == 1 && markDevice >= 0 && Interlocked.Decrement(ref waitingForFirst) == 0) ProfilerRange.Start(markDevice);
                }
                return stamps;
            })).ToArray();
            var times = readers.Select(t => t.Result).ToArray();
            if (markDevice >= 0) ProfilerRange.Stop(markDevice);
            long decodeStart = times.Max(t => t[0]), end = times.Max(t => t[^1]);
            foreach (var t in times)
            {
                ttft.Add(Stopwatch.GetElapsedTime(start, t[0]).TotalMilliseconds);
                for (int i = 1; i < t.Count; i++) itl.Add(Stopwatch.GetElapsedTime(t[i - 1], t[i]).TotalMilliseconds);
                outputTokens += t.Count;
                decodeTokens += t.Count(x => x > decodeStart);
            }
            decodeSeconds += Stopwatch.GetElapsedTime(decodeStart, end).TotalSeconds;
        }
        wall.Stop();
        var after = engine.Stats;
        return new BenchResult(batch, total, adapters.Length, outputTokens / wall.Elapsed.TotalSeconds, decodeTokens / Math.Max(decodeSeconds, 1e-9),
            Percentiles(ttft), Percentiles(itl), wall.Elapsed.TotalSeconds)
        {
            Preemptions = after.Preemptions - before.Preemptions,
            AdapterCache = after.Adapters,
        };
    }

    /// <summary>--concurrency clients, each sending its next request when the last one ended, until
    /// <paramref name="total"/> requests are done, through one engine; adapters go round robin.
    /// TTFT is from submission to the first token, ITL the gaps between a request's tokens; "decode
    /// tokens/s" here counts the tokens after each request's first per second of wall time.</summary>
    private static BenchResult MeasureEngine(InferenceEngine engine, LlamaModel llm, int concurrency, int total, int promptLen, int newTokens, string[] adapters)
    {
        var rng = new Random(1234);
        int[] Prompt() { lock (rng) return Enumerable.Range(0, promptLen).Select(_ => rng.Next(3, llm.Config.VocabSize)).ToArray(); }
        var sampling = SamplingParams.Greedy(newTokens);   // no stop tokens: exactly newTokens each
        int next = 0;
        var ttft = new List<double>();
        var itl = new List<double>();
        long outputTokens = 0;

        async Task Client()
        {
            while (true)
            {
                int i = Interlocked.Increment(ref next) - 1;
                if (i >= total) return;
                var started = Stopwatch.GetTimestamp();
                var stream = engine.Submit(new GenerationRequest { PromptIds = Prompt(), Sampling = sampling, Adapter = adapters.Length == 0 ? null : adapters[i % adapters.Length] });
                long last = 0;
                var gaps = new List<double>();
                double first = 0;
                int count = 0;
                await foreach (var e in stream)
                {
                    if (e.TokenId < 0) continue;
                    long now = Stopwatch.GetTimestamp();
                    if (count++ == 0) first = Stopwatch.GetElapsedTime(started, now).TotalMilliseconds;
                    else gaps.Add(Stopwatch.GetElapsedTime(last, now).TotalMilliseconds);
                    last = now;
                }
                lock (ttft)
                {
                    ttft.Add(first);
                    itl.AddRange(gaps);
                    outputTokens += count;
                }
            }
        }

        var before = engine.Stats;
        var wall = Stopwatch.StartNew();
        Task.WaitAll(Enumerable.Range(0, concurrency).Select(_ => Task.Run(Client)).ToArray());
        wall.Stop();
        var after = engine.Stats;
        double seconds = wall.Elapsed.TotalSeconds;
        return new BenchResult(concurrency, total, adapters.Length, outputTokens / seconds, (outputTokens - ttft.Count) / seconds,
            Percentiles(ttft), Percentiles(itl), wall.Elapsed.TotalSeconds)
        {
            Preemptions = after.Preemptions - before.Preemptions,
            AdapterCache = after.Adapters,
        };
    }

    private static int[] ParseList(string text, string option, int min)
    {
        var values = text.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries)
            .Select(p => int.TryParse(p, out var v) && v >= min ? v : throw new ArgumentException($"{option}: '{p}' is not a whole number >= {min}")).ToArray();
        return values.Length > 0 ? values : throw new ArgumentException($"{option}: no value given");
    }

    private static string MakeAdapter(string dir, string method, ModelConfig c, int rank, int seed) => method switch
    {
        "lora" => SyntheticAdapters.Lora(dir, c, rank, seed),
        "dora" => SyntheticAdapters.Dora(dir, c, rank, seed),
        "lora-lm-head" => SyntheticAdapters.LoraWithSavedLmHead(dir, c, rank, seed),
        "prefix" => SyntheticAdapters.Prefix(dir, c, 16, seed),
        "prompt" => SyntheticAdapters.PromptTuning(dir, c, 16, seed),
        "ia3" => SyntheticAdapters.IA3(dir, c, seed),
        "llama-adapter" => SyntheticAdapters.LlamaAdapter(dir, c, 10, Math.Min(8, c.NumLayers), seed),
        "ptuning" => SyntheticAdapters.PTuning(dir, c, 16, seed),
        "bottleneck" => SyntheticAdapters.Bottleneck(dir, c, BottleneckFactor(c), seed),
        "adamix" => SyntheticAdapters.Bottleneck(dir, c, BottleneckFactor(c), seed, experts: 4),
        "bitfit" => SyntheticAdapters.BitFit(dir, c, seed),
        _ => throw new ArgumentException($"--adapter-methods: unknown method '{method}' (lora, dora, lora-lm-head, prefix, prompt, ptuning, ia3, llama-adapter, bottleneck, adamix, bitfit)"),
    };

    /// <summary>The reduction factor giving a bottleneck of 64 units (the default slot limit) or the nearest that divides hidden.</summary>
    private static int BottleneckFactor(ModelConfig c)
    {
        int factor = Math.Max(1, c.HiddenSize / 64);
        while (c.HiddenSize % factor != 0 || c.HiddenSize / factor > 64) factor++;
        return factor;
    }

    private static LlamaModel LoadForBench(string? modelDir, ModelOptions options, bool random)
    {
        if (!random) return CommonOptions.LoadModel(modelDir, options);
        var (dir, _) = DefaultModel.Resolve(modelDir);
        var model = LlamaModel.CreateRandom(ModelConfig.Load(dir), options);
        Console.Error.WriteLine($"weights: {model.WeightSummary}");
        return model;
    }

    private static double[] Percentiles(List<double> values)
    {
        if (values.Count == 0) return [0, 0, 0];
        var sorted = values.Order().ToArray();
        double At(double q) => sorted[Math.Min(sorted.Length - 1, (int)Math.Floor(q * (sorted.Length - 1) + 0.5))];
        return [At(0.5), At(0.9), At(0.99)];
    }
}
