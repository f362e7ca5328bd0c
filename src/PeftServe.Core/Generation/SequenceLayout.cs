using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Generation;

/// <summary>Why a sequence stopped: a stop token or string, its length limit, or cancellation.</summary>
public enum FinishReason { Stop, Length, Cancelled }

/// <summary>Rows of a batch right-aligned in one [B,T] block: each row is its adapter's virtual
/// columns (if any) followed by its tokens, preceded by padding. Virtual columns take positions
/// 0..n-1 and the tokens n.., as Hugging Face PEFT numbers them; padding gets position -1, which the
/// KV cache never lets anything attend to.</summary>
public sealed record SequenceLayout(long[] Ids, long[] Positions, int Rows, int Length, int[] VirtualStart)
{
    public static SequenceLayout Build(IReadOnlyList<int[]> prompts, IReadOnlyList<int> virtualTokens)
    {
        int rows = prompts.Count, length = prompts.Select((p, r) => p.Length + virtualTokens[r]).Max();
        var ids = new long[rows * length];
        var pos = new long[rows * length];
        var virtualStart = new int[rows];
        for (int r = 0; r < rows; r++)
        {
            int n = virtualTokens[r], pad = length - n - prompts[r].Length;
            virtualStart[r] = n > 0 ? pad : -1;
            for (int t = 0; t < length; t++)
            {
                int i = r * length + t;
                ids[i] = t < pad + n ? 0 : prompts[r][t - pad - n];
                pos[i] = t < pad ? -1 : t - pad;
            }
        }
        return new SequenceLayout(ids, pos, rows, length, virtualStart);
    }

    public (Tensor Ids, Tensor Positions) ToTensors(Device device) =>
        (torch.tensor(Ids, [Rows, Length], device: device), torch.tensor(Positions, [Rows, Length], device: device));
}
