// Batched gathered matrix-vector products for adapters kept in slot pools (the BGMV shape of Punica and
// S-LoRA): every token multiplies its own adapter's matrices, read in place from the pool through the
// token's slot index, so rows with 32 different adapters cost one launch and no per-row copies.
// A pool holds, per slot s, K stacked "down" matrices A[s][j] ([R, in]) and per target j an "up" matrix
// B_j[s] ([R, out_j], rank-major so a rank's row is contiguous). ranks[s][col + j] is the adapter's rank
// for target j (0: the adapter has no such target); ranks past it are never read. A slot index < 0 means
// the token's sequence has no adapter of this kind: nothing is added.
// Used by LoRA (K = 3 for q|k|v, 2 for gate|up, 1 for o and down) and by bottleneck adapters (K = 1, with
// a bias and an activation between the two products).
#include "common.cuh"

#define WARPS 4

// d[n][j][r] = sum_k x[n][k] * A[s][j][r][k] for r < rank(s, j); 0 elsewhere. s = slots[n / tokens_per_row].
// x: [N, in] with row stride x_stride; A: [S, K, R, in]; d: float [N, K, R]. in % VEC == 0, rows 16-byte aligned.
// Each warp takes RANKS_PER_WARP consecutive ranks of one target for one token (compile-time, default 1: more
// warps in flight measured faster than sharing the x loads across ranks at batch 32). Grid (N, ceil(K * R / (WARPS * RANKS_PER_WARP))):
// tokens on x (y and z stop at 65535).
#ifndef RANKS_PER_WARP
#define RANKS_PER_WARP 1
#endif
#ifndef SHRINK_UNROLL
#define SHRINK_UNROLL 4
#endif
extern "C" __global__ void __launch_bounds__(WARPS * 32) bgmv_shrink(
    const T* __restrict__ x, long long x_stride, const long long* __restrict__ slots, int tokens_per_row,
    const T* __restrict__ A, const int* __restrict__ ranks, int rank_stride, int rank_col,
    float* __restrict__ d, int K, int R, int in)
{
    const int n = blockIdx.x;
    const int group = blockIdx.y * WARPS + (threadIdx.x >> 5);       // which run of RANKS_PER_WARP (j, r) pairs
    const int lane = threadIdx.x & 31;
    const int first = group * RANKS_PER_WARP;
    if (first >= K * R) return;
    const long long s = slots[n / tokens_per_row];
    // R is a multiple of RANKS_PER_WARP (the pool's rank is padded so), so a run never crosses targets.
    const int j = first / R, r0 = first - j * R;
    const int rank = s < 0 ? 0 : ranks[s * rank_stride + rank_col + j];
    float* dst = d + ((long long)n * K + j) * R + r0;
    const int live = min(RANKS_PER_WARP, max(0, rank - r0));
    if (live == 0)
    {
        if (lane < RANKS_PER_WARP) dst[lane] = 0.0f;
        return;
    }
    const T* a = A + ((s * K + j) * (long long)R + r0) * (long long)in;
    const T* xr = x + (long long)n * x_stride;
    float sum[RANKS_PER_WARP];
    #pragma unroll
    for (int q = 0; q < RANKS_PER_WARP; q++) sum[q] = 0.0f;
    // SHRINK_UNROLL strides of the row per step, all loaded before any is used: the warp's loop is a chain
    // of load latencies (in / (32 VEC) of them, 43 for a 11,008-wide input), which this shortens.
    for (int k0 = lane * VEC; k0 < in; k0 += 32 * VEC * SHRINK_UNROLL)
    {
        float xv[SHRINK_UNROLL][VEC];
        #pragma unroll
        for (int u = 0; u < SHRINK_UNROLL; u++)
        {
            const int k = k0 + u * 32 * VEC;
            if (k < in) load_vec(xr + k, xv[u]);
            else
            {
                #pragma unroll
                for (int i = 0; i < VEC; i++) xv[u][i] = 0.0f;
            }
        }
        #pragma unroll
        for (int q = 0; q < RANKS_PER_WARP; q++)
        {
            if (q >= live) break;
            float av[SHRINK_UNROLL][VEC];
            #pragma unroll
            for (int u = 0; u < SHRINK_UNROLL; u++)
            {
                const int k = k0 + u * 32 * VEC;
                if (k < in) load_vec(a + (long long)q * in + k, av[u]);
                else
                {
                    #pragma unroll
                    for (int i = 0; i < VEC; i++) av[u][i] = 0.0f;
                }
            }
            #pragma unroll
            for (int u = 0; u < SHRINK_UNROLL; u++)
            {
                #pragma unroll
                for (int i = 0; i < VEC; i++) sum[q] = fmaf(av[u][i], xv[u][i], sum[q]);
            }
        }
    }
    #pragma unroll
    for (int q = 0; q < RANKS_PER_WARP; q++)
    {
        const float total = warp_sum(sum[q]);
        if (lane == 0) dst[q] = q < live ? total : 0.0f;
    }
}

