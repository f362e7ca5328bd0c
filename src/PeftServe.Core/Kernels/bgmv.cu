// Batched gathered matrix-vector products for adapters kept in slot pools (the BGMV shape of Punica and
// S-LoRA): every token multiplies its own adapter's matrices, read in place from the pool through the
// token's slot index, so rows with 32 different adapters cost one launch and no per-row copies.
// A pool holds, per slot s, K stacked "down" matrices A[s][j] ([R, in]) and per target j an "up" matrix
// B_j[s] ([R, out_j], rank-major so a rank's row is contiguous). ranks[s][col + j] is the adapter's rank
// for target j (0: the adapter has no such target); ranks past it are never read. A slot index < 0 means
// the token's sequence has no adapter of this kind: nothing is added.
// Used by LoRA (K = 3 for q|k|v, 2 for gate|up, 1 for o and down) and by bottleneck adapters (K = 1, with
// a bias and an activation between the two products, applied by the expand as it reads the shrink's output).
#include "common.cuh"

// Both products are short and latency-bound at decode sizes (a 4096-wide rank-16 shrink for 32 tokens is 6M
// multiply-adds), so each kernel is written to need as few dependent trips to memory as possible: after the
// token's slot and rank, every thread issues all of its loads of a round at once and only then uses them. On an
// H200 the earlier loop-per-warp versions were chains of 4 to 11 load latencies and took 9-12 us a launch.

