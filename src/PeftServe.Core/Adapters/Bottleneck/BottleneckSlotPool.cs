using PeftServe.Core.Kernels;
using PeftServe.Core.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Adapters.Bottleneck;

/// <summary>Bottleneck modules of up to <see cref="Capacity"/> adapters on the device, per layer and
/// placement stacked as down [S, rMax, hidden], down bias [S, rMax], up transposed [S, rMax, hidden] and
/// up bias [S, hidden], plus a neutral all-zero slot. An adapter with r &lt; rMax fills the first r units; the rest stay zero (zero weights
/// and zero bias, so act(0) = 0 times a zero column of up adds nothing), which is what lets rows of
/// different bottleneck dimensions share one gathered batched matmul. A slot without a module at some
/// layer/placement is all zeros there too, so it adds exactly nothing.</summary>
public sealed class BottleneckSlotPool : AdapterSlotPool
{
    private readonly ModelConfig _config;
    private readonly int _dim;
    // [layer, placement]: down [S+1, dim, hidden], down bias [S+1, dim], up transposed [S+1, dim, hidden]
    // (the layouts the BGMV kernels read in place), up bias [S+1, hidden]. Slot S is the neutral one (zeros).
    private readonly Tensor[,] _down, _downBias, _upT, _upBias;
    private readonly Tensor _ranks;                              // [S+1, 2] int32: dim where the adapter has a module, else 0
    private readonly Tensor _codes;                              // [S+1] int32: the slot's activation
    private readonly bool[,,] _present;                          // [slot, layer, placement]
    private readonly BottleneckActivation[] _activation;         // per slot

    public override AdapterMethod Method { get; }
    public override int Capacity { get; }
    public int Dim => _dim;

    public BottleneckSlotPool(AdapterMethod method, LlamaModel model, AdapterLimits limits)
    {
        Method = method;
        Capacity = limits.SlotsPerMethod;
        _config = model.Config;
        _dim = limits.MaxBottleneckDim;
        long hidden = _config.HiddenSize;
        var (dev, dt) = (model.Device, model.DType);
        int layers = _config.NumLayers, slots = Capacity + 1;
        (_down, _downBias, _upT, _upBias) = (new Tensor[layers, 2], new Tensor[layers, 2], new Tensor[layers, 2], new Tensor[layers, 2]);
        _present = new bool[slots, layers, 2];
        _activation = new BottleneckActivation[slots];
        for (int l = 0; l < layers; l++)
            for (int p = 0; p < 2; p++)
            {
                _down[l, p] = torch.zeros([slots, _dim, hidden], dt, dev);
                _downBias[l, p] = torch.zeros([slots, _dim], dt, dev);
                _upT[l, p] = torch.zeros([slots, _dim, hidden], dt, dev);
                _upBias[l, p] = torch.zeros([slots, hidden], dt, dev);
            }
        _ranks = torch.zeros([slots, 2], ScalarType.Int32, dev);
        _codes = torch.zeros([slots], ScalarType.Int32, dev);
    }

    /// <summary>Device bytes of a pool for <paramref name="c"/> under <paramref name="limits"/>.</summary>
    public static long Bytes(ModelConfig c, AdapterLimits limits, ScalarType dtype) =>
        2L * c.NumLayers * (limits.SlotsPerMethod + 1) * (2L * limits.MaxBottleneckDim * c.HiddenSize + limits.MaxBottleneckDim + c.HiddenSize)
        * (dtype == ScalarType.Float32 ? 4 : 2);

    public override void Store(int slot, Adapter adapter)
    {
        var a = (BottleneckAdapter)adapter;
        if (a.Dim > _dim) throw new AdapterException($"adapter '{a.Name}' has bottleneck dimension {a.Dim}, the {Method.Name} slots hold at most {_dim}");
        using var _ = torch.no_grad();
        using var scope = torch.NewDisposeScope();
        _activation[slot] = a.Activation;
        var ranks = new int[2];
        for (int l = 0; l < _config.NumLayers; l++)
            for (int p = 0; p < 2; p++)
            {
                var (down, downBias, upT, upBias) = (_down[l, p][slot], _downBias[l, p][slot], _upT[l, p][slot], _upBias[l, p][slot]);
                down.zero_();
                downBias.zero_();
                upT.zero_();
                upBias.zero_();
                _present[slot, l, p] = a.Modules[l, p] is not null;
                if (a.Modules[l, p] is not { } m) continue;
                int r = a.Dim;
                down[..r].copy_(m.Down);
                downBias[..r].copy_(m.DownBias);
                upT[..r].copy_(m.Up.t());
                upBias.copy_(m.UpBias);
                ranks[p] = r;
            }
        // The kernels read one rank per (slot, placement): an adapter has one dimension, present or not per layer,
        // so layers without a module get a zero module (which adds nothing: every activation maps 0 to 0).
        _ranks[slot] = torch.tensor(ranks, device: _ranks.device);
        _codes[slot] = torch.tensor((int)a.Activation, device: _codes.device);
    }

    public override AdapterBatchOp CreateBatchOp(MethodRows rows) => new BottleneckBatchOp(this, rows);

