namespace PeftServe.Core.SafeTensors;

/// <summary>One tensor's header entry. <see cref="Begin"/> and <see cref="End"/> are the header's
/// data_offsets: byte offsets relative to the start of the data section (just after the header),
/// End exclusive. Validated by <see cref="SafeTensorsFile.Open"/>: End - Begin == ByteLength.</summary>
public sealed record SafeTensorInfo(string Name, SafeTensorDType DType, long[] Shape, long Begin, long End)
{
    /// <summary>Product of <see cref="Shape"/> (1 for a scalar, shape []).</summary>
    public long ElementCount
    {
        get
        {
            long n = 1;
            foreach (var d in Shape) n = checked(n * d);
            return n;
        }
    }

    /// <summary>Bytes the tensor's data takes: ElementCount times the element size.</summary>
    public long ByteLength => checked(ElementCount * DType.ElementSize());

    public override string ToString() =>
        $"{Name}: {DType.HeaderName()}[{string.Join(", ", Shape)}] @ [{Begin}, {End})";
}
