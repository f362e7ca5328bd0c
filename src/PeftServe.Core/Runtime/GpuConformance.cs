using PeftServe.Core.Adapters;
using PeftServe.Core.Cuda;
using PeftServe.Core.Engine;
using PeftServe.Core.Generation;
using PeftServe.Core.Kernels;
using PeftServe.Core.Model;
using PeftServe.Core.SafeTensors;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Runtime;

/// <summary>The GPU test lane (the CI machine has no GPU, so these run as a program on the GPU machine:
/// <c>./peftserve test --gpu</c> or the <c>selfcheck</c> verb). Three parts:
/// <list type="number">
/// <item>each CUDA kernel against the tensor ops it replaces, on fresh random inputs (relative error);</item>
/// <item>Hugging Face conformance on the fixture model: float32 logits of the base and every PEFT fixture adapter
/// within 1e-4, and greedy tokens in float32 and bfloat16, alone and all mixed in one batch, with decode steps
/// eager and captured as CUDA graphs (the two must give the same tokens);</item>
/// <item>our own methods (bottleneck, AdaMix, BitFit), which have no Hugging Face reference: the GPU's greedy
/// tokens in float32 against the CPU's, which the CI tests hold to a float64 reference.</item>
/// </list>
/// Every line says PASS or FAIL; the return value is 0 only when all pass.</summary>
public static class GpuConformance
{
    public static int Run(TextWriter log, string fixturesDir, string modelDir, int ordinal = 0)
    {
        if (!torch.cuda.is_available()) { log.WriteLine("selfcheck: CUDA is not available"); return 2; }
        var device = new Device(DeviceType.CUDA, ordinal);
        log.WriteLine($"selfcheck on {device}: native helper {(NativeHelper.IsAvailable ? "loaded" : "MISSING: " + NativeHelper.Unavailable)}");
        var probe = KernelModule.TryGet("fused.cu", device, KernelModule.ElementType(ScalarType.Float32)!.Value);
        log.WriteLine($"kernels: {(probe is null ? "unavailable: " + KernelModule.LastError : probe.Target)}; programmatic dependent launch " +
            $"{(probe?.Programmatic == true ? "on" : KernelModule.ProgrammaticLaunch ? "requested, unavailable here (needs sm_90 and cuLaunchKernelEx)" : "off (PEFTSERVE_PDL=0)")}");
        int failures = 0;
        void Report(bool pass, string what)
        {
            log.WriteLine($"{(pass ? "PASS" : "FAIL")}  {what}");
            if (!pass) failures++;
        }
        foreach (var (name, check) in new (string, Action<Device, Action<bool, string>>)[]
                 { ("kernel", Kernels), ("LoRA kernel", Lora), ("NF4 kernel", Nf4), ("adapter kernel", AdapterKernels) })
        {
            try { check(device, Report); }
            catch (Exception e) { Report(false, $"{name} checks threw: {e.Message}"); }
        }
        try { Conformance(device, fixturesDir, modelDir, Report); }
        catch (Exception e) { Report(false, $"conformance threw: {e}"); }
        try { OurMethods(device, modelDir, Report); }
        catch (Exception e) { Report(false, $"our-methods check threw: {e}"); }
        log.WriteLine(failures == 0 ? "selfcheck: all passed" : $"selfcheck: {failures} FAILED");
        return failures == 0 ? 0 : 1;
    }

    private static double RelativeError(Tensor actual, Tensor expected)
    {
        using var scope = torch.NewDisposeScope();
        var a = actual.to(ScalarType.Float64).cpu();
        var e = expected.to(ScalarType.Float64).cpu();
        if (!torch.isfinite(a).all().item<bool>()) return double.PositiveInfinity;
        double denominator = Math.Max(e.norm().item<double>(), 1e-30);
        return (a - e).norm().item<double>() / denominator;
    }

    /// <summary>The same computation with our kernels on, then off (the tensor-op path).</summary>
    private static (Tensor Kernel, Tensor Ops) Both(Func<Tensor> compute)
    {
        var kernel = compute();
        bool was = KernelModule.Enabled;
        KernelModule.Enabled = false;
        try { return (kernel, compute()); }
        finally { KernelModule.Enabled = was; }
    }

