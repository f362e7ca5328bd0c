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
/// slot past the capacity holds zeros: the tensor-op path sends rows without an adapter there.
///
/// After the LoRA delta, each fused output may get a per-row affine term computed when the adapter is
/// placed: output += output ⊙ gain + offset, gain and offset [S+1, width] per layer and group (zeros in
/// the neutral slot and for adapters without them). DoRA's scale m / ||W + s B A|| is 1 + gain; trained and
/// lora_B biases are offsets (<see cref="StoreOutputTerms"/>). These are slot-indexed tensor ops, the same on
/// CPU and CUDA and inside a captured graph. A pool made with vocabulary slots also holds LoRA on the
/// embedding and LM head and saved modules (<see cref="LoraVocabularySlots"/>).</summary>
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
    private readonly LlamaModel _model;
    private readonly Tensor[,] _gain, _offset;       // [layer, group] -> [S+1, group width]
    private readonly bool[,,] _hasGain, _hasOffset;  // [slot, layer, group]

    /// <summary>LoRA on the embedding and LM head and saved modules, in a pool made for them (else null).</summary>
    internal LoraVocabularySlots? Vocabulary { get; }

    public override AdapterMethod Method { get; }
    public override int Capacity { get; }
    public int Rank => _rank;
    /// <summary>The zero slot past the capacity.</summary>
    internal int NeutralSlot => Capacity;

    public LoraSlotPool(AdapterMethod method, LlamaModel model, AdapterLimits limits) : this(method, model, limits, limits.SlotsPerMethod, vocabulary: false) { }

    /// <param name="vocabulary">Also hold LoRA on the embedding and LM head and saved embedding / LM head matrices.</param>
    public LoraSlotPool(AdapterMethod method, LlamaModel model, AdapterLimits limits, int capacity, bool vocabulary)
    {
        Method = method;
        Capacity = capacity;
        _model = model;
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
        _gain = new Tensor[_config.NumLayers, Groups.Length];
        _offset = new Tensor[_config.NumLayers, Groups.Length];
        for (int l = 0; l < _config.NumLayers; l++)
            for (int g = 0; g < Groups.Length; g++)
            {
                _gain[l, g] = torch.zeros([Capacity + 1, GroupWidth(g, _config)], dt, dev);
                _offset[l, g] = torch.zeros([Capacity + 1, GroupWidth(g, _config)], dt, dev);
            }
        _hasGain = new bool[Capacity + 1, _config.NumLayers, Groups.Length];
        _hasOffset = new bool[Capacity + 1, _config.NumLayers, Groups.Length];
        if (vocabulary) Vocabulary = new LoraVocabularySlots(model, Capacity, _rank);
    }

    /// <summary>Width of group <paramref name="group"/>'s fused output (q|k|v, o, gate|up, down).</summary>
    internal static long GroupWidth(int group, ModelConfig c) => Groups[group].Sum(t => LoraAdapter.Shape(t, c).Out);

    /// <summary>Where target <paramref name="j"/> of group <paramref name="group"/> starts in the fused output.</summary>
    internal static long TargetOffset(int group, int j, ModelConfig c) => Groups[group].Take(j).Sum(t => LoraAdapter.Shape(t, c).Out);

    /// <summary>Device bytes of a pool for <paramref name="model"/> under <paramref name="limits"/> (the plain LoRA pool).</summary>
    public static long Bytes(ModelConfig c, AdapterLimits limits, ScalarType dtype) => Bytes(c, limits, dtype, limits.SlotsPerMethod, vocabulary: false);

    /// <summary>Device bytes of a pool of <paramref name="capacity"/> slots, with vocabulary slots or not.</summary>
    public static long Bytes(ModelConfig c, AdapterLimits limits, ScalarType dtype, int capacity, bool vocabulary)
    {
        if (capacity < 1) return 0;
        // A, B, and each layer's gain and offset over every fused output.
        long perSlot = Enum.GetValues<LoraTarget>().Sum(t => { var (i, o) = LoraAdapter.Shape(t, c); return (i + o) * limits.MaxRank + 2 * o; }) * c.NumLayers;
        long bytes = (capacity + 1) * perSlot * (dtype == ScalarType.Float32 ? 4 : 2);
        return bytes + (vocabulary ? LoraVocabularySlots.Bytes(c, capacity, limits.MaxRank, dtype) : 0);
    }

    public override void Store(int slot, Adapter adapter)
    {
        var lora = (LoraAdapter)adapter;
        if (lora.MaxRank > _rank) throw new AdapterException($"adapter '{lora.Name}' has rank {lora.MaxRank}, the LoRA slots hold at most {_rank}");
        if (lora.Variants is { NeedsVocabularySlot: true } && Vocabulary is null)
            throw new AdapterException($"adapter '{lora.Name}' has vocabulary-sized parts; it belongs in the embeddings pool, not this one");
        using var _ = torch.no_grad();
        using var scope = torch.NewDisposeScope();
        // Checked before the slot is touched: a refused adapter leaves nothing behind.
        if (lora.Variants is { } checkFirst) LoraVocabularySlots.CheckBaseCopies(_model, lora, checkFirst);
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
        StoreOutputTerms(slot, lora);
        Vocabulary?.Store(slot, lora);
    }

    /// <summary>Each fused output's gain and offset for the adapter in <paramref name="slot"/> (whose A and B are
    /// already in place), per target: with base bias b0 (zero when the base has none), the bias b the adapter
    /// wants (its trained bias, else b0), DoRA's scale g = m / ||W + s B A|| (1 without DoRA) and s · lora_B.bias
    /// c: the output after the LoRA delta is W x + b0 + s B A x, and PEFT's is g (W x + s B A x) + b + c, so
    /// gain = g - 1 and offset = b - g b0 + c.</summary>
    private void StoreOutputTerms(int slot, LoraAdapter lora)
    {
        using var scope = torch.NewDisposeScope();
        var v = lora.Variants;
        for (int l = 0; l < _config.NumLayers; l++)
            for (int g = 0; g < Groups.Length; g++)
            {
                var gainRow = _gain[l, g][slot];
                var offsetRow = _offset[l, g][slot];
                gainRow.zero_();
                offsetRow.zero_();
                _hasGain[slot, l, g] = _hasOffset[slot, l, g] = false;
                if (v is null) continue;
                for (int j = 0; j < Groups[g].Length; j++)
                {
                    var target = Groups[g][j];
                    var (m, trained, loraBias) = (v.Magnitude[l, (int)target], v.TrainedBias[l, (int)target], v.LoraBias[l, (int)target]);
                    if (m is null && trained is null && loraBias is null) continue;
                    long offset = TargetOffset(g, j, _config), width = LoraAdapter.Shape(target, _config).Out;
                    var baseBias = _model.ProjectionBias(l, (LinearSite)g)?.narrow(0, offset, width).to(ScalarType.Float32);
                    Tensor scale;
                    if (m is not null)
                    {
                        int r = (int)lora.Weights[l, (int)target]!.Value.A.shape[0];
                        var norms = DoraNorms.Linear(_model, l, (LinearSite)g, offset, width,
                            _a[l, g][slot][j].narrow(0, 0, r), _b[l, (int)target][slot].narrow(0, 0, r));
                        scale = m.to(ScalarType.Float32, _model.Device) / norms;
                        gainRow.narrow(0, offset, width).copy_(scale - 1);
                        _hasGain[slot, l, g] = true;
                    }
                    else scale = torch.ones(width, ScalarType.Float32, _model.Device);
                    var terms = torch.zeros(width, ScalarType.Float32, _model.Device);
                    if (baseBias is not null) terms.add_((trained?.to(ScalarType.Float32, _model.Device) ?? baseBias) - scale * baseBias);
                    else if (trained is not null) terms.add_(trained.to(ScalarType.Float32, _model.Device));
                    if (loraBias is not null) terms.add_(loraBias.to(ScalarType.Float32, _model.Device));
                    if ((baseBias is not null && m is not null) || trained is not null || loraBias is not null)
                    {
                        offsetRow.narrow(0, offset, width).copy_(terms);
                        _hasOffset[slot, l, g] = true;
                    }
                }
            }
    }

    /// <summary>On a GPU with a prepared (pinned, serving-dtype) adapter: the slot is zeroed and the adapter copied
    /// on the copy stream, beside running decode steps; the rank table (read only by rows using this slot,
    /// and none does until the copy is done) is updated at once.</summary>
    public override DeviceCopy? StoreAsync(int slot, Adapter adapter)
    {
        var lora = (LoraAdapter)adapter;
        // Adapters with more than A and B (DoRA's norms are computed from the slot's A and B) are placed synchronously.
        if (_ranks.device.type != DeviceType.CUDA || lora.Variants is not null || lora.UpRows is null || lora.Weights.Cast<(Tensor A, Tensor B)?>().Any(w => w is { } p && (!p.A.is_pinned() || p.A.dtype != _a[0, 0].dtype)))
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
        StoreOutputTerms(slot, lora);   // a plain adapter: clears the gain and offset an earlier occupant may have left
        return done;
    }

    public override AdapterBatchOp CreateBatchOp(MethodRows rows) => new LoraBatchOp(this, rows);

    /// <summary>The targets some slot's adapter touches ("QKVOGUD" letters), the groups whose outputs some slot scales
    /// ("g") or offsets ("b"), and what the vocabulary slots hold.</summary>
    public override string Signature =>
        new string(Enum.GetValues<LoraTarget>().Select(t => AnyUses(Enumerable.Range(0, Capacity), t) ? "QKVOGUD"[(int)t] : '-').ToArray()) + "/" +
        new string(Enumerable.Range(0, Groups.Length).SelectMany(g => new[] { AnyGain(AllSlots, g) ? 'g' : '-', AnyOffset(AllSlots, g) ? 'b' : '-' }).ToArray()) +
        (Vocabulary is null ? "" : "/" + Vocabulary.Signature);

    private IEnumerable<int> AllSlots => Enumerable.Range(0, Capacity);

    /// <summary>Whether some adapter in <paramref name="slots"/> scales group <paramref name="group"/>'s output, in
    /// <paramref name="layer"/> or (null) in any layer.</summary>
    internal bool AnyGain(IEnumerable<int> slots, int group, int? layer = null) =>
        slots.Any(s => layer is { } l ? _hasGain[s, l, group] : Enumerable.Range(0, _config.NumLayers).Any(x => _hasGain[s, x, group]));

    internal bool AnyOffset(IEnumerable<int> slots, int group, int? layer = null) =>
        slots.Any(s => layer is { } l ? _hasOffset[s, l, group] : Enumerable.Range(0, _config.NumLayers).Any(x => _hasOffset[s, x, group]));

    internal Tensor Gain(int layer, int group) => _gain[layer, group];
    internal Tensor Offset(int layer, int group) => _offset[layer, group];

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
        foreach (var t in _gain) t.Dispose();
        foreach (var t in _offset) t.Dispose();
        _ranks.Dispose();
        Vocabulary?.Dispose();
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
    private readonly bool[,] _gainActive, _offsetActive;   // [layer, group]: may any row's adapter scale / offset it?
    private readonly LoraVocabularyOp? _vocabulary;
    private Tensor? _index;            // [B] each row's slot, the neutral slot for rows without
    private LowRankDelta? _pending;    // the group's shrink running on the side stream, to join before its expand
    private int _pendingGroup = -1;
    private Tensor? _distinct;         // masked form: the distinct slots [u]
    private Tensor? _mask;             // masked form: [n,1,u,1]

    public LoraBatchOp(LoraSlotPool pool, MethodRows rows) : base(rows)
    {
        _pool = pool;
        _active = Enum.GetValues<LoraTarget>().Select(t => pool.AnyUses(rows.PossibleSlots, t)).ToArray();
        int layers = pool.Config.NumLayers;
        _gainActive = new bool[layers, LoraSlotPool.Groups.Length];
        _offsetActive = new bool[layers, LoraSlotPool.Groups.Length];
        // A static pass (a graph) decides per group, as the pool's signature does; an eager one per layer.
        for (int l = 0; l < layers; l++)
            for (int g = 0; g < LoraSlotPool.Groups.Length; g++)
            {
                _gainActive[l, g] = pool.AnyGain(rows.PossibleSlots, g, rows.IsStatic ? null : l);
                _offsetActive[l, g] = pool.AnyOffset(rows.PossibleSlots, g, rows.IsStatic ? null : l);
            }
        if (pool.Vocabulary is { } vocabulary) _vocabulary = new LoraVocabularyOp(vocabulary, rows, () => Index);
    }

    /// <summary>[B] each row's slot, rows without an adapter of this pool sent to the neutral slot.</summary>
    private Tensor Index => _index ??= Rows.PoolIndex(_pool.NeutralSlot).DetachFromDisposeScope();

    public override Tensor TokenEmbeddings(Tensor inputIds, Tensor embeddings) => _vocabulary?.TokenEmbeddings(inputIds, embeddings) ?? embeddings;
    public override Tensor Logits(Tensor hidden, Tensor logits) => _vocabulary?.Logits(hidden, logits) ?? logits;

    /// <summary>On CUDA (unless PEFTSERVE_LORA_OVERLAP=0), starts the group's shrink on the side stream as soon as the
    /// projection's input is there, so that it runs beside the base projection; the expand joins it after the
    /// projection (<see cref="TakePending"/>).</summary>
    public override void BeforeLinear(int layer, LinearSite site, Tensor x)
    {
        int group = (int)site;
        if (!Bgmv.Overlap || x.device.type != DeviceType.CUDA || !LoraSlotPool.Groups[group].Any(t => _active[(int)t])) return;
        // The side stream reads x as it is once forked: nothing may be copied for it on the current stream afterwards.
        if (!x.is_contiguous() || !Bgmv.RowsAligned(x.view(-1, x.shape[^1]))) return;
        var side = SideStream.For(x.device.index < 0 ? 0 : x.device.index);
        side.Fork();
        _pending = Shrink(layer, group, x, side);
        side.MarkDone();
        _pendingGroup = _pending is null ? -1 : group;
    }

    /// <summary>The group's shrink started beside the projection, once the current stream has joined it; null when none
    /// was started for this group.</summary>
    private LowRankDelta? TakePending(int group, Tensor x)
    {
        if (_pendingGroup != group || _pending is not { } delta) return null;
        SideStream.For(x.device.index < 0 ? 0 : x.device.index).Join();
        _pending = null;
        _pendingGroup = -1;
        return delta;
    }

    /// <summary>The group's delta as a low-rank term (its shrink runs now or ran beside the projection, the expand with the
    /// other methods' terms), where the BGMV kernels serve it and nothing else of LoRA's acts at this output (no DoRA
    /// scale, no lora_B bias).</summary>
    internal override OutputTerm? OfferOutputTerm(int layer, LinearSite site, Tensor x, Tensor output)
    {
        int group = (int)site;
        if (!LoraSlotPool.Groups[group].Any(t => _active[(int)t]) || _gainActive[layer, group] || _offsetActive[layer, group]
            || output.dim() != 3 || !output.is_contiguous()) return null;
        return (TakePending(group, x) ?? Shrink(layer, group, x)) is { } delta ? new OutputTerm.LowRank(delta) : null;
    }

    /// <summary>The group's shrink on the BGMV kernel (on <paramref name="side"/> when given), as a delta still to expand;
    /// null where the kernels do not serve x.</summary>
    private LowRankDelta? Shrink(int layer, int group, Tensor x, SideStream? side = null)
    {
        var targets = LoraSlotPool.Groups[group];
        var layout = Layout(group);
        long b = x.shape[0], t = x.shape[1], inF = x.shape[2];
        var x2 = x.reshape(b * t, inF);
        if (!Bgmv.Supports(x2, [.. layout.Select(l => l.Width)])) return null;
        var d = Bgmv.Shrink(x2, Rows.RowSlots, (int)t, _pool.A(layer, group), _pool.Ranks, (int)targets[0], side);
        return new LowRankDelta(d, Rows.RowSlots, targets.Select(tg => _pool.B(layer, tg)).ToArray(), layout.Select(l => l.Offset).ToArray(),
            _pool.Ranks, (int)targets[0]);
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

    private Tensor Apply(int layer, int group, Tensor x, Tensor output) => ApplyOutputTerms(layer, group, ApplyDelta(layer, group, x, output));

    /// <summary>output += output ⊙ gain + offset, each row's from its slot (DoRA's scale, trained and lora_B biases).</summary>
    private Tensor ApplyOutputTerms(int layer, int group, Tensor output)
    {
        // One fused kernel: output + output * gain, written in place (each element reads only itself).
        if (_gainActive[layer, group]) output.addcmul_(output, _pool.Gain(layer, group).index_select(0, Index).unsqueeze(1), 1);
        if (_offsetActive[layer, group]) output.add_(_pool.Offset(layer, group).index_select(0, Index).unsqueeze(1));
        return output;
    }

    private Tensor ApplyDelta(int layer, int group, Tensor x, Tensor output)
    {
        var targets = LoraSlotPool.Groups[group];
        if (!targets.Any(t => _active[(int)t])) return output;
        // A shrink started beside the projection is joined in any case: its output must not outlive the side stream's write.
        var pending = TakePending(group, x);
        if (output.is_contiguous() && (pending ?? Shrink(layer, group, x)) is { } d)
        {
            Bgmv.Expand(output.view(-1, output.shape[^1]), d.RowSlots, (int)x.shape[1], d.D, d.Up, d.Offsets, d.Ranks, d.RankColumn);
            return output;
        }
        return ApplyWithTensorOps(layer, group, x, output, Layout(group));
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
        _index?.Dispose();
        _vocabulary?.Dispose();
        base.Dispose();
    }
}
