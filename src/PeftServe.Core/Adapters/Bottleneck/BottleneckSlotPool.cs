using PeftServe.Core.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Adapters.Bottleneck;

/// <summary>Bottleneck modules of up to <see cref="Capacity"/> adapters on the device, per layer and
/// placement stacked as down [S, rMax, hidden], down bias [S, rMax], up [S, hidden, rMax] and up bias
/// [S, hidden]. An adapter with r &lt; rMax fills the first r units; the rest stay zero (zero weights
/// and zero bias, so act(0) = 0 times a zero column of up adds nothing), which is what lets rows of
/// different bottleneck dimensions share one gathered batched matmul. A slot without a module at some
/// layer/placement is all zeros there too, so it adds exactly nothing.</summary>
public sealed class BottleneckSlotPool : AdapterSlotPool
{
    private readonly ModelConfig _config;
    private readonly int _dim;
    private readonly Tensor[,] _down, _downBias, _up, _upBias;  // [layer, placement]
    private readonly bool[,,] _present;                          // [slot, layer, placement]
    private readonly BottleneckActivation[] _activation;         // per slot

    public override AdapterMethod Method { get; }
    public override int Capacity { get; }
    /// <summary>The padded bottleneck dimension every slot holds.</summary>
    public int Dim => _dim;

    public BottleneckSlotPool(AdapterMethod method, LlamaModel model, AdapterLimits limits)
    {
        Method = method;
        Capacity = limits.SlotsPerMethod;
        _config = model.Config;
        _dim = limits.MaxBottleneckDim;
        long hidden = _config.HiddenSize;
        var (dev, dt) = (model.Device, model.DType);
        int layers = _config.NumLayers;
        (_down, _downBias, _up, _upBias) = (new Tensor[layers, 2], new Tensor[layers, 2], new Tensor[layers, 2], new Tensor[layers, 2]);
        _present = new bool[Capacity, layers, 2];
        _activation = new BottleneckActivation[Capacity];
        for (int l = 0; l < layers; l++)
            for (int p = 0; p < 2; p++)
            {
                _down[l, p] = torch.zeros([Capacity, _dim, hidden], dt, dev);
                _downBias[l, p] = torch.zeros([Capacity, _dim], dt, dev);
                _up[l, p] = torch.zeros([Capacity, hidden, _dim], dt, dev);
                _upBias[l, p] = torch.zeros([Capacity, hidden], dt, dev);
            }
    }

    public override void Store(int slot, Adapter adapter)
    {
        var a = (BottleneckAdapter)adapter;
        if (a.Dim > _dim) throw new AdapterException($"adapter '{a.Name}' has bottleneck dimension {a.Dim}, the {Method.Name} slots hold at most {_dim}");
        using var _ = torch.no_grad();
        _activation[slot] = a.Activation;
        for (int l = 0; l < _config.NumLayers; l++)
            for (int p = 0; p < 2; p++)
            {
                var (down, downBias, up, upBias) = (_down[l, p][slot], _downBias[l, p][slot], _up[l, p][slot], _upBias[l, p][slot]);
                down.zero_();
                downBias.zero_();
                up.zero_();
                upBias.zero_();
                _present[slot, l, p] = a.Modules[l, p] is not null;
                if (a.Modules[l, p] is not { } m) continue;
                int r = a.Dim;
                down[..r].copy_(m.Down);
                downBias[..r].copy_(m.DownBias);
                up[.., ..r].copy_(m.Up);
                upBias.copy_(m.UpBias);
            }
    }

    public override AdapterBatchOp CreateBatchOp(MethodRows rows) => new BottleneckBatchOp(this, rows);

    internal (Tensor Down, Tensor DownBias, Tensor Up, Tensor UpBias) Weights(int layer, BottleneckPlacement p) =>
        (_down[layer, (int)p], _downBias[layer, (int)p], _up[layer, (int)p], _upBias[layer, (int)p]);
    internal bool AnyPresent(int[] slots, int layer, BottleneckPlacement p) => slots.Any(s => _present[s, layer, (int)p]);
    internal BottleneckActivation Activation(int slot) => _activation[slot];
    internal int NumLayers => _config.NumLayers;

