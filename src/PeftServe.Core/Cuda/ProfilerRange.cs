namespace PeftServe.Core.Cuda;

/// <summary>Marks the part of a run a profiler started with collection off should see (Nsight Compute's
/// <c>--profile-from-start off</c>, Nsight Systems' <c>--capture-range=cudaProfilerApi</c>): cuProfilerStart at the
/// start, cuProfilerStop at the end. The bench verb marks its timed rounds this way when PEFTSERVE_PROFILER_RANGE=1,
/// so a kernel profile leaves out model loading, NF4 quantization and warm-up without guessing a launch count; with
/// PEFTSERVE_PROFILER_RANGE=decode it marks only the decode steps of the first timed wave (from the moment every row
/// has its first token to the wave's end), leaving prefill out too.</summary>
public static unsafe class ProfilerRange
{
    /// <summary>Whether PEFTSERVE_PROFILER_RANGE asks for the marks (1: the timed rounds; decode: their decode steps).</summary>
    public static bool Requested => Environment.GetEnvironmentVariable("PEFTSERVE_PROFILER_RANGE") is "1" or "decode";

    /// <summary>Whether only decode steps are to be marked (PEFTSERVE_PROFILER_RANGE=decode).</summary>
    public static bool DecodeOnly => Environment.GetEnvironmentVariable("PEFTSERVE_PROFILER_RANGE") == "decode";

    /// <summary>Starts collection on CUDA device <paramref name="ordinal"/> (its primary context, libtorch's).</summary>
    public static void Start(int ordinal)
    {
        var cu = CudaDriver.Instance;
        cu.UsePrimaryContext(ordinal);
        cu.Check(cu.ProfilerStart(), "cuProfilerStart");
    }

    /// <summary>Stops collection on CUDA device <paramref name="ordinal"/>.</summary>
    public static void Stop(int ordinal)
    {
        var cu = CudaDriver.Instance;
        cu.UsePrimaryContext(ordinal);
        cu.Check(cu.ProfilerStop(), "cuProfilerStop");
    }
}
