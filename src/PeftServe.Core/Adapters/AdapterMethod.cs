using PeftServe.Core.Model;
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

    /// <summary>A fixed pool of device slots for this method's adapters.</summary>
    public abstract AdapterSlotPool CreatePool(LlamaModel model, AdapterLimits limits);
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
    /// <summary>The batched operation for the rows of one forward pass that use this pool.</summary>
    public abstract AdapterBatchOp CreateBatchOp(MethodRows rows);
    public abstract void Dispose();
}
