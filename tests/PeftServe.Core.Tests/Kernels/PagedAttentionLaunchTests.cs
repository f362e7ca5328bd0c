using PeftServe.Core.Kernels;

namespace PeftServe.Core.Tests.Kernels;

/// <summary>The decode-attention kernel's block size, chosen on the host: for every shape the kernel accepts
/// (head dims up to 256, up to 16 query heads per KV head), the warps' merge buffer stays inside the 48 KiB of
/// static shared memory a block may have, and the common shapes get the most warps (16 for Llama 2 and 3).</summary>
public sealed class PagedAttentionLaunchTests
{
    [Fact]
    public void MergeBufferFitsStaticSharedMemoryForEveryAcceptedShape()
    {
        for (long hd = 2; hd <= 256; hd += 2)
            for (long group = 1; group <= 16; group++)
            {
                int warps = PagedAttention.AttentionWarps(hd, group);
                long bytes = warps * group * 32 * ((hd + 31) / 32) * sizeof(float) + 2 * warps * group * sizeof(float);
                Assert.InRange(warps, 1, 16);
                Assert.True(bytes <= 48 * 1024, $"head dim {hd}, group {group}: {warps} warps need {bytes} bytes");
            }
    }

    [Theory]
    [InlineData(128, 1, 16)]   // Llama 2 7B: multi-head attention
    [InlineData(128, 4, 16)]   // Llama 3 8B
    [InlineData(128, 7, 8)]    // Qwen2 7B
    [InlineData(64, 3, 16)]    // SmolLM 135M
    [InlineData(256, 16, 2)]
    public void CommonShapesGetTheMostWarpsThatFit(long headDim, long group, int warps) =>
        Assert.Equal(warps, PagedAttention.AttentionWarps(headDim, group));
}
