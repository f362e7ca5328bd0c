using PeftServe.Core.Adapters.Training;
using PeftServe.Core.Model;
using PeftServe.Core.Quantization;
using PeftServe.Tests;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Tests.Model;

/// <summary>The training forward pass of the tiny model, float32 on the CPU: gradient checkpointing
/// and the chunked LM-head loss leave losses and gradients as they were; each layer's intermediates
/// are released when the layer returns; the frozen weights never hold gradients.</summary>
public sealed class TrainingForwardTests : IDisposable
{
    private readonly LlamaModel _dense = LlamaModel.Load(TestData.TinyLlamaDir, new ModelOptions());
    private readonly LlamaModel _nf4 = LlamaModel.Load(TestData.TinyLlamaDir, new ModelOptions { Quantization = QuantizationMode.Nf4 });

    public void Dispose()
    {
        _dense.Dispose();
        _nf4.Dispose();
    }

    public static TheoryData<string> Methods() => new(TrainingMethods.All.Select(m => m.Name));

    private static readonly string[] AllLinears = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

    /// <summary>The method's adapter on the right base, with every parameter moved off its init (a LoRA's B
    /// starts at zero, which would leave A's gradient zero and the comparison empty).</summary>
    private TrainableAdapter Adapter(string method, double loraDropout = 0)
    {
        var m = TrainingMethods.Get(method);
        torch.manual_seed(3);
        var adapter = m.Create(m.QuantizedBase ? _nf4 : _dense, new TrainingOptions { LoraTargets = AllLinears, LoraDropout = loraDropout, NumVirtualTokens = 3 });
        using var _ = torch.no_grad();
        using var g = new torch.Generator(11);
        foreach (var (_, p) in adapter.Parameters) p.add_(torch.randn(p.shape, generator: g) * 0.05);
        return adapter;
    }

    /// <summary>Two rows of 9 tokens after the adapter's virtual columns; every token but the first is a target.</summary>
    private static (Tensor Ids, Tensor Positions, Tensor Rows, Tensor Targets) Batch(int virtualTokens)
    {
        int n = virtualTokens, t = 9;
        using var g = new torch.Generator(5);
        var tokens = torch.randint(3, 384, [2, t], generator: g);
        var ids = torch.cat([torch.zeros([2, n], ScalarType.Int64), tokens], 1);
        var positions = torch.arange(n + t, dtype: ScalarType.Int64).unsqueeze(0).expand(2, n + t).contiguous();
        var rows = new List<long>();
        for (int r = 0; r < 2; r++)
            for (int j = 1; j < t; j++) rows.Add(r * (n + t) + n + j - 1);
        return (ids, positions, torch.tensor(rows.ToArray()), tokens[.., 1..].reshape(-1));
    }

    /// <summary>The loss and a copy of every parameter's gradient after one backward pass.</summary>
    private static (double Loss, Tensor[] Grads) LossAndGradients(TrainableAdapter adapter, Func<Tensor> loss)
    {
        foreach (var (_, p) in adapter.Parameters) p.grad = null;
        using var scope = torch.NewDisposeScope();
        var value = loss();
        value.backward();
        var grads = adapter.Parameters.Select(p => (p.Value.grad ?? torch.zeros_like(p.Value)).clone().MoveToOuterDisposeScope()).ToArray();
        return (value.item<float>(), grads);
    }

    private static Tensor ChunkedLoss(LlamaModel model, TrainableAdapter adapter, bool checkpoint, int chunkRows)
    {
        var (ids, positions, rows, targets) = Batch(adapter.VirtualTokens);
        var hidden = model.FinalHiddenStates(ids, positions, adapter, checkpointLayers: checkpoint);
        return model.LmHeadLossSum(hidden.reshape(-1, hidden.shape[^1]).index_select(0, rows), targets, chunkRows);
    }