// d[n][j][r] = sum_k x[n][k] * A[s][j][r][k] for r < rank(s, j); 0 elsewhere. s = slots[n / tokens_per_row].
// x: [N, in] with row stride x_stride; A: [S, K, R, in]; d: float [N, K, R]. in % VEC == 0, rows 16-byte aligned.
// Grid (N, K * ceil(R / SHRINK_RANKS)): a block takes SHRINK_RANKS consecutive ranks of one target for one
// token; its SHRINK_THREADS threads split the row, SHRINK_VECS 16-byte vectors each per round (one round covers
// SHRINK_THREADS * SHRINK_VECS * VEC inputs: 4,096 in bf16 with the defaults, so 11,008 takes three).
#ifndef SHRINK_RANKS
#define SHRINK_RANKS 2
#endif
#define SHRINK_THREADS 256
#define SHRINK_VECS 2
extern "C" __global__ void __launch_bounds__(SHRINK_THREADS) bgmv_shrink(
    const T* __restrict__ x, long long x_stride, const long long* __restrict__ slots, int tokens_per_row,
    const T* __restrict__ A, const int* __restrict__ ranks, int rank_stride, int rank_col,
    float* __restrict__ d, int K, int R, int in)
{
    wait_for_prior_kernels();
    __shared__ float partial[SHRINK_THREADS / 32][SHRINK_RANKS];
    const int n = blockIdx.x;
    const int runs = (R + SHRINK_RANKS - 1) / SHRINK_RANKS;          // runs of ranks per target
    const int j = blockIdx.y / runs, r0 = (blockIdx.y - j * runs) * SHRINK_RANKS;
    const long long s = slots[n / tokens_per_row];
    const int rank = s < 0 ? 0 : ranks[s * rank_stride + rank_col + j];
    const int live = min(SHRINK_RANKS, max(0, rank - r0));           // the same for the whole block
    float* dst = d + ((long long)n * K + j) * R + r0;
    if (live == 0)
    {
        if (threadIdx.x < SHRINK_RANKS && r0 + (int)threadIdx.x < R) dst[threadIdx.x] = 0.0f;
        return;
    }
    const T* xr = x + (long long)n * x_stride;
    const T* a = A + ((s * K + j) * (long long)R + r0) * (long long)in;
    const int vecs = in / VEC;
    float sum[SHRINK_RANKS];
    #pragma unroll
    for (int q = 0; q < SHRINK_RANKS; q++) sum[q] = 0.0f;
    for (int v0 = threadIdx.x; v0 < vecs; v0 += SHRINK_THREADS * SHRINK_VECS)
    {
        uint4 xv[SHRINK_VECS], av[SHRINK_RANKS][SHRINK_VECS];
        #pragma unroll
        for (int u = 0; u < SHRINK_VECS; u++)
        {
            const int v = v0 + u * SHRINK_THREADS;
            xv[u] = v < vecs ? *reinterpret_cast<const uint4*>(xr + (long long)v * VEC) : make_uint4(0u, 0u, 0u, 0u);
            #pragma unroll
            for (int q = 0; q < SHRINK_RANKS; q++)
                av[q][u] = v < vecs && q < live ? *reinterpret_cast<const uint4*>(a + (long long)q * in + (long long)v * VEC)
                                                : make_uint4(0u, 0u, 0u, 0u);
        }
        #pragma unroll
        for (int u = 0; u < SHRINK_VECS; u++)
        {
            float xf[VEC];
            unpack_vec(xv[u], xf);
            #pragma unroll
            for (int q = 0; q < SHRINK_RANKS; q++)
            {
                float af[VEC];
                unpack_vec(av[q][u], af);
                #pragma unroll
                for (int i = 0; i < VEC; i++) sum[q] = fmaf(af[i], xf[i], sum[q]);
            }
        }
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    #pragma unroll
    for (int q = 0; q < SHRINK_RANKS; q++)
    {
        const float total = warp_sum(sum[q]);
        if (lane == 0) partial[warp][q] = total;
    }
    __syncthreads();
    if (threadIdx.x < SHRINK_RANKS && r0 + (int)threadIdx.x < R)
    {
        float total = 0.0f;
        #pragma unroll
        for (int w = 0; w < SHRINK_THREADS / 32; w++) total += partial[w][threadIdx.x];
        dst[threadIdx.x] = (int)threadIdx.x < live ? total : 0.0f;
    }
}

// A bottleneck adapter's activation, by code: 0 ReLU, 1 GELU (erf), 2 SiLU, 3 tanh.
__device__ __forceinline__ float bottleneck_act(int code, float v)
{
    switch (code)
    {
        case 0: return fmaxf(v, 0.0f);
        case 1: return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
        case 2: return v / (1.0f + expf(-v));
        default: return tanhf(v);
    }
}

// The up-projection: acc[o] = sum_{r < rank(s, j)} c[r] * B_j[s][r][o] (+ bias[s][o] for j = 0 when given),
// for o < out_j, and then either (ACCUMULATE) y[n][off_j + o] = T(y + acc) in place in the layer's output, or
// y[n][off_j + o] = acc into a float32 buffer, zeros included (tokens without an adapter write 0), so the
// buffer can be computed beside the base projection on another stream and added after it.
// c[r] = d[n][j][r]; for bottleneck adapters (act_codes given) c[r] = act_s(d[n][j][r] + act_bias[s][r]): the
// down-projection's bias and activation are applied as the coefficients are loaded, in no launch of their own.
// y: [N, y_stride]; B_j: [S, R, out_j] with out_j % VEC == 0; bias: [S, out_0] or null.
// Grid (N, ceil(max out_j / (threads * VEC)), K); each thread owns VEC consecutive outputs and loads the B rows
// of EXPAND_RANKS ranks (and its outputs) in one round: one round for ranks up to EXPAND_RANKS.
#define EXPAND_RANKS 16

// acc[i] += sum_{r < rank} c[r] * b[r * out + i] for one thread's VEC outputs (b: the slot's B at the thread's first
// output), EXPAND_RANKS rows of B loaded at once per round; c[r] = dr[r], or act(code, dr[r] + act_bias[r]) when
// code >= 0 (bottleneck adapters). The summation order is fixed: every kernel that adds a low-rank delta rounds alike.
__device__ __forceinline__ void add_low_rank(float acc[VEC], const T* __restrict__ b, int out, const float* __restrict__ dr, int rank,
                                             int code, const T* __restrict__ act_bias)
{
    for (int r0 = 0; r0 < rank; r0 += EXPAND_RANKS)
    {
        uint4 bv[EXPAND_RANKS];
        float c[EXPAND_RANKS];
        #pragma unroll
        for (int q = 0; q < EXPAND_RANKS; q++)
        {
            const bool live = r0 + q < rank;
            bv[q] = live ? *reinterpret_cast<const uint4*>(b + (long long)(r0 + q) * out) : make_uint4(0u, 0u, 0u, 0u);
            c[q] = live ? dr[r0 + q] : 0.0f;
            if (code >= 0 && live) c[q] = bottleneck_act(code, c[q] + to_f32(act_bias[r0 + q]));
        }
        #pragma unroll
        for (int q = 0; q < EXPAND_RANKS; q++)
        {
            float bf[VEC];
            unpack_vec(bv[q], bf);
            #pragma unroll
            for (int i = 0; i < VEC; i++) acc[i] = fmaf(c[q], bf[i], acc[i]);
        }
    }
}
template <bool ACCUMULATE, typename Y>
__device__ __forceinline__ void bgmv_expand_impl(
    Y* __restrict__ y, long long y_stride, const long long* __restrict__ slots, int tokens_per_row,
    const float* __restrict__ d, int K, int R,
    const T* __restrict__ B0, const T* __restrict__ B1, const T* __restrict__ B2,
    int out0, int out1, int out2, int off0, int off1, int off2,
    const int* __restrict__ ranks, int rank_stride, int rank_col, const T* __restrict__ bias,
    const T* __restrict__ act_bias, const int* __restrict__ act_codes)
{
    wait_for_prior_kernels();
    const int n = blockIdx.x, j = blockIdx.z;
    const long long s = slots[n / tokens_per_row];
    const int rank = s < 0 ? 0 : ranks[s * rank_stride + rank_col + j];
    if (ACCUMULATE && rank == 0) return;
    const T* B = j == 0 ? B0 : j == 1 ? B1 : B2;
    const int out = j == 0 ? out0 : j == 1 ? out1 : out2;
    const int off = j == 0 ? off0 : j == 1 ? off1 : off2;
    const int o0 = (blockIdx.y * blockDim.x + threadIdx.x) * VEC;
    if (o0 >= out) return;

    Y* yr = y + (long long)n * y_stride + off + o0;
    float acc[VEC], prior[VEC];
    #pragma unroll
    for (int i = 0; i < VEC; i++) acc[i] = 0.0f;
    if constexpr (ACCUMULATE) load_vec(yr, prior);                      // issued with the B loads below
    const float* dr = d + ((long long)n * K + j) * R;
    const T* b = B + s * (long long)R * out + o0;
    const int code = act_codes != nullptr && rank > 0 ? act_codes[s] : -1;
    add_low_rank(acc, b, out, dr, rank, code, code >= 0 ? act_bias + s * R : nullptr);
    if (rank > 0 && bias != nullptr && j == 0)
    {
        #pragma unroll
        for (int i = 0; i < VEC; i++) acc[i] += to_f32(bias[s * (long long)out + o0 + i]);
    }
    #pragma unroll
    for (int i = 0; i < VEC; i++)
    {
        if constexpr (ACCUMULATE) yr[i] = from_f32<Y>(prior[i] + acc[i]);
        else yr[i] = acc[i];
    }
}

#define EXPAND_PARAMS(Y) \
    Y* y, long long y_stride, const long long* slots, int tokens_per_row, const float* d, int K, int R, \
    const T* B0, const T* B1, const T* B2, int out0, int out1, int out2, int off0, int off1, int off2, \
    const int* ranks, int rank_stride, int rank_col, const T* bias, const T* act_bias, const int* act_codes
#define EXPAND_ARGS y, y_stride, slots, tokens_per_row, d, K, R, B0, B1, B2, out0, out1, out2, off0, off1, off2, ranks, rank_stride, rank_col, bias, \
    act_bias, act_codes

extern "C" __global__ void __launch_bounds__(128) bgmv_expand(EXPAND_PARAMS(T)) { bgmv_expand_impl<true, T>(EXPAND_ARGS); }
extern "C" __global__ void __launch_bounds__(128) bgmv_expand_to_f32(EXPAND_PARAMS(float)) { bgmv_expand_impl<false, float>(EXPAND_ARGS); }

// One epilogue for several methods' per-row terms at a projection's output, in place:
//   y[n][c] = T(y[n][c] * scale[si][c] + bias[bi][c] + sum_{r < rank(s, j)} d[n][j][r] * B_j[s][r][c - off_j])
// with si = scale_index[n / tokens_per_row] (IA3's scales; rows without read a neutral slot of ones), bi likewise
// (BitFit's biases; neutral slot of zeros), s = lora_slots[...] (LoRA; -1: no low-rank term) and j the target whose
// columns [off_j, off_j + out_j) hold c. Any of the three may be absent (a null table or slot pointer). A row has one
// adapter, so it gets at most one non-neutral term, and the single rounding equals that method's own kernel:
// T(y * s), T(y + b) or T(y + acc) (times 1 and plus 0 are exact).
// y: [N, y_stride], width W (a multiple of VEC, as are the targets' offsets and widths). Grid (N, ceil(W / (threads *
// VEC))): each thread owns VEC consecutive columns.
extern "C" __global__ void __launch_bounds__(128) row_epilogue(
    T* __restrict__ y, long long y_stride, int W, int tokens_per_row,
    const T* __restrict__ scale, const long long* __restrict__ scale_index,
    const T* __restrict__ bias, const long long* __restrict__ bias_index,
    const long long* __restrict__ lora_slots, const float* __restrict__ d, int K, int R,
    const T* __restrict__ B0, const T* __restrict__ B1, const T* __restrict__ B2,
    int out0, int out1, int out2, int off0, int off1, int off2,
    const int* __restrict__ ranks, int rank_stride, int rank_col)
{
    wait_for_prior_kernels();
    const int n = blockIdx.x, row = n / tokens_per_row;
    const int c0 = (blockIdx.y * blockDim.x + threadIdx.x) * VEC;
    if (c0 >= W) return;
    T* yr = y + (long long)n * y_stride + c0;
    float v[VEC];
    load_vec(yr, v);
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
    const long long s = lora_slots != nullptr ? lora_slots[row] : -1;
    if (s >= 0)
    {
        const int j = c0 >= off2 && c0 < off2 + out2 && K > 2 ? 2 : c0 >= off1 && c0 < off1 + out1 && K > 1 ? 1 : c0 >= off0 && c0 < off0 + out0 ? 0 : -1;
        const int rank = j < 0 ? 0 : ranks[s * rank_stride + rank_col + j];
        if (rank > 0)
        {
            const T* B = j == 0 ? B0 : j == 1 ? B1 : B2;
            const int out = j == 0 ? out0 : j == 1 ? out1 : out2;
            const int off = j == 0 ? off0 : j == 1 ? off1 : off2;
            const float* dr = d + ((long long)n * K + j) * R;
            const T* b = B + s * (long long)R * out + (c0 - off);
            float acc[VEC];
            #pragma unroll
            for (int i = 0; i < VEC; i++) acc[i] = 0.0f;
            add_low_rank(acc, b, out, dr, rank, -1, nullptr);
            #pragma unroll
            for (int i = 0; i < VEC; i++) v[i] += acc[i];
        }
    }
    #pragma unroll
    for (int i = 0; i < VEC; i++) yr[i] = from_f32<T>(v[i]);
}
