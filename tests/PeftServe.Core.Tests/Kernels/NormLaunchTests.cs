using PeftServe.Core.Kernels;

namespace PeftServe.Core.Tests.Kernels;

/// <summary>The RMSNorm kernels' block, chosen on the host: every accepted row fits the kernel's registers (at most
/// NORM_CHUNKS = 4 chunks of 16 bytes a thread, NORM_MAX_THREADS = 512 threads), rows that are not whole chunks or are too wide go to the
/// tensor ops, and the common hidden sizes get one chunk a thread.</summary>
public sealed class NormLaunchTests
{
    [Fact]
    public void EveryAcceptedRowFitsTheKernelsChunks()
    {
        foreach (long elementSize in new long[] { 2, 4 })
            for (long width = 1; width <= 20_000; width++)
            {
                long vec = 16 / elementSize;
                var threads = FusedOps.NormThreads(width, elementSize);
                if (width % vec != 0 || width / vec > 2048)
                {
                    Assert.Null(threads);
                    continue;
                }
                Assert.NotNull(threads);
                Assert.InRange(threads!.Value, 32u, 512u);
                Assert.Equal(0u, threads.Value % 32);
                long chunksPerThread = (width / vec + threads.Value - 1) / threads.Value;
                Assert.InRange(chunksPerThread, 1, 4);
            }
    }

    [Theory]
    [InlineData(4096, 2, 512)]     // Llama 2 7B, bf16: one chunk a thread
    [InlineData(4096, 4, 512)]     // the same in float32: two chunks a thread
    [InlineData(576, 2, 96)]       // SmolLM 135M
    [InlineData(8192, 2, 512)]     // Llama 70B: two chunks a thread
    [InlineData(16384, 2, 512)]    // four chunks a thread
    public void CommonHiddenSizes(long width, long elementSize, uint threads) =>
        Assert.Equal(threads, FusedOps.NormThreads(width, elementSize));

    [Fact]
    public void RowsThatAreNotWholeChunksTakeTheTensorOps()
    {
        Assert.Null(FusedOps.NormThreads(4100, 2));
        Assert.Null(FusedOps.NormThreads(16384 + 8, 2));
        Assert.Null(FusedOps.NormThreads(8192 + 4, 4));
    }
}