// The up-projection: acc[o] = sum_{r < rank(s, j)} d[n][j][r] * B_j[s][r][o] (+ bias[s][o] for j = 0 when given),
// for o < out_j, and then either (ACCUMULATE) y[n][off_j + o] = T(y + acc) in place in the layer's output, or
// y[n][off_j + o] = acc into a float32 buffer, zeros included (tokens without an adapter write 0), so the
// buffer can be computed beside the base projection on another stream and added after it.
// y: [N, y_stride]; B_j: [S, R, out_j] with out_j % VEC == 0; bias: [S, out_0] or null.
// Grid (N, ceil(max out_j / (threads * VEC)), K); each thread owns VEC consecutive outputs.
template <bool ACCUMULATE, typename Y>
__device__ __forceinline__ void bgmv_expand_impl(
    Y* __restrict__ y, long long y_stride, const long long* __restrict__ slots, int tokens_per_row,
    const float* __restrict__ d, int K, int R,
    const T* __restrict__ B0, const T* __restrict__ B1, const T* __restrict__ B2,
    int out0, int out1, int out2, int off0, int off1, int off2,
    const int* __restrict__ ranks, int rank_stride, int rank_col, const T* __restrict__ bias)
{
    const int n = blockIdx.x, j = blockIdx.z;
    const long long s = slots[n / tokens_per_row];
    const int rank = s < 0 ? 0 : ranks[s * rank_stride + rank_col + j];
    if (ACCUMULATE && rank == 0) return;
    const T* B = j == 0 ? B0 : j == 1 ? B1 : B2;
    const int out = j == 0 ? out0 : j == 1 ? out1 : out2;
    const int off = j == 0 ? off0 : j == 1 ? off1 : off2;
    const int o0 = (blockIdx.y * blockDim.x + threadIdx.x) * VEC;
    if (o0 >= out) return;

    float acc[VEC];
    #pragma unroll
    for (int i = 0; i < VEC; i++) acc[i] = 0.0f;
    if (rank > 0)
    {
        const float* dr = d + ((long long)n * K + j) * R;
        const T* b = B + s * (long long)R * out + o0;
        int r = 0;
        // Four ranks per step: their loads go out before any is used (the loop is a chain of load latencies).
        for (; r + 3 < rank; r += 4)
        {
            float b0[VEC], b1[VEC], b2[VEC], b3[VEC];
            load_vec(b + (long long)r * out, b0);
            load_vec(b + (long long)(r + 1) * out, b1);
            load_vec(b + (long long)(r + 2) * out, b2);
            load_vec(b + (long long)(r + 3) * out, b3);
            const float c0 = dr[r], c1 = dr[r + 1], c2 = dr[r + 2], c3 = dr[r + 3];
            #pragma unroll
            for (int i = 0; i < VEC; i++) acc[i] = fmaf(c3, b3[i], fmaf(c2, b2[i], fmaf(c1, b1[i], fmaf(c0, b0[i], acc[i]))));
        }
        for (; r < rank; r++)
        {
            float b0[VEC];
            load_vec(b + (long long)r * out, b0);
            const float c0 = dr[r];
            #pragma unroll
            for (int i = 0; i < VEC; i++) acc[i] = fmaf(c0, b0[i], acc[i]);
        }
        if (bias != nullptr && j == 0)
        {
            #pragma unroll
            for (int i = 0; i < VEC; i++) acc[i] += to_f32(bias[s * (long long)out + o0 + i]);
        }
    }
    Y* yr = y + (long long)n * y_stride + off + o0;
    #pragma unroll
    for (int i = 0; i < VEC; i++)
    {
        if constexpr (ACCUMULATE) yr[i] = from_f32<Y>(to_f32(yr[i]) + acc[i]);
        else yr[i] = acc[i];
    }
}

