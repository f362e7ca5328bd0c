using System.Text.Json.Nodes;
using PeftServe.Core.Adapters.Lora;
using PeftServe.Core.Kernels;
using PeftServe.Core.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Adapters.IA3;

/// <summary>IA3 (Liu et al., 2022): learned vectors that rescale activations: the outputs of the
/// targeted attention projections (k and v in the paper) and the input of the feed-forward output
/// projection (down_proj). PEFT's <c>ia3_l</c> is [out,1] for output scaling and [1,in] for the
/// feed-forward modules' input scaling.</summary>
public sealed class IA3Method : AdapterMethod
{
    public override string Name => "ia3";
    public override IReadOnlyList<string> PeftTypes { get; } = ["IA3"];

    /// <summary>PEFT's IA3 defaults for Llama-family models when a config names no modules.</summary>
    public static readonly string[] DefaultTargets = ["k_proj", "v_proj", "down_proj"], DefaultFeedForward = ["down_proj"];

    public override Adapter Load(AdapterFolder f, string name, ModelConfig model, AdapterLimits limits)
    {
        var where = $"{f.Path}/{AdapterFolder.ConfigFile}";
        var targets = ModuleSelection.Read(f, "target_modules");
        var feedForward = ModuleSelection.Read(f, "feedforward_modules");
        var excluded = ModuleSelection.Read(f, "exclude_modules");
        bool Targeted(string module) => (targets?.Matches(module) ?? DefaultTargets.Any(t => module.EndsWith("." + t, StringComparison.Ordinal)))
                                        && excluded?.Matches(module) != true;
        bool FeedForward(string module) => feedForward is null ? DefaultFeedForward.Any(t => module.EndsWith("." + t, StringComparison.Ordinal)) : feedForward.Matches(module);
        string Targets() => "target_modules " + (targets?.Description ?? $"absent, so PEFT's default [{string.Join(", ", DefaultTargets)}]");

        var modules = Enum.GetValues<LoraTarget>().ToDictionary(LoraAdapter.ModuleName);
        var scales = new Dictionary<(int Layer, IA3Scale Kind), Tensor>();
        // Everything read is disposed if validation fails; what is kept is detached at the end.
        using var scope = torch.NewDisposeScope();
        foreach (var tensor in f.TensorNames.Order(StringComparer.Ordinal))
        {
            if (!AdapterFolder.TryParseLayerTensor(tensor, out var layer, out var module, out var rest) || rest != "ia3_l" || !modules.TryGetValue(module, out var target))
                throw new AdapterException($"{f.Path}: tensor '{tensor}' is not an IA3 vector of a decoder linear layer (…_proj.ia3_l)");
            if (layer >= model.NumLayers) throw new AdapterException($"{f.Path}: tensor '{tensor}' names layer {layer}, the base model has {model.NumLayers}");
            var fullName = LoraAdapter.FullName(layer, target);
            if (!Targeted(fullName)) throw new AdapterException($"{where}: the weights include {fullName}, which the config does not target ({Targets()})");
            var (inF, outF) = LoraAdapter.Shape(target, model);
            bool input = FeedForward(fullName);
            if (input && target != LoraTarget.Down)
                throw new AdapterException($"{f.Path}: tensor '{tensor}': feed-forward (input) scaling is served on down_proj only");
            var scale = input ? f.Float(tensor, 1, inF) : f.Float(tensor, outF, 1);
            if (!AdapterFolder.AllFinite(scale)) throw new AdapterException($"{f.Path}: tensor '{tensor}' holds NaN or infinite values");
            scales[(layer, input ? IA3Scale.DownInput : (IA3Scale)(int)target)] = scale.flatten();
        }
        if (scales.Count == 0) throw new AdapterException($"{f.Path}: no IA3 vectors found");
        for (int layer = 0; layer < model.NumLayers; layer++)
            foreach (var target in Enum.GetValues<LoraTarget>())
            {
                var fullName = LoraAdapter.FullName(layer, target);
                if (!Targeted(fullName)) continue;
                // PEFT refuses feed-forward modules outside the targets; each targeted module has a vector.
                var kind = FeedForward(fullName) ? IA3Scale.DownInput : (IA3Scale)(int)target;
                if (!scales.ContainsKey((layer, kind)))
                    throw new AdapterException($"{where}: the config targets {fullName} ({Targets()}), but the weights have no ia3_l vector for it");
            }
        if (feedForward is not null)
            foreach (var module in modules.Keys)
                for (int layer = 0; layer < model.NumLayers; layer++)
                    if (feedForward.Matches(LoraAdapter.FullName(layer, modules[module])) && !Targeted(LoraAdapter.FullName(layer, modules[module])))
                        throw new AdapterException($"{where}: feedforward_modules {feedForward.Description} selects {LoraAdapter.FullName(layer, modules[module])}, " +
                            $"which is not among the targets ({Targets()}); PEFT requires feed-forward modules to be targets");
        foreach (var t in scales.Values) t.DetachFromDisposeScope();
        return new IA3Adapter(this, scales) { Name = name, SourcePath = f.Path };
    }

