// Fused elementwise kernels of the decoder layer. Each reproduces the roundings of the TorchSharp ops it
// replaces (LlamaModel.RmsNorm, residual add, SiLU times up), so the kernel path and the tensor-op path
// differ only by float32 summation order.
#include "common.cuh"
#include "row_terms.cuh"

// The RMSNorm kernels hold a row in registers as 16-byte chunks: thread t of the block owns chunks t, t + blockDim, ...
// (at most NORM_CHUNKS of them; H % VEC == 0, rows 16-byte aligned: the host checks). The residual is summed, squared
// and normalized from the registers it was computed in, so the row is read once and written once; both kernels
// share this layout and the block size (FusedOps.NormThreads), so they sum the squares in the same order.
#define NORM_CHUNKS 4
#define NORM_MAX_THREADS 512     // FusedOps.NormThreads' cap

// Kernels that add low-rank terms (add_low_rank, row_terms.cuh) say how many blocks an SM should hold at least: without
// it ptxas assumed 1,024-thread blocks, capped registers at 64 and sank each round's 16 loads of B next to their FMAs,
// a few in flight at a time (the SASS of NVRTC 11.8 for sm_90, loadtests/gpu/sass-local.sh: with the bound, the
// longest run of loads before their first use went from 18 to 37 here).

// Whether chunk k of this thread lies in the row, and its first column.
__device__ __forceinline__ bool norm_chunk(int k, int H, int& c0)
{
    c0 = (threadIdx.x + k * blockDim.x) * VEC;
    return c0 < H;
}

// out = w * T(v * rsqrt(mean(v^2) + eps)), v (this thread's chunks of the row, as the tensor-op path stores them) in float32.
__device__ __forceinline__ void rms_norm_chunks(const float v[NORM_CHUNKS][VEC], const T* __restrict__ w, T* __restrict__ out, int H, float eps)
{
    __shared__ float scratch[32];
    float sum = 0.0f;
    int c0;
    #pragma unroll
    for (int k = 0; k < NORM_CHUNKS; k++)
        if (norm_chunk(k, H, c0))
        {
            #pragma unroll
            for (int i = 0; i < VEC; i++) sum += v[k][i] * v[k][i];
        }
    sum = block_sum(sum, scratch);
    const float inv = rsqrtf(sum / (float)H + eps);
    #pragma unroll
    for (int k = 0; k < NORM_CHUNKS; k++)
        if (norm_chunk(k, H, c0))
        {
            float o[VEC];
            load_vec(w + c0, o);
            #pragma unroll
            for (int i = 0; i < VEC; i++) o[i] *= round_to<T>(v[k][i] * inv);
            store_vec(out + c0, o);
        }
}

// out = w * T(x * rsqrt(mean(x^2) + eps)), x in float32 (one block per row of H).
extern "C" __global__ void __launch_bounds__(NORM_MAX_THREADS) rms_norm(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ out, int H, float eps)
{
    wait_for_prior_kernels();
    const long long row = blockIdx.x;
    float v[NORM_CHUNKS][VEC];
    int c0;
    #pragma unroll
    for (int k = 0; k < NORM_CHUNKS; k++)
        if (norm_chunk(k, H, c0)) load_vec(x + row * H + c0, v[k]);
    rms_norm_chunks(v, w, out + row * H, H, eps);
}