    private static void AssertSame(string what, (double Loss, Tensor[] Grads) expected, (double Loss, Tensor[] Grads) actual, IReadOnlyList<(string Name, Tensor Value)> parameters)
    {
        Assert.True(Math.Abs(expected.Loss - actual.Loss) <= 1e-5 * Math.Abs(expected.Loss), $"{what}: loss {actual.Loss} vs {expected.Loss}");
        double largest = expected.Grads.Max(g => g.abs().max().item<float>());
        Assert.True(largest > 0, $"{what}: no gradient at all");
        for (int i = 0; i < parameters.Count; i++)
        {
            double diff = (expected.Grads[i] - actual.Grads[i]).abs().max().item<float>();
            Assert.True(diff <= 1e-5 * largest, $"{what}: gradient of {parameters[i].Name} differs by {diff:E2} (largest gradient {largest:E2})");
        }
    }

    [Theory]
    [MemberData(nameof(Methods))]
    public void CheckpointedLayersGiveTheSameLossAndGradients(string method)
    {
        // LoRA with dropout: the recomputed layer must draw the same masks (AdaMix: the same experts).
        using var adapter = Adapter(method, loraDropout: method is "lora" or "qlora" ? 0.3 : 0);
        var model = adapter.Model;
        adapter.ForwardSeed = 17;
        var plain = LossAndGradients(adapter, () => ChunkedLoss(model, adapter, checkpoint: false, chunkRows: 7));
        var counter = new LayerCounter(adapter);
        var checkpointed = LossAndGradients(adapter, () =>
        {
            var (ids, positions, rows, targets) = Batch(adapter.VirtualTokens);
            var hidden = model.FinalHiddenStates(ids, positions, counter, checkpointLayers: true);
            return model.LmHeadLossSum(hidden.reshape(-1, hidden.shape[^1]).index_select(0, rows), targets, 7);
        });
        AssertSame($"{method} checkpointed", plain, checkpointed, adapter.Parameters);
        // Really checkpointed: every layer ran twice, once in forward and again in backward.
        Assert.Equal(Enumerable.Repeat(2, model.Config.NumLayers), counter.Calls);
    }

    [Theory]
    [InlineData("lora")]
    [InlineData("qlora")]
    [InlineData("prefix")]
    [InlineData("adamix")]
    public void ChunkedLossEqualsTheLossOfTheWholeLogits(string method)
    {
        using var adapter = Adapter(method);
        var model = adapter.Model;
        var whole = LossAndGradients(adapter, () =>
        {
            var (ids, positions, rows, targets) = Batch(adapter.VirtualTokens);
            var logits = model.Forward(ids, positions, new ChunkKvCache(), adapters: adapter, trainable: true);   // [B,T,V] at once
            var picked = logits.reshape(-1, logits.shape[^1]).index_select(0, rows).to(ScalarType.Float32);
            return nn.functional.cross_entropy(picked, targets, reduction: nn.Reduction.Sum);
        });
        foreach (int chunk in new[] { 1, 5, 16, 1000 })
            AssertSame($"{method}, chunks of {chunk} rows", whole, LossAndGradients(adapter, () => ChunkedLoss(model, adapter, false, chunk)), adapter.Parameters);
    }

    [Fact]
    public void ChunkedLossGradientOfTheHiddenStatesIsExact()
    {
        torch.manual_seed(1);
        using var scope = torch.NewDisposeScope();
        var hidden = (torch.randn(13, 64) * 3).requires_grad_(true);
        var targets = torch.randint(0, 384, [13]);
        var head = _dense.WeightTensors().Skip(1).First();   // the LM head [V, hidden]
        Assert.Equal(new long[] { 384, 64 }, head.shape);
        nn.functional.cross_entropy(nn.functional.linear(hidden, head), targets, reduction: nn.Reduction.Sum).backward();
        var expected = hidden.grad!.clone();
        hidden.grad = null;
        var loss = _dense.LmHeadLossSum(hidden, targets, 4);
        loss.backward();
        Assert.True((hidden.grad! - expected).abs().max().item<float>() < 1e-6);
        using (torch.no_grad())
        {
            // Without autograd it is the same number.
            Assert.Equal(loss.item<float>(), _dense.LmHeadLossSum(hidden, targets, 3).item<float>(), 4);
        }
    }

