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
    private readonly int[] _slotRank;    // [slot]: the largest rank of the adapter in the slot

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
        _slotRank = new int[Capacity];
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
        _slotRank[slot] = lora.MaxRank;
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
    /// <summary>The largest rank among the adapters in <paramref name="slots"/>: columns past it are zero padding.</summary>
    internal int RankOf(IEnumerable<int> slots) => slots.Select(s => _slotRank[s]).DefaultIfEmpty(1).Max();
    internal ModelConfig Config => _config;

    public override void Dispose()
    {
        foreach (var t in _a) t.Dispose();
        foreach (var t in _b) t.Dispose();
    }
}

/// <summary>LoRA deltas for the rows of one forward pass, per target group, computed only up to the
/// largest rank among the batch's adapters (the pool pads every slot to the configured maximum).
/// Three shapes of the same sum: one adapter for every row is two plain matmuls against its slot;
/// a few distinct adapters (at most <see cref="MaskedMaxAdapters"/>) read each adapter once, x times
/// every distinct A, masked to each row's own adapter, times the stacked B's; otherwise the rows'
/// A and B are gathered from their slots for two batched matmuls (Punica's BGMV shape).
/// Targets no row's adapter has are skipped.</summary>
internal sealed class LoraBatchOp : AdapterBatchOp
{
    /// <summary>Up to this many distinct adapters the masked form reads less than the gather does.</summary>
    internal const int MaskedMaxAdapters = 8;

    private readonly LoraSlotPool _pool;
    private readonly bool[] _active;   // per target: does any row's adapter use it?
    private readonly int _rank;        // the batch's effective rank
    private readonly int _sharedSlot;  // the one slot every row uses, or -1
    private readonly Tensor? _distinct;  // masked form: the distinct slots [u]
    private readonly Tensor? _mask;      // masked form: [n,1,u,1,1], 1 where a row uses that adapter

    public LoraBatchOp(LoraSlotPool pool, MethodRows rows) : base(rows)
    {
        _pool = pool;
        _active = Enum.GetValues<LoraTarget>().Select(t => pool.AnyUses(rows.Slots, t)).ToArray();
        _rank = pool.RankOf(rows.Slots);
        var distinct = rows.Slots.Distinct().ToArray();
        _sharedSlot = distinct.Length == 1 ? distinct[0] : -1;
        if (distinct.Length > 1 && distinct.Length <= MaskedMaxAdapters && distinct.Length < rows.Slots.Length)
        {
            var mask = new float[rows.Slots.Length * distinct.Length];
            for (int r = 0; r < rows.Slots.Length; r++) mask[r * distinct.Length + Array.IndexOf(distinct, rows.Slots[r])] = 1;
            _distinct = torch.tensor(distinct.Select(x => (long)x).ToArray(), device: rows.Device).DetachFromDisposeScope();
            using var m = torch.tensor(mask, [rows.Slots.Length, 1, distinct.Length, 1, 1], device: rows.Device);
            _mask = m.to(pool.A(0, 0).dtype).DetachFromDisposeScope();
        }
    }

    public override Tensor Qkv(int layer, Tensor x, Tensor qkv) => Apply(layer, 0, x, qkv);
    public override Tensor AttentionOutput(int layer, Tensor x, Tensor output) => Apply(layer, 1, x, output);
    public override Tensor GateUp(int layer, Tensor x, Tensor gateUp) => Apply(layer, 2, x, gateUp);
    public override Tensor MlpOutput(int layer, Tensor x, Tensor output) => Apply(layer, 3, x, output);

    private Tensor Apply(int layer, int group, Tensor x, Tensor output)
    {
        var targets = LoraSlotPool.Groups[group];
        if (!targets.Any(t => _active[(int)t])) return output;
        int k = targets.Length, r = _rank, pad = _pool.Rank;
        var xs = SelectRows(x);                                                       // [n,T,in]
        long n = xs.shape[0], t = xs.shape[1], inF = xs.shape[2];
        var aPool = _pool.A(layer, group);                                            // [S, k*R, in]
        // The first r rows of each target's block of R: [S, k, r, in].
        var aRanked = aPool.view(aPool.shape[0], k, pad, inF).narrow(2, 0, r);
        Tensor down;                                                                  // [n,T,k,r] per row's own adapter
        Func<LoraTarget, Tensor, Tensor> up;                                          // down_j -> [n,T,out]
        if (_sharedSlot >= 0)
        {
            down = torch.matmul(xs, aRanked[_sharedSlot].reshape(k * r, inF).t()).view(n, t, k, r);
            up = (target, dj) => torch.matmul(dj, _pool.B(layer, target)[_sharedSlot].narrow(1, 0, r).t());
        }
        else if (_mask is not null)
        {
            long u = _distinct!.shape[0];
            var a = aRanked.index_select(0, _distinct).reshape(u * k * r, inF);        // each adapter once
            var all = torch.matmul(xs, a.t()).view(n, t, u, k, r) * _mask;             // zero but the row's own
            down = all;
            up = (target, dj) =>                                                       // dj [n,T,u,r]
            {
                var b = _pool.B(layer, target).index_select(0, _distinct).narrow(2, 0, r);   // [u,out,r]
                return torch.matmul(dj.reshape(n, t, u * r), b.permute(0, 2, 1).reshape(u * r, b.shape[1]));
            };
        }
        else
        {
            var a = aRanked.index_select(0, Rows.SlotIndex).reshape(n, k * r, inF);    // [n,k*r,in]
            down = torch.matmul(xs, a.transpose(-1, -2)).view(n, t, k, r);
            up = (target, dj) => torch.matmul(dj, _pool.B(layer, target).index_select(0, Rows.SlotIndex).narrow(2, 0, r).transpose(-1, -2));
        }
        long offset = 0;
        for (int j = 0; j < k; j++)
        {
            var (_, outF) = LoraAdapter.Shape(targets[j], _pool.Config);
            if (_active[(int)targets[j]])
            {
                var dj = down.select(-2, j);                                           // [n,T,r] or [n,T,u,r]
                AddToRows(output.narrow(-1, offset, outF), up(targets[j], dj));
            }
            offset += outF;
        }
        return output;
    }

    public override void Dispose()
    {
        _distinct?.Dispose();
        _mask?.Dispose();
        base.Dispose();
    }
}