// residual = T(h + delta'), out = rms_norm(residual), normalizing the rounded sum the residual stream holds. delta' =
// T(terms(delta)) with a projection's per-row adapter terms (row_terms.cuh) applied on the way, or delta itself where
// there are none (null pointers): the same roundings as row_epilogue followed by the plain add, in one launch.
extern "C" __global__ void __launch_bounds__(NORM_MAX_THREADS, 1) add_rms_norm(const T* __restrict__ h, const T* __restrict__ delta, const T* __restrict__ w,
                                        T* __restrict__ residual, T* __restrict__ out, int H, float eps, int tokens_per_row, ROW_TERMS_PARAMS)
{
    wait_for_prior_kernels();
    const long long row = blockIdx.x;
    float v[NORM_CHUNKS][VEC];
    int c0;
    #pragma unroll
    for (int k = 0; k < NORM_CHUNKS; k++)
        if (norm_chunk(k, H, c0))
        {
            float dv[VEC];
            load_vec(delta + row * H + c0, dv);
            load_vec(h + row * H + c0, v[k]);
            apply_row_terms(ROW_TERMS, dv, (int)row, (int)row / tokens_per_row, c0, H);   // nothing where all are null
            #pragma unroll
            for (int i = 0; i < VEC; i++) v[k][i] = round_to<T>(v[k][i] + round_to<T>(dv[i]));
            store_vec(residual + row * H + c0, v[k]);
        }
    rms_norm_chunks(v, w, out + row * H, H, eps);
}

// out[r, i] = T(T(silu(g)) * u) with g = gate_up[r, i], u = gate_up[r, I + i].
extern "C" __global__ void silu_mul(const T* gate_up, T* out, long long rows, int I)
{
    wait_for_prior_kernels();
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * I) return;
    const long long r = i / I, c = i - r * I;
    const float g = to_f32(gate_up[r * 2 * I + c]);
    const float u = to_f32(gate_up[r * 2 * I + I + c]);
    const float s = round_to<T>(g / (1.0f + expf(-g)));
    out[i] = from_f32<T>(s * u);
}

// silu_mul with the gate|up projection's per-row adapter terms (row_terms.cuh) applied on the way: gate and up are
// first rounded as row_epilogue would store them, so this equals row_epilogue followed by silu_mul, in one launch.
// I % VEC == 0; each thread owns VEC consecutive outputs of one row.
extern "C" __global__ void __launch_bounds__(256, 2) silu_mul_terms(const T* __restrict__ gate_up, T* __restrict__ out, long long rows, int I, int tokens_per_row,
                                          ROW_TERMS_PARAMS)
{
    wait_for_prior_kernels();
    const long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * VEC;
    if (i >= rows * I) return;
    const long long r = i / I;
    const int c = (int)(i - r * I);
    float g[VEC], u[VEC];
    load_vec(gate_up + r * 2 * I + c, g);
    load_vec(gate_up + r * 2 * I + I + c, u);
    apply_row_terms(ROW_TERMS, g, (int)r, (int)r / tokens_per_row, c, 2 * I);
    apply_row_terms(ROW_TERMS, u, (int)r, (int)r / tokens_per_row, I + c, 2 * I);
    #pragma unroll
    for (int k = 0; k < VEC; k++)
    {
        const float gk = round_to<T>(g[k]);
        const float sk = round_to<T>(gk / (1.0f + expf(-gk)));
        g[k] = sk * round_to<T>(u[k]);
    }
    store_vec(out + i, g);
}

// Per-row adapter vectors read from a slot table, in place: y[n][o] = T(y[n][o] * table[s][o]) (add = 0: IA3's
// scales) or T(y[n][o] + table[s][o]) (add = 1: BitFit's biases), s = index[n / tokens_per_row]. The same single
// rounding as the tensor ops (gather, then multiply or add), without the gathered copy. Grid (ceil(width / 256)
// capped, rows); y: [rows, width] contiguous; table: [slots, width].
extern "C" __global__ void row_table_apply(T* __restrict__ y, int width, const long long* __restrict__ index, int tokens_per_row,
                                           const T* __restrict__ table, int add)
{
    wait_for_prior_kernels();
    const long long n = blockIdx.y;
    const T* row = table + index[n / tokens_per_row] * (long long)width;
    T* out = y + n * width;
    for (int o = blockIdx.x * blockDim.x + threadIdx.x; o < width; o += gridDim.x * blockDim.x)
    {
        const float v = to_f32(out[o]), p = to_f32(row[o]);
        out[o] = from_f32<T>(add ? v + p : v * p);
    }
}
