using System.Collections.Concurrent;
using TorchSharp;

namespace PeftServe.Core.Runtime;

/// <summary>Scalars that live as long as the process, for the constant numbers that hot paths pass to tensor ops.
/// TorchSharp 0.107 turns every number given to an op into a <see cref="Scalar"/> (the default alpha of 1 of its add
/// included) whose native object only its finalizer frees, and hands the native pointer to libtorch without keeping the
/// Scalar reachable until the call returns: a garbage collection during the call can free it while libtorch still
/// reads it (seen in CI: docs/reliability.md; upstream: dotnet/TorchSharp pull requests #1434 and #1496). Passing these
/// instead, alpha included, closes that window. Numbers that vary from call to call are made with <c>ToScalar()</c>
/// in a <c>using</c>, which keeps them alive until after the call and then frees them at once.</summary>
internal static class Scalars
{
    private static readonly ConcurrentDictionary<(TypeCode Type, long Bits), Scalar> Cache = new();

    public static Scalar Of(float value) => Cache.GetOrAdd((TypeCode.Single, BitConverter.SingleToInt32Bits(value)), _ => value.ToScalar());
    public static Scalar Of(double value) => Cache.GetOrAdd((TypeCode.Double, BitConverter.DoubleToInt64Bits(value)), _ => value.ToScalar());
    public static Scalar Of(long value) => Cache.GetOrAdd((TypeCode.Int64, value), _ => value.ToScalar());
    public static Scalar Of(int value) => Cache.GetOrAdd((TypeCode.Int32, value), _ => value.ToScalar());

    /// <summary>The alpha TorchSharp passes where none is given (the int 1).</summary>
    public static Scalar One => Of(1);
}