#define EXPAND_PARAMS(Y) \
    Y* y, long long y_stride, const long long* slots, int tokens_per_row, const float* d, int K, int R, \
    const T* B0, const T* B1, const T* B2, int out0, int out1, int out2, int off0, int off1, int off2, \
    const int* ranks, int rank_stride, int rank_col, const T* bias
#define EXPAND_ARGS y, y_stride, slots, tokens_per_row, d, K, R, B0, B1, B2, out0, out1, out2, off0, off1, off2, ranks, rank_stride, rank_col, bias

extern "C" __global__ void __launch_bounds__(128) bgmv_expand(EXPAND_PARAMS(T)) { bgmv_expand_impl<true, T>(EXPAND_ARGS); }
extern "C" __global__ void __launch_bounds__(128) bgmv_expand_to_f32(EXPAND_PARAMS(float)) { bgmv_expand_impl<false, float>(EXPAND_ARGS); }

// Bottleneck adapters between their two products: z[n][r] = act_s(z[n][r] + bias[s][r]) in place, for the
// tokens that have an adapter (float32 throughout). codes[s]: 0 ReLU, 1 GELU (erf), 2 SiLU, 3 tanh.
extern "C" __global__ void bottleneck_activate(
    float* __restrict__ z, long long N, int R, const long long* __restrict__ slots, int tokens_per_row,
    const T* __restrict__ bias, const int* __restrict__ codes)
{
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N * R) return;
    const long long n = i / R;
    const int r = (int)(i - n * R);
    const long long s = slots[n / tokens_per_row];
    if (s < 0) return;
    const float v = z[i] + to_f32(bias[s * R + r]);
    float a;
    switch (codes[s])
    {
        case 0: a = fmaxf(v, 0.0f); break;
        case 1: a = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f)); break;
        case 2: a = v / (1.0f + expf(-v)); break;
        default: a = tanhf(v); break;
    }
    z[i] = a;
}