    private static void Kernels(Device device, Action<bool, string> report)
    {
        using var _ = torch.no_grad();
        foreach (var dtype in new[] { ScalarType.Float32, ScalarType.BFloat16 })
        {
            double tol = dtype == ScalarType.Float32 ? 1e-5 : 1e-2;
            using var scope = torch.NewDisposeScope();
            foreach (var (rows, h) in new[] { (7, 4096), (3, 64), (33, 896) })
            {
                var x = torch.randn([rows, h], dtype, device);
                var d = torch.randn([rows, h], dtype, device);
                var w = (torch.randn([h], dtype, device) * 0.1 + 1).to(dtype);
                var (k1, o1) = Both(() => FusedOps.RmsNorm(x, w, 1e-5));
                report(RelativeError(k1, o1) <= tol, $"rms_norm {dtype} [{rows},{h}] rel.err {RelativeError(k1, o1):E2}");
                var (k2, o2) = Both(() => FusedOps.AddRmsNorm(x, d, w, 1e-5).Normed);
                report(RelativeError(k2, o2) <= tol, $"add_rms_norm {dtype} [{rows},{h}] rel.err {RelativeError(k2, o2):E2}");
                var gu = torch.randn([rows, 2 * h], dtype, device);
                var (k3, o3) = Both(() => FusedOps.SiluMul(gu));
                report(RelativeError(k3, o3) <= tol, $"silu_mul {dtype} [{rows},{2 * h}] rel.err {RelativeError(k3, o3):E2}");
            }
            foreach (var (heads, kvHeads, hd) in new[] { (32, 32, 128), (32, 8, 128), (14, 2, 64), (4, 2, 16) })
            {
                int b = 5, bs = 16, maxBlocks = 24, slots = (b * maxBlocks + 1) * bs;
                var keys = torch.randn([slots, kvHeads, hd], dtype, device);
                var values = torch.randn([slots, kvHeads, hd], dtype, device);
                var q = torch.randn([b, heads, hd], dtype, device);
                var perm = torch.randperm(b * maxBlocks, device: device) + 1;               // scattered blocks, never block 0
                var tables = perm.view(b, maxBlocks);
                var lengths = torch.tensor(new long[] { 1, 17, 100, 0, 383 }, device: device);   // one padding row (0)
                var cache = PagedAttention.TryDecode(q, keys, values, tables, lengths, bs);
                if (cache is null) { report(false, $"paged attention {dtype} {heads}/{kvHeads}x{hd}: kernel unavailable ({KernelModule.LastError})"); continue; }
                // Reference: gather every row's keys and mask past its length, in float32.
                var gather = (tables.unsqueeze(-1) * bs + torch.arange(bs, device: device)).reshape(-1);
                var gk = keys.index_select(0, gather).view(b, maxBlocks * bs, kvHeads, hd).transpose(1, 2).to(ScalarType.Float32);
                var gv = values.index_select(0, gather).view(b, maxBlocks * bs, kvHeads, hd).transpose(1, 2).to(ScalarType.Float32);
                var visible = torch.arange(maxBlocks * bs, device: device).unsqueeze(0).lt(lengths.unsqueeze(1));
                var mask = torch.where(visible, torch.zeros(1, device: device), torch.full(1, -1e30f, device: device)).view(b, 1, 1, -1);
                var qf = q.to(ScalarType.Float32).unsqueeze(2);
                var reference = Attention.Sdpa(qf, gk, gv, mask).view(b, heads, hd);
                reference[3].zero_();                                                       // the padding row's output is zero
                double err = RelativeError(cache, reference);
                report(err <= (dtype == ScalarType.Float32 ? 1e-5 : 2e-2), $"paged attention {dtype} heads {heads}/{kvHeads} dim {hd} rel.err {err:E2}");
            }
        }
    }

