using PeftServe.Core.Cuda;
using PeftServe.Core.Kernels;
using PeftServe.Core.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Adapters.Lora;

/// <summary>LoRA weights of up to <see cref="Capacity"/> adapters on the device, padded to one rank, laid
/// out for the BGMV kernels (Kernels/bgmv.cu) that read each row's adapter in place: per layer and target
/// group (q|k|v, o, gate|up, down) the down-projections A as [S, targets, R, in], and per target the
/// up-projections B transposed, [S, R, out], so each rank's row is contiguous. ranks[s, target] is the
/// adapter's rank there (0 where it has no such target), so the kernels never touch padding. One extra
/// slot past the capacity holds zeros: the tensor-op path sends rows without an adapter there.</summary>
public sealed class LoraSlotPool : AdapterSlotPool
{
    /// <summary>Targets grouped by the input they read, in the model's fused output order.</summary>
    internal static readonly LoraTarget[][] Groups =
        [[LoraTarget.Q, LoraTarget.K, LoraTarget.V], [LoraTarget.O], [LoraTarget.Gate, LoraTarget.Up], [LoraTarget.Down]];

    private readonly ModelConfig _config;
    private readonly int _rank;
    private readonly Tensor[,] _a;       // [layer, group] -> [S+1, targets, R, in]
    private readonly Tensor[,] _b;       // [layer, target] -> [S+1, R, out]
    private readonly Tensor _ranks;      // [S+1, 7] int32 on the device
    private readonly int[,] _rankHost;   // the same on the host

    public override AdapterMethod Method { get; }
    public override int Capacity { get; }
    public int Rank => _rank;
    /// <summary>The zero slot past the capacity.</summary>
    internal int NeutralSlot => Capacity;

    public LoraSlotPool(AdapterMethod method, LlamaModel model, AdapterLimits limits)
    {
        Method = method;
        Capacity = limits.SlotsPerMethod;
        _config = model.Config;
        _rank = limits.MaxRank;
        var (dev, dt) = (model.Device, model.DType);
        _a = new Tensor[_config.NumLayers, Groups.Length];
        _b = new Tensor[_config.NumLayers, 7];
        for (int l = 0; l < _config.NumLayers; l++)
        {
            for (int g = 0; g < Groups.Length; g++)
                _a[l, g] = torch.zeros([Capacity + 1, Groups[g].Length, _rank, LoraAdapter.Shape(Groups[g][0], _config).In], dt, dev);
            foreach (var t in Enum.GetValues<LoraTarget>())
                _b[l, (int)t] = torch.zeros([Capacity + 1, _rank, LoraAdapter.Shape(t, _config).Out], dt, dev);
        }
        _ranks = torch.zeros([Capacity + 1, 7], ScalarType.Int32, dev);
        _rankHost = new int[Capacity + 1, 7];
    }

    /// <summary>Device bytes of a pool for <paramref name="model"/> under <paramref name="limits"/>.</summary>
    public static long Bytes(ModelConfig c, AdapterLimits limits, ScalarType dtype)
    {
        long perSlot = Enum.GetValues<LoraTarget>().Sum(t => { var (i, o) = LoraAdapter.Shape(t, c); return (i + o) * limits.MaxRank; }) * c.NumLayers;
        return (limits.SlotsPerMethod + 1) * perSlot * (dtype == ScalarType.Float32 ? 4 : 2);
    }

    public override void Store(int slot, Adapter adapter)
    {
        var lora = (LoraAdapter)adapter;
        if (lora.MaxRank > _rank) throw new AdapterException($"adapter '{lora.Name}' has rank {lora.MaxRank}, the LoRA slots hold at most {_rank}");
        using var _ = torch.no_grad();
        using var scope = torch.NewDisposeScope();
        var ranks = new int[7];
        for (int l = 0; l < _config.NumLayers; l++)
            for (int g = 0; g < Groups.Length; g++)
            {
                var a = _a[l, g][slot];
                a.zero_();
                for (int j = 0; j < Groups[g].Length; j++)
                {
                    var target = Groups[g][j];
                    var b = _b[l, (int)target][slot];
                    b.zero_();
                    if (lora.Weights[l, (int)target] is not { } w) continue;
                    int r = (int)w.A.shape[0];
                    a[j, ..r] = w.A;
                    b[..r] = w.B.t();
                    ranks[(int)target] = Math.Max(ranks[(int)target], r);
                }
            }
        for (int t = 0; t < 7; t++) _rankHost[slot, t] = ranks[t];
        _ranks[slot] = torch.tensor(ranks, device: _ranks.device);
    }

