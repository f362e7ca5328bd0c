namespace PeftServe.Core.Runtime;

/// <summary>Derived seeds that are the same in every process (HashCode.Combine is randomised per
/// process, so it cannot seed a reproducible run).</summary>
public static class Seeds
{
    /// <summary>A 32-bit seed from (seed, index, stream) by SplitMix64.</summary>
    public static int Mix(int seed, long index, int stream)
    {
        ulong z = unchecked((ulong)(uint)seed * 0x9E3779B97F4A7C15UL + (ulong)index * 0xBF58476D1CE4E5B9UL + (ulong)stream * 0x94D049BB133111EBUL);
        z = unchecked((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL);
        z = unchecked((z ^ (z >> 27)) * 0x94D049BB133111EBUL);
        z ^= z >> 31;
        return (int)(z & 0x7FFFFFFF);
    }
}
