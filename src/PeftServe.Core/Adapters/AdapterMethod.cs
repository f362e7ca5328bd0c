using PeftServe.Core.Cuda;
using PeftServe.Core.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Adapters;

/// <summary>Bounds an adapter must stay within to be served (checked before anything reaches the device).</summary>
public sealed record AdapterLimits
{
    public int MaxRank { get; init; } = 64;
    /// <summary>Largest bottleneck dimension (hidden / reduction_factor) of a bottleneck or AdaMix adapter.</summary>
    public int MaxBottleneckDim { get; init; } = 64;
    public int MaxVirtualTokens { get; init; } = 128;
    /// <summary>Device slots per method: how many adapters of one method can be resident at once.</summary>
    public int SlotsPerMethod { get; init; } = 16;
    /// <summary>Device slots for LoRA adapters with vocabulary-sized parts (a saved lm_head or embed_tokens, LoRA on
    /// them): each holds two [vocabulary, hidden] matrices, so they are few. 0 refuses such adapters.</summary>
    public int EmbeddingSlots { get; init; } = 2;
}

/// <summary>One parameter-efficient fine-tuning method: how its files are read and validated, and how
/// its adapters are kept on the device and applied to a batch. Each method lives in its own folder
/// (Adapters/Lora, Adapters/Prefix, ...) and is listed once in <see cref="AdapterMethods"/>.</summary>
public abstract class AdapterMethod
{
    /// <summary>Short name ("lora", "prefix", ...).</summary>
    public abstract string Name { get; }

    /// <summary>The adapter_config.json peft_type values this method reads.</summary>
    public abstract IReadOnlyList<string> PeftTypes { get; }

    /// <summary>Reads and validates an adapter against the base model; the result holds host (CPU) tensors.</summary>
    public abstract Adapter Load(AdapterFolder folder, string name, ModelConfig model, AdapterLimits limits);

    /// <summary>Whether this method's adapters have a pool of their own; false for a method whose adapters another
    /// method serves (AdaMix: bottleneck slots), whose <see cref="CreatePool"/> then throws and <see cref="PoolBytes"/> is 0.</summary>
    public virtual bool HasOwnPool => true;

    /// <summary>A fixed pool of device slots for this method's adapters.</summary>
    public abstract AdapterSlotPool CreatePool(LlamaModel model, AdapterLimits limits);

    /// <summary>Device bytes <see cref="CreatePool"/> allocates for a model of <paramref name="c"/> computing in
    /// <paramref name="dtype"/> (the KV cache is sized to leave room for every method's pool).</summary>
    public abstract long PoolBytes(ModelConfig c, AdapterLimits limits, ScalarType dtype);

    /// <summary>Bytes of one element of <paramref name="dtype"/> (float32 4, the 16-bit types 2).</summary>
    protected static long ElementBytes(ScalarType dtype) => dtype == ScalarType.Float32 ? 4 : dtype == ScalarType.Float64 ? 8 : 2;
}

/// <summary>A validated adapter in host memory, ready to be copied into a device slot.</summary>
public abstract class Adapter : IDisposable
{
    public required string Name { get; init; }
    public required string SourcePath { get; init; }
    public abstract AdapterMethod Method { get; }
    /// <summary>Bytes of its tensors in host memory.</summary>
    public abstract long ByteSize { get; }
    /// <summary>Columns the adapter puts before a sequence's tokens (prefix, prompt and P-tuning).</summary>
    public virtual int VirtualTokens => 0;

    /// <summary>Converts the host copy to the serving dtype and, for a GPU, into pinned memory, so that placing
    /// it on the device is a plain asynchronous copy (<see cref="AdapterSlotPool.StoreAsync"/>). Called once, on
    /// the loading thread, before the adapter enters the host cache; <see cref="ByteSize"/> then reports the new
    /// size. Methods whose pools copy synchronously keep their float32 tensors.</summary>
    public virtual void PrepareForDevice(ScalarType dtype, bool pin) { }

    public abstract void Dispose();

    protected static long Bytes(IEnumerable<Tensor?> tensors) => tensors.Sum(t => t is null ? 0 : t.NumberOfElements * t.ElementSize);
}

/// <summary>Device memory for up to <see cref="Capacity"/> adapters of one method, stacked so that one
/// batched operation can serve rows using different slots.</summary>
public abstract class AdapterSlotPool : IDisposable
{
    public abstract AdapterMethod Method { get; }
    public abstract int Capacity { get; }
    /// <summary>Copies an adapter into a slot (overwriting what was there).</summary>
    public abstract void Store(int slot, Adapter adapter);

    /// <summary>Starts copying an adapter into a slot without waiting for it: returns the pending copy (the slot
    /// may be read once it is done), or null when the copy is already complete (the default: <see cref="Store"/>).</summary>
    public virtual DeviceCopy? StoreAsync(int slot, Adapter adapter)
    {
        Store(slot, adapter);
        return null;
    }
    /// <summary>The batched operation for the rows of one forward pass that use this pool.</summary>
    public abstract AdapterBatchOp CreateBatchOp(MethodRows rows);

    /// <summary>Whether the method acts in decode steps at all (prefix and prompt tuning act only in the
    /// prefill, where their virtual tokens enter): a decode pass makes no op for a pool that does not.</summary>
    public virtual bool ActsInDecode => true;

    /// <summary>What the pool's resident adapters may need of a pass, as a short key (for example which
    /// targets any slot's adapter touches). A static pass (a captured CUDA graph) skips only work no slot
    /// needs, so graphs are keyed by this and recaptured when it changes.</summary>
    public virtual string Signature => "";

    public abstract void Dispose();
}
