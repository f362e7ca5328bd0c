// NF4 kernels. Packed weights: row-major, two codes per byte, the first (even k) in the high nibble;
// absmax float32, one per 64 consecutive weights.
#include "launch.cuh"
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

// The dot product of one chunk's 32 decoded weights with the 32 x values staged at xs (4 vectors of 8, in order).
template <bool BF16> __device__ __forceinline__ float chunk_dot(const unsigned short* xs, const float w[32])
{
    const uint4* xr = reinterpret_cast<const uint4*>(xs);
    float dot = 0.0f;
    #pragma unroll
    for (int v = 0; v < 4; v++)
    {
        const uint4 q = xr[v];                                   // values 8v .. 8v+7 of the chunk
        const unsigned int qw[4] = { q.x, q.y, q.z, q.w };
        #pragma unroll
        for (int j = 0; j < 4; j++)
        {
            dot = fmaf(low_half<BF16>(qw[j]), w[8 * v + 2 * j], dot);
            dot = fmaf(high_half<BF16>(qw[j]), w[8 * v + 2 * j + 1], dot);
        }
    }
    return dot;
}

// y[m][n] = the sum of acc[m] over the warp's lanes (a butterfly), written by lane 0.
template <int M, bool BF16>
__device__ __forceinline__ void store_row_sums(const float acc[M], unsigned short* __restrict__ y, int N, int n, int lane)
{
    #pragma unroll
    for (int m = 0; m < M; m++)
    {
        float v = acc[m];
        #pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
        if (lane == 0) y[(size_t)m * (size_t)N + n] = from_f32<BF16>(v);
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
    wait_for_prior_kernels();
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
                acc[m] = fmaf(chunk_dot<BF16>(xs + (m * (TILE_K / 32) + lane) * CHUNK_STRIDE, w), scale, acc[m]);
        }
        c = cNext;
        p = pNext;
        scale = scaleNext;
    }

    if (!active) return;
    store_row_sums<M, BF16>(acc, y, N, n, lane);
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

// The same product for 1 to 4 rows of x whose K columns fit in shared memory at once (M * K * 5/2 bytes, dynamic
// shared memory): the block stages all of x first, so its warps never wait on each other after that, and each lane
// issues the loads of up to GEMV_ROUND of its row's chunks together (c = lane, lane + 32, ...: a 4,096-wide row in one
// round, 11,008 in two) instead of one chunk per tile with two block barriers per tile. The chunk order per lane and
// every product are nf4_gemv's, so the results are bit-identical to it (the selfcheck compares them).
#define GEMV_ROUND 8
template <int M, bool BF16>
__device__ __forceinline__ void nf4_gemv_whole(const unsigned short* __restrict__ x, const unsigned char* __restrict__ wq,
                                               const float* __restrict__ absmax, unsigned short* __restrict__ y, int N, int K)
{
    wait_for_prior_kernels();
    __shared__ float code[16];
    extern __shared__ __align__(16) unsigned short xs[];       // [M][K / 32][CHUNK_STRIDE]
    if (threadIdx.x < 16) code[threadIdx.x] = kNf4Code[threadIdx.x];

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int n = blockIdx.x * WARPS_PER_BLOCK + warp;
    const bool active = n < N;
    const int chunks = K >> 5;
    const uint4* wrow = reinterpret_cast<const uint4*>(wq + (size_t)(active ? n : 0) * (size_t)(K >> 1));
    const float* arow = absmax + (size_t)(active ? n : 0) * (size_t)(K >> 6);

    // The first round's weights are on their way while x is staged.
    uint4 p[GEMV_ROUND];
    float scale[GEMV_ROUND];
    #pragma unroll
    for (int u = 0; u < GEMV_ROUND; u++)
    {
        const int c = lane + 32 * u;
        const bool live = active && c < chunks;
        p[u] = live ? __ldg(wrow + c) : make_uint4(0u, 0u, 0u, 0u);
        scale[u] = live ? __ldg(arow + (c >> 1)) : 0.0f;
    }
    const int vecsPerRow = K >> 3;                                // 8 values per 16-byte vector
    for (int i = threadIdx.x; i < M * vecsPerRow; i += 32 * WARPS_PER_BLOCK)
    {
        const int m = i / vecsPerRow, v = i - m * vecsPerRow;
        const uint4 val = __ldg(reinterpret_cast<const uint4*>(x + (size_t)m * (size_t)K) + v);
        *reinterpret_cast<uint4*>(xs + (m * chunks + (v >> 2)) * CHUNK_STRIDE + ((v & 3) << 3)) = val;
    }
    __syncthreads();
    if (!active) return;

    float acc[M];
    #pragma unroll
    for (int m = 0; m < M; m++) acc[m] = 0.0f;
    for (int first = 0; first < chunks; first += 32 * GEMV_ROUND)
    {
        if (first > 0)
        {
            #pragma unroll
            for (int u = 0; u < GEMV_ROUND; u++)
            {
                const int c = first + lane + 32 * u;
                p[u] = c < chunks ? __ldg(wrow + c) : make_uint4(0u, 0u, 0u, 0u);
                scale[u] = c < chunks ? __ldg(arow + (c >> 1)) : 0.0f;
            }
        }
        #pragma unroll
        for (int u = 0; u < GEMV_ROUND; u++)
        {
            const int c = first + lane + 32 * u;
            if (c >= chunks) break;                               // the chunks of a lane ascend: none left
            float w[32];
            decode_chunk(p[u], code, w);
            #pragma unroll
            for (int m = 0; m < M; m++)
                acc[m] = fmaf(chunk_dot<BF16>(xs + (m * chunks + c) * CHUNK_STRIDE, w), scale[u], acc[m]);
        }
    }
    store_row_sums<M, BF16>(acc, y, N, n, lane);
}

