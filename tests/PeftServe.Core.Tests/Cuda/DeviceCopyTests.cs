using PeftServe.Core.Cuda;

namespace PeftServe.Core.Tests.Cuda;

/// <summary>The copy marker's lifetime across threads, with a stand-in event (the CPU machine has no driver): the
/// engine disposes a marker once it reads done while a pool thread may still be blocked waiting on it, and the event
/// must not be freed under that thread (on the GPU that freed event crashed the process inside the driver).</summary>
public sealed class DeviceCopyTests
{
    /// <summary>An event that completes when told to, counting what is asked of it.</summary>
    private sealed class StandInEvent
    {
        public readonly ManualResetEventSlim Completed = new(false);
        public readonly ManualResetEventSlim WaiterInside = new(false);
        public int Queries, Destroys;
        public bool DestroyedWhileWaited;
        private int _inside;

        public DeviceCopy Marker() => new(
            () => { Interlocked.Increment(ref Queries); return Completed.IsSet; },
            () =>
            {
                Interlocked.Increment(ref _inside);
                WaiterInside.Set();
                Completed.Wait();
                Thread.Sleep(20);   // the driver still inside the event after it completed
                Interlocked.Decrement(ref _inside);
            },
            () =>
            {
                if (Volatile.Read(ref _inside) > 0) DestroyedWhileWaited = true;
                Interlocked.Increment(ref Destroys);
            });
    }

    [Fact]
    public void DisposingWhileAThreadWaitsFreesTheEventOnlyAfterTheWaitReturns()
    {
        var e = new StandInEvent();
        var copy = e.Marker();
        var waiter = new Thread(copy.Wait);   // a pool thread of AdapterManager.Place
        waiter.Start();
        Assert.True(e.WaiterInside.Wait(TimeSpan.FromSeconds(10)));
        e.Completed.Set();
        Assert.True(copy.IsDone);   // the engine sees it done while the waiter is still inside the driver call...
        copy.Dispose();             // ...and disposes it, as AdapterManager does
        Assert.Equal(0, e.Destroys);
        Assert.True(waiter.Join(TimeSpan.FromSeconds(10)));
        Assert.Equal(1, e.Destroys);
        Assert.False(e.DestroyedWhileWaited);
    }

    [Fact]
    public void DisposingWithNoWaiterFreesAtOnceAndOnlyOnce()
    {
        var e = new StandInEvent();
        var copy = e.Marker();
        copy.Dispose();
        copy.Dispose();
        Assert.Equal(1, e.Destroys);
        copy.Wait();                // returns at once: nothing is left to wait on
        Assert.True(copy.IsDone);
        Assert.Equal(0, e.Queries); // a freed event is never queried
    }

    [Fact]
    public void DoneIsRememberedAndWaitAfterDoneDoesNotBlock()
    {
        var e = new StandInEvent();
        var copy = e.Marker();
        Assert.False(copy.IsDone);
        e.Completed.Set();
        Assert.True(copy.IsDone);
        Assert.True(copy.IsDone);
        Assert.Equal(2, e.Queries);
        copy.Wait();
        Assert.False(e.WaiterInside.IsSet);   // never entered the blocking call
        copy.Dispose();
        Assert.Equal(1, e.Destroys);
    }

    [Fact]
    public void AFailedWaitLeavesTheMarkerNotDoneAndStillFreesIt()
    {
        int destroys = 0;
        var copy = new DeviceCopy(() => false, () => throw new CudaException("cuEventSynchronize failed: 700"), () => destroys++);
        Assert.Throws<CudaException>(copy.Wait);
        Assert.False(copy.IsDone);
        copy.Dispose();
        Assert.Equal(1, destroys);
    }
}
