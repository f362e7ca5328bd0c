using PeftServe.Core.Adapters;
using PeftServe.Core.Engine;
using PeftServe.Core.Generation;
using PeftServe.Core.Tests.Model;
using PeftServe.Core.Tests.SafeTensors;

namespace PeftServe.Core.Tests.Adapters;

/// <summary>A BitFit adapter as the test builds it: bias vectors by tensor name (without "base_model.model.").</summary>
internal sealed class BitFitSpec
{
    public static readonly string[] Projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    public Dictionary<string, double[]> Biases { get; } = [];

    public static string Name(int layer, string module) => module switch
    {
        "input_layernorm" or "post_attention_layernorm" => $"model.layers.{layer}.{module}.bias",
        "gate_proj" or "up_proj" or "down_proj" => $"model.layers.{layer}.mlp.{module}.bias",
        _ => $"model.layers.{layer}.self_attn.{module}.bias",
    };

    public static int Size(string module)
    {
        var m = ReferenceLlama.Tiny;
        return module switch
        {
            "q_proj" => m.Heads * m.HeadDim,
            "k_proj" or "v_proj" => m.KvHeads * m.HeadDim,
            "gate_proj" or "up_proj" => m.Intermediate,
            _ => m.Hidden,
        };
    }

    /// <summary>Random biases for the given modules in the given layers.</summary>
    public static BitFitSpec Random(int seed, string[] modules, int[] layers, double scale = 0.5)
    {
        var rng = new Random(seed);
        var spec = new BitFitSpec();
        foreach (var layer in layers)
            foreach (var module in modules) spec.Biases[Name(layer, module)] = OurAdapterTesting.Random(rng, Size(module), scale);
        return spec;
    }

    public string Write(string root, string name) => OurAdapterTesting.WriteAdapter(root, name,
        new Dictionary<string, object> { ["peft_type"] = "BITFIT" },
        Biases.Select(kv => OurAdapterTesting.FileTensor.Of(kv.Key, kv.Value)));

    /// <summary>Each bias added where it sits: after its projection, or after its norm.</summary>
    public ReferenceHooks Hooks() => new()
    {
        Projection = (layer, module, y) => Biases.TryGetValue(Name(layer, module), out var b) ? ReferenceLlama.Add(y, b) : y,
        AfterInputNorm = (layer, x) => Biases.TryGetValue(Name(layer, "input_layernorm"), out var b) ? ReferenceLlama.Add(x, b) : x,
        AfterPostAttentionNorm = (layer, x) => Biases.TryGetValue(Name(layer, "post_attention_layernorm"), out var b) ? ReferenceLlama.Add(x, b) : x,
    };
}

/// <summary>BitFit biases served on the fused outputs, against the reference with each bias added where it belongs.</summary>
public sealed class BitFitAdapterTests : IClassFixture<TinyLlamaFixture>, IDisposable
{
    private readonly TinyLlamaFixture _f;
    private readonly TempDir _dir = new();
    private readonly AdapterManager _set;

    public BitFitAdapterTests(TinyLlamaFixture fixture)
    {
        _f = fixture;
        _set = new AdapterManager(fixture.Model, new AdapterLimits(), null, 1L << 30);
    }

    public void Dispose()
    {
        _set.Dispose();
        _dir.Dispose();
    }

    public static TheoryData<string, string[], int[]> Cases() => new()
    {
        // The paper's finding: the query and the MLP's first (here: up) biases suffice.
        { "q-and-up", ["q_proj", "up_proj"], [0, 1, 2] },
        { "every-projection", BitFitSpec.Projections, [0, 1, 2] },
        { "k-v-o-down-one-layer", ["k_proj", "v_proj", "o_proj", "down_proj"], [1] },
        { "gate-only", ["gate_proj"], [0, 2] },
    };

    [Theory]
    [MemberData(nameof(Cases))]
    public void ServedLogitsMatchTheBiasedReference(string name, string[] modules, int[] layers)
    {
        var spec = BitFitSpec.Random(name.Length * 13, modules, layers);
        Check(_set.Acquire(spec.Write(_dir.Path, name)), spec);
    }

    [Fact]
    public void NormBiasesFoldIntoTheFollowingProjections()
    {
        var spec = BitFitSpec.Random(21, ["input_layernorm", "post_attention_layernorm"], [0, 1, 2], scale: 1.0);
        Check(_set.Acquire(spec.Write(_dir.Path, "norms")), spec);
    }

    [Fact]
    public void NormBiasesAndProjectionBiasesOfTheSameOutputAddUp()
    {
        // Layer 1's q|k|v output gets the k bias and W_qkv b_input; its gate|up output gets the up bias and W_gateup b_post.
        var spec = BitFitSpec.Random(22, ["input_layernorm", "k_proj", "post_attention_layernorm", "up_proj", "down_proj"], [1], scale: 1.0);
        Check(_set.Acquire(spec.Write(_dir.Path, "mixed")), spec);
    }

    [Fact]
    public void ASlotOverwrittenByAnotherAdapterKeepsNothingOfTheOld()
    {
        var first = BitFitSpec.Random(23, BitFitSpec.Projections.Append("input_layernorm").Append("post_attention_layernorm").ToArray(), [0, 1, 2]);
        var second = BitFitSpec.Random(24, ["v_proj"], [2]);
        var limits = new AdapterLimits { SlotsPerMethod = 1 };
        using var pool = new Core.Adapters.BitFit.BitFitMethod().CreatePool(_f.Model, limits);
        using var a = AdapterMethods.Load(first.Write(_dir.Path, "first"), "first", _f.Model.Config, limits);
        using var b = AdapterMethods.Load(second.Write(_dir.Path, "second"), "second", _f.Model.Config, limits);
        pool.Store(0, a);
        pool.Store(0, b);
        using var logits = FullLogits.Compute(_f.Model, _f.InputIds[1..2], [new ResidentAdapter(b, pool, 0)]);
        OurAdapterTesting.AssertClose(ReferenceLlama.Tiny.Logits(BottleneckAdapterTests.Row(_f.InputIds, 1), second.Hooks()), logits[0]);
    }

    private void Check(Core.Adapters.ResidentAdapter adapter, BitFitSpec spec)
    {
        using var logits = FullLogits.Compute(_f.Model, _f.InputIds, [adapter, adapter]);
        for (int row = 0; row < 2; row++)
        {
            var ids = BottleneckAdapterTests.Row(_f.InputIds, row);
            var expected = ReferenceLlama.Tiny.Logits(ids, spec.Hooks());
            OurAdapterTesting.AssertAdapterMatters(expected, ReferenceLlama.Tiny.Logits(ids));
            OurAdapterTesting.AssertClose(expected, logits[row]);
        }
    }
}