#define NF4_WHOLE_INSTANTIATE(M) \
    extern "C" __global__ void __launch_bounds__(32 * WARPS_PER_BLOCK) nf4_gemv_whole_bf16_m##M( \
        const unsigned short* x, const unsigned char* w, const float* absmax, unsigned short* y, int N, int K) \
    { nf4_gemv_whole<M, true>(x, w, absmax, y, N, K); } \
    extern "C" __global__ void __launch_bounds__(32 * WARPS_PER_BLOCK) nf4_gemv_whole_f16_m##M( \
        const unsigned short* x, const unsigned char* w, const float* absmax, unsigned short* y, int N, int K) \
    { nf4_gemv_whole<M, false>(x, w, absmax, y, N, K); }

NF4_WHOLE_INSTANTIATE(1) NF4_WHOLE_INSTANTIATE(2) NF4_WHOLE_INSTANTIATE(3) NF4_WHOLE_INSTANTIATE(4)

// Tensor-core NF4 product for 17 to 32 rows of x (batched decode), where the CUDA-core kernels above become
// compute-bound: y[m, n] = sum_k x[m, k] * bf16(code[q(n, k)] * absmax), with mma.sync m16n8k16 (fp32
// accumulation). The weight is the A operand (16 weight rows per m-tile), x^T the B operand (8 tokens per n-tile).
// A k-permutation makes both operands' fragments contiguous loads: within a unit of 128 columns, the k-slots
// {2t, 2t+1, 2t+8, 2t+9} that lane (g, t) holds at mma step i (0..7) stand for columns 32t + 4i + {0,1,2,3}, so
// over the 8 steps a lane covers columns 32t .. 32t+31 of its rows: exactly one 16-byte chunk of packed weights
// (one absmax) per row, and 64 contiguous bytes of each x row. Products are summed over k in any order, so the
// permutation changes nothing but the order of the fp32 additions.
// A block is 8 warps of MMA_MT m-tiles (128 weight rows at MMA_MT = 1, the default), all walking the same columns so x is read
// from L1 after its first warp; blockIdx.y splits K into `splits` ranges. With more than one split, each block
// writes fp32 partials to work[split][m][n] and the last block of a row tile to finish (a per-tile counter, reset
// by that block) adds them in split order and writes y: deterministic, and one launch.
#define MMA_WARPS 8
#ifndef MMA_MT
#define MMA_MT 1                   // m-tiles per warp (the host passes it)
#endif
#ifndef MMA_PREFETCH
#define MMA_PREFETCH 2             // units of weights in flight per warp while one is multiplied (the host passes it)
#endif
#ifndef MMA_XSMEM
#define MMA_XSMEM 0                // 1: x staged per unit in shared memory (the host passes it; see xs_pos below)
#endif
#define MMA_ROWS (MMA_WARPS * MMA_MT * 16)

