// Batched gathered matrix-vector products for adapters kept in slot pools (the BGMV shape of Punica and
// S-LoRA): every token multiplies its own adapter's matrices, read in place from the pool through the
// token's slot index, so rows with 32 different adapters cost one launch and no per-row copies.
// A pool holds, per slot s, K stacked "down" matrices A[s][j] ([R, in]) and per target j an "up" matrix
// B_j[s] ([R, out_j], rank-major so a rank's row is contiguous). ranks[s][col + j] is the adapter's rank
// for target j (0: the adapter has no such target); ranks past it are never read. A slot index < 0 means
// the token's sequence has no adapter of this kind: nothing is added.
// Used by LoRA (K = 3 for q|k|v, 2 for gate|up, 1 for o and down) and by bottleneck adapters (K = 1, with
// a bias and an activation between the two products, applied by the shrink to what it writes).
#include "common.cuh"
#include "row_terms.cuh"

// Both products are short and latency-bound at decode sizes (a 4096-wide rank-16 shrink for 32 tokens is 6M
// multiply-adds), so each kernel is written to need as few dependent trips to memory as possible: after the
// token's slot and rank, every thread issues all of its loads of a round at once and only then uses them. On an
// H200 the earlier loop-per-warp versions were chains of 4 to 11 load latencies and took 9-12 us a launch.
// The second launch bound (blocks an SM should hold) lets ptxas keep a round's loads in registers at once; without it
// it sank them next to their FMAs (fused.cu says more).

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

// d[n][j][r] = sum_k x[n][k] * A[s][j][r][k] for r < rank(s, j); 0 elsewhere. s = slots[n / tokens_per_row].
// With act_codes (bottleneck adapters: K = 1), d[n][0][r] = act_s(that sum + act_bias[s][r]) for r < rank: the expand
// then reads finished coefficients (once per coefficient here, not once per output column there).
// x: [N, in] with row stride x_stride; A: [S, K, R, in]; d: float [N, K, R]. in % VEC == 0, rows 16-byte aligned.
// Grid (N, K * ceil(R / SHRINK_RANKS)): a block takes SHRINK_RANKS consecutive ranks of one target for one
// token; its SHRINK_THREADS threads split the row, SHRINK_VECS 16-byte vectors each per round (one round covers
// SHRINK_THREADS * SHRINK_VECS * VEC inputs: 4,096 in bf16 with the defaults, so 11,008 takes three).
#ifndef SHRINK_RANKS
#define SHRINK_RANKS 2
#endif
#define SHRINK_THREADS 256
#define SHRINK_VECS 2
extern "C" __global__ void __launch_bounds__(SHRINK_THREADS, 4) bgmv_shrink(
    const T* __restrict__ x, long long x_stride, const long long* __restrict__ slots, int tokens_per_row,
    const T* __restrict__ A, const int* __restrict__ ranks, int rank_stride, int rank_col,
    float* __restrict__ d, int K, int R, int in, const T* __restrict__ act_bias, const int* __restrict__ act_codes)
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
        if (act_codes != nullptr) total = bottleneck_act(act_codes[s], total + to_f32(act_bias[s * R + r0 + threadIdx.x]));
        dst[threadIdx.x] = (int)threadIdx.x < live ? total : 0.0f;
    }
}

// The up-projection: acc[o] = sum_{r < rank(s, j)} d[n][j][r] * B_j[s][r][o] (+ bias[s][o] for j = 0 when given),
// for o < out_j, and then y[n][off_j + o] = T(y + acc) in place in the layer's output (tokens without an adapter
// leave it untouched).
// y: [N, y_stride]; B_j: [S, R, out_j] with out_j % VEC == 0; bias: [S, out_0] or null.
// Grid (N, ceil(max out_j / (threads * VEC)), K); each thread owns VEC consecutive outputs and loads the B rows
// of EXPAND_RANKS ranks (and its outputs) in one round: one round for ranks up to EXPAND_RANKS (row_terms.cuh).

extern "C" __global__ void __launch_bounds__(128, 4) bgmv_expand(
    T* __restrict__ y, long long y_stride, const long long* __restrict__ slots, int tokens_per_row,
    const float* __restrict__ d, int K, int R,
    const T* __restrict__ B0, const T* __restrict__ B1, const T* __restrict__ B2,
    int out0, int out1, int out2, int off0, int off1, int off2,
    const int* __restrict__ ranks, int rank_stride, int rank_col, const T* __restrict__ bias)
{
    wait_for_prior_kernels();
    const int n = blockIdx.x, j = blockIdx.z;
    const long long s = slots[n / tokens_per_row];
    const int rank = s < 0 ? 0 : ranks[s * rank_stride + rank_col + j];
    if (rank == 0) return;
    const T* B = j == 0 ? B0 : j == 1 ? B1 : B2;
    const int out = j == 0 ? out0 : j == 1 ? out1 : out2;
    const int off = j == 0 ? off0 : j == 1 ? off1 : off2;
    const int o0 = (blockIdx.y * blockDim.x + threadIdx.x) * VEC;
    if (o0 >= out) return;

    T* yr = y + (long long)n * y_stride + off + o0;
    float acc[VEC], prior[VEC];
    #pragma unroll
    for (int i = 0; i < VEC; i++) acc[i] = 0.0f;
    load_vec(yr, prior);                                               // issued with the B loads below
    const float* dr = d + ((long long)n * K + j) * R;
    const T* b = B + s * (long long)R * out + o0;
    add_low_rank(acc, b, out, dr, rank);
    if (bias != nullptr && j == 0)
    {
        #pragma unroll
        for (int i = 0; i < VEC; i++) acc[i] += to_f32(bias[s * (long long)out + o0 + i]);
    }
    #pragma unroll
    for (int i = 0; i < VEC; i++) acc[i] += prior[i];
    store_vec(yr, acc);
}

// One epilogue for several methods' per-row terms at a projection's output, in place (row_terms.cuh says what it
// computes). y: [N, y_stride], width W. Grid (N, ceil(W / (threads * VEC))): each thread owns VEC consecutive columns.
extern "C" __global__ void __launch_bounds__(128, 4) row_epilogue(T* __restrict__ y, long long y_stride, int W, int tokens_per_row, ROW_TERMS_PARAMS)
{
    wait_for_prior_kernels();
    const int n = blockIdx.x;
    const int c0 = (blockIdx.y * blockDim.x + threadIdx.x) * VEC;
    if (c0 >= W) return;
    T* yr = y + (long long)n * y_stride + c0;
    float v[VEC];
    load_vec(yr, v);
    apply_row_terms(ROW_TERMS, v, n, n / tokens_per_row, c0, W);
    store_vec(yr, v);
}
