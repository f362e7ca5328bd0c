using BenchmarkDotNet.Attributes;
using PeftServe.Core.Adapters;
using PeftServe.Core.Engine;
using PeftServe.Core.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Benchmarks;

/// <summary>One batched decode step (batch 32, every row at position 64) of a small random Llama on
/// the CPU, with 0, 1, 8 or 32 distinct rank-16 LoRA adapters on all linear layers, or a mix of every
/// method: what adapters cost relative to the base model alone.</summary>
[MemoryDiagnoser(false)]
public class DecodeStepBenchmarks
{
    private const int Batch = 32, Prompt = 64;

    /// <summary>"base", "lora-1", "lora-8", "lora-32" or "mix" (LoRA, prefix, prompt, IA3, LLaMA-Adapter in turn).</summary>
    [Params("base", "lora-1", "lora-8", "lora-32", "mix")]
    public string Adapters { get; set; } = "base";

    private LlamaModel _model = null!;
    private AdapterManager _set = null!;
    private PagedKvCache _cache = null!;
    private AdapterBatch? _decode;
    private Tensor _ids = null!, _positions = null!, _write = null!, _tables = null!, _lengths = null!;
    private int _gatherBlocks;
    private DirectoryInfo _scratch = null!;

    public static ModelConfig SmallConfig() => new()
    {
        VocabSize = 4096, HiddenSize = 256, IntermediateSize = 688, NumLayers = 4, NumHeads = 8, NumKvHeads = 4, HeadDim = 32,
        RmsNormEps = 1e-5, MaxPositionEmbeddings = 1024,
    };

    [GlobalSetup]
    public void Setup()
    {
        torch.set_num_threads(1);
        _model = LlamaModel.CreateRandom(SmallConfig(), new ModelOptions(), seed: 1);
        _scratch = Directory.CreateTempSubdirectory("peftserve-bench-");
        _set = new AdapterManager(_model, new AdapterLimits { MaxRank = 16, SlotsPerMethod = 32 }, null, 1L << 30);
        var c = _model.Config;
        string[] methods = Adapters == "mix" ? ["lora", "prefix", "prompt", "ia3", "llama-adapter"] : ["lora"];
        int distinct = Adapters switch { "base" => 0, "mix" => 5, _ => int.Parse(Adapters["lora-".Length..]) };
        var resident = Enumerable.Range(0, distinct).Select(i =>
        {
            var dir = Path.Combine(_scratch.FullName, $"a{i}");
            return _set.Acquire(methods[i % methods.Length] switch
            {
                "lora" => SyntheticAdapters.Lora(dir, c, 16, i),
                "prefix" => SyntheticAdapters.Prefix(dir, c, 16, i),
                "prompt" => SyntheticAdapters.PromptTuning(dir, c, 16, i),
                "ia3" => SyntheticAdapters.IA3(dir, c, i),
                _ => SyntheticAdapters.LlamaAdapter(dir, c, 10, 2, i),
            });
        }).ToArray();
        var rows = Enumerable.Range(0, Batch).Select(r => distinct == 0 ? null : resident[r % distinct]).ToArray();

        // Prefill once into the paged cache; every benchmarked step then decodes the same column again.
        const int blockSize = 16;
        int blocksPerRow = (Prompt + 1 + blockSize - 1) / blockSize;
        _cache = new PagedKvCache(c, Batch * blocksPerRow + 1, blockSize, _model.DType, _model.Device);
        var tables = Enumerable.Range(0, Batch).Select(_ => Enumerable.Range(0, blocksPerRow).Select(_ => _cache.TryAllocate(out var b) ? b : -1).ToList()).ToArray();
        var layout = Core.Generation.SequenceLayout.Build(
            Enumerable.Range(0, Batch).Select(r => Enumerable.Range(0, Prompt - (rows[r]?.VirtualTokens ?? 0)).Select(t => 3 + (r * 7 + t) % 4000).ToArray()).ToArray(),
            rows.Select(a => a?.VirtualTokens ?? 0).ToArray());
        var (ids, pos) = layout.ToTensors(_model.Device);
        using (var prefill = AdapterBatch.Create(rows, layout.VirtualStart, _model.Device))
            _model.Forward(ids, pos, _cache.ForPrefill(tables, new int[Batch], Enumerable.Repeat(layout.Length, Batch).ToArray(), layout.Length), lastTokenOnly: true, prefill).Dispose();
        _decode = AdapterBatch.Create(rows, Enumerable.Repeat(-1, Batch).ToArray(), _model.Device);
        _ids = torch.full([Batch, 1], 42L);
        _positions = torch.full([Batch, 1], (long)layout.Length);
        _write = torch.tensor(tables.Select(t => _cache.SlotOf(t, layout.Length)).ToArray());
        _tables = torch.tensor(tables.SelectMany(t => t.Select(b => (long)b)).ToArray(), [Batch, blocksPerRow]);
        _lengths = torch.full([Batch], layout.Length + 1L);
        _gatherBlocks = blocksPerRow;
    }

    [Benchmark]
    public void DecodeStep()
    {
        using var scope = torch.NewDisposeScope();
        _model.Forward(_ids, _positions, _cache.ForDecode(_write, _tables, _lengths, _gatherBlocks), lastTokenOnly: true, _decode);
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _decode?.Dispose();
        _cache.Dispose();
        _set.Dispose();
        _model.Dispose();
        _scratch.Delete(true);
    }
}