    /// <summary>On a GPU with a prepared (pinned, serving-dtype) adapter: the slot is zeroed and the adapter copied
    /// on the copy stream, beside running decode steps; the rank table (read only by rows using this slot,
    /// and none does until the copy is done) is updated at once.</summary>
    public override DeviceCopy? StoreAsync(int slot, Adapter adapter)
    {
        var lora = (LoraAdapter)adapter;
        if (_ranks.device.type != DeviceType.CUDA || lora.UpRows is null || lora.Weights.Cast<(Tensor A, Tensor B)?>().Any(w => w is { } p && (!p.A.is_pinned() || p.A.dtype != _a[0, 0].dtype)))
            return base.StoreAsync(slot, adapter);
        if (lora.MaxRank > _rank) throw new AdapterException($"adapter '{lora.Name}' has rank {lora.MaxRank}, the LoRA slots hold at most {_rank}");
        var copies = CopyStream.For(_ranks.device);
        var ranks = new int[7];
        using var scope = torch.NewDisposeScope();
        for (int l = 0; l < _config.NumLayers; l++)
            for (int g = 0; g < Groups.Length; g++)
            {
                var a = _a[l, g][slot];
                copies.Zero(a);
                for (int j = 0; j < Groups[g].Length; j++)
                {
                    var target = Groups[g][j];
                    var b = _b[l, (int)target][slot];
                    copies.Zero(b);
                    if (lora.Weights[l, (int)target] is not { } w) continue;
                    int r = (int)w.A.shape[0];
                    copies.Copy(a[j].narrow(0, 0, r), w.A);
                    copies.Copy(b.narrow(0, 0, r), lora.UpRows![l, (int)target]!);
                    ranks[(int)target] = Math.Max(ranks[(int)target], r);
                }
            }
        var done = copies.Mark();
        for (int t = 0; t < 7; t++) _rankHost[slot, t] = ranks[t];
        _ranks[slot] = torch.tensor(ranks, device: _ranks.device);
        return done;
    }

    public override AdapterBatchOp CreateBatchOp(MethodRows rows) => new LoraBatchOp(this, rows);

    /// <summary>The targets some slot's adapter touches ("QKVOGUD" letters).</summary>
    public override string Signature => new(Enum.GetValues<LoraTarget>().Select(t => AnyUses(Enumerable.Range(0, Capacity), t) ? "QKVOGUD"[(int)t] : '-').ToArray());

    internal Tensor A(int layer, int group) => _a[layer, group];
    internal Tensor B(int layer, LoraTarget target) => _b[layer, (int)target];
    internal Tensor Ranks => _ranks;
    internal bool AnyUses(IEnumerable<int> slots, LoraTarget target) => slots.Any(s => _rankHost[s, (int)target] > 0);
    /// <summary>The largest rank among the adapters in <paramref name="slots"/>: columns past it are zero padding.</summary>
    internal int RankOf(IEnumerable<int> slots) => slots.Select(s => Enumerable.Range(0, 7).Max(t => _rankHost[s, t])).DefaultIfEmpty(1).Max();
    internal ModelConfig Config => _config;

    public override void Dispose()
    {
        foreach (var t in _a) t.Dispose();
        foreach (var t in _b) t.Dispose();
        _ranks.Dispose();
    }
}