    /// <summary>LoRA's BGMV kernels (shrink then expand) against a float64 reference, on a pool whose slots have
    /// full, partial and zero ranks, and rows without an adapter; pool ranks past one round of either kernel
    /// (33: the expand's 16-rank rounds, and a last partial run of shrink ranks) included.</summary>
    private static void Lora(Device device, Action<bool, string> report)
    {
        using var _ = torch.no_grad();
        foreach (var dtype in new[] { ScalarType.Float32, ScalarType.BFloat16 })
            foreach (var (inF, outs, r) in new[] { (4096, new long[] { 4096, 1024, 1024 }, 16), (896, new long[] { 4864 }, 16), (11008, new long[] { 4096 }, 16), (2048, new long[] { 2048, 512 }, 33) })
            {
                using var scope = torch.NewDisposeScope();
                int slots = 4, k = outs.Length, rows = 9;
                var a = (torch.randn([slots, k, r, inF], ScalarType.Float32, device) * 0.05).to(dtype);
                var up = outs.Select(o => (torch.randn([slots, r, o], ScalarType.Float32, device) * 0.05).to(dtype)).ToArray();
                var offsets = outs.Select((o, j) => outs.Take(j).Sum()).ToArray();
                var rankTable = new int[slots, k + 1];                       // column 0 unused: targets start at column 1
                for (int sl = 0; sl < slots; sl++)
                    for (int j = 0; j < k; j++) rankTable[sl, j + 1] = new[] { r, 4, 0, 7 }[(sl + j) % 4];
                var ranks = torch.tensor(rankTable.Cast<int>().ToArray(), [slots, k + 1], device: device);
                var slotOfRow = new long[] { 0, 1, -1, 2, 3, 0, 1, -1, 3 };
                var rowSlots = torch.tensor(slotOfRow, device: device);
                var x = torch.randn([rows, inF], dtype, device);
                var y0 = torch.randn([rows, outs.Sum()], dtype, device);

                var reference = y0.to(ScalarType.Float64).cpu().clone();
                var ad = a.to(ScalarType.Float64).cpu();
                var xd = x.to(ScalarType.Float64).cpu();
                for (int row = 0; row < rows; row++)
                {
                    long sl = slotOfRow[row];
                    if (sl < 0) continue;
                    for (int j = 0; j < k; j++)
                    {
                        int rank = rankTable[sl, j + 1];
                        if (rank == 0) continue;
                        var inter = torch.matmul(ad[sl, j].narrow(0, 0, rank), xd[row]);                                  // [rank]
                        var delta = torch.matmul(inter, up[j].to(ScalarType.Float64).cpu()[sl].narrow(0, 0, rank));     // [out_j]
                        reference[row].narrow(0, offsets[j], outs[j]).add_(delta);
                    }
                }
                double tol = dtype == ScalarType.Float32 ? 1e-5 : 2e-2;
                string shape = $"{dtype} in {inF}, outs {string.Join("|", outs)}, rank {r}";
                if (!Bgmv.Supports(x, outs))
                {
                    report(false, $"bgmv {shape}: kernels unavailable ({KernelModule.LastError})");
                    continue;
                }
                var split = y0.clone();
                var d = Bgmv.Shrink(x, rowSlots, 1, a, ranks, 1);
                Bgmv.Expand(split, rowSlots, 1, d, up, offsets, ranks, 1);
                double e1 = RelativeError(split, reference);
                report(e1 <= tol, $"bgmv shrink + expand {shape}: rel.err {e1:E2}");
            }
    }

