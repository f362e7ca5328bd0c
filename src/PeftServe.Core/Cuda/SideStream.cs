namespace PeftServe.Core.Cuda;

/// <summary>A second CUDA stream per device, for adapter work that only needs a projection's input: it
/// forks from libtorch's current stream before the projection is queued and joins back before the
/// projection's output is used, so the two run side by side (and a CUDA graph captures the fork and join
/// as dependencies). Non-blocking, so the legacy default stream never serializes with it implicitly. Used
/// from the engine thread only, strictly fork, join, fork, join.</summary>
internal sealed unsafe class SideStream
{
    private static readonly Dictionary<int, SideStream> PerDevice = [];
    private readonly IntPtr _context, _fork, _join;

    public IntPtr Stream { get; }
    public int Ordinal { get; }

    private SideStream(int ordinal)
    {
        var cu = CudaDriver.Instance;
        Ordinal = ordinal;
        _context = cu.UsePrimaryContext(ordinal);
        IntPtr stream, fork, join;
        cu.Check(cu.StreamCreate(&stream, 1), "cuStreamCreate(NON_BLOCKING)");
        cu.Check(cu.EventCreate(&fork, 2), "cuEventCreate(DISABLE_TIMING)");
        cu.Check(cu.EventCreate(&join, 2), "cuEventCreate(DISABLE_TIMING)");
        (Stream, _fork, _join) = (stream, fork, join);
    }

    public static SideStream For(int ordinal)
    {
        lock (PerDevice)
        {
            if (!PerDevice.TryGetValue(ordinal, out var s)) PerDevice[ordinal] = s = new SideStream(ordinal);
            return s;
        }
    }

    /// <summary>Work queued on the side stream from now on runs after everything already queued on libtorch's current stream.</summary>
    public void Fork()
    {
        var cu = CudaDriver.Instance;
        cu.MakeCurrent(_context);
        cu.Check(cu.EventRecord(_fork, NativeHelper.CurrentStream(Ordinal)), "cuEventRecord(fork)");
        cu.Check(cu.StreamWaitEvent(Stream, _fork, 0), "cuStreamWaitEvent(side, fork)");
    }

    /// <summary>Marks the end of the side stream's work so far (call right after queueing it).</summary>
    public void MarkDone()
    {
        var cu = CudaDriver.Instance;
        cu.Check(cu.EventRecord(_join, Stream), "cuEventRecord(join)");
    }

    /// <summary>Work queued on libtorch's current stream from now on runs after the side stream's work up to <see cref="MarkDone"/>.</summary>
    public void Join()
    {
        var cu = CudaDriver.Instance;
        cu.MakeCurrent(_context);
        cu.Check(cu.StreamWaitEvent(NativeHelper.CurrentStream(Ordinal), _join, 0), "cuStreamWaitEvent(current, join)");
    }
}
