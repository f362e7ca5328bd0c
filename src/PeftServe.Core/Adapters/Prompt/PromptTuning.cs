using PeftServe.Core.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Adapters.Prompt;

/// <summary>Prompt tuning (Lester et al., 2021) and P-tuning (Liu et al., 2021) as served: n learned
/// embeddings put before the sequence's token embeddings. PEFT saves P-tuning's prompt-encoder output
/// as plain embeddings, so both arrive as <c>prompt_embeddings</c> [n, hidden].</summary>
public sealed class PromptTuningMethod : AdapterMethod
{
    public override string Name => "prompt";
    public override IReadOnlyList<string> PeftTypes { get; } = ["PROMPT_TUNING", "P_TUNING"];

    public override Adapter Load(AdapterFolder f, string name, ModelConfig model, AdapterLimits limits)
    {
        if (f.Int("num_transformer_submodules", 1) != 1)
            throw new AdapterException($"{f.Path}/{AdapterFolder.ConfigFile}: num_transformer_submodules must be 1 for a decoder-only model");
        int n = f.Int("num_virtual_tokens");
        if (n < 1 || n > limits.MaxVirtualTokens)
            throw new AdapterException($"{f.Path}/{AdapterFolder.ConfigFile}: num_virtual_tokens {n} is outside 1..{limits.MaxVirtualTokens}");
        if (f.Int("token_dim", model.HiddenSize) != model.HiddenSize)
            throw new AdapterException($"{f.Path}/{AdapterFolder.ConfigFile}: token_dim {f.Int("token_dim")} does not match the base model's hidden size {model.HiddenSize}");
        foreach (var t in f.TensorNames)
            if (t != "prompt_embeddings") throw new AdapterException($"{f.Path}: unexpected tensor '{t}' (a prompt-tuning adapter holds only prompt_embeddings)");
        var embeddings = f.Float("prompt_embeddings", n, model.HiddenSize);
        if (!AdapterFolder.AllFinite(embeddings))
        {
            embeddings.Dispose();
            throw new AdapterException($"{f.Path}: prompt_embeddings holds NaN or infinite values");
        }
        return new PromptAdapter(this, embeddings) { Name = name, SourcePath = f.Path };
    }

    public override AdapterSlotPool CreatePool(LlamaModel model, AdapterLimits limits) => new PromptSlotPool(this, model, limits);

    public override long PoolBytes(ModelConfig c, AdapterLimits limits, ScalarType dtype) =>
        (long)limits.SlotsPerMethod * limits.MaxVirtualTokens * c.HiddenSize * ElementBytes(dtype);
}

public sealed class PromptAdapter(AdapterMethod method, Tensor embeddings) : Adapter
{
    public override AdapterMethod Method => method;
    /// <summary>[n, hidden] float32.</summary>
    public Tensor Embeddings => embeddings;
    public override int VirtualTokens => (int)embeddings.shape[0];
    public override long ByteSize => Bytes([embeddings]);
    public override void Dispose() => embeddings.Dispose();
}

/// <summary>Virtual-token embeddings of every slot: [slots, maxTokens, hidden].</summary>
internal sealed class PromptSlotPool : AdapterSlotPool
{
    private readonly Tensor _table;
    private readonly int[] _tokens;

    public override AdapterMethod Method { get; }
    public override int Capacity { get; }

    public PromptSlotPool(AdapterMethod method, LlamaModel model, AdapterLimits limits)
    {
        Method = method;
        Capacity = limits.SlotsPerMethod;
        _tokens = new int[Capacity];
        _table = torch.zeros([Capacity, limits.MaxVirtualTokens, model.Config.HiddenSize], model.DType, model.Device);
    }

    public override void Store(int slot, Adapter adapter)
    {
        var p = (PromptAdapter)adapter;
        using var _ = torch.no_grad();
        _table[slot].zero_();
        _table[slot, ..p.VirtualTokens] = p.Embeddings;
        _tokens[slot] = p.VirtualTokens;
    }

    /// <summary>Its virtual tokens enter in the prefill; decode steps only read the KV cache.</summary>
    public override bool ActsInDecode => false;

    public override AdapterBatchOp CreateBatchOp(MethodRows rows) => new PromptBatchOp(rows, new VirtualTokenIndex(rows, _tokens, (int)_table.shape[1]), _table);

    public override void Dispose() => _table.Dispose();

    private sealed class PromptBatchOp(MethodRows rows, VirtualTokenIndex index, Tensor table) : AdapterBatchOp(rows)
    {
        public override Tensor Embeddings(Tensor embeddings) => index.Scatter(embeddings, table);

        public override void Dispose()
        {
            index.Dispose();
            base.Dispose();
        }
    }
}