    /// <summary>The per-row adapter kernels (IA3's scales and BitFit's biases; LLaMA-Adapter's gated attention;
    /// bottleneck adapters' shrink and expand with the bias and activation in the expand) against the tensor ops
    /// or a float64 reference, with rows reading different slots and several tokens per row.</summary>
    private static void AdapterKernels(Device device, Action<bool, string> report)
    {
        using var _ = torch.no_grad();
        foreach (var dtype in new[] { ScalarType.Float32, ScalarType.BFloat16 })
        {
            using var scope = torch.NewDisposeScope();
            Bottleneck(device, dtype, report);
            RowEpilogue(device, dtype, report);
            var index = torch.tensor(new long[] { 2, 0, 3 }, device: device);
            foreach (bool add in new[] { false, true })
            {
                var y = torch.randn([3, 5, 1000], dtype, device);
                var table = torch.randn([4, 1000], dtype, device);
                var gathered = table.index_select(0, index).unsqueeze(1);
                var expected = add ? y + gathered : y * gathered;
                bool ran = FusedOps.RowTableApply(y, index, 5, table, add);
                report(ran && y.eq(expected).all().item<bool>(), $"row_table_apply ({(add ? "BitFit biases" : "IA3 scales")}) {dtype}: {(ran ? "equal to the tensor ops" : "kernel unavailable")}");
            }
            // LLaMA-Adapter: 8 query heads over 2 KV heads, 2 query tokens per row, prompts of 6 with the last ones masked;
            // slot 1's length of 3 ends its prompt before its mask does (the kernel reads no further than the length).
            long nq = 8, nkv = 2, hd = 64, len = 6, tq = 2;
            var q = torch.randn([3, tq, nq, hd], dtype, device).transpose(1, 2);                     // [B,nq,Tq,hd], strided
            var keys = torch.randn([4, len, nkv, hd], dtype, device);
            var values = torch.randn([4, len, nkv, hd], dtype, device);
            var mask = torch.zeros([4, len], dtype, device);
            mask[2, 4..].fill_(Attention.MinValue(dtype));
            mask[3, 1..].fill_(Attention.MinValue(dtype));
            var gate = torch.randn([4], dtype, device);
            var lengths = torch.tensor(new[] { 6, 3, 6, 1 }, device: device);
            var promptIndex = torch.tensor(new long[] { 2, 1, 3 }, device: device);
            var actual = AdaptionPromptAttention.TryCompute(q, keys, values, mask, gate, lengths, promptIndex);
            var qd = q.to(ScalarType.Float64).reshape(3, nkv, (nq / nkv) * tq, hd);
            var kd = keys.to(ScalarType.Float64).index_select(0, promptIndex).permute(0, 2, 1, 3);
            var vd = values.to(ScalarType.Float64).index_select(0, promptIndex).permute(0, 2, 1, 3);
            var lengthMask = torch.where(torch.arange(len, device: device).unsqueeze(0) >= lengths.unsqueeze(1), double.NegativeInfinity, 0.0);
            var fullMask = (mask.to(ScalarType.Float64) + lengthMask).index_select(0, promptIndex).view(3, 1, 1, -1);
            var scores = torch.matmul(qd, kd.transpose(2, 3)) / Math.Sqrt(hd) + fullMask;
            var weights = torch.softmax(scores, -1) * gate.to(ScalarType.Float64).index_select(0, promptIndex).view(3, 1, 1, 1);
            var reference = torch.matmul(weights, vd).view(3, nq, tq, hd).transpose(1, 2).reshape(3, tq, nq * hd);
            double err = actual is null ? double.PositiveInfinity : RelativeError(actual, reference);
            report(err <= (dtype == ScalarType.Float32 ? 1e-5 : 2e-2), $"adaption_prompt_attention {dtype} heads {nq}/{nkv} dim {hd}: rel.err {err:E2}");
        }
    }

    /// <summary>A bottleneck pool of 5 slots (one per activation code, the last one with no module: rank 0) served to
    /// 7 rows of 2 tokens each (one row without an adapter) through shrink and the expand that applies the down
    /// bias and activation, against a float64 reference.</summary>
    private static void Bottleneck(Device device, ScalarType dtype, Action<bool, string> report)
    {
        using var scope = torch.NewDisposeScope();
        const int hidden = 896, dim = 48, tokens = 2;
        int slots = 5;
        var down = (torch.randn([slots, 1, dim, hidden], ScalarType.Float32, device) * 0.1).to(dtype);
        var downBias = (torch.randn([slots, dim], ScalarType.Float32, device) * 0.5).to(dtype);
        var upT = (torch.randn([slots, dim, hidden], ScalarType.Float32, device) * 0.05).to(dtype);
        var upBias = (torch.randn([slots, hidden], ScalarType.Float32, device) * 0.05).to(dtype);
        int[] rankOf = [dim, dim, dim, dim, 0];
        var ranks = torch.tensor(rankOf.SelectMany(r => new[] { 0, r }).ToArray(), [slots, 2], device: device);   // column 1: this placement
        var codes = torch.tensor(new[] { 0, 1, 2, 3, 0 }, device: device);
        long[] slotOfRow = [3, 0, -1, 1, 2, 4, 1];
        var rowSlots = torch.tensor(slotOfRow, device: device);
        var x = torch.randn([slotOfRow.Length * tokens, hidden], dtype, device);
        if (!Bgmv.Supports(x, hidden, dim))
        {
            report(false, $"bottleneck bgmv {dtype}: kernels unavailable ({KernelModule.LastError})");
            return;
        }
        var y = torch.zeros_like(x);                              // the expand adds into it: y is the delta alone
        var z = Bgmv.Shrink(x, rowSlots, tokens, down, ranks, 1, activation: (downBias, codes));
        Bgmv.Expand(y, rowSlots, tokens, z, [upT], [0L], ranks, 1, upBias);

        var reference = torch.zeros(x.shape, ScalarType.Float64);
        var (xd, dd, dbd, ud, ubd) = (x.to(ScalarType.Float64).cpu(), down.to(ScalarType.Float64).cpu(), downBias.to(ScalarType.Float64).cpu(),
            upT.to(ScalarType.Float64).cpu(), upBias.to(ScalarType.Float64).cpu());
        for (int n = 0; n < xd.shape[0]; n++)
        {
            long sl = slotOfRow[n / tokens];
            if (sl < 0 || rankOf[sl] == 0) continue;
            var pre = torch.matmul(dd[sl, 0], xd[n]) + dbd[sl];
            var act = new[] { nn.functional.relu(pre), nn.functional.gelu(pre), nn.functional.silu(pre), torch.tanh(pre) }[(int)sl % 4];
            reference[n].add_(torch.matmul(act, ud[sl]) + ubd[sl]);
        }
        double err = RelativeError(y, reference);
        report(err <= (dtype == ScalarType.Float32 ? 1e-5 : 2e-2), $"bottleneck bgmv (bias and activation in the expand) {dtype}: delta rel.err {err:E2}");
    }

