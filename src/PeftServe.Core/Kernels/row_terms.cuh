// Per-row adapter terms at a projection's output, shared by the kernels that apply them: row_epilogue (bgmv.cu) on
// its own, add_rms_norm and silu_mul_terms (fused.cu) and rope_write_kv (paged_attention.cu) as they read the output.
// Needs common.cuh (T, VEC).
//
// For a row n of a projection's output y [N, W] and a column chunk [c0, c0 + VEC):
//   y[n][c] = y[n][c] * scale[si][c] + bias[bi][c] + sum_{r < rank(s, j)} d[n][j][r] * B_j[s][r][c - off_j]
// with si = scale_index[n / tokens_per_row] (IA3's scales; rows without read a neutral slot of ones), bi likewise
// (BitFit's biases; neutral slot of zeros), s = lora_slots[...] (LoRA; -1: no low-rank term) and j the target whose
// columns [off_j, off_j + out_j) hold c. Any of the three may be absent (null table or slot pointer). A row has one
// adapter, so it gets at most one non-neutral term, and rounding the sum once equals that method's own kernel:
// T(y * s), T(y + b) or T(y + acc) (times 1 and plus 0 are exact). W, the offsets and the widths are multiples of VEC.

#define EXPAND_RANKS 16

// acc[i] += sum_{r < rank} dr[r] * b[r * out + i] for one thread's VEC outputs (b: the slot's B at the thread's first
// output), EXPAND_RANKS rows of B loaded at once per round. The summation order is fixed: every kernel that adds a
// low-rank delta rounds alike.
// Every load of a round is unconditional, its row clamped to rank - 1 (a row the adapter has: finite, and an L1 hit),
// and ranks past `rank` get a coefficient of 0 instead, so that nothing stops ptxas from issuing all of them before
// the first FMA. It did not: with register limits from the occupancy it assumed, it interleaved the loads with the
// FMAs, two or three in flight per thread, a chain of 8 load latencies per 16 ranks (an H200 profile's bottleneck
// expand took 30 us for 1 MB: long-scoreboard stalls). The kernels that call this now carry a launch bound with a
// minimum of blocks per SM; in the SASS of NVRTC 11.8 for sm_90 (loadtests/gpu/sass-local.sh) a round's loads then all
// come first (with clang's PTX and predicated loads instead of clamped ones: about two thirds of them).
__device__ __forceinline__ void add_low_rank(float acc[VEC], const T* __restrict__ b, int out, const float* __restrict__ dr, int rank)
{
    for (int r0 = 0; r0 < rank; r0 += EXPAND_RANKS)
    {
        uint4 bv[EXPAND_RANKS];
        float c[EXPAND_RANKS];
        #pragma unroll
        for (int q = 0; q < EXPAND_RANKS; q++)
        {
            const int r = min(r0 + q, rank - 1);
            bv[q] = *reinterpret_cast<const uint4*>(b + (long long)r * out);
            c[q] = dr[r];
        }
        #pragma unroll
        for (int q = 0; q < EXPAND_RANKS; q++)
        {
            const float cq = r0 + q < rank ? c[q] : 0.0f;
            float bf[VEC];
            unpack_vec(bv[q], bf);
            #pragma unroll
            for (int i = 0; i < VEC; i++) acc[i] = fmaf(cq, bf[i], acc[i]);
        }
    }
}

// The row terms as kernel parameters (each an 8-byte argument slot on the host: Bgmv.RowTermArgs) and as the
// arguments of apply_row_terms.
#define ROW_TERMS_PARAMS \
    const T* __restrict__ scale, const long long* __restrict__ scale_index, \
    const T* __restrict__ bias, const long long* __restrict__ bias_index, \
    const long long* __restrict__ lora_slots, const float* __restrict__ d, int K, int R, \
    const T* __restrict__ B0, const T* __restrict__ B1, const T* __restrict__ B2, \
    int out0, int out1, int out2, int off0, int off1, int off2, \
    const int* __restrict__ ranks, int rank_stride, int rank_col
#define ROW_TERMS scale, scale_index, bias, bias_index, lora_slots, d, K, R, B0, B1, B2, out0, out1, out2, off0, off1, off2, \
    ranks, rank_stride, rank_col

// v: the VEC values of row n (whose adapter row is row = n / tokens_per_row), columns c0.., as floats; the terms are
// added in place (v is then rounded once by the caller).
__device__ __forceinline__ void apply_row_terms(ROW_TERMS_PARAMS, float v[VEC], int n, int row, int c0, int W)
{
    if (scale != nullptr)
    {
        float sv[VEC];
        load_vec(scale + scale_index[row] * (long long)W + c0, sv);
        #pragma unroll
        for (int i = 0; i < VEC; i++) v[i] *= sv[i];
    }
    if (bias != nullptr)
    {
        float bv[VEC];
        load_vec(bias + bias_index[row] * (long long)W + c0, bv);
        #pragma unroll
        for (int i = 0; i < VEC; i++) v[i] += bv[i];
    }
    // The low-rank term: the row's LoRA slot (none: -1) and the target j whose columns hold c0 (a vector never straddles
    // two), then that target's rank (0: the adapter has no such target).
    const long long s = lora_slots != nullptr ? lora_slots[row] : -1;
    if (s < 0) return;
    const int j = K > 2 && c0 >= off2 && c0 < off2 + out2 ? 2 : K > 1 && c0 >= off1 && c0 < off1 + out1 ? 1 : c0 >= off0 && c0 < off0 + out0 ? 0 : -1;
    const int rank = j < 0 ? 0 : ranks[s * rank_stride + rank_col + j];
    if (rank == 0) return;
    const int out = j == 0 ? out0 : j == 1 ? out1 : out2;
    const T* b = (j == 0 ? B0 : j == 1 ? B1 : B2) + s * (long long)R * out + (c0 - (j == 0 ? off0 : j == 1 ? off1 : off2));
    const float* dr = d + ((long long)n * K + j) * R;
    float acc[VEC];
    #pragma unroll
    for (int i = 0; i < VEC; i++) acc[i] = 0.0f;
    add_low_rank(acc, b, out, dr, rank);
    #pragma unroll
    for (int i = 0; i < VEC; i++) v[i] += acc[i];
}
