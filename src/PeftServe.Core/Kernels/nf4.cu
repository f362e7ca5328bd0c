// NF4 kernels. Packed weights: row-major, two codes per byte, the first (even k) in the high nibble;
// absmax float32, one per 64 consecutive weights.
#define WARPS_PER_BLOCK 8
#define TILE_K 1024                // x columns staged in shared memory per step: one 32-chunk per lane
#define CHUNK_STRIDE 40            // 32 values + 8 padding per chunk in shared memory (80 bytes): the
                                   // 16-byte reads of 8 neighbouring lanes then hit distinct banks

__constant__ float kNf4Code[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f };

__device__ __forceinline__ float f16_to_f32(unsigned int h)
{
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((unsigned short)h));
    return f;
}

template <bool BF16> __device__ __forceinline__ float low_half(unsigned int w)
{
    if constexpr (BF16) return __uint_as_float(w << 16);
    else return f16_to_f32(w & 0xffffu);
}

template <bool BF16> __device__ __forceinline__ float high_half(unsigned int w)
{
    if constexpr (BF16) return __uint_as_float(w & 0xffff0000u);
    else return f16_to_f32(w >> 16);
}

template <bool BF16> __device__ __forceinline__ unsigned short from_f32(float f)
{
    unsigned short r;
    if constexpr (BF16) asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    else asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}

// The 32 weights of one 16-byte chunk: byte 4i+b holds weights 8i+2b (high nibble) and 8i+2b+1 (low).
__device__ __forceinline__ void decode_chunk(const uint4 p, const float* code, float w[32])
{
    const unsigned int pw[4] = { p.x, p.y, p.z, p.w };
    #pragma unroll
    for (int i = 0; i < 4; i++)
    {
        #pragma unroll
        for (int b = 0; b < 4; b++)
        {
            const unsigned int byte = (pw[i] >> (8 * b)) & 0xffu;
            w[8 * i + 2 * b] = code[byte >> 4];
            w[8 * i + 2 * b + 1] = code[byte & 15u];
        }
    }
}

// y[m, n] = sum_k x[m, k] * code[q(n, k)] * absmax[(n*K + k) / 64] for M (<= 16) rows of x.
// One warp per output row n. K is walked in tiles of TILE_K: the block stages x[:, tile] in shared
// memory, then lane l takes chunk c = tile/32 + l (weights 32c .. 32c+31 of row n, in 64-block
// n*K/64 + c/2; K is a multiple of 64), whose 16 bytes were loaded one tile ahead.
template <int M, bool BF16>
__device__ __forceinline__ void nf4_gemv(const unsigned short* __restrict__ x, const unsigned char* __restrict__ wq,
                                         const float* __restrict__ absmax, unsigned short* __restrict__ y, int N, int K)
{
    __shared__ float code[16];
    __shared__ __align__(16) unsigned short xs[M * (TILE_K / 32) * CHUNK_STRIDE];
    if (threadIdx.x < 16) code[threadIdx.x] = kNf4Code[threadIdx.x];

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int n = blockIdx.x * WARPS_PER_BLOCK + warp;
    const bool active = n < N;
    const int chunks = K >> 5;
    const uint4* wrow = reinterpret_cast<const uint4*>(wq + (size_t)(active ? n : 0) * (size_t)(K >> 1));
    const float* arow = absmax + (size_t)(active ? n : 0) * (size_t)(K >> 6);

    float acc[M];
    #pragma unroll
    for (int m = 0; m < M; m++) acc[m] = 0.0f;

    int c = lane;
    uint4 p = make_uint4(0u, 0u, 0u, 0u);
    float scale = 0.0f;
    if (active && c < chunks) { p = __ldg(wrow + c); scale = __ldg(arow + (c >> 1)); }

    for (int k0 = 0; k0 < K; k0 += TILE_K)
    {
        const int vecsPerRow = min(TILE_K, K - k0) >> 3;       // 8 values per 16-byte vector
        __syncthreads();                                         // the previous tile is used up
        for (int i = threadIdx.x; i < M * vecsPerRow; i += 32 * WARPS_PER_BLOCK)
        {
            const int m = i / vecsPerRow, v = i - m * vecsPerRow;
            const uint4 val = __ldg(reinterpret_cast<const uint4*>(x + (size_t)m * (size_t)K + k0) + v);
            *reinterpret_cast<uint4*>(xs + (m * (TILE_K / 32) + (v >> 2)) * CHUNK_STRIDE + ((v & 3) << 3)) = val;
        }
        __syncthreads();

        const int cNext = c + 32;                                // this lane's chunk of the next tile
        uint4 pNext = make_uint4(0u, 0u, 0u, 0u);
        float scaleNext = 0.0f;
        if (active && cNext < chunks) { pNext = __ldg(wrow + cNext); scaleNext = __ldg(arow + (cNext >> 1)); }

        if (active && c < chunks)
        {
            float w[32];
            decode_chunk(p, code, w);
            #pragma unroll
            for (int m = 0; m < M; m++)
            {
                const uint4* xr = reinterpret_cast<const uint4*>(xs + (m * (TILE_K / 32) + lane) * CHUNK_STRIDE);
                float dot = 0.0f;
                #pragma unroll
                for (int v = 0; v < 4; v++)
                {
                    const uint4 q = xr[v];                       // values 8v .. 8v+7 of the chunk
                    const unsigned int qw[4] = { q.x, q.y, q.z, q.w };
                    #pragma unroll
                    for (int j = 0; j < 4; j++)
                    {
                        dot = fmaf(low_half<BF16>(qw[j]), w[8 * v + 2 * j], dot);
                        dot = fmaf(high_half<BF16>(qw[j]), w[8 * v + 2 * j + 1], dot);
                    }
                }
                acc[m] = fmaf(dot, scale, acc[m]);
            }
        }
        c = cNext;
        p = pNext;
        scale = scaleNext;
    }

    if (!active) return;
    #pragma unroll
    for (int m = 0; m < M; m++)
    {
        float v = acc[m];
        #pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
        if (lane == 0) y[(size_t)m * (size_t)N + n] = from_f32<BF16>(v);
    }
}