    /// <summary>The (layer, placement) pairs where some slot's adapter has a module, and the activations in use.</summary>
    public override string Signature =>
        new string(Enumerable.Range(0, NumLayers * 2).Select(i => AnyPresent(Enumerable.Range(0, Capacity), i / 2, (BottleneckPlacement)(i % 2)) ? '1' : '0').ToArray());

    internal (Tensor Down, Tensor DownBias, Tensor UpT, Tensor UpBias) Weights(int layer, BottleneckPlacement p) =>
        (_down[layer, (int)p], _downBias[layer, (int)p], _upT[layer, (int)p], _upBias[layer, (int)p]);
    internal Tensor Ranks => _ranks;
    internal Tensor ActivationCodes => _codes;
    internal bool AnyPresent(IEnumerable<int> slots, int layer, BottleneckPlacement p) => slots.Any(s => _present[s, layer, (int)p]);
    internal BottleneckActivation Activation(int slot) => _activation[slot];
    internal int NumLayers => _config.NumLayers;

    public override void Dispose()
    {
        foreach (var t in _down) t.Dispose();
        foreach (var t in _downBias) t.Dispose();
        foreach (var t in _upT) t.Dispose();
        foreach (var t in _upBias) t.Dispose();
        _ranks.Dispose();
        _codes.Dispose();
    }

    internal static Tensor Activate(BottleneckActivation a, Tensor x) => a switch
    {
        BottleneckActivation.Relu => nn.functional.relu(x),
        BottleneckActivation.Gelu => nn.functional.gelu(x),
        BottleneckActivation.Silu => nn.functional.silu(x),
        _ => torch.tanh(x),
    };
}

/// <summary>Bottleneck deltas for the rows of one forward pass at one placement. On CUDA: the BGMV shrink
/// reads every row's down-projection in place and adds the down bias and applies the slot's activation to what it
/// writes, and the BGMV expand adds the up-projection and its bias (rows without an
/// adapter add nothing), whatever the mix of adapters: two launches. Elsewhere: the rows' matrices are gathered for two batched
/// matmuls, with the activation applied per group of rows sharing one.</summary>
internal sealed class BottleneckBatchOp : AdapterBatchOp
{
    private readonly BottleneckSlotPool _pool;
    private readonly bool[,] _active;   // [layer, placement]: may any row's adapter act there?

    public BottleneckBatchOp(BottleneckSlotPool pool, MethodRows rows) : base(rows)
    {
        _pool = pool;
        _active = new bool[pool.NumLayers, 2];
        for (int l = 0; l < pool.NumLayers; l++)
            foreach (var p in Enum.GetValues<BottleneckPlacement>()) _active[l, (int)p] = pool.AnyPresent(rows.PossibleSlots, l, p);
    }

    public override Tensor AttentionOutput(int layer, Tensor x, Tensor output) => Apply(layer, BottleneckPlacement.Attention, output);
    public override Tensor MlpOutput(int layer, Tensor x, Tensor output) => Apply(layer, BottleneckPlacement.Mlp, output);

    private Tensor Apply(int layer, BottleneckPlacement placement, Tensor output)
    {
        if (!_active[layer, (int)placement]) return output;
        var (down, downBias, upT, upBias) = _pool.Weights(layer, placement);
        long b = output.shape[0], t = output.shape[1], hidden = output.shape[2];
        var flat = output.reshape(b * t, hidden);
        if (output.is_contiguous() && Bgmv.Supports(flat, hidden))
        {
            var z = Bgmv.Shrink(flat, Rows.RowSlots, (int)t, down.unsqueeze(1), _pool.Ranks, (int)placement,
                activation: (downBias, _pool.ActivationCodes));                                                   // [N,1,dim] float32: act(down x + b)
            Bgmv.Expand(output.view(b * t, hidden), Rows.RowSlots, (int)t, z, [upT], [0L], _pool.Ranks, (int)placement, upBias);
            return output;
        }
        var slots = Rows.SlotIndex;
        var h = SelectRows(output);                                                              // [n,T,hidden]
        var zt = torch.bmm(h, down.index_select(0, slots).transpose(1, 2))
            .add_(downBias.index_select(0, slots).unsqueeze(1));                                 // [n,T,dim]
        var a = Activate(zt);
        var delta = torch.bmm(a, upT.index_select(0, slots))
            .add_(upBias.index_select(0, slots).unsqueeze(1));                                   // [n,T,hidden]
        return AddToRows(output, delta);
    }

    private Tensor Activate(Tensor z)
    {
        var slots = Rows.Slots!;
        var groups = slots.Select((slot, i) => (Activation: _pool.Activation(slot), Position: (long)i)).GroupBy(x => x.Activation).ToArray();
        if (groups.Length == 1) return BottleneckSlotPool.Activate(groups[0].Key, z);
        var result = torch.empty_like(z);
        foreach (var g in groups)
        {
            using var positions = torch.tensor(g.Select(x => x.Position).ToArray(), device: z.device);
            result.index_copy_(0, positions, BottleneckSlotPool.Activate(g.Key, z.index_select(0, positions)));
        }
        return result;
    }
}