/// <summary>LoRA deltas for the rows of one forward pass, per target group. On CUDA the BGMV kernels read
/// every row's A and B in place from its slot (one shrink and one expand launch per group, whatever the
/// mix of adapters), which is also what a captured decode graph replays. Elsewhere (CPU, autograd) tensor
/// ops compute the same sum only up to the batch's largest rank, in one of three shapes: one adapter for
/// every row is two plain matmuls against its slot; a few distinct adapters (at most
/// <see cref="MaskedMaxAdapters"/>) read each adapter once, x times every distinct A, masked to each
/// row's own adapter; otherwise the rows' A and B are gathered for two batched matmuls. Targets no
/// possible adapter has are skipped.</summary>
internal sealed class LoraBatchOp : AdapterBatchOp
{
    /// <summary>Up to this many distinct adapters the masked form reads less than the gather does.</summary>
    internal const int MaskedMaxAdapters = 8;

    private readonly LoraSlotPool _pool;
    private readonly bool[] _active;   // per target: may any row's adapter use it?
    private Tensor? _pending;          // the group's delta being computed on the side stream (float32 [N, width])
    private int _pendingGroup = -1;
    private Tensor? _distinct;         // masked form: the distinct slots [u]
    private Tensor? _mask;             // masked form: [n,1,u,1]

    public LoraBatchOp(LoraSlotPool pool, MethodRows rows) : base(rows)
    {
        _pool = pool;
        _active = Enum.GetValues<LoraTarget>().Select(t => pool.AnyUses(rows.PossibleSlots, t)).ToArray();
    }

    /// <summary>With PEFTSERVE_LORA_OVERLAP=1 on CUDA, starts the group's delta on the side stream as soon as the
    /// projection's input is there: shrink and expand then run beside the base projection, and <see cref="Apply"/>
    /// only joins and adds.</summary>
    public override void BeforeLinear(int layer, LinearSite site, Tensor x)
    {
        int group = (int)site;
        var targets = LoraSlotPool.Groups[group];
        if (!Bgmv.Overlap || !targets.Any(t => _active[(int)t])) return;
        var layout = Layout(group);
        long b = x.shape[0], t = x.shape[1], inF = x.shape[2];
        var x2 = x.reshape(b * t, inF);
        if (!Bgmv.Supports(x2, _pool.Rank, [.. layout.Select(l => l.Width)])) return;
        var side = SideStream.For(x.device.index < 0 ? 0 : x.device.index);
        side.Fork();
        var d = Bgmv.Shrink(x2, Rows.RowSlots, (int)t, _pool.A(layer, group), _pool.Ranks, (int)targets[0], side);
        _pending = Bgmv.ExpandToFloat32(layout[^1].Offset + layout[^1].Width, Rows.RowSlots, (int)t, d,
            targets.Select(tg => _pool.B(layer, tg)).ToArray(), layout.Select(l => l.Offset).ToArray(), _pool.Ranks, (int)targets[0], side);
        side.MarkDone();
        _pendingGroup = group;
    }

    public override Tensor Qkv(int layer, Tensor x, Tensor qkv) => Apply(layer, 0, x, qkv);
    public override Tensor AttentionOutput(int layer, Tensor x, Tensor output) => Apply(layer, 1, x, output);
    public override Tensor GateUp(int layer, Tensor x, Tensor gateUp) => Apply(layer, 2, x, gateUp);
    public override Tensor MlpOutput(int layer, Tensor x, Tensor output) => Apply(layer, 3, x, output);

    /// <summary>Where each target of a group starts in the fused output, and its width.</summary>
    private (long Offset, long Width)[] Layout(int group)
    {
        var targets = LoraSlotPool.Groups[group];
        var result = new (long, long)[targets.Length];
        long offset = 0;
        for (int j = 0; j < targets.Length; j++)
        {
            long width = LoraAdapter.Shape(targets[j], _pool.Config).Out;
            result[j] = (offset, width);
            offset += width;
        }
        return result;
    }