    /// <summary>The fused output epilogue (IA3 scale, BitFit bias and LoRA expand in one launch) against the three methods'
    /// own kernels run one after the other: bit-equal, since a row gets one non-neutral term and both round once. Rows 0-2
    /// are LoRA rows (one with rank 0 on a target), 3-4 IA3, 5-6 BitFit, 7 none; q|k|v-like targets of unequal widths, and
    /// every pair of parts as well as all three.</summary>
    private static void RowEpilogue(Device device, ScalarType dtype, Action<bool, string> report)
    {
        using var scope = torch.NewDisposeScope();
        long[] outs = [256, 64, 64];
        long width = outs.Sum(), inF = 512;
        int slots = 3, r = 16, tokens = 2, rows = 8;
        long[] offsets = [0, 256, 320];
        var a = (torch.randn([slots, 3, r, inF], ScalarType.Float32, device) * 0.05).to(dtype);
        var up = outs.Select(o => (torch.randn([slots, r, o], ScalarType.Float32, device) * 0.05).to(dtype)).ToArray();
        var ranks = torch.tensor(new[] { 0, r, r, r, 0, 7, 4, 16, 0, 12, 0, 0 }, [slots + 1, 3], device: device);   // slot 3 unused
        var loraSlots = torch.tensor(new long[] { 0, 1, 2, -1, -1, -1, -1, -1 }, device: device);
        var scaleTable = (torch.randn([3, width], ScalarType.Float32, device) * 0.2 + 1).to(dtype);
        scaleTable[2].fill_(1);                                                                          // the neutral slot
        var scaleIndex = torch.tensor(new long[] { 2, 2, 2, 0, 1, 2, 2, 2 }, device: device);
        var biasTable = (torch.randn([3, width], ScalarType.Float32, device) * 0.1).to(dtype);
        biasTable[2].zero_();
        var biasIndex = torch.tensor(new long[] { 2, 2, 2, 2, 2, 1, 0, 2 }, device: device);
        var x = torch.randn([rows * tokens, inF], dtype, device);
        var y0 = torch.randn([rows * tokens, width], dtype, device);
        if (!Bgmv.Supports(x, outs))
        {
            report(false, $"row epilogue {dtype}: kernels unavailable ({KernelModule.LastError})");
            return;
        }
        var d = Bgmv.Shrink(x, loraSlots, tokens, a, ranks, 0);
        var delta = new LowRankDelta(d, loraSlots, up, offsets, ranks, 0);
        foreach (var (useScale, useBias, useLora) in new[] { (true, true, true), (true, true, false), (true, false, true), (false, true, true) })
        {
            string parts = string.Join(" ", new[] { useScale ? "IA3" : "", useBias ? "BitFit" : "", useLora ? "LoRA" : "" }.Where(p => p != ""));
            var separate = y0.clone().view(rows, tokens, width);
            if (useScale) FusedOps.RowTableApply(separate, scaleIndex, tokens, scaleTable, add: false);
            if (useBias) FusedOps.RowTableApply(separate, biasIndex, tokens, biasTable, add: true);
            if (useLora) Bgmv.Expand(separate.view(rows * tokens, width), loraSlots, tokens, d, up, offsets, ranks, 0);
            var fused = y0.clone();
            var terms = new RowEpilogue(tokens, useScale ? (scaleTable, scaleIndex) : null, useBias ? (biasTable, biasIndex) : null, useLora ? delta : null);
            bool ran = Bgmv.RowEpilogue(fused, terms);
            bool equal = ran && fused.eq(separate.view(rows * tokens, width)).all().item<bool>();
            report(equal, $"row_epilogue {dtype} ({parts}): " +
                $"{(!ran ? "kernel unavailable" : equal ? "equal to the methods' own kernels" : $"differs by {(fused - separate.view(rows * tokens, width)).abs().max().item<float>():E2}")}");
            // The same terms applied by the residual add + RMSNorm kernel as the output joins the residual stream.
            var h = torch.randn([rows * tokens, width], dtype, device);
            var weight = (torch.randn([width], dtype, device) * 0.1 + 1).to(dtype);
            var (residual, normed) = FusedOps.AddRmsNorm(h, separate.view(rows * tokens, width), weight, 1e-5);
            var (residualFused, normedFused) = FusedOps.AddRmsNorm(h, y0.clone(), weight, 1e-5, terms);
            bool same = residual.eq(residualFused).all().item<bool>() && normed.eq(normedFused).all().item<bool>();
            report(same, $"add_rms_norm with terms {dtype} ({parts}): " +
                $"{(same ? "equal to the terms, then add_rms_norm" : "DIFFERENT")}");
            // And by SiLU·up, reading the output as gate|up halves.
            var act = FusedOps.SiluMul(separate);
            var actFused = FusedOps.SiluMul(y0.clone().view(rows, tokens, width), terms);
            bool sameAct = act.eq(actFused).all().item<bool>();
            report(sameAct, $"silu_mul_terms {dtype} ({parts}): " +
                $"{(sameAct ? "equal to the terms, then silu_mul" : "DIFFERENT")}");
            // And by the rotary + KV write, reading the output as q|k|v of 4 query heads and 1 KV head of 64.
            var positions = torch.arange(rows * tokens, ScalarType.Int64, device) * 3;
            var inverseFrequencies = torch.pow(10000.0, torch.arange(0, 64, 2, ScalarType.Float32, device) / -64.0);
            var slotsWritten = torch.arange(rows * tokens, ScalarType.Int64, device);
            Tensor Pool() => torch.zeros([rows * tokens, 1, 64], dtype, device);
            var (k1, v1, k2, v2) = (Pool(), Pool(), Pool(), Pool());
            var q1 = PagedAttention.TryRotateAndWrite(separate.view(rows * tokens, width), positions, inverseFrequencies, slotsWritten, k1, v1, 4);
            var q2 = PagedAttention.TryRotateAndWrite(y0.clone(), positions, inverseFrequencies, slotsWritten, k2, v2, 4, terms);
            bool sameRope = q1 is not null && q2 is not null && q1.eq(q2).all().item<bool>() && k1.eq(k2).all().item<bool>() && v1.eq(v2).all().item<bool>();
            report(sameRope, $"rope_write_kv with terms {dtype} ({parts}): " +
                $"{(q1 is null || q2 is null ? "kernel unavailable" : sameRope ? "equal to the terms, then rope_write_kv" : "DIFFERENT")}");
        }
    }

    private static void Nf4(Device device, Action<bool, string> report)
    {
        using var _ = torch.no_grad();
        using var scope = torch.NewDisposeScope();
        // Shapes: several row tiles and K splits of the tensor-core kernel, and one tile with one split (K = 128,
        // rows not a multiple of 16), and K = 11,008 (the down projection's: the whole-row GEMV's two rounds, K not a
        // multiple of the tiled kernel's 1,024). Rows: the CUDA-core kernels (1, 3, 7, 16), the tensor cores (17, 32).
        foreach (var (outF, inF) in new[] { (768, 1024), (300, 128), (100, 11008) })
        {
            using var layer = new Quantization.Nf4Linear(Quantization.Nf4Weight.Quantize(torch.randn([outF, inF], ScalarType.Float32, device) * 0.02), null);
            foreach (var dtype in new[] { ScalarType.BFloat16, ScalarType.Float16 })
                foreach (int rows in new[] { 1, 3, 7, 16, 17, Quantization.Nf4CudaKernel.MaxSplitRows })
                {
                    var x = torch.randn([rows, inF], dtype, device);
                    var plain = layer.PlainForward(x, tensorOpsOnly: true);
                    // The tensor-core kernel for each m-tile count its PEFTSERVE_NF4_MMA_MT switch takes.
                    foreach (int tiles in rows > Quantization.Nf4CudaKernel.MaxRows ? new[] { 1, 2, 4 } : [2])
                    {
                        var fused = Quantization.Nf4CudaKernel.TryForward(x, layer.Weight, tiles, wholeRow: true);
                        double err = fused is null ? double.PositiveInfinity : RelativeError(fused, plain);
                        // A second call: the tensor-core kernel's counters must have been reset by the first.
                        var again = Quantization.Nf4CudaKernel.TryForward(x, layer.Weight, tiles, wholeRow: true);
                        bool same = again is not null && fused is not null && again.eq(fused).all().item<bool>();
                        string which = rows > Quantization.Nf4CudaKernel.MaxRows ? $"tensor cores, {tiles} m-tiles per warp" : "CUDA cores";
                        report(err <= 1e-2 && same, $"nf4 fused kernel {dtype} [{outF},{inF}], {rows} rows ({which}): rel.err {err:E2}{(same ? "" : ", a second call differs")}");
                        if (rows <= Quantization.Nf4CudaKernel.MaxRows) continue;
                        // x staged in shared memory (PEFTSERVE_NF4_MMA_XSMEM) against x read from global memory: the same
                        // fragments and products in the same order, so the same bits.
                        var staged = Quantization.Nf4CudaKernel.TryForward(x, layer.Weight, tiles, wholeRow: true, sharedX: true);
                        var direct = Quantization.Nf4CudaKernel.TryForward(x, layer.Weight, tiles, wholeRow: true, sharedX: false);
                        bool sameBits = staged is not null && direct is not null && staged.eq(direct).all().item<bool>();
                        report(sameBits, $"nf4 tensor cores, x in shared memory {dtype} [{outF},{inF}], {rows} rows, {tiles} m-tiles per warp: " +
                                         $"{(staged is null || direct is null ? "kernel unavailable" : sameBits ? "equal to x read from global memory" : "DIFFERENT")}");
                    }
                    if (Quantization.Nf4CudaKernel.WholeRowFits(rows, inF))
                    {
                        // The whole-row GEMV against the tiled one: the same chunk order and products, so the same bits.
                        var whole = Quantization.Nf4CudaKernel.TryForward(x, layer.Weight, 1, wholeRow: true);
                        var tiled = Quantization.Nf4CudaKernel.TryForward(x, layer.Weight, 1, wholeRow: false);
                        bool equal = whole is not null && tiled is not null && whole.eq(tiled).all().item<bool>();
                        report(equal, $"nf4 whole-row GEMV {dtype} [{outF},{inF}], {rows} rows: {(whole is null || tiled is null ? "kernel unavailable" : equal ? "equal to the tiled kernel" : "DIFFERENT")}");
                    }
                }
        }
    }

    private static void Conformance(Device device, string fixturesDir, string modelDir, Action<bool, string> report)
    {
        using var file = SafeTensorsFile.Open(Path.Combine(fixturesDir, "tiny-llama-expected.safetensors"));
        var store = Path.Combine(fixturesDir, "tiny-llama-adapters");
        var adapters = Directory.GetDirectories(store).Select(Path.GetFileName).Order(StringComparer.Ordinal).ToArray();
        using var input = file.ToTensor("input_ids");
        var prompt = file.ToTensor("prompt_ids")[0].data<long>().Select(x => (int)x).ToArray();
        int[] Greedy(string tag) { using var t = file.ToTensor("greedy_" + tag); return t[0].data<long>().Select(x => (int)x).ToArray(); }

        foreach (var dtype in new[] { ScalarType.Float32, ScalarType.BFloat16 })
        {
            using var model = LlamaModel.Load(modelDir, new ModelOptions { Device = device, DType = dtype });
            if (dtype == ScalarType.Float32)
            {
                using var manager = new AdapterManager(model, new AdapterLimits(), store, 1L << 30);
                foreach (var tag in adapters.Prepend("base"))
                {
                    var rows = Enumerable.Repeat(tag == "base" ? null : manager.Acquire(tag!), (int)input.shape[0]).ToArray();
                    using var logits = FullLogits.Compute(model, input.to(device), rows);
                    using var expected = file.ToTensor("logits_" + tag);
                    double diff = (logits - expected).abs().max().item<float>();
                    report(diff <= 1e-4, $"float32 logits {tag}: max|diff| {diff:E2} (<= 1e-4)");
                }
            }
            foreach (bool graphs in new[] { false, true })
            {
                var options = new EngineOptions { CudaGraphs = graphs };
                string mode = graphs ? "graphed" : "eager";
                foreach (var tag in adapters.Prepend("base"))
                {
                    var tokens = FixedBatch.Generate(model, [prompt], [SamplingParams.Greedy(16)], [tag == "base" ? null : tag], store, options)
                        .Select(t => t.TokenId).ToArray();
                    report(tokens.SequenceEqual(Greedy(tag!)), $"{dtype} {mode} greedy {tag}: {(tokens.SequenceEqual(Greedy(tag!)) ? "equal" : $"ours {string.Join(",", tokens)} vs {string.Join(",", Greedy(tag!))}")}");
                }
                // Every adapter and the base in one batch, twice over (so graphs see repeated and distinct slots).
                var tags = adapters.Prepend("base").Concat(adapters.Prepend("base")).ToArray();
                var mixed = FixedBatch.Generate(model, tags.Select(_ => prompt).ToArray(), tags.Select(_ => SamplingParams.Greedy(16)).ToArray(),
                    tags.Select(t => t == "base" ? null : t).ToArray(), store, options);
                for (int r = 0; r < tags.Length; r++)
                {
                    var got = mixed.Where(t => t.Row == r).Select(t => t.TokenId).ToArray();
                    report(got.SequenceEqual(Greedy(tags[r]!)), $"{dtype} {mode} mixed batch row {r} ({tags[r]}): {(got.SequenceEqual(Greedy(tags[r]!)) ? "equal" : "DIFFERENT")}");
                }
            }
        }
    }

    private static void OurMethods(Device device, string modelDir, Action<bool, string> report)
    {
        var dir = Directory.CreateTempSubdirectory("peftserve-selfcheck-");
        try
        {
            using var cpu = LlamaModel.Load(modelDir, new ModelOptions());
            using var gpu = LlamaModel.Load(modelDir, new ModelOptions { Device = device, DType = ScalarType.Float32 });
            var c = cpu.Config;
            var names = new[] { "bottleneck", "adamix", "bitfit", "lora" };
            SyntheticAdapters.Bottleneck(Path.Combine(dir.FullName, "bottleneck"), c, c.HiddenSize / 16, 1);
            SyntheticAdapters.Bottleneck(Path.Combine(dir.FullName, "adamix"), c, c.HiddenSize / 16, 2, experts: 3);
            SyntheticAdapters.BitFit(Path.Combine(dir.FullName, "bitfit"), c, 3);
            SyntheticAdapters.Lora(Path.Combine(dir.FullName, "lora"), c, 8, 4);
            var prompts = names.Select((_, i) => Enumerable.Range(0, 9 + i).Select(t => 3 + (t * 37 + i * 11) % (c.VocabSize - 3)).ToArray()).ToArray();
            var sampling = names.Select(_ => SamplingParams.Greedy(12)).ToArray();
            var expected = FixedBatch.Generate(cpu, prompts, sampling, names, dir.FullName);
            bool overlap = PeftServe.Core.Kernels.Bgmv.Overlap;
            try
            {
                // With LoRA's shrink after each base projection and on the side stream beside it (the default).
                foreach (var (graphs, beside) in new[] { (false, false), (true, false), (false, true), (true, true) })
                {
                    PeftServe.Core.Kernels.Bgmv.Overlap = beside;
                    var got = FixedBatch.Generate(gpu, prompts, sampling, names, dir.FullName, new EngineOptions { CudaGraphs = graphs });
                    for (int r = 0; r < names.Length; r++)
                    {
                        bool same = got.Where(t => t.Row == r).Select(t => t.TokenId).SequenceEqual(expected.Where(t => t.Row == r).Select(t => t.TokenId));
                        report(same, $"float32 {(graphs ? "graphed" : "eager")}{(beside ? ", LoRA shrink beside the projection" : "")} {names[r]} in a mixed batch: " +
                                     $"GPU tokens {(same ? "equal" : "DIFFER from")} the CPU's");
                    }
                }
            }
            finally
            {
                PeftServe.Core.Kernels.Bgmv.Overlap = overlap;
            }
        }
        finally
        {
            dir.Delete(recursive: true);
        }
    }
}