    public override void Dispose()
    {
        foreach (var t in _down) t.Dispose();
        foreach (var t in _downBias) t.Dispose();
        foreach (var t in _up) t.Dispose();
        foreach (var t in _upBias) t.Dispose();
    }

    internal static Tensor Activate(BottleneckActivation a, Tensor x) => a switch
    {
        BottleneckActivation.Relu => nn.functional.relu(x),
        BottleneckActivation.Gelu => nn.functional.gelu(x),
        BottleneckActivation.Silu => nn.functional.silu(x),
        _ => torch.tanh(x),
    };
}

/// <summary>Bottleneck deltas for the rows of one forward pass: gather each row's module from its slot
/// and run two batched matmuls (with their biases) per placement; a layer/placement no row's adapter
/// has is skipped. Rows whose adapters use different non-linearities get each theirs, one
/// index_select/index_copy per distinct non-linearity (one plain call in the usual case of one).</summary>
internal sealed class BottleneckBatchOp : AdapterBatchOp
{
    private readonly BottleneckSlotPool _pool;
    private readonly bool[,] _active;   // [layer, placement]: does any row's adapter act there?
    private readonly BottleneckActivation _single;
    /// <summary>When the rows mix non-linearities: each one with the positions (in this op's rows) that use it.</summary>
    private readonly (BottleneckActivation Activation, Tensor Positions)[]? _groups;

    public BottleneckBatchOp(BottleneckSlotPool pool, MethodRows rows) : base(rows)
    {
        _pool = pool;
        _active = new bool[pool.NumLayers, 2];
        for (int l = 0; l < pool.NumLayers; l++)
            foreach (var p in Enum.GetValues<BottleneckPlacement>()) _active[l, (int)p] = pool.AnyPresent(rows.Slots, l, p);
        var byActivation = rows.Slots.Select((slot, i) => (Activation: pool.Activation(slot), Position: (long)i)).GroupBy(x => x.Activation).ToArray();
        _single = byActivation[0].Key;
        if (byActivation.Length > 1)
            _groups = byActivation
                .Select(g => (g.Key, torch.tensor(g.Select(x => x.Position).ToArray(), device: rows.Device).DetachFromDisposeScope()))
                .ToArray();
    }

    public override Tensor AttentionOutput(int layer, Tensor x, Tensor output) => Apply(layer, BottleneckPlacement.Attention, output);
    public override Tensor MlpOutput(int layer, Tensor x, Tensor output) => Apply(layer, BottleneckPlacement.Mlp, output);

    private Tensor Apply(int layer, BottleneckPlacement placement, Tensor output)
    {
        if (!_active[layer, (int)placement]) return output;
        var (down, downBias, up, upBias) = _pool.Weights(layer, placement);
        var slots = Rows.SlotIndex;
        var h = SelectRows(output);                                                              // [n,T,hidden]
        var z = torch.bmm(h, down.index_select(0, slots).transpose(1, 2))
            .add_(downBias.index_select(0, slots).unsqueeze(1));                                 // [n,T,rMax]
        var a = Activate(z);
        var delta = torch.bmm(a, up.index_select(0, slots).transpose(1, 2))
            .add_(upBias.index_select(0, slots).unsqueeze(1));                                   // [n,T,hidden]
        return AddToRows(output, delta);
    }

    private Tensor Activate(Tensor z)
    {
        if (_groups is null) return BottleneckSlotPool.Activate(_single, z);
        var result = torch.empty_like(z);
        foreach (var (activation, positions) in _groups)
            result.index_copy_(0, positions, BottleneckSlotPool.Activate(activation, z.index_select(0, positions)));
        return result;
    }

    public override void Dispose()
    {
        if (_groups is not null) foreach (var (_, positions) in _groups) positions.Dispose();
        base.Dispose();
    }
}