    public override AdapterSlotPool CreatePool(LlamaModel model, AdapterLimits limits) => new IA3SlotPool(this, model, limits);

    public override long PoolBytes(ModelConfig c, AdapterLimits limits, ScalarType dtype) =>
        (long)c.NumLayers * (limits.SlotsPerMethod + 1) * ((long)(c.NumHeads + 2 * c.NumKvHeads) * c.HeadDim + 2L * c.HiddenSize + 3L * c.IntermediateSize) * ElementBytes(dtype);
}

/// <summary>What an IA3 vector scales: a projection's output (q..down, as in <see cref="LoraTarget"/>) or the down projection's input.</summary>
public enum IA3Scale { Q, K, V, O, Gate, Up, Down, DownInput }

public sealed class IA3Adapter(AdapterMethod method, Dictionary<(int Layer, IA3Scale Kind), Tensor> scales) : Adapter
{
    public override AdapterMethod Method => method;
    /// <summary>(layer, kind) -> vector (float32).</summary>
    public IReadOnlyDictionary<(int Layer, IA3Scale Kind), Tensor> Scales => scales;
    public override long ByteSize => Bytes(scales.Values);
    public override void Dispose() { foreach (var t in scales.Values) t.Dispose(); }
}

/// <summary>Per layer, one scale table per hook point, [slots, width], ones where an adapter scales nothing.</summary>
internal sealed class IA3SlotPool : AdapterSlotPool
{
    // Hook points: 0 = q|k|v output, 1 = o output, 2 = gate|up output, 3 = down output, 4 = down input.
    private readonly Tensor[,] _tables;
    private readonly bool[,] _uses;   // [slot, hook point]
    private readonly ModelConfig _c;

    public override AdapterMethod Method { get; }
    public override int Capacity { get; }

    public IA3SlotPool(AdapterMethod method, LlamaModel model, AdapterLimits limits)
    {
        Method = method;
        Capacity = limits.SlotsPerMethod;
        _c = model.Config;
        long q = (long)_c.NumHeads * _c.HeadDim, kv = (long)_c.NumKvHeads * _c.HeadDim;
        long[] widths = [q + 2 * kv, _c.HiddenSize, 2L * _c.IntermediateSize, _c.HiddenSize, _c.IntermediateSize];
        _tables = new Tensor[_c.NumLayers, widths.Length];
        for (int l = 0; l < _c.NumLayers; l++)
            for (int p = 0; p < widths.Length; p++)
                _tables[l, p] = torch.ones([Capacity + 1, widths[p]], model.DType, model.Device);   // + the neutral slot (ones)
        _uses = new bool[Capacity, widths.Length];
    }

