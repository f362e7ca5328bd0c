// Shared by PeftServe's kernel files (KernelModule pastes it where a file says #include "common.cuh").
// No CUDA headers are needed: the 16-bit conversions are inline PTX (sm_80+).
// Each module is compiled for one element type, chosen with -DELEM_TYPE=bf16_t | f16_t | float.

#include "launch.cuh"

#define NEG_INF __int_as_float(0xff800000)

struct bf16_t { unsigned short bits; };
struct f16_t { unsigned short bits; };

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16_t v) { return __uint_as_float(((unsigned int)v.bits) << 16); }
__device__ __forceinline__ float to_f32(f16_t v)
{
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
}

template <typename T> __device__ __forceinline__ T from_f32(float f);
template <> __device__ __forceinline__ float from_f32<float>(float f) { return f; }
template <> __device__ __forceinline__ bf16_t from_f32<bf16_t>(float f)
{
    bf16_t r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(f));
    return r;
}
template <> __device__ __forceinline__ f16_t from_f32<f16_t>(float f)
{
    f16_t r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(f));
    return r;
}

// f rounded to T and back: what a tensor op whose result has dtype T stores.
template <typename T> __device__ __forceinline__ float round_to(float f) { return to_f32(from_f32<T>(f)); }

#ifdef ELEM_TYPE
typedef ELEM_TYPE T;
// Elements in one 16-byte load.
#define VEC (16 / (int)sizeof(T))

// The VEC elements of one 16-byte vector as floats.
__device__ __forceinline__ void unpack_vec(const uint4 raw, float out[VEC])
{
    const T* e = reinterpret_cast<const T*>(&raw);
    #pragma unroll
    for (int i = 0; i < VEC; i++) out[i] = to_f32(e[i]);
}

// Loads VEC consecutive elements (16-byte aligned) as floats.
__device__ __forceinline__ void load_vec(const T* p, float out[VEC]) { unpack_vec(*reinterpret_cast<const uint4*>(p), out); }

// Stores VEC floats, each rounded to T, as one 16-byte vector (p 16-byte aligned).
__device__ __forceinline__ void store_vec(T* p, const float v[VEC])
{
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
    #pragma unroll
    for (int i = 0; i < VEC; i++) e[i] = from_f32<T>(v[i]);
    *reinterpret_cast<uint4*>(p) = raw;
}
#endif

__device__ __forceinline__ float warp_sum(float v)
{
    #pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Sum over a block of up to 1024 threads; every thread gets the result. scratch: 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* scratch)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}
