using PeftServe.Core.Adapters;
using PeftServe.Core.Engine;
using PeftServe.Core.Generation;
using PeftServe.Core.Tests.Model;
using PeftServe.Core.Tests.SafeTensors;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Tests.Adapters;

/// <summary>Bottleneck adapters written to disk, loaded through <see cref="AdapterManager"/> and served,
/// against the float64 reference forward with h + W_up act(W_down h + b_down) + b_up inserted.</summary>
public sealed class BottleneckAdapterTests : IClassFixture<TinyLlamaFixture>, IDisposable
{
    private readonly TinyLlamaFixture _f;
    private readonly TempDir _dir = new();
    private readonly AdapterManager _set;

    public BottleneckAdapterTests(TinyLlamaFixture fixture)
    {
        _f = fixture;
        _set = new AdapterManager(fixture.Model, new AdapterLimits(), null, 1L << 30);
    }

    public void Dispose()
    {
        _set.Dispose();
        _dir.Dispose();
    }

    internal static int[] Row(Tensor ids, int row) => ids[row].data<long>().Select(x => (int)x).ToArray();

    [Theory]
    [InlineData("relu", "both", 8, null)]
    [InlineData("gelu", "attention", 4, null)]
    [InlineData("silu", "mlp", 16, null)]
    [InlineData("tanh", "both", 2, "0,2")]
    [InlineData("gelu", "mlp", 1, "1")]
    public void ServedLogitsMatchTheFormula(string nonLinearity, string placement, int reductionFactor, string? layers)
    {
        var spec = BottleneckSpec.Random(reductionFactor * 31 + placement.Length, reductionFactor, placement, nonLinearity,
            layers?.Split(',').Select(int.Parse).ToArray());
        var adapter = _set.Acquire(spec.Write(_dir.Path, "bottleneck"));
        using var logits = FullLogits.Compute(_f.Model, _f.InputIds, [adapter, adapter]);
        for (int row = 0; row < 2; row++)
        {
            var ids = Row(_f.InputIds, row);
            var expected = ReferenceLlama.Tiny.Logits(ids, spec.Hooks());
            OurAdapterTesting.AssertAdapterMatters(expected, ReferenceLlama.Tiny.Logits(ids));
            OurAdapterTesting.AssertClose(expected, logits[row]);
        }
    }

    [Fact]
    public void RowsWithDifferentDimsAndNonLinearitiesShareOneBatch()
    {
        // r = 16 relu on both blocks, r = 4 tanh on one layer's MLP, r = 32 gelu on attention, and a base row.
        var specs = new[]
        {
            BottleneckSpec.Random(1, 4, "both", "relu"),
            BottleneckSpec.Random(2, 16, "mlp", "tanh", [1]),
            null,
            BottleneckSpec.Random(3, 2, "attention", "gelu"),
        };
        var adapters = specs.Select((s, i) => s is null ? null : _set.Acquire(s.Write(_dir.Path, $"b{i}"))).ToArray();
        using var ids = torch.stack(specs.Select((_, i) => _f.InputIds[i % 2]).ToArray());
        using var logits = FullLogits.Compute(_f.Model, ids, adapters);
        for (int i = 0; i < specs.Length; i++)
            OurAdapterTesting.AssertClose(ReferenceLlama.Tiny.Logits(Row(ids, i), specs[i]?.Hooks()), logits[i]);
    }

    [Fact]
    public void ASlotOverwrittenByASmallerAdapterKeepsNothingOfTheOld()
    {
        // r = 64 tanh on both blocks, then r = 4 relu on one layer's attention only, stored into the same slot.
        var big = BottleneckSpec.Random(6, 1, "both", "tanh");
        var small = BottleneckSpec.Random(7, 16, "attention", "relu", [2]);
        var limits = new AdapterLimits { SlotsPerMethod = 2 };
        using var pool = Core.Adapters.Bottleneck.BottleneckMethod.Instance.CreatePool(_f.Model, limits);
        using var bigAdapter = AdapterMethods.Load(big.Write(_dir.Path, "big"), "big", _f.Model.Config, limits);
        using var smallAdapter = AdapterMethods.Load(small.Write(_dir.Path, "small"), "small", _f.Model.Config, limits);
        pool.Store(0, bigAdapter);
        pool.Store(1, bigAdapter);
        pool.Store(1, smallAdapter);
        // Slot 0 (big) keeps every layer and block active, so slot 1's stale entries would be used.
        using var logits = FullLogits.Compute(_f.Model, _f.InputIds,
            [new ResidentAdapter(bigAdapter, pool, 0), new ResidentAdapter(smallAdapter, pool, 1)]);
        OurAdapterTesting.AssertClose(ReferenceLlama.Tiny.Logits(Row(_f.InputIds, 0), big.Hooks()), logits[0]);
        OurAdapterTesting.AssertClose(ReferenceLlama.Tiny.Logits(Row(_f.InputIds, 1), small.Hooks()), logits[1]);
    }

    [Fact]
    public void HalfPrecisionFilesAreRead()
    {
        // The same weights stored as F16 and as F32 (values chosen exactly representable in F16) serve alike.
        var spec = BottleneckSpec.Random(5, 8, "both", "silu");
        foreach (var w in spec.Modules.Values)
        {
            foreach (var v in w.Down.Append(w.DownBias).Concat(w.Up).Append(w.UpBias))
                for (int i = 0; i < v.Length; i++) v[i] = (double)(Half)v[i];
        }
        var f32 = _set.Acquire(spec.Write(_dir.Path, "f32"));
        var f16 = _set.Acquire(OurAdapterTesting.WriteAdapter(_dir.Path, "f16", spec.Config(),
            spec.Modules.SelectMany(kv => kv.Value.Tensors(BottleneckSpec.PlacementPrefix(kv.Key.Layer, kv.Key.Placement))), ScalarType.Float16));
        using var logits = FullLogits.Compute(_f.Model, _f.InputIds, [f32, f16]);
        var expected = ReferenceLlama.Tiny.Logits(Row(_f.InputIds, 1), spec.Hooks());
        OurAdapterTesting.AssertClose(expected, logits[1]);
        OurAdapterTesting.AssertClose(ReferenceLlama.Tiny.Logits(Row(_f.InputIds, 0), spec.Hooks()), logits[0]);
    }
}
