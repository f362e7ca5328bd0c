// Decode attention over the paged KV cache: one new query token per sequence attends to the first
// context_lens[b] keys of its block table, read in place from the cache pools (no gathered copy).
// Compile-time: ELEM_TYPE, HEAD_DIM, GROUP (query heads per KV head).
// One thread block per (sequence, KV head) handles that KV head's GROUP query heads: its WARPS warps
// take interleaved runs of UNROLL keys, each lane holding DIMS consecutive dimensions of the queries, a
// running max, a running sum and a running output per query head (online softmax, float32); the warps'
// partial results are merged through shared memory at the end.
// WARPS is set by the host (PagedAttention.cs): as many as the merge buffer allows, because at small batches
// the few blocks (one per KV head) are bound by the latency of each warp's chain of key runs, which more
// warps shorten (measured on an H200 at batch 1: 40 us a layer with 4 warps, a third of a decode step).
#include "common.cuh"
#include "row_terms.cuh"

#ifndef WARPS
#define WARPS 4
#endif
#define UNROLL 4
#define DIMS ((HEAD_DIM + 31) / 32)

// This lane's DIMS consecutive dimensions of a head (row p), as floats. Where the lanes cover the head exactly and a
// lane's share is 4, 8 or 16 bytes, it is one load (a head's row is 16-byte aligned: HEAD_DIM * sizeof(T) >= 128).
#define DIM_BYTES (DIMS * (int)sizeof(T))
__device__ __forceinline__ void load_dims(const T* __restrict__ p, int lane, float out[DIMS])
{
    if constexpr (HEAD_DIM == 32 * DIMS && (DIM_BYTES == 4 || DIM_BYTES == 8 || DIM_BYTES == 16))
    {
        union { uint4 v16; uint2 v8; unsigned int v4; T e[DIMS]; } share;
        if constexpr (DIM_BYTES == 16) share.v16 = *reinterpret_cast<const uint4*>(p + lane * DIMS);
        else if constexpr (DIM_BYTES == 8) share.v8 = *reinterpret_cast<const uint2*>(p + lane * DIMS);
        else share.v4 = *reinterpret_cast<const unsigned int*>(p + lane * DIMS);
        #pragma unroll
        for (int d = 0; d < DIMS; d++) out[d] = to_f32(share.e[d]);
    }
    else
    {
        #pragma unroll
        for (int d = 0; d < DIMS; d++)
        {
            const int dim = lane * DIMS + d;
            out[d] = dim < HEAD_DIM ? to_f32(p[dim]) : 0.0f;
        }
    }
}

// q, out: [B, nq, HEAD_DIM]; k_cache, v_cache: [slots, nkv, HEAD_DIM]; block_tables: [B, max_blocks]
// (block ids); context_lens: [B] (0 for padding rows, whose output is zero).
extern "C" __global__ void __launch_bounds__(WARPS * 32) paged_decode_attention(
    const T* __restrict__ q, const T* __restrict__ k_cache, const T* __restrict__ v_cache,
    const long long* __restrict__ block_tables, const long long* __restrict__ context_lens, T* __restrict__ out,
    int nkv, int max_blocks, int block_size, float scale)
{
    wait_for_prior_kernels();
    const int b = blockIdx.x, kvh = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int nq = nkv * GROUP;
    const int ctx = (int)context_lens[b];
    const long long* table = block_tables + (long long)b * max_blocks;

    float qv[GROUP][DIMS], acc[GROUP][DIMS], m[GROUP], l[GROUP];
    #pragma unroll
    for (int g = 0; g < GROUP; g++)
    {
        load_dims(q + ((long long)b * nq + kvh * GROUP + g) * HEAD_DIM, lane, qv[g]);
        #pragma unroll
        for (int d = 0; d < DIMS; d++) { qv[g][d] *= scale; acc[g][d] = 0.0f; }
        m[g] = NEG_INF;
        l[g] = 0.0f;
    }

    for (int base = warp * UNROLL; base < ctx; base += WARPS * UNROLL)
    {
        // Keys and values base .. base+UNROLL-1: all their loads go out together before any is used.
        float kv[UNROLL][DIMS], vv[UNROLL][DIMS];
        long long row[UNROLL];
        #pragma unroll
        for (int u = 0; u < UNROLL; u++)
        {
            const int j = base + u;
            row[u] = -1;
            if (j < ctx)
            {
                const long long slot = table[j / block_size] * block_size + j % block_size;
                row[u] = (slot * nkv + kvh) * HEAD_DIM;
                load_dims(k_cache + row[u], lane, kv[u]);
                load_dims(v_cache + row[u], lane, vv[u]);
            }
        }
        #pragma unroll
        for (int g = 0; g < GROUP; g++)
        {
            float s[UNROLL];
            float top = m[g];
            #pragma unroll
            for (int u = 0; u < UNROLL; u++)
            {
                float dot = 0.0f;
                #pragma unroll
                for (int d = 0; d < DIMS; d++) dot = fmaf(qv[g][d], row[u] >= 0 ? kv[u][d] : 0.0f, dot);
                s[u] = row[u] >= 0 ? warp_sum(dot) : NEG_INF;
                top = fmaxf(top, s[u]);
            }
            const float correction = m[g] == NEG_INF ? 0.0f : expf(m[g] - top);
            l[g] *= correction;
            #pragma unroll
            for (int d = 0; d < DIMS; d++) acc[g][d] *= correction;
            m[g] = top;
            #pragma unroll
            for (int u = 0; u < UNROLL; u++) s[u] = row[u] >= 0 ? expf(s[u] - top) : 0.0f;
            #pragma unroll
            for (int u = 0; u < UNROLL; u++)
            {
                if (row[u] < 0) continue;
                l[g] += s[u];
                #pragma unroll
                for (int d = 0; d < DIMS; d++) acc[g][d] = fmaf(s[u], vv[u][d], acc[g][d]);
            }
        }
    }

    // Merge the warps: each warp's (max, sum, output) is rescaled to the common max.
    __shared__ float sm_m[WARPS][GROUP], sm_l[WARPS][GROUP];
    __shared__ float sm_acc[WARPS][GROUP][DIMS * 32];
    #pragma unroll
    for (int g = 0; g < GROUP; g++)
    {
        if (lane == 0) { sm_m[warp][g] = m[g]; sm_l[warp][g] = l[g]; }
        #pragma unroll
        for (int d = 0; d < DIMS; d++) sm_acc[warp][g][lane * DIMS + d] = acc[g][d];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < GROUP * HEAD_DIM; i += WARPS * 32)
    {
        const int g = i / HEAD_DIM, dim = i - g * HEAD_DIM;
        float top = NEG_INF;
        #pragma unroll
        for (int w = 0; w < WARPS; w++) top = fmaxf(top, sm_m[w][g]);
        float sum = 0.0f, value = 0.0f;
        #pragma unroll
        for (int w = 0; w < WARPS; w++)
        {
            if (sm_m[w][g] == NEG_INF) continue;
            const float f = expf(sm_m[w][g] - top);
            sum += sm_l[w][g] * f;
            value += sm_acc[w][g][dim] * f;
        }
        out[((long long)b * nq + kvh * GROUP + g) * HEAD_DIM + dim] = from_f32<T>(sum > 0.0f ? value / sum : 0.0f);
    }
}