#define NF4_INSTANTIATE(M) \
    extern "C" __global__ void __launch_bounds__(32 * WARPS_PER_BLOCK) nf4_gemv_bf16_m##M( \
        const unsigned short* x, const unsigned char* w, const float* absmax, unsigned short* y, int N, int K) \
    { nf4_gemv<M, true>(x, w, absmax, y, N, K); } \
    extern "C" __global__ void __launch_bounds__(32 * WARPS_PER_BLOCK) nf4_gemv_f16_m##M( \
        const unsigned short* x, const unsigned char* w, const float* absmax, unsigned short* y, int N, int K) \
    { nf4_gemv<M, false>(x, w, absmax, y, N, K); }

NF4_INSTANTIATE(1) NF4_INSTANTIATE(2) NF4_INSTANTIATE(3) NF4_INSTANTIATE(4)
NF4_INSTANTIATE(5) NF4_INSTANTIATE(6) NF4_INSTANTIATE(7) NF4_INSTANTIATE(8)
NF4_INSTANTIATE(9) NF4_INSTANTIATE(10) NF4_INSTANTIATE(11) NF4_INSTANTIATE(12)
NF4_INSTANTIATE(13) NF4_INSTANTIATE(14) NF4_INSTANTIATE(15) NF4_INSTANTIATE(16)

// Dequantization for the plain path (many rows): out[i] = code[q_i] * absmax[i / 64], computed in
// float32 and rounded once to the output type, exactly as the tensor-op path does. Each thread
// decodes one 16-byte chunk (32 values, half a block) and writes 64 bytes.
template <bool BF16>
__device__ __forceinline__ void nf4_dequant(const unsigned char* __restrict__ wq, const float* __restrict__ absmax,
                                            unsigned short* __restrict__ out, long long chunks)
{
    __shared__ float code[16];
    if (threadIdx.x < 16) code[threadIdx.x] = kNf4Code[threadIdx.x];
    __syncthreads();
    const long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= chunks) return;
    const uint4 p = __ldg(reinterpret_cast<const uint4*>(wq) + c);
    const float scale = __ldg(absmax + (c >> 1));
    float w[32];
    decode_chunk(p, code, w);
    uint4* dst = reinterpret_cast<uint4*>(out + (c << 5));
    #pragma unroll
    for (int v = 0; v < 4; v++)
    {
        unsigned int h[4];
        #pragma unroll
        for (int j = 0; j < 4; j++)
            h[j] = (unsigned int)from_f32<BF16>(w[8 * v + 2 * j] * scale) |
                   ((unsigned int)from_f32<BF16>(w[8 * v + 2 * j + 1] * scale) << 16);
        dst[v] = make_uint4(h[0], h[1], h[2], h[3]);
    }
}

extern "C" __global__ void __launch_bounds__(256) nf4_dequant_bf16(const unsigned char* w, const float* absmax, unsigned short* out, long long chunks)
{ nf4_dequant<true>(w, absmax, out, chunks); }
extern "C" __global__ void __launch_bounds__(256) nf4_dequant_f16(const unsigned char* w, const float* absmax, unsigned short* out, long long chunks)
{ nf4_dequant<false>(w, absmax, out, chunks); }
