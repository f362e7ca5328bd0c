using TorchSharp;

namespace PeftServe.Core.SafeTensors;

/// <summary>The element types this reader and writer understand, named after the safetensors header
/// spelling ("F32", "BF16", ...). The first seven are the ones models and adapters use; BOOL, F64 and
/// I16 are extras that also map onto a torch dtype.</summary>
public enum SafeTensorDType
{
    F32,
    F16,
    BF16,
    I64,
    I32,
    U8,
    I8,
    BOOL,
    F64,
    I16,
}

/// <summary>Conversions between <see cref="SafeTensorDType"/>, header names and torch dtypes.</summary>
public static class SafeTensorDTypes
{
    /// <summary>Bytes per element.</summary>
    public static int ElementSize(this SafeTensorDType dtype) => dtype switch
    {
        SafeTensorDType.F32 => 4,
        SafeTensorDType.F16 => 2,
        SafeTensorDType.BF16 => 2,
        SafeTensorDType.I64 => 8,
        SafeTensorDType.I32 => 4,
        SafeTensorDType.U8 => 1,
        SafeTensorDType.I8 => 1,
        SafeTensorDType.BOOL => 1,
        SafeTensorDType.F64 => 8,
        SafeTensorDType.I16 => 2,
        _ => throw new ArgumentOutOfRangeException(nameof(dtype), dtype, "unknown safetensors dtype"),
    };

    /// <summary>The name the header uses for <paramref name="dtype"/>.</summary>
    public static string HeaderName(this SafeTensorDType dtype) => dtype switch
    {
        SafeTensorDType.F32 => "F32",
        SafeTensorDType.F16 => "F16",
        SafeTensorDType.BF16 => "BF16",
        SafeTensorDType.I64 => "I64",
        SafeTensorDType.I32 => "I32",
        SafeTensorDType.U8 => "U8",
        SafeTensorDType.I8 => "I8",
        SafeTensorDType.BOOL => "BOOL",
        SafeTensorDType.F64 => "F64",
        SafeTensorDType.I16 => "I16",
        _ => throw new ArgumentOutOfRangeException(nameof(dtype), dtype, "unknown safetensors dtype"),
    };

    /// <summary>Parses a header dtype name (case-sensitive, as the format spells them).</summary>
    public static bool TryParse(string? name, out SafeTensorDType dtype)
    {
        switch (name)
        {
            case "F32": dtype = SafeTensorDType.F32; return true;
            case "F16": dtype = SafeTensorDType.F16; return true;
            case "BF16": dtype = SafeTensorDType.BF16; return true;
            case "I64": dtype = SafeTensorDType.I64; return true;
            case "I32": dtype = SafeTensorDType.I32; return true;
            case "U8": dtype = SafeTensorDType.U8; return true;
            case "I8": dtype = SafeTensorDType.I8; return true;
            case "BOOL": dtype = SafeTensorDType.BOOL; return true;
            case "F64": dtype = SafeTensorDType.F64; return true;
            case "I16": dtype = SafeTensorDType.I16; return true;
            default: dtype = default; return false;
        }
    }

    /// <summary>The torch dtype a tensor of <paramref name="dtype"/> loads as.</summary>
    public static torch.ScalarType ToScalarType(this SafeTensorDType dtype) => dtype switch
    {
        SafeTensorDType.F32 => torch.ScalarType.Float32,
        SafeTensorDType.F16 => torch.ScalarType.Float16,
        SafeTensorDType.BF16 => torch.ScalarType.BFloat16,
        SafeTensorDType.I64 => torch.ScalarType.Int64,
        SafeTensorDType.I32 => torch.ScalarType.Int32,
        SafeTensorDType.U8 => torch.ScalarType.Byte,
        SafeTensorDType.I8 => torch.ScalarType.Int8,
        SafeTensorDType.BOOL => torch.ScalarType.Bool,
        SafeTensorDType.F64 => torch.ScalarType.Float64,
        SafeTensorDType.I16 => torch.ScalarType.Int16,
        _ => throw new ArgumentOutOfRangeException(nameof(dtype), dtype, "unknown safetensors dtype"),
    };

    /// <summary>The safetensors dtype for a torch dtype, or false where the format (or this
    /// implementation) has none, e.g. complex types.</summary>
    public static bool TryFromScalarType(torch.ScalarType scalarType, out SafeTensorDType dtype)
    {
        switch (scalarType)
        {
            case torch.ScalarType.Float32: dtype = SafeTensorDType.F32; return true;
            case torch.ScalarType.Float16: dtype = SafeTensorDType.F16; return true;
            case torch.ScalarType.BFloat16: dtype = SafeTensorDType.BF16; return true;
            case torch.ScalarType.Int64: dtype = SafeTensorDType.I64; return true;
            case torch.ScalarType.Int32: dtype = SafeTensorDType.I32; return true;
            case torch.ScalarType.Byte: dtype = SafeTensorDType.U8; return true;
            case torch.ScalarType.Int8: dtype = SafeTensorDType.I8; return true;
            case torch.ScalarType.Bool: dtype = SafeTensorDType.BOOL; return true;
            case torch.ScalarType.Float64: dtype = SafeTensorDType.F64; return true;
            case torch.ScalarType.Int16: dtype = SafeTensorDType.I16; return true;
            default: dtype = default; return false;
        }
    }
}