// A decode step's rotary embedding and KV write in one pass, from the fused q|k|v projection
// qkv [N, (nq + 2 nkv) * HEAD_DIM]: queries and keys rotated at their token's position (q_out [N, nq, HEAD_DIM]),
// keys and values written to the cache pools at write_slots[n]. The roundings are the tensor-op path's
// (RotaryEmbedding): cos and sin of position * inv_freq rounded to T, then x*cos and rotate_half(x)*sin each
// rounded, then their sum. Each thread owns VEC consecutive rotary pairs (p .. p + VEC - 1 and their partners
// p + half ..) of one query or key head, or the same two VEC-wide pieces of a value head, read and written as 16-byte
// vectors: ROPE_LANES threads a head (HEAD_DIM / 2 must be a multiple of VEC; the host checks). Grid (N, ceil((nq +
// 2 nkv) * ROPE_LANES / blockDim.x)). (One block per token, looping over its heads, took 35 us a layer at batch 1 on an
// H200; one thread per pair with the adapter terms read element by element took 22 us at batch 32 against 6.6 without.)
// The projection's per-row adapter terms (row_terms.cuh; null pointers: none) are applied to each vector as it is
// read, rounded as row_epilogue would have stored it: the same values as the epilogue followed by this kernel. The
// launch bound's 16 blocks an SM leave ptxas the registers to issue the terms' loads at once (fused.cu says why).
#define ROPE_LANES (HEAD_DIM / 2 / VEC)
extern "C" __global__ void __launch_bounds__(32, 16) rope_write_kv(
    const T* __restrict__ qkv, const long long* __restrict__ positions, const float* __restrict__ inv_freq,
    const long long* __restrict__ write_slots, T* __restrict__ q_out, T* __restrict__ k_cache, T* __restrict__ v_cache,
    int nq, int nkv, int tokens_per_row, ROW_TERMS_PARAMS)
{
    wait_for_prior_kernels();
    const int n = blockIdx.x;
    const int lane = blockIdx.y * blockDim.x + threadIdx.x;
    const int head = lane / ROPE_LANES;
    if (head >= nq + 2 * nkv) return;
    const int half = HEAD_DIM / 2;
    const int p0 = (lane - head * ROPE_LANES) * VEC;                  // this thread's first pair
    const int width = (nq + 2 * nkv) * HEAD_DIM;
    const int c1 = head * HEAD_DIM + p0, c2 = c1 + half;
    const T* row = qkv + (long long)n * width;
    float x1[VEC], x2[VEC];
    load_vec(row + c1, x1);
    load_vec(row + c2, x2);
    if (scale != nullptr || bias != nullptr || lora_slots != nullptr)
    {
        apply_row_terms(ROW_TERMS, x1, n, n / tokens_per_row, c1, width);
        apply_row_terms(ROW_TERMS, x2, n, n / tokens_per_row, c2, width);
        #pragma unroll
        for (int i = 0; i < VEC; i++) { x1[i] = round_to<T>(x1[i]); x2[i] = round_to<T>(x2[i]); }
    }
    const long long slot = write_slots[n];
    if (head >= nq + nkv)
    {
        T* dst = v_cache + (slot * nkv + (head - nq - nkv)) * HEAD_DIM + p0;
        store_vec(dst, x1);
        store_vec(dst + half, x2);
        return;
    }
    const float position = (float)positions[n];
    float lo[VEC], hi[VEC];
    #pragma unroll
    for (int i = 0; i < VEC; i++)
    {
        const float angle = position * inv_freq[p0 + i];
        const float c = round_to<T>(cosf(angle)), s = round_to<T>(sinf(angle));
        lo[i] = round_to<T>(x1[i] * c) + round_to<T>(-x2[i] * s);
        hi[i] = round_to<T>(x2[i] * c) + round_to<T>(x1[i] * s);
    }
    T* dst = (head < nq ? q_out + ((long long)n * nq + head) * HEAD_DIM : k_cache + (slot * nkv + (head - nq)) * HEAD_DIM) + p0;
    store_vec(dst, lo);
    store_vec(dst + half, hi);
}
