using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Model;

/// <summary>Keys and values of every layer for a batch of sequences that advance together, one
/// column per token: [B, kvHeads, capacity, headDim] per layer, preallocated on the device so a decode
/// step writes in place and never reallocates. Each column also records the position of the token
/// it holds (or "empty"), and the attention mask is derived from positions alone: a query at
/// position p sees the keys at positions &lt;= p. That one rule covers causality, left padding and
/// rows of different lengths.</summary>
public sealed class KvCache : IKvCache, IDisposable
{
    /// <summary>Marks a column with no token: no query position is ever at or beyond it.</summary>
    public const long EmptyPosition = long.MaxValue;

    private readonly Tensor[] _keys, _values;
    private readonly Tensor _keyPositions; // [B, capacity] int64

    public int Batch { get; }
    public int Capacity { get; }
    /// <summary>Columns in use (the same for every row).</summary>
    public int Length { get; private set; }

    public KvCache(ModelConfig config, int batch, int capacity, ScalarType dtype, Device device)
    {
        Batch = batch;
        Capacity = capacity;
        _keys = new Tensor[config.NumLayers];
        _values = new Tensor[config.NumLayers];
        for (int i = 0; i < config.NumLayers; i++)
        {
            _keys[i] = torch.zeros([batch, config.NumKvHeads, capacity, config.HeadDim], dtype, device);
            _values[i] = torch.zeros([batch, config.NumKvHeads, capacity, config.HeadDim], dtype, device);
        }
        _keyPositions = torch.full([batch, capacity], EmptyPosition, ScalarType.Int64, device: device);
    }

    /// <summary>Claims the next T columns for a forward pass over tokens at <paramref name="positions"/>
    /// [B,T] (negative = padding, never attended to) and returns the additive attention mask
    /// [B,1,T,Length] in <paramref name="dtype"/>: 0 where a query may attend, the dtype's lowest value
    /// elsewhere (finite, so a padding query yields a harmless uniform average instead of NaN).</summary>
    public Tensor Reserve(Tensor positions, ScalarType dtype)
    {
        int t = (int)positions.shape[1];
        if (Length + t > Capacity)
            throw new InvalidOperationException($"KV cache full: {Length} + {t} tokens exceed its capacity of {Capacity}");
        var stored = torch.where(positions.lt(0), torch.full_like(positions, EmptyPosition), positions);
        _keyPositions[.., Length..(Length + t)] = stored;
        Length += t;
        var keys = _keyPositions[.., ..Length].unsqueeze(1);           // [B,1,S]
        var queries = positions.unsqueeze(-1);                          // [B,T,1]
        var visible = keys.le(queries).unsqueeze(1);                    // [B,1,T,S]
        var zero = torch.zeros(1, dtype, device: positions.device);
        var blocked = torch.full(1, MinValue(dtype), dtype, device: positions.device);
        return torch.where(visible, zero, blocked);
    }

    /// <summary>Writes a layer's new keys and values [B,kvH,T,D] into the columns the last
    /// <see cref="Reserve"/> claimed and returns views of all columns in use.</summary>
    public (Tensor Keys, Tensor Values) Write(int layer, Tensor keys, Tensor values)
    {
        int t = (int)keys.shape[2];
        var start = Length - t;
        _keys[layer][.., .., start..Length, ..] = keys;
        _values[layer][.., .., start..Length, ..] = values;
        return (_keys[layer][.., .., ..Length, ..], _values[layer][.., .., ..Length, ..]);
    }

    /// <summary>Forgets every column from <paramref name="length"/> on (their keys are never attended
    /// again), so the same cache can replay steps: benchmarks, and recomputation after preemption.</summary>
    public void Truncate(int length)
    {
        if (length < 0 || length > Length) throw new ArgumentOutOfRangeException(nameof(length));
        _keyPositions[.., length..].fill_(EmptyPosition);
        Length = length;
    }

    internal static Scalar MinValue(ScalarType dtype) => dtype switch
    {
        ScalarType.Float16 => -65504.0,
        ScalarType.BFloat16 => -3.3895313892515355e38,
        ScalarType.Float64 => double.MinValue,
        _ => float.MinValue,
    };

    public void Dispose()
    {
        foreach (var t in _keys) t.Dispose();
        foreach (var t in _values) t.Dispose();
        _keyPositions.Dispose();
    }
}
