using PeftServe.Core.Model;
using static TorchSharp.torch;

namespace PeftServe.Core.Adapters.Lora;

/// <summary>LoRA adapters with vocabulary-sized parts: a saved (modules_to_save) embed_tokens or lm_head, or LoRA
/// on either. One slot holds up to two [V, hidden] matrices (about 1 GB each for Llama-3-8B in bfloat16), so these
/// adapters get a pool of their own with few slots (<see cref="AdapterLimits.EmbeddingSlots"/>), under the same
/// LRU tiers as every pool; the rest of such an adapter (its decoder LoRA, DoRA, biases) lives in the same
/// slot, so a row needs one slot whatever its adapter holds. It reads no peft_type itself: <see cref="LoraMethod"/>
/// reads every LoRA folder and hands the adapters that need it here.</summary>
public sealed class LoraEmbeddingsMethod : AdapterMethod
{
    public static LoraEmbeddingsMethod Instance { get; } = new();

    private LoraEmbeddingsMethod() { }

    public override string Name => "lora-embeddings";
    public override IReadOnlyList<string> PeftTypes { get; } = [];

    public override Adapter Load(AdapterFolder folder, string name, ModelConfig model, AdapterLimits limits) =>
        LoraAdapter.Read(this, folder, name, model, limits);

    public override AdapterSlotPool CreatePool(LlamaModel model, AdapterLimits limits) =>
        new LoraSlotPool(this, model, limits, limits.EmbeddingSlots, vocabulary: true);

    public override long PoolBytes(ModelConfig c, AdapterLimits limits, ScalarType dtype) =>
        LoraSlotPool.Bytes(c, limits, dtype, limits.EmbeddingSlots, vocabulary: true);
}
