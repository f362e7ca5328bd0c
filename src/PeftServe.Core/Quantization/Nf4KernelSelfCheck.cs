using System.Diagnostics;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Quantization;

/// <summary>A check of the fused NF4 CUDA kernel for the GPU machine (CI has no GPU): for several real
/// layer shapes and decode batch sizes it compares the kernel with a float32 reference built from the
/// same dequantized weight, checks that <see cref="Nf4Linear.Forward"/> dispatches to the kernel and
/// agrees with the plain path, checks that the dequantization kernel is bit-identical to the tensor-op
/// dequantization, and times the fused kernel, dequantize-kernel + matmul, tensor-op dequantize + matmul,
/// and a dense matmul with the same weight in the activations' dtype (what an unquantized model pays). Run it from a CLI verb:
/// <c>return Nf4KernelSelfCheck.Run(Console.Out);</c> (the program must have called
/// torch.InitializeDeviceType(DeviceType.CUDA) first). Returns 0 when every case passes, 1 when one
/// fails, 2 when there is no CUDA device or the kernel cannot be compiled.</summary>
public static class Nf4KernelSelfCheck
{
    /// <summary>Relative error ‖kernel − reference‖ / ‖reference‖ allowed (bf16 output rounding is
    /// 2^-9 ≈ 0.002 relative per element; fp16's is smaller).</summary>
    public const double Tolerance = 1e-2;

    /// <summary>[out, in] shapes: Llama-7B q/k/v/o, gate/up, down, and a fused q|k|v.</summary>
    public static readonly (long Out, long In)[] Shapes = [(4096, 4096), (11008, 4096), (4096, 11008), (12288, 4096)];
    public static readonly int[] Rows = [1, 4, 16];

