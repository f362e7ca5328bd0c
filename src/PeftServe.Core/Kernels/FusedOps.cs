using PeftServe.Core.Cuda;
using PeftServe.Core.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Kernels;

/// <summary>The decoder layer's elementwise steps: one kernel each on CUDA (Kernels/fused.cu) where eight
/// or so tensor ops ran, the same tensor ops elsewhere (CPU, training with autograd, dtypes the kernels do
/// not take). Both give the same roundings; only float32 summation order differs.</summary>
public static class FusedOps
{
    private const string File = "fused.cu";

    private static KernelModule? Module(Tensor x)
    {
        if (x.device.type != DeviceType.CUDA || torch.is_grad_enabled()) return null;
        var type = KernelModule.TypeName(x.dtype);
        return type is null ? null : KernelModule.TryGet(File, x.device, KernelModule.ElementType(x.dtype)!.Value);
    }

    /// <summary>Whether these kernels run for tensors like <paramref name="x"/> (CUDA, no autograd, a dtype they take).</summary>
    internal static bool Runs(Tensor x) => Module(x) is not null;

    /// <summary>Chunks of 16 bytes each thread of the RMSNorm kernels holds (their NORM_CHUNKS).</summary>
    private const int NormChunks = 4;

    /// <summary>The RMSNorm kernels' block for rows of <paramref name="width"/> elements of <paramref name="elementSize"/>
    /// bytes: a thread per 16-byte chunk, up to <see cref="NormMaxThreads"/> threads of up to <see cref="NormChunks"/> chunks;
    /// null where the row is not whole chunks or too wide (those rows take the tensor ops). One rule for both kernels, so
    /// that they sum a row's squares in the same order.</summary>
    internal static uint? NormThreads(long width, long elementSize)
    {
        long vec = 16 / elementSize;
        if (width % vec != 0 || width / vec > (long)NormMaxThreads * NormChunks) return null;
        return (uint)Math.Clamp((width / vec + 31) / 32 * 32, 32, NormMaxThreads);
    }

    /// <summary>The RMSNorm kernels' largest block (their NORM_MAX_THREADS launch bound: add_rms_norm may then keep more
    /// registers, for the loads of its adapter terms).</summary>
    private const int NormMaxThreads = 512;

    /// <summary>RMSNorm over the last axis, computed in float32 whatever the dtype (as the reference does):
    /// weight * (x * rsqrt(mean(x^2) + eps)).to(dtype).</summary>
    public static Tensor RmsNorm(Tensor x, Tensor weight, double eps)
    {
        if (Module(x) is { } module && weight.dtype == x.dtype && x.is_contiguous() && Aligned(x) && Aligned(weight)
            && weight.is_contiguous() && NormThreads(x.shape[^1], x.ElementSize) is uint threads)
        {
            long h = x.shape[^1], rows = x.NumberOfElements / h;
            var output = torch.empty_like(x);
            module.Launch("rms_norm", ((uint)rows, 1, 1), threads, 0,
                KernelModule.Arg.Ptr(x), KernelModule.Arg.Ptr(weight), KernelModule.Arg.Ptr(output), KernelModule.Arg.Int(h), KernelModule.Arg.Float((float)eps));
            return output;
        }
        using var scope = torch.NewDisposeScope();
        var xf = x.to(ScalarType.Float32);
        // Numbers as Scalars kept alive through the calls (Runtime/Scalars.cs): this runs every layer on the CPU.
        var normed = xf * torch.rsqrt(xf.pow(Scalars.Of(2)).mean([-1], keepdim: true).add(Scalars.Of(eps), Scalars.One));
        return (weight * normed.to(x.dtype)).MoveToOuterDisposeScope();
    }

