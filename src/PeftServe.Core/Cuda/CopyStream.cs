using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Cuda;

/// <summary>Host-to-device copies on a stream of their own (S-LoRA's way of loading adapters): they run on
/// the copy engines beside the decode steps instead of between them, and the engine admits a request once
/// its adapter's copies are done (<see cref="DeviceCopy.IsDone"/>), never waiting for them on its thread.
/// Sources must be pinned host memory and stay alive until the copy is done. The stream is non-blocking,
/// so the legacy default stream (libtorch's) never waits for it implicitly.</summary>
internal sealed unsafe class CopyStream
{
    private static readonly Dictionary<int, CopyStream> PerDevice = [];
    private readonly IntPtr _context, _stream;

    public int Ordinal { get; }

    private CopyStream(int ordinal)
    {
        var cu = CudaDriver.Instance;
        Ordinal = ordinal;
        _context = cu.UsePrimaryContext(ordinal);
        IntPtr stream;
        cu.Check(cu.StreamCreate(&stream, 1), "cuStreamCreate(NON_BLOCKING)");
        _stream = stream;
    }

    public static CopyStream For(Device device)
    {
        int ordinal = device.index < 0 ? 0 : device.index;
        lock (PerDevice)
        {
            if (!PerDevice.TryGetValue(ordinal, out var s)) PerDevice[ordinal] = s = new CopyStream(ordinal);
            return s;
        }
    }

    /// <summary>Queues zeroing of <paramref name="region"/> (a contiguous device tensor or view).</summary>
    public void Zero(Tensor region)
    {
        if (!region.is_contiguous()) throw new ArgumentException("the region must be contiguous");
        var cu = CudaDriver.Instance;
        cu.MakeCurrent(_context);
        cu.Check(cu.MemsetD8Async(KernelModule.Arg.Ptr(region), 0, (nuint)(region.NumberOfElements * region.ElementSize), _stream), "cuMemsetD8Async");
    }

    /// <summary>Queues a copy of pinned host tensor <paramref name="source"/> into the contiguous device region
    /// <paramref name="destination"/> (same dtype and element count).</summary>
    public void Copy(Tensor destination, Tensor source)
    {
        if (!destination.is_contiguous() || !source.is_contiguous()) throw new ArgumentException("copies need contiguous tensors");
        if (destination.dtype != source.dtype || destination.NumberOfElements != source.NumberOfElements)
            throw new ArgumentException($"copy of {source.dtype} x{source.NumberOfElements} into {destination.dtype} x{destination.NumberOfElements}");
        var cu = CudaDriver.Instance;
        cu.MakeCurrent(_context);
        cu.Check(cu.MemcpyHtoDAsync(KernelModule.Arg.Ptr(destination), (void*)KernelModule.Arg.Ptr(source),
            (nuint)(source.NumberOfElements * source.ElementSize), _stream), "cuMemcpyHtoDAsync");
    }

    /// <summary>A marker after everything queued so far.</summary>
    public DeviceCopy Mark()
    {
        var cu = CudaDriver.Instance;
        cu.MakeCurrent(_context);
        IntPtr e;
        cu.Check(cu.EventCreate(&e, 2), "cuEventCreate");
        cu.Check(cu.EventRecord(e, _stream), "cuEventRecord");
        return new DeviceCopy(_context, e);
    }
}

/// <summary>Copies queued on a <see cref="CopyStream"/>, up to a point.</summary>
public sealed unsafe class DeviceCopy : IDisposable
{
    private readonly IntPtr _context;
    private IntPtr _event;
    private bool _done;

    internal DeviceCopy(IntPtr context, IntPtr e) => (_context, _event) = (context, e);

    /// <summary>Whether the copies have finished (never blocks).</summary>
    public bool IsDone
    {
        get
        {
            if (_done) return true;
            var cu = CudaDriver.Instance;
            cu.MakeCurrent(_context);
            int status = cu.EventQuery(_event);
            if (status == CudaDriver.NotReady) return false;
            cu.Check(status, "cuEventQuery");
            return _done = true;
        }
    }

    /// <summary>Blocks the calling thread (not the engine's) until the copies are done.</summary>
    public void Wait()
    {
        if (_done) return;
        var cu = CudaDriver.Instance;
        cu.MakeCurrent(_context);
        cu.Check(cu.EventSynchronize(_event), "cuEventSynchronize");
        _done = true;
    }

    public void Dispose()
    {
        if (_event == IntPtr.Zero) return;
        CudaDriver.Instance.EventDestroy(_event);
        _event = IntPtr.Zero;
    }
}