    public static int Run(TextWriter log, int iterations = 200, bool includeFp16 = true, int[]? rowCounts = null)
    {
        var bf16Rows = rowCounts ?? Rows;
        int[] fp16Rows = rowCounts ?? [1, 16];
        if (!torch.cuda.is_available())
        {
            log.WriteLine("nf4-kernel self-check: CUDA is not available (call torch.InitializeDeviceType(DeviceType.CUDA) first?)");
            return 2;
        }
        var device = torch.CUDA;
        try
        {
            Nf4CudaKernel.EnsureLoaded(0);
        }
        catch (PeftServe.Core.Cuda.CudaException e)
        {
            log.WriteLine($"nf4-kernel self-check: the kernel could not be prepared: {e.Message}");
            return 2;
        }
        var kernels = Nf4CudaKernel.For(0)!;
        log.WriteLine($"nf4-kernel self-check: compiled for {kernels.Target}, " +
                      $"{iterations} iterations per timing, median of {Repeats} batches; enabled={Nf4CudaKernel.Enabled}");
        log.WriteLine("columns: rel.err = |fused - fp32 reference| / |reference|; vs plain = |Nf4Linear.Forward - tensor-op path| / |..|;");
        log.WriteLine("deq = dequantization kernel bit-identical to tensor ops; times in microseconds per call (host overhead included);");
        log.WriteLine("GB/s = NF4 weight bytes (packed + absmax) / fused time; deq+mm = dequantization kernel + matmul; ops = tensor-op");
        log.WriteLine("dequantization + matmul; dense = matmul with a dense weight in the activations' dtype.");
        log.WriteLine($"{"dtype",-5} {"out x in",-12} {"rows",4} {"rel.err",9} {"vs plain",9} {"deq",5} {"fused",8} {"GB/s",6} {"deq+mm",8} {"ops",8} {"dense",8}  result");

        bool allPass = true;
        using var _ = torch.no_grad();
        torch.manual_seed(1234);
        var dtypes = includeFp16 ? new[] { ScalarType.BFloat16, ScalarType.Float16 } : [ScalarType.BFloat16];
        foreach (var dtype in dtypes)
            foreach (var (outF, inF) in Shapes)
            {
                using var scope = torch.NewDisposeScope();
                var w = torch.randn([outF, inF], ScalarType.Float32, device).mul_(0.02);
                using var layer = new Nf4Linear(Nf4Weight.Quantize(w), null);
                w.Dispose();
                var dense = layer.Weight.Dequantize(ScalarType.Float32);
                var denseTyped = dense.to(dtype);
                double bytes = layer.Weight.Bytes;
                var deqKernel = Nf4CudaKernel.TryDequantize(layer.Weight, dtype);
                var deqOps = layer.Weight.Dequantize(dtype);
                bool deqExact = deqKernel is not null && deqKernel.eq(deqOps).all().item<bool>();
                deqKernel?.Dispose();
                deqOps.Dispose();
                foreach (var rows in dtype == ScalarType.BFloat16 ? bf16Rows : fp16Rows)
                {
                    using var inner = torch.NewDisposeScope();
                    var x = torch.randn([rows, inF], dtype, device);
                    var reference = nn.functional.linear(x.to(ScalarType.Float32), dense);
                    var kernelOut = Nf4CudaKernel.TryForward(x, layer.Weight);
                    if (kernelOut is null)
                    {
                        log.WriteLine($"{Name(dtype),-5} {outF + "x" + inF,-12} {rows,4}  kernel declined: {Nf4CudaKernel.LastError ?? "(no reason)"}  FAIL");
                        allPass = false;
                        continue;
                    }
                    double rel = RelErr(kernelOut, reference);

                    // Through the layer: must take the kernel and agree with the plain path.
                    long before = Nf4CudaKernel.Launches;
                    var viaLayer = layer.Forward(x.unsqueeze(0));
                    bool dispatched = Nf4CudaKernel.Launches == before + 1;
                    var plain = layer.PlainForward(x, tensorOpsOnly: true);
                    double layerErr = RelErr(viaLayer.squeeze(0), plain.to(ScalarType.Float32));

                    double kernelUs = Time(() => Nf4CudaKernel.TryForward(x, layer.Weight)!.Dispose(), iterations);
                    double deqUs = Time(() => layer.PlainForward(x).Dispose(), iterations);
                    double opsUs = Time(() => layer.PlainForward(x, tensorOpsOnly: true).Dispose(), iterations);
                    double denseUs = Time(() => nn.functional.linear(x, denseTyped).Dispose(), iterations);
                    bool pass = rel < Tolerance && layerErr < Tolerance && dispatched && deqExact && double.IsFinite(rel);
                    allPass &= pass;
                    log.WriteLine($"{Name(dtype),-5} {outF + "x" + inF,-12} {rows,4} {rel,9:E2} {layerErr,9:E2} {(deqExact ? "yes" : "NO"),5} {kernelUs,8:F1} {bytes / kernelUs / 1e3,6:F0} " +
                                  $"{deqUs,8:F1} {opsUs,8:F1} {denseUs,8:F1}  {(pass ? "ok" : "FAIL")}{(dispatched ? "" : " (Nf4Linear.Forward did not use the kernel)")}");
                }
            }

        // Off switch and fallbacks: more rows than MaxRows, and float32, must take the plain path.
        {
            using var scope = torch.NewDisposeScope();
            var w = torch.randn([256, 512], ScalarType.Float32, device);
            using var layer = new Nf4Linear(Nf4Weight.Quantize(w), null);
            bool declinesLarge = Nf4CudaKernel.TryForward(torch.randn([Nf4CudaKernel.MaxSplitRows + 1, 512], ScalarType.BFloat16, device), layer.Weight) is null;
            bool declinesF32 = Nf4CudaKernel.TryForward(torch.randn([1, 512], ScalarType.Float32, device), layer.Weight) is null;
            bool was = Nf4CudaKernel.Enabled;
            Nf4CudaKernel.Enabled = false;
            bool declinesOff = Nf4CudaKernel.TryForward(torch.randn([1, 512], ScalarType.BFloat16, device), layer.Weight) is null;
            Nf4CudaKernel.Enabled = was;
            // Double-quantized absmax and an input view at an odd offset.
            using var dq = new Nf4Linear(Nf4Weight.Quantize(w, doubleQuant: true), null);
            var big = torch.randn([1, 513], ScalarType.BFloat16, device);
            var odd = big[.., 1..];
            var k = Nf4CudaKernel.TryForward(odd, dq.Weight);
            double dqErr = k is null ? double.NaN : RelErr(k, dq.PlainForward(odd, tensorOpsOnly: true).to(ScalarType.Float32));
            bool ok = declinesLarge && declinesF32 && declinesOff && dqErr < Tolerance;
            allPass &= ok;
            log.WriteLine($"fallbacks: >{Nf4CudaKernel.MaxSplitRows} rows {(declinesLarge ? "plain" : "KERNEL")}, float32 {(declinesF32 ? "plain" : "KERNEL")}, " +
                          $"disabled {(declinesOff ? "plain" : "KERNEL")}; double-quant + unaligned view rel.err {dqErr:E2}  {(ok ? "ok" : "FAIL")}");
        }
        log.WriteLine(allPass ? "nf4-kernel self-check: PASS" : "nf4-kernel self-check: FAIL");
        return allPass ? 0 : 1;
    }

    private const int Repeats = 7;

    private static string Name(ScalarType t) => t == ScalarType.BFloat16 ? "bf16" : "fp16";

    private static double RelErr(Tensor actual, Tensor reference)
    {
        using var scope = torch.NewDisposeScope();
        var r = reference.to(ScalarType.Float64);
        return (actual.to(ScalarType.Float64) - r).norm().item<double>() / r.norm().item<double>();
    }

    /// <summary>Median over <see cref="Repeats"/> batches of the mean microseconds per call in a batch
    /// of <paramref name="iterations"/> calls, synchronized before and after each batch.</summary>
    private static double Time(Action call, int iterations)
    {
        for (int i = 0; i < 10; i++) call();
        torch.cuda.synchronize();
        var samples = new double[Repeats];
        for (int r = 0; r < Repeats; r++)
        {
            var sw = Stopwatch.StartNew();
            for (int i = 0; i < iterations; i++) call();
            torch.cuda.synchronize();
            samples[r] = sw.Elapsed.TotalMicroseconds / iterations;
        }
        Array.Sort(samples);
        return samples[Repeats / 2];
    }
}