    private Tensor Apply(int layer, int group, Tensor x, Tensor output)
    {
        var targets = LoraSlotPool.Groups[group];
        if (!targets.Any(t => _active[(int)t])) return output;
        if (_pendingGroup == group && _pending is { } delta)
        {
            SideStream.For(x.device.index < 0 ? 0 : x.device.index).Join();
            _pending = null;
            _pendingGroup = -1;
            return output.add_(delta.view(output.shape));
        }
        var layout = Layout(group);
        long b = x.shape[0], t = x.shape[1], inF = x.shape[2];
        var x2 = x.reshape(b * t, inF);
        if (output.is_contiguous() && Bgmv.Supports(x2, _pool.Rank, [.. layout.Select(l => l.Width)]))
        {
            var d = Bgmv.Shrink(x2, Rows.RowSlots, (int)t, _pool.A(layer, group), _pool.Ranks, (int)targets[0]);
            Bgmv.Expand(output.view(b * t, output.shape[^1]), Rows.RowSlots, (int)t, d,
                targets.Select(tg => _pool.B(layer, tg)).ToArray(), layout.Select(l => l.Offset).ToArray(), _pool.Ranks, (int)targets[0]);
            return output;
        }
        return ApplyWithTensorOps(layer, group, x, output, layout);
    }

    private Tensor ApplyWithTensorOps(int layer, int group, Tensor x, Tensor output, (long Offset, long Width)[] layout)
    {
        var targets = LoraSlotPool.Groups[group];
        var slots = Rows.Slots ?? throw new InvalidOperationException("the LoRA tensor-op path needs the batch's rows (no BGMV kernels here to capture)");
        int k = targets.Length, r = _pool.RankOf(slots);
        var distinct = slots.Distinct().ToArray();
        var xs = SelectRows(x);                                                       // [n,T,in]
        long n = xs.shape[0], t = xs.shape[1], inF = xs.shape[2];
        var aRanked = _pool.A(layer, group).narrow(2, 0, r);                          // [S+1, k, r, in]
        Tensor down;                                                                  // [n,T,k,r], or [n,T,u,k,r] masked
        Func<LoraTarget, Tensor, Tensor> up;                                          // down_j -> [n,T,out]
        if (distinct.Length == 1)
        {
            int slot = distinct[0];
            down = torch.matmul(xs, aRanked[slot].reshape(k * r, inF).t()).view(n, t, k, r);
            up = (target, dj) => torch.matmul(dj, _pool.B(layer, target)[slot].narrow(0, 0, r));
        }
        else if (distinct.Length <= MaskedMaxAdapters && distinct.Length < slots.Length)
        {
            long u = distinct.Length;
            if (_distinct is null)
            {
                var mask = new float[slots.Length * distinct.Length];
                for (int row = 0; row < slots.Length; row++) mask[row * distinct.Length + Array.IndexOf(distinct, slots[row])] = 1;
                _distinct = torch.tensor(distinct.Select(s => (long)s).ToArray(), device: Rows.Device).DetachFromDisposeScope();
                using var m = torch.tensor(mask, [slots.Length, 1, distinct.Length, 1, 1], device: Rows.Device);
                _mask = m.to(x.dtype).DetachFromDisposeScope();
            }
            var a = aRanked.index_select(0, _distinct).reshape(u * k * r, inF);        // each adapter once
            down = torch.matmul(xs, a.t()).view(n, t, u, k, r) * _mask!;               // zero but the row's own
            up = (target, dj) =>                                                       // dj [n,T,u,r]
            {
                var b = _pool.B(layer, target).index_select(0, _distinct).narrow(1, 0, r);   // [u,r,out]
                return torch.matmul(dj.reshape(n, t, u * r), b.reshape(u * r, b.shape[2]));
            };
        }
        else
        {
            var a = aRanked.index_select(0, Rows.SlotIndex).reshape(n, k * r, inF);    // [n,k*r,in]
            down = torch.matmul(xs, a.transpose(-1, -2)).view(n, t, k, r);
            up = (target, dj) => torch.matmul(dj, _pool.B(layer, target).index_select(0, Rows.SlotIndex).narrow(1, 0, r));
        }
        for (int j = 0; j < k; j++)
        {
            if (!_active[(int)targets[j]]) continue;
            var dj = down.select(-2, j);                                               // [n,T,r] or [n,T,u,r]
            AddToRows(output.narrow(-1, layout[j].Offset, layout[j].Width), up(targets[j], dj));
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
