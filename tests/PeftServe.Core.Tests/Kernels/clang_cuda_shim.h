// Stand-ins for the CUDA runtime header, for compiling PeftServe's kernels with clang's CUDA mode on a machine
// without the CUDA toolkit (the CI machine): KernelCompileTests emits PTX for every kernel file and dtype, so a
// kernel that NVRTC would refuse fails on CPU CI before it costs GPU time. These declarations are what our kernels
// use of the runtime (qualifiers, vector types, math and warp intrinsics); the PTX is never run.
#define __global__ __attribute__((global))
#define __device__ __attribute__((device))
#define __shared__ __attribute__((shared))
#define __host__ __attribute__((host))
#define __forceinline__ __inline__ __attribute__((always_inline))
#define __launch_bounds__(...) __attribute__((launch_bounds(__VA_ARGS__)))
#include <__clang_cuda_builtin_vars.h>
typedef unsigned long long size_t;
struct uint4 { unsigned int x, y, z, w; };
struct uint2 { unsigned int x, y; };
struct float4 { float x, y, z, w; };
__device__ float expf(float); __device__ float cosf(float); __device__ float sinf(float); __device__ float fmaf(float,float,float);
__device__ float fmaxf(float,float); __device__ float fminf(float,float); __device__ float erff(float); __device__ float tanhf(float);
__device__ float sqrtf(float); __device__ float rsqrtf(float); __device__ float fabsf(float); __device__ float logf(float);
__device__ float __int_as_float(int); __device__ float __uint_as_float(unsigned int); __device__ unsigned int __float_as_uint(float); __device__ int __float_as_int(float);
__device__ float __shfl_xor_sync(unsigned, float, int); __device__ int __shfl_xor_sync(unsigned, int, int);
__device__ float __shfl_sync(unsigned, float, int); __device__ int __shfl_sync(unsigned, int, int);
__device__ void __syncthreads(); __device__ void __syncwarp(unsigned = 0xffffffffu);
template <typename A, typename B> __device__ A min(A a, B b); template <typename A, typename B> __device__ A max(A a, B b);
__device__ int __ldg(const int*); 
__device__ inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { uint4 r; r.x=a; r.y=b; r.z=c; r.w=d; return r; }
#define __constant__ __attribute__((constant))
#define __align__(n) __attribute__((aligned(n)))
__device__ uint4 __ldg(const uint4*); __device__ float __ldg(const float*); __device__ unsigned int __ldg(const unsigned int*);
__device__ uint2 __ldg(const uint2*); __device__ unsigned short __ldg(const unsigned short*); __device__ float4 __ldg(const float4*);
__device__ float __ldcg(const float*); __device__ void __threadfence(); __device__ int atomicAdd(int*, int);
