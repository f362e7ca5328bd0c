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
        return DeviceCopy.ForEvent(_context, e);
    }
}

/// <summary>Copies queued on a <see cref="CopyStream"/>, up to a point (a CUDA event after them).
/// Thread-safe: the engine polls <see cref="IsDone"/> and disposes the marker on its thread while a pool thread may be
/// blocked in <see cref="Wait"/>; destroying the event under a waiter is a use after free inside the driver (a
/// segfault, seen with 128 adapters cycling through 64 slots), so the event outlives the last waiter.</summary>
public sealed class DeviceCopy : IDisposable
{
    private readonly Func<bool> _query;
    private readonly Action _synchronize, _destroy;
    private readonly object _gate = new();
    private int _waiters;
    private bool _done, _disposed, _destroyed;

    /// <param name="query">whether the copies are done, without blocking</param>
    /// <param name="synchronize">blocks until they are</param>
    /// <param name="destroy">frees the marker; called once, when disposed and no thread waits</param>
    internal DeviceCopy(Func<bool> query, Action synchronize, Action destroy) => (_query, _synchronize, _destroy) = (query, synchronize, destroy);

    /// <summary>A marker for CUDA event <paramref name="e"/> of <paramref name="context"/>.</summary>
    internal static unsafe DeviceCopy ForEvent(IntPtr context, IntPtr e)
    {
        var cu = CudaDriver.Instance;
        return new DeviceCopy(
            () =>
            {
                cu.MakeCurrent(context);
                int status = cu.EventQuery(e);
                if (status == CudaDriver.NotReady) return false;
                cu.Check(status, "cuEventQuery");
                return true;
            },
            () =>
            {
                cu.MakeCurrent(context);
                cu.Check(cu.EventSynchronize(e), "cuEventSynchronize");
            },
            () => cu.EventDestroy(e));
    }

    /// <summary>Whether the copies have finished (never blocks). True once disposed: nothing is left to wait for.</summary>
    public bool IsDone
    {
        get
        {
            lock (_gate)
                return _done || _disposed || (_done = _query());
        }
    }

    /// <summary>Blocks the calling thread (not the engine's) until the copies are done; returns at once once disposed.</summary>
    public void Wait()
    {
        lock (_gate)
        {
            if (_done || _disposed) return;
            _waiters++;
        }
        bool finished = false;
        try
        {
            _synchronize();
            finished = true;
        }
        finally
        {
            lock (_gate)
            {
                _waiters--;
                _done |= finished;
                if (_disposed && _waiters == 0) DestroyOnce();
            }
        }
    }

    /// <summary>Frees the marker now, or when the last thread in <see cref="Wait"/> returns.</summary>
    public void Dispose()
    {
        lock (_gate)
        {
            _disposed = true;
            if (_waiters == 0) DestroyOnce();
        }
    }

    private void DestroyOnce()
    {
        if (_destroyed) return;
        _destroyed = true;
        _destroy();
    }
}