// LoRA's shrink and expand in one launch (opt-in, PEFTSERVE_LORA_FUSED=1; Bgmv.ShrinkExpand): for token n and
// target j, y[n][off_j + o] += sum_{r < rank} (x[n] . A[s][j][r]) * B_j[s][r][o], the rank-sized intermediate kept
// in shared memory. Grid (N, ceil(max out_j / FUSED_CHUNK), K), FUSED_WARPS * 32 threads, rank floats of dynamic
// shared memory. Each block first computes the whole intermediate of its (token, target) (its warps share the
// ranks, two at a time against one load of x), then its chunk of FUSED_CHUNK outputs, two vectors per thread.
// Blocks of one (token, target) recompute the same intermediate (A is read from L2 again), which costs less than
// a second launch: on an H200 a 7B decode step's separate shrink and expand took 11.6 and 8.9 us a launch, chains
// of load latencies on few blocks.
#define FUSED_WARPS 8
#define FUSED_CHUNK (FUSED_WARPS * 32 * VEC * 2)
extern "C" __global__ void __launch_bounds__(FUSED_WARPS * 32) lora_shrink_expand(
    T* __restrict__ y, long long y_stride, const T* __restrict__ x, long long x_stride,
    const long long* __restrict__ slots, int tokens_per_row,
    const T* __restrict__ A, int K, int R, int in,
    const T* __restrict__ B0, const T* __restrict__ B1, const T* __restrict__ B2,
    int out0, int out1, int out2, int off0, int off1, int off2,
    const int* __restrict__ ranks, int rank_stride, int rank_col)
{
    extern __shared__ float inter[];                                   // [rank]
    const int n = blockIdx.x, j = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long long s = slots[n / tokens_per_row];
    const int rank = s < 0 ? 0 : ranks[s * rank_stride + rank_col + j];
    const int out = j == 0 ? out0 : j == 1 ? out1 : out2;
    const int chunk = blockIdx.y * FUSED_CHUNK;
    // Both conditions hold for the whole block, so these returns come before any barrier for every thread.
    if (rank == 0 || chunk >= out) return;

    // The intermediate: warp w takes ranks w and w + FUSED_WARPS (then the next pair), reading x once for both.
    const T* xr = x + (long long)n * x_stride;
    const T* a = A + (s * K + j) * (long long)R * in;
    for (int r0 = warp; r0 < rank; r0 += 2 * FUSED_WARPS)
    {
        const int r1 = r0 + FUSED_WARPS;
        const bool second = r1 < rank;
        float sum0 = 0.0f, sum1 = 0.0f;
        for (int k0 = lane * VEC; k0 < in; k0 += 32 * VEC * SHRINK_UNROLL)
        {
            float xv[SHRINK_UNROLL][VEC], a0[SHRINK_UNROLL][VEC], a1[SHRINK_UNROLL][VEC];
            #pragma unroll
            for (int u = 0; u < SHRINK_UNROLL; u++)
            {
                const int k = k0 + u * 32 * VEC;
                const bool live = k < in;
                if (live) load_vec(xr + k, xv[u]);
                if (live) load_vec(a + (long long)r0 * in + k, a0[u]);
                if (live && second) load_vec(a + (long long)r1 * in + k, a1[u]);
                #pragma unroll
                for (int i = 0; i < VEC; i++)
                {
                    if (!live) { xv[u][i] = 0.0f; a0[u][i] = 0.0f; }
                    if (!live || !second) a1[u][i] = 0.0f;
                }
            }
            #pragma unroll
            for (int u = 0; u < SHRINK_UNROLL; u++)
            {
                #pragma unroll
                for (int i = 0; i < VEC; i++)
                {
                    sum0 = fmaf(a0[u][i], xv[u][i], sum0);
                    sum1 = fmaf(a1[u][i], xv[u][i], sum1);
                }
            }
        }
        sum0 = warp_sum(sum0);
        sum1 = warp_sum(sum1);
        if (lane == 0)
        {
            inter[r0] = sum0;
            if (second) inter[r1] = sum1;
        }
    }
    __syncthreads();

    // The chunk's outputs: two vectors per thread, four ranks per step, loads before use.
    const T* B = j == 0 ? B0 : j == 1 ? B1 : B2;
    const int off = j == 0 ? off0 : j == 1 ? off1 : off2;
    const T* b = B + s * (long long)R * out;
    #pragma unroll
    for (int h = 0; h < 2; h++)
    {
        const int o0 = chunk + (h * FUSED_WARPS * 32 + threadIdx.x) * VEC;
        if (o0 >= out) break;
        float acc[VEC];
        #pragma unroll
        for (int i = 0; i < VEC; i++) acc[i] = 0.0f;
        int r = 0;
        for (; r + 3 < rank; r += 4)
        {
            float b0[VEC], b1[VEC], b2[VEC], b3[VEC];
            load_vec(b + (long long)r * out + o0, b0);
            load_vec(b + (long long)(r + 1) * out + o0, b1);
            load_vec(b + (long long)(r + 2) * out + o0, b2);
            load_vec(b + (long long)(r + 3) * out + o0, b3);
            const float c0 = inter[r], c1 = inter[r + 1], c2 = inter[r + 2], c3 = inter[r + 3];
            #pragma unroll
            for (int i = 0; i < VEC; i++) acc[i] = fmaf(c3, b3[i], fmaf(c2, b2[i], fmaf(c1, b1[i], fmaf(c0, b0[i], acc[i]))));
        }
        for (; r < rank; r++)
        {
            float b0[VEC];
            load_vec(b + (long long)r * out + o0, b0);
            const float c0 = inter[r];
            #pragma unroll
            for (int i = 0; i < VEC; i++) acc[i] = fmaf(c0, b0[i], acc[i]);
        }
        T* yr = y + (long long)n * y_stride + off + o0;
        #pragma unroll
        for (int i = 0; i < VEC; i++) yr[i] = from_f32<T>(to_f32(yr[i]) + acc[i]);
    }
}
