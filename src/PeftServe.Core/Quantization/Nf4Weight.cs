using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Quantization;

/// <summary>An NF4-quantized matrix [Rows, Columns] (row-major, flat blocks of 64): the packed codes
/// (uint8 [Rows*Columns/2]) and either float32 absmax [Rows*Columns/64] or its double-quantized form.
/// Owns its tensors.</summary>
public sealed class Nf4Weight : IDisposable
{
    public long Rows { get; }
    public long Columns { get; }
    /// <summary>uint8 [Rows*Columns/2], first element of each pair in the high nibble.</summary>
    public Tensor Packed { get; }
    /// <summary>float32 [Rows*Columns/64], or null when <see cref="DoubleQuant"/> holds them.</summary>
    public Tensor? Absmax { get; }
    /// <summary>The double-quantized absmax values, or null when <see cref="Absmax"/> holds them.</summary>
    public DoubleQuantAbsmax? DoubleQuant { get; }

    public Nf4Weight(long rows, long columns, Tensor packed, Tensor? absmax, DoubleQuantAbsmax? doubleQuant)
    {
        ArgumentNullException.ThrowIfNull(packed);
        if ((absmax is null) == (doubleQuant is null))
            throw new ArgumentException("an NF4 weight needs exactly one of float32 absmax or double-quantized absmax");
        long n = checked(rows * columns);
        Nf4.CheckElementCount(n, $"NF4 weight [{rows},{columns}]");
        if (packed.dtype != ScalarType.Byte || packed.NumberOfElements != n / 2)
            throw new ArgumentException($"NF4 weight [{rows},{columns}]: packed codes must be uint8 with {n / 2} elements, not {packed.dtype} with {packed.NumberOfElements}");
        long blocks = n / Nf4.BlockSize;
        if (absmax is not null && (absmax.dtype != ScalarType.Float32 || absmax.NumberOfElements != blocks))
            throw new ArgumentException($"NF4 weight [{rows},{columns}]: absmax must be float32 with {blocks} elements, not {absmax.dtype} with {absmax.NumberOfElements}");
        if (doubleQuant is not null && doubleQuant.Count != blocks)
            throw new ArgumentException($"NF4 weight [{rows},{columns}]: double-quantized absmax holds {doubleQuant.Count} values, not {blocks}");
        Rows = rows;
        Columns = columns;
        Packed = packed.reshape(-1);
        if (!ReferenceEquals(Packed, packed)) packed.Dispose();
        Absmax = absmax?.reshape(-1);
        if (absmax is not null && !ReferenceEquals(Absmax, absmax)) absmax.Dispose();
        DoubleQuant = doubleQuant;
    }

    public long ElementCount => Rows * Columns;
    public Device Device => Packed.device;

    /// <summary>Bytes held: packed codes plus absmax (in whichever form).</summary>
    public long Bytes => Packed.NumberOfElements + (Absmax is not null ? Absmax.NumberOfElements * 4 : DoubleQuant!.Bytes);

    /// <summary>Quantizes a dense matrix [rows, columns] (any float dtype and device; the result lives
    /// on the same device), optionally double-quantizing the absmax values.</summary>
    public static Nf4Weight Quantize(Tensor weight, bool doubleQuant = false)
    {
        ArgumentNullException.ThrowIfNull(weight);
        if (weight.dim() != 2) throw new ArgumentException($"NF4 weight must be a matrix, got shape [{string.Join(",", weight.shape)}]");
        long rows = weight.shape[0], cols = weight.shape[1];
        Nf4.CheckElementCount(rows * cols, $"weight [{rows},{cols}]");
        var (packed, absmax) = Nf4.Quantize(weight);
        if (!doubleQuant) return new Nf4Weight(rows, cols, packed, absmax, null);
        try
        {
            return new Nf4Weight(rows, cols, packed, null, DoubleQuantAbsmax.Quantize(absmax));
        }
        finally
        {
            absmax.Dispose();
        }
    }

    /// <summary>The absmax values as float32 [Rows*Columns/64] (a new tensor the caller owns).</summary>
    public Tensor AbsmaxFloat32() => Absmax is not null ? Absmax.alias() : DoubleQuant!.ToFloat32();

    /// <summary>The dense matrix [Rows, Columns] in <paramref name="dtype"/> (computed in float32).</summary>
    public Tensor Dequantize(ScalarType dtype = ScalarType.Float32, Tensor? pairTable = null)
    {
        using var absmax = AbsmaxFloat32();
        return Nf4.Dequantize(Packed, absmax, dtype, [Rows, Columns], pairTable);
    }

    /// <summary>Stacks matrices of equal column count along the rows (q|k|v, gate|up). Each part is a
    /// whole number of 64-blocks, so no block straddles a seam and the result is exactly the quantization
    /// of the concatenated matrix. Takes ownership of the parts (they are disposed).</summary>
    public static Nf4Weight Concat(IReadOnlyList<Nf4Weight> parts)
    {
        if (parts.Count == 0) throw new ArgumentException("nothing to concatenate", nameof(parts));
        if (parts.Count == 1) return parts[0];
        long cols = parts[0].Columns;
        if (parts.Any(p => p.Columns != cols))
            throw new ArgumentException($"NF4 concatenation needs equal column counts, got {string.Join(", ", parts.Select(p => p.Columns))}");
        bool dq = parts[0].DoubleQuant is not null;
        if (parts.Any(p => (p.DoubleQuant is not null) != dq))
            throw new ArgumentException("NF4 concatenation of double-quantized and plain absmax parts");
        using var _ = torch.no_grad();
        var packed = torch.cat(parts.Select(p => p.Packed).ToArray(), 0);
        Tensor? absmax = null;
        DoubleQuantAbsmax? doubleQuant = null;
        if (dq)
        {
            // The segments move over to the new object: the parts' own DoubleQuant must not dispose them.
            doubleQuant = new DoubleQuantAbsmax(parts.SelectMany(p => p.DoubleQuant!.Segments).ToArray());
        }
        else
        {
            absmax = torch.cat(parts.Select(p => p.Absmax!).ToArray(), 0);
        }
        foreach (var p in parts)
        {
            p.Packed.Dispose();
            p.Absmax?.Dispose();
        }
        return new Nf4Weight(parts.Sum(p => p.Rows), cols, packed, absmax, doubleQuant);
    }

    public void Dispose()
    {
        Packed.Dispose();
        Absmax?.Dispose();
        DoubleQuant?.Dispose();
    }
}
