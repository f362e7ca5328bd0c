using PeftServe.Core.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Adapters.Lora;

/// <summary>LoRA weights of up to <see cref="Capacity"/> adapters on the device, padded to one rank so
/// rows using different adapters (and ranks) share one gathered batched matmul, as Punica's BGMV and
/// S-LoRA do. Targets sharing an input (q,k,v and gate,up) keep their A matrices stacked, so the
/// down-projection x A^T is one matmul for the group.</summary>
public sealed class LoraSlotPool : AdapterSlotPool
{
    /// <summary>Targets grouped by the input they read, in the model's fused output order.</summary>
    internal static readonly LoraTarget[][] Groups =
        [[LoraTarget.Q, LoraTarget.K, LoraTarget.V], [LoraTarget.O], [LoraTarget.Gate, LoraTarget.Up], [LoraTarget.Down]];

    private readonly ModelConfig _config;
    private readonly int _rank;
    private readonly Tensor[,] _a;     // [layer, group] -> [S, targets*rank, in]
    private readonly Tensor[,] _b;     // [layer, target] -> [S, out, rank]
    private readonly bool[,] _hasTarget; // [slot, target]: does the adapter in the slot touch this target anywhere?

    public override AdapterMethod Method { get; }
    public override int Capacity { get; }
    public int Rank => _rank;

    public LoraSlotPool(AdapterMethod method, LlamaModel model, AdapterLimits limits)
    {
        Method = method;
        Capacity = limits.SlotsPerMethod;
        _config = model.Config;
        _rank = limits.MaxRank;
        var (dev, dt) = (model.Device, model.DType);
        _a = new Tensor[_config.NumLayers, Groups.Length];
        _b = new Tensor[_config.NumLayers, 7];
        _hasTarget = new bool[Capacity, 7];
        for (int l = 0; l < _config.NumLayers; l++)
        {
            for (int g = 0; g < Groups.Length; g++)
                _a[l, g] = torch.zeros([Capacity, Groups[g].Length * _rank, LoraAdapter.Shape(Groups[g][0], _config).In], dt, dev);
            foreach (var t in Enum.GetValues<LoraTarget>())
                _b[l, (int)t] = torch.zeros([Capacity, LoraAdapter.Shape(t, _config).Out, _rank], dt, dev);
        }
    }

    public override void Store(int slot, Adapter adapter)
    {
        var lora = (LoraAdapter)adapter;
        if (lora.MaxRank > _rank) throw new AdapterException($"adapter '{lora.Name}' has rank {lora.MaxRank}, the LoRA slots hold at most {_rank}");
        using var _ = torch.no_grad();
        for (int t = 0; t < 7; t++) _hasTarget[slot, t] = false;
        for (int l = 0; l < _config.NumLayers; l++)
            for (int g = 0; g < Groups.Length; g++)
            {
                _a[l, g][slot].zero_();
                for (int j = 0; j < Groups[g].Length; j++)
                {
                    var target = Groups[g][j];
                    var b = _b[l, (int)target][slot];
                    b.zero_();
                    if (lora.Weights[l, (int)target] is not { } w) continue;
                    int r = (int)w.A.shape[0];
                    _a[l, g][slot, (j * _rank)..(j * _rank + r)] = w.A;
                    b[.., ..r] = w.B;
                    _hasTarget[slot, (int)target] = true;
                }
            }
    }

    public override AdapterBatchOp CreateBatchOp(MethodRows rows) => new LoraBatchOp(this, rows);

    internal Tensor A(int layer, int group) => _a[layer, group];
    internal Tensor B(int layer, LoraTarget target) => _b[layer, (int)target];
    internal bool AnyUses(int[] slots, LoraTarget target) => slots.Any(s => _hasTarget[s, (int)target]);
    internal ModelConfig Config => _config;

    public override void Dispose()
    {
        foreach (var t in _a) t.Dispose();
        foreach (var t in _b) t.Dispose();
    }
}

/// <summary>LoRA deltas for the rows of one forward pass: for each target group, gather the rows'
/// A and B from their slots and run two batched matmuls; targets no row's adapter has are skipped.</summary>
internal sealed class LoraBatchOp : AdapterBatchOp
{
    private readonly LoraSlotPool _pool;
    private readonly bool[] _active;   // per target: does any row's adapter use it?
    private readonly int _sharedSlot;  // the one slot every row uses, or -1

    public LoraBatchOp(LoraSlotPool pool, MethodRows rows) : base(rows)
    {
        _pool = pool;
        _active = Enum.GetValues<LoraTarget>().Select(t => pool.AnyUses(rows.Slots, t)).ToArray();
        _sharedSlot = rows.Slots.Distinct().Count() == 1 ? rows.Slots[0] : -1;
    }

    public override Tensor Qkv(int layer, Tensor x, Tensor qkv) => Apply(layer, 0, x, qkv);
    public override Tensor AttentionOutput(int layer, Tensor x, Tensor output) => Apply(layer, 1, x, output);
    public override Tensor GateUp(int layer, Tensor x, Tensor gateUp) => Apply(layer, 2, x, gateUp);
    public override Tensor MlpOutput(int layer, Tensor x, Tensor output) => Apply(layer, 3, x, output);

    private Tensor Apply(int layer, int group, Tensor x, Tensor output)
    {
        var targets = LoraSlotPool.Groups[group];
        if (!targets.Any(t => _active[(int)t])) return output;
        int rank = _pool.Rank;
        var xs = SelectRows(x);                                                       // [n,T,in]
        // One adapter for every row: plain matmuls against its slot, no per-row gather.
        var a = _sharedSlot >= 0 ? _pool.A(layer, group)[_sharedSlot] : _pool.A(layer, group).index_select(0, Rows.SlotIndex);
        var down = torch.matmul(xs, a.transpose(-1, -2));                             // [n,T,k*r]
        long offset = 0;
        for (int j = 0; j < targets.Length; j++)
        {
            var (_, outF) = LoraAdapter.Shape(targets[j], _pool.Config);
            if (_active[(int)targets[j]])
            {
                var b = _sharedSlot >= 0 ? _pool.B(layer, targets[j])[_sharedSlot] : _pool.B(layer, targets[j]).index_select(0, Rows.SlotIndex);
                var delta = torch.matmul(down[.., .., (j * rank)..((j + 1) * rank)], b.transpose(-1, -2));   // [n,T,out]
                AddToRows(output.narrow(-1, offset, outF), delta);
            }
            offset += outF;
        }
        return output;
    }
}