// With MMA_XSMEM, the block stages each unit's x (up to 32 tokens x 128 columns, 8 KiB) in shared memory, double
// buffered, instead of every warp loading its fragments from global memory: those loads touch 16 cache lines per
// instruction (each lane 16 bytes of a token's row at 64-byte steps), so the warps' x reads, 8 times the bytes of their
// weights, kept L1 busy. A token's 16 chunks of 16 bytes are stored swizzled: chunk c of token r at position
// (c & 8) | ((c + 2 (c >> 3 & 1) + (r & 1)) & 7), so that the 8 lanes of each quarter-warp (tokens g and g + 1,
// chunks 4t + i/2) read 8 different bank groups, and a staging quarter-warp (one token, 8 chunks) writes 8.
__device__ __forceinline__ int xs_pos(int c, int r) { return (c & 8) | ((c + 2 * ((c >> 3) & 1) + (r & 1)) & 7); }
#define REDUCE_OUTPUTS 4           // outputs a thread of the finishing block sums at once
#define REDUCE_SPLITS 8            // splits whose partials it loads together

template <bool BF16> __device__ __forceinline__ unsigned int pack2(float lo, float hi)
{
    unsigned int r;
    if constexpr (BF16) asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    else asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

template <bool BF16> __device__ __forceinline__ void mma16816(float c[4], const unsigned int a[4], unsigned int b0, unsigned int b1)
{
    if constexpr (BF16)
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The two weights of step i's k-slot pair e (0: columns 4i, 4i+1; 1: 4i+2, 4i+3) of a 16-byte chunk, scaled and
// packed: byte 2i + e holds them (high nibble first).
template <bool BF16> __device__ __forceinline__ unsigned int weight_pair(const uint4 p, int i, int e, const float* code, float scale)
{
    const unsigned int words[4] = { p.x, p.y, p.z, p.w };
    const unsigned int byte = (words[i >> 1] >> (8 * (((i & 1) << 1) + e))) & 0xffu;
    return pack2<BF16>(code[byte >> 4] * scale, code[byte & 15u] * scale);
}

template <int NT, bool BF16>
__device__ __forceinline__ void nf4_mma(const unsigned short* __restrict__ x, const unsigned char* __restrict__ wq,
                                       const float* __restrict__ absmax, unsigned short* __restrict__ y,
                                       float* __restrict__ work, int* __restrict__ counters, int M, int N, int K, int splits)
{
    wait_for_prior_kernels();
    __shared__ float code[16];
    __shared__ int last;
    if (threadIdx.x < 16) code[threadIdx.x] = kNf4Code[threadIdx.x];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int tile = blockIdx.x, split = blockIdx.y;
    const int units = K >> 7;
    const int u0 = (int)((long long)split * units / splits), u1 = (int)((long long)(split + 1) * units / splits);
#if MMA_XSMEM
    // Staging: thread i of the block moves chunks i and i + 256 of the unit (token = chunk / 16, 8 NT tokens of 16 chunks).
    __shared__ __align__(16) uint4 xs[2][8 * NT][16];
    uint4 staged[2];
    auto stage_load = [&](int u)
    {
        #pragma unroll
        for (int e = 0; e < 2; e++)
        {
            const int idx = threadIdx.x + 32 * MMA_WARPS * e, r = idx >> 4, c = idx & 15;
            if (r < 8 * NT)
                staged[e] = __ldg(reinterpret_cast<const uint4*>(x + (size_t)min(r, M - 1) * (size_t)K + (u << 7)) + c);
        }
    };
    auto stage_store = [&](int buffer)
    {
        #pragma unroll
        for (int e = 0; e < 2; e++)
        {
            const int idx = threadIdx.x + 32 * MMA_WARPS * e, r = idx >> 4, c = idx & 15;
            if (r < 8 * NT) xs[buffer][r][xs_pos(c, r)] = staged[e];
        }
    };
    int buffer = 0;
    if (u0 < u1) { stage_load(u0); stage_store(0); }
#endif
    __syncthreads();
    const size_t rowBytes = (size_t)(K >> 1), rowScales = (size_t)(K >> 6);

    // This lane's 2 * MMA_MT weight rows (rows g and g + 8 of each m-tile), clamped into the weight.
    const uint4* wrow[MMA_MT][2];
    const float* arow[MMA_MT][2];
    #pragma unroll
    for (int mt = 0; mt < MMA_MT; mt++)
        #pragma unroll
        for (int h = 0; h < 2; h++)
        {
            const int n = min(tile * MMA_ROWS + (warp * MMA_MT + mt) * 16 + g + 8 * h, N - 1);
            wrow[mt][h] = reinterpret_cast<const uint4*>(wq + (size_t)n * rowBytes);
            arow[mt][h] = absmax + (size_t)n * rowScales;
        }
#if !MMA_XSMEM
    // This lane's x rows (token 8 nt + g of each n-tile); tokens past M read row M - 1 and are never written.
    const unsigned short* xrow[NT];
    #pragma unroll
    for (int nt = 0; nt < NT; nt++) xrow[nt] = x + (size_t)min(8 * nt + g, M - 1) * (size_t)K + 32 * t;
#endif

    float acc[MMA_MT][NT][4];
    #pragma unroll
    for (int mt = 0; mt < MMA_MT; mt++)
        #pragma unroll
        for (int nt = 0; nt < NT; nt++)
            #pragma unroll
            for (int q = 0; q < 4; q++) acc[mt][nt][q] = 0.0f;

    // A ring of MMA_PREFETCH units of weights per lane: unit u sits in stage (u - u0) % MMA_PREFETCH, and as a stage is
    // taken for multiplying, the unit MMA_PREFETCH further on is loaded into it, so that many units' loads are in flight
    // during each unit's arithmetic (the loop is unrolled over the stages: register arrays need constant indices).
    uint4 p[MMA_PREFETCH][MMA_MT][2];
    float scale[MMA_PREFETCH][MMA_MT][2];
    auto load = [&](int stage, int u)
    {
        const int c = 4 * u + t;                                        // this lane's chunk of unit u
        #pragma unroll
        for (int mt = 0; mt < MMA_MT; mt++)
            #pragma unroll
            for (int h = 0; h < 2; h++)
            {
                p[stage][mt][h] = __ldg(wrow[mt][h] + c);
                scale[stage][mt][h] = __ldg(arow[mt][h] + (c >> 1));
            }
    };
    #pragma unroll
    for (int st = 0; st < MMA_PREFETCH; st++)
        if (u0 + st < u1) load(st, u0 + st);
    for (int ub = u0; ub < u1; ub += MMA_PREFETCH)
    #pragma unroll
    for (int st = 0; st < MMA_PREFETCH; st++)
    {
        const int u = ub + st;
        if (u >= u1) break;
        uint4 cur[MMA_MT][2];
        float sc[MMA_MT][2];
        #pragma unroll
        for (int mt = 0; mt < MMA_MT; mt++)
            #pragma unroll
            for (int h = 0; h < 2; h++) { cur[mt][h] = p[st][mt][h]; sc[mt][h] = scale[st][mt][h]; }
        if (u + MMA_PREFETCH < u1) load(st, u + MMA_PREFETCH);          // in flight during the next MMA_PREFETCH units
#if MMA_XSMEM
        if (u + 1 < u1) stage_load(u + 1);                              // the next unit's x, stored after this one's MMAs
#endif
        uint4 xv[NT];
        #pragma unroll
        for (int i = 0; i < 8; i++)
        {
            if ((i & 1) == 0)                                           // x columns 32t + 4i .. 32t + 4i + 7
            {
                #pragma unroll
                for (int nt = 0; nt < NT; nt++)
#if MMA_XSMEM
                    xv[nt] = xs[buffer][8 * nt + g][xs_pos(4 * t + (i >> 1), 8 * nt + g)];
#else
                    xv[nt] = __ldg(reinterpret_cast<const uint4*>(xrow[nt] + (u << 7)) + (i >> 1));
#endif
            }
            unsigned int a[MMA_MT][4];
            #pragma unroll
            for (int mt = 0; mt < MMA_MT; mt++)
            {
                a[mt][0] = weight_pair<BF16>(cur[mt][0], i, 0, code, sc[mt][0]);
                a[mt][1] = weight_pair<BF16>(cur[mt][1], i, 0, code, sc[mt][1]);
                a[mt][2] = weight_pair<BF16>(cur[mt][0], i, 1, code, sc[mt][0]);
                a[mt][3] = weight_pair<BF16>(cur[mt][1], i, 1, code, sc[mt][1]);
            }
            #pragma unroll
            for (int nt = 0; nt < NT; nt++)
            {
                // x columns 32t + 4i .. +3 of the token: half of the vector.
                const uint4 q = xv[nt];
                const unsigned int b0 = (i & 1) ? q.z : q.x, b1 = (i & 1) ? q.w : q.y;
                #pragma unroll
                for (int mt = 0; mt < MMA_MT; mt++) mma16816<BF16>(acc[mt][nt], a[mt], b0, b1);
            }
        }
#if MMA_XSMEM
        // The other buffer was last read in the unit before this one, which every warp has finished (the barrier below,
        // one unit ago); after this barrier every warp has also finished this unit, so its buffer may be refilled.
        if (u + 1 < u1) stage_store(buffer ^ 1);
        __syncthreads();
        buffer ^= 1;
#endif
    }

    // acc[mt][nt][q]: weight row (warp * MMA_MT + mt) * 16 + g + 8 (q >> 1), token 8 nt + 2t + (q & 1).
    #pragma unroll
    for (int mt = 0; mt < MMA_MT; mt++)
        #pragma unroll
        for (int nt = 0; nt < NT; nt++)
            #pragma unroll
            for (int q = 0; q < 4; q++)
            {
                const int n = tile * MMA_ROWS + (warp * MMA_MT + mt) * 16 + g + 8 * (q >> 1);
                const int m = 8 * nt + 2 * t + (q & 1);
                if (n >= N || m >= M) continue;
                if (splits == 1) y[(size_t)m * N + n] = from_f32<BF16>(acc[mt][nt][q]);
                else work[((size_t)split * M + m) * N + n] = acc[mt][nt][q];
            }
    if (splits == 1) return;
    __threadfence();                                                    // partials visible before the count
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(counters + tile, 1) == splits - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    // Each thread sums REDUCE_OUTPUTS outputs at once, loading REDUCE_SPLITS splits' partials of each together before
    // adding them in split order (a load per split in turn was a chain of L2 latencies as long as the split count);
    // absent terms are loaded as 0, and adding 0 leaves a float sum unchanged, so the result is the plain ordered sum.
    for (int i0 = threadIdx.x; i0 < MMA_ROWS * M; i0 += REDUCE_OUTPUTS * blockDim.x)
    {
        float sum[REDUCE_OUTPUTS];
        const float* src[REDUCE_OUTPUTS];
        #pragma unroll
        for (int o = 0; o < REDUCE_OUTPUTS; o++)
        {
            const int i = i0 + o * blockDim.x;
            const int m = i / MMA_ROWS, n = tile * MMA_ROWS + (i - m * MMA_ROWS);
            sum[o] = 0.0f;
            src[o] = i < MMA_ROWS * M && n < N ? work + (size_t)m * N + n : nullptr;
        }
        for (int sp0 = 0; sp0 < splits; sp0 += REDUCE_SPLITS)
        {
            float v[REDUCE_OUTPUTS][REDUCE_SPLITS];
            #pragma unroll
            for (int o = 0; o < REDUCE_OUTPUTS; o++)
                #pragma unroll
                for (int e = 0; e < REDUCE_SPLITS; e++)
                    v[o][e] = src[o] != nullptr && sp0 + e < splits ? __ldcg(src[o] + (size_t)(sp0 + e) * M * N) : 0.0f;
            #pragma unroll
            for (int o = 0; o < REDUCE_OUTPUTS; o++)
                #pragma unroll
                for (int e = 0; e < REDUCE_SPLITS; e++) sum[o] += v[o][e];
        }
        #pragma unroll
        for (int o = 0; o < REDUCE_OUTPUTS; o++)
            if (src[o] != nullptr) y[src[o] - work] = from_f32<BF16>(sum[o]);
    }
    if (threadIdx.x == 0) counters[tile] = 0;                           // ready for the next launch (graph replays)
}

#define NF4_MMA_INSTANTIATE(NT) \
    extern "C" __global__ void __launch_bounds__(32 * MMA_WARPS) nf4_mma_bf16_n##NT(const unsigned short* x, const unsigned char* w, \
        const float* absmax, unsigned short* y, float* work, int* counters, int M, int N, int K, int splits) \
    { nf4_mma<NT, true>(x, w, absmax, y, work, counters, M, N, K, splits); } \
    extern "C" __global__ void __launch_bounds__(32 * MMA_WARPS) nf4_mma_f16_n##NT(const unsigned short* x, const unsigned char* w, \
        const float* absmax, unsigned short* y, float* work, int* counters, int M, int N, int K, int splits) \
    { nf4_mma<NT, false>(x, w, absmax, y, work, counters, M, N, K, splits); }

NF4_MMA_INSTANTIATE(1) NF4_MMA_INSTANTIATE(2) NF4_MMA_INSTANTIATE(3) NF4_MMA_INSTANTIATE(4)

// Dequantization for the plain path (many rows): out[i] = code[q_i] * absmax[i / 64], computed in
// float32 and rounded once to the output type, exactly as the tensor-op path does. Each thread
// decodes one 16-byte chunk (32 values, half a block) and writes 64 bytes.
template <bool BF16>
__device__ __forceinline__ void nf4_dequant(const unsigned char* __restrict__ wq, const float* __restrict__ absmax,
                                            unsigned short* __restrict__ out, long long chunks)
{
    wait_for_prior_kernels();
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