    /// <summary>Hook point and column offset where a scale kind lands.</summary>
    private (int Point, long Offset) Place(IA3Scale kind)
    {
        long q = (long)_c.NumHeads * _c.HeadDim, kv = (long)_c.NumKvHeads * _c.HeadDim;
        return kind switch
        {
            IA3Scale.Q => (0, 0), IA3Scale.K => (0, q), IA3Scale.V => (0, q + kv),
            IA3Scale.O => (1, 0), IA3Scale.Gate => (2, 0), IA3Scale.Up => (2, _c.IntermediateSize),
            IA3Scale.Down => (3, 0), _ => (4, 0),
        };
    }

    public override void Store(int slot, Adapter adapter)
    {
        var a = (IA3Adapter)adapter;
        using var _ = torch.no_grad();
        for (int p = 0; p < _uses.GetLength(1); p++) _uses[slot, p] = false;
        foreach (var t in _tables) t[slot].fill_(1);
        foreach (var ((layer, kind), scale) in a.Scales)
        {
            var (point, offset) = Place(kind);
            _tables[layer, point][slot].narrow(0, offset, scale.shape[0]).copy_(scale);
            _uses[slot, point] = true;
        }
    }

    public override AdapterBatchOp CreateBatchOp(MethodRows rows) => new IA3BatchOp(rows, this);

    /// <summary>The hook points some slot's adapter scales (q|k|v, o, gate|up, down, down input).</summary>
    public override string Signature => new(Enumerable.Range(0, 5).Select(p => Enumerable.Range(0, Capacity).Any(s => _uses[s, p]) ? "qogdi"[p] : '-').ToArray());

    public override void Dispose() { foreach (var t in _tables) t.Dispose(); }

    private sealed class IA3BatchOp : AdapterBatchOp
    {
        private readonly IA3SlotPool _pool;
        private readonly bool[] _active;

        public IA3BatchOp(MethodRows rows, IA3SlotPool pool) : base(rows)
        {
            _pool = pool;
            _active = Enumerable.Range(0, 5).Select(p => rows.PossibleSlots.Any(s => pool._uses[s, p])).ToArray();
        }

        public override Tensor Qkv(int layer, Tensor x, Tensor qkv) => Scale(layer, 0, qkv);
        public override Tensor AttentionOutput(int layer, Tensor x, Tensor output) => Scale(layer, 1, output);
        public override Tensor GateUp(int layer, Tensor x, Tensor gateUp) => Scale(layer, 2, gateUp);
        public override Tensor MlpOutput(int layer, Tensor x, Tensor output) => Scale(layer, 3, output);
        public override Tensor DownInput(int layer, Tensor x) => Scale(layer, 4, x);

        internal override OutputTerm? OfferOutputTerm(int layer, LinearSite site, Tensor x, Tensor output)
        {
            int point = (int)site;   // q|k|v, o, gate|up, down: the first four hook points, in the sites' order
            if (!_active[point] || output.dim() != 3 || !output.is_contiguous() || !FusedOps.Runs(output)) return null;
            _index ??= Rows.PoolIndex(_pool.Capacity).DetachFromDisposeScope();
            return new OutputTerm.Scale(_pool._tables[layer, point], _index);
        }

        // Every row is scaled by its adapter's vector; rows without an IA3 adapter read the neutral slot
        // (ones), so the op reads only the per-row slot tensor and serves any batch.
        private Tensor Scale(int layer, int point, Tensor t)
        {
            if (!_active[point]) return t;
            _index ??= Rows.PoolIndex(_pool.Capacity).DetachFromDisposeScope();
            var table = _pool._tables[layer, point];
            if (t.dim() == 3 && FusedOps.RowTableApply(t, _index, (int)t.shape[1], table, add: false)) return t;   // CUDA: in place
            return t * table.index_select(0, _index).unsqueeze(1);                              // [B,1,width] broadcast over T
        }

        private Tensor? _index;

        public override void Dispose()
        {
            _index?.Dispose();
            base.Dispose();
        }
    }
}