    [Theory]
    [InlineData(false, false)]
    [InlineData(false, true)]
    [InlineData(true, false)]
    [InlineData(true, true)]
    public void FrozenWeightsHoldNoGradients(bool nf4, bool checkpoint)
    {
        using var adapter = Adapter(nf4 ? "qlora" : "lora");
        var model = adapter.Model;
        LossAndGradients(adapter, () => ChunkedLoss(model, adapter, checkpoint, 5));
        Assert.All(adapter.Parameters, p => Assert.NotNull(p.Value.grad));
        var weights = model.WeightTensors().ToList();
        Assert.True(weights.Count >= 3 + 2 * model.Config.NumLayers + 4 * model.Config.NumLayers);
        Assert.All(weights, w =>
        {
            Assert.False(w.requires_grad);
            Assert.Null(w.grad);
        });
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void EachLayersIntermediatesAreReleasedWhenTheLayerReturns(bool checkpoint)
    {
        // Live tensor handles on this thread as each layer starts: with each layer's intermediates
        // released when it returns, only the hidden states between layers remain (one per layer).
        using var adapter = Adapter("lora");
        var probe = new LayerCounter(adapter);
        var (ids, positions, rows, targets) = Batch(0);
        using (var scope = torch.NewDisposeScope())
        {
            var hidden = _dense.FinalHiddenStates(ids, positions, probe, checkpointLayers: checkpoint);
            var loss = _dense.LmHeadLossSum(hidden.reshape(-1, 64).index_select(0, rows), targets, 5);
            loss.backward();
        }
        var live = probe.LiveAtLayerStart.Take(_dense.Config.NumLayers).ToArray();
        for (int i = 1; i < live.Length; i++)
            Assert.True(live[i] - live[i - 1] <= 1, $"layer {i} starts with {live[i] - live[i - 1]} more live tensors than layer {i - 1}: [{string.Join(", ", live)}]");

        // The inference-style entry point with autograd (Forward(trainable: true)) runs its layers the same way.
        probe.LiveAtLayerStart.Clear();
        using (var logits = _dense.Forward(ids, positions, new ChunkKvCache(), adapters: probe, trainable: true)) { }
        live = [.. probe.LiveAtLayerStart];
        for (int i = 1; i < live.Length; i++)
            Assert.True(live[i] - live[i - 1] <= 1, $"Forward: layer {i} starts with {live[i] - live[i - 1]} more live tensors: [{string.Join(", ", live)}]");
    }

    /// <summary>Passes every hook to the adapter, and counts each layer's runs (at its first hook, q|k|v)
    /// and the live tensor handles at that moment.</summary>
    private sealed class LayerCounter(IAdapterHooks inner) : IAdapterHooks
    {
        public int[] Calls { get; } = new int[3];
        public List<long> LiveAtLayerStart { get; } = [];

        public Tensor Qkv(int layer, Tensor x, Tensor qkv)
        {
            Calls[layer]++;
            LiveAtLayerStart.Add(DisposeScopeManager.Statistics.ThreadTotalLiveCount);
            return inner.Qkv(layer, x, qkv);
        }

        public Tensor TokenEmbeddings(Tensor inputIds, Tensor embeddings) => inner.TokenEmbeddings(inputIds, embeddings);
        public Tensor Embeddings(Tensor embeddings) => inner.Embeddings(embeddings);
        public Tensor Logits(Tensor hidden, Tensor logits) => inner.Logits(hidden, logits);
        public void BeforeLinear(int layer, LinearSite site, Tensor x) => inner.BeforeLinear(layer, site, x);
        public bool ChangesKeysValues => inner.ChangesKeysValues;
        public (Tensor Keys, Tensor Values) KeysValues(int layer, Tensor keys, Tensor values) => inner.KeysValues(layer, keys, values);
        public Tensor? ExtraAttention(int layer, Tensor queries) => inner.ExtraAttention(layer, queries);
        public Tensor AttentionOutput(int layer, Tensor x, Tensor output) => inner.AttentionOutput(layer, x, output);
        public Tensor GateUp(int layer, Tensor x, Tensor gateUp) => inner.GateUp(layer, x, gateUp);
        public Tensor DownInput(int layer, Tensor x) => inner.DownInput(layer, x);
        public Tensor MlpOutput(int layer, Tensor x, Tensor output) => inner.MlpOutput(layer, x, output);
    }
}
