using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Model;

/// <summary>Rotary position embeddings (RoPE) in the "rotate half" layout that Hugging Face Llama
/// checkpoints use. Angles are computed from each token's own position every forward pass, so rows
/// of a batch may sit at any positions (padding, prefixes, continuous batching).</summary>
public sealed class RotaryEmbedding : IDisposable
{
    private readonly Tensor _invFreq; // [headDim/2] float32 on the model's device

    public RotaryEmbedding(RopeConfig rope, int headDim, Device device)
    {
        _invFreq = torch.tensor(InverseFrequencies(rope, headDim), device: device);
    }

    /// <summary>theta^(-2i/d), adjusted by the checkpoint's scaling rule.</summary>
    public static float[] InverseFrequencies(RopeConfig rope, int headDim)
    {
        var inv = new float[headDim / 2];
        for (int i = 0; i < inv.Length; i++)
        {
            double f = 1.0 / Math.Pow(rope.Theta, 2.0 * i / headDim);
            inv[i] = (float)(rope.Type switch
            {
                "linear" => f / rope.Factor,
                "llama3" => Llama3Scale(f, rope),
                _ => f,
            });
        }
        return inv;
    }

    // Llama 3.1's rule: long wavelengths are divided by the factor, short ones kept, and the band in
    // between interpolated smoothly.
    private static double Llama3Scale(double invFreq, RopeConfig r)
    {
        double wavelen = 2 * Math.PI / invFreq;
        double lowWavelen = r.OriginalMaxPositionEmbeddings / r.LowFreqFactor;
        double highWavelen = r.OriginalMaxPositionEmbeddings / r.HighFreqFactor;
        if (wavelen < highWavelen) return invFreq;
        if (wavelen > lowWavelen) return invFreq / r.Factor;
        double smooth = (r.OriginalMaxPositionEmbeddings / wavelen - r.LowFreqFactor) / (r.HighFreqFactor - r.LowFreqFactor);
        return (1 - smooth) * invFreq / r.Factor + smooth * invFreq;
    }

    /// <summary>cos and sin tables for the given positions [B,T]: each [B,T,1,headDim] in
    /// <paramref name="dtype"/>, ready to broadcast over the heads of a [B,T,H,D] tensor. Computed in
    /// float32 as the reference does, then cast.</summary>
    /// <summary>The inverse frequencies [headDim/2] float32 on the device (for the fused decode kernel).</summary>
    internal Tensor InverseFrequencies() => _invFreq;

    public (Tensor Cos, Tensor Sin) Tables(Tensor positions, ScalarType dtype)
    {
        var angles = positions.to(ScalarType.Float32).unsqueeze(-1) * _invFreq; // [B,T,D/2]
        var emb = torch.cat([angles, angles], -1).unsqueeze(2);                 // [B,T,1,D]
        return (emb.cos().to(dtype), emb.sin().to(dtype));
    }

    /// <summary>x * cos + rotate_half(x) * sin, for x [B,T,H,D].</summary>
    public static Tensor Apply(Tensor x, Tensor cos, Tensor sin)
    {
        var half = x.shape[^1] / 2;
        var x1 = x[TensorIndex.Ellipsis, TensorIndex.Slice(0, half)];
        var x2 = x[TensorIndex.Ellipsis, TensorIndex.Slice(half)];
        var rotated = torch.cat([-x2, x1], -1);
        return (x * cos).add(rotated * sin, Runtime.Scalars.One);   // alpha kept alive (Runtime/Scalars.cs)
    }

    public void Dispose() => _invFreq.Dispose();
}