    /// <summary>The residual stream after adding <paramref name="delta"/> (rounded to the dtype), and its RMSNorm. With
    /// <paramref name="terms"/>, the adapters' per-row terms still owed to delta (a projection's output) are applied to it
    /// first: in the same kernel where it can (one launch fewer), else on their own; delta may be changed in place.</summary>
    public static (Tensor Residual, Tensor Normed) AddRmsNorm(Tensor h, Tensor delta, Tensor weight, double eps, RowEpilogue? terms = null)
    {
        var module = Module(h);
        bool KernelTakes(Tensor d) => module is not null && weight.dtype == h.dtype && d.dtype == h.dtype && h.is_contiguous() && d.is_contiguous()
                                      && weight.is_contiguous() && h.shape.SequenceEqual(d.shape) && Aligned(h) && Aligned(d) && Aligned(weight)
                                      && NormThreads(h.shape[^1], h.ElementSize) is not null;
        // Owed terms ride along in the add_rms_norm kernel where they fit; elsewhere they are applied to delta first.
        if (terms is not null && !(KernelTakes(delta) && terms.Fits(delta.view(-1, delta.shape[^1]))))
        {
            delta = terms.ApplyTo(delta);
            terms = null;
        }
        if (KernelTakes(delta))
        {
            long width = h.shape[^1], rows = h.NumberOfElements / width;
            var residual = torch.empty_like(h);
            var normed = torch.empty_like(h);
            module!.Launch("add_rms_norm", ((uint)rows, 1, 1), NormThreads(width, h.ElementSize)!.Value, 0,
                [KernelModule.Arg.Ptr(h), KernelModule.Arg.Ptr(delta), KernelModule.Arg.Ptr(weight), KernelModule.Arg.Ptr(residual),
                KernelModule.Arg.Ptr(normed), KernelModule.Arg.Int(width), KernelModule.Arg.Float((float)eps),
                KernelModule.Arg.Int(terms?.TokensPerRow ?? 1), .. terms?.Args() ?? RowEpilogue.NoArgs]);
            return (residual, normed);
        }
        var sum = h.add(delta, Scalars.One);
        return (sum, RmsNorm(sum, weight, eps));
    }

    /// <summary>Whether the tensor's data starts on a 16-byte boundary (the vector loads of the kernels that take rows of VEC).</summary>
    private static bool Aligned(Tensor x) => KernelModule.Arg.Ptr(x) % 16 == 0;

    /// <summary>silu(gate) * up for the fused gate|up projection output [..., 2I]: [..., I]. With <paramref name="terms"/>,
    /// the adapters' per-row terms still owed to gate|up are applied to it first: in the same kernel where it can,
    /// else on their own (gateUp may then be changed in place).</summary>
    public static Tensor SiluMul(Tensor gateUp, RowEpilogue? terms = null)
    {
        long width = gateUp.shape[^1] / 2, vec = 16 / gateUp.ElementSize;
        var module = Module(gateUp);
        // Owed terms ride along in silu_mul_terms where they fit; elsewhere they are applied to gate|up first.
        if (terms is not null && !(module is not null && gateUp.is_contiguous() && Aligned(gateUp) && width % vec == 0 && terms.Fits(gateUp.view(-1, 2 * width))))
        {
            gateUp = terms.ApplyTo(gateUp);
            terms = null;
        }
        if (module is not null && gateUp.is_contiguous())
        {
            var shape = gateUp.shape.ToArray();
            shape[^1] = width;
            var output = torch.empty(shape, gateUp.dtype, gateUp.device);
            long rows = gateUp.NumberOfElements / (2 * width);
            ulong[] args = [KernelModule.Arg.Ptr(gateUp), KernelModule.Arg.Ptr(output), KernelModule.Arg.Long(rows), KernelModule.Arg.Int(width)];
            if (terms is null) module.Launch("silu_mul", ((uint)((rows * width + 255) / 256), 1, 1), 256, 0, args);
            else module.Launch("silu_mul_terms", ((uint)((rows * width / vec + 255) / 256), 1, 1), 256, 0, [.. args, KernelModule.Arg.Int(terms.TokensPerRow), .. terms.Args()]);
            return output;
        }
        using var scope = torch.NewDisposeScope();
        var halves = gateUp.chunk(2, -1);
        return (nn.functional.silu(halves[0]) * halves[1]).MoveToOuterDisposeScope();
    }

    /// <summary>In place, each row n of <paramref name="y"/> [..., width] times (or plus, when <paramref name="add"/>)
    /// row index[n / tokensPerRow] of <paramref name="table"/> [slots, width]: IA3's scales and BitFit's biases in
    /// one kernel instead of a gather and a product. False (nothing done) where the kernel does not apply.</summary>
    public static bool RowTableApply(Tensor y, Tensor index, int tokensPerRow, Tensor table, bool add)
    {
        if (Module(y) is not { } module || !y.is_contiguous() || !table.is_contiguous() || table.dtype != y.dtype
            || index.dtype != ScalarType.Int64 || table.shape[^1] != y.shape[^1]) return false;
        long width = y.shape[^1], rows = y.NumberOfElements / width;
        if (rows > 65535) return false;
        module.Launch("row_table_apply", ((uint)Math.Min((width + 255) / 256, 16), (uint)rows, 1), 256, 0,
            KernelModule.Arg.Ptr(y), KernelModule.Arg.Int(width), KernelModule.Arg.Ptr(index), KernelModule.Arg.Int(tokensPerRow),
            KernelModule.Arg.Ptr(table), KernelModule.Arg.Int(add ? 1 : 0));
        return true;
    }
}
