// How every PeftServe kernel starts (pasted in by KernelModule.Source, like every #include "*.cuh").
// Programmatic dependent launch (sm_90+, KernelModule.ProgrammaticLaunch): a kernel launched with it may start
// while the kernel before it in the stream is still finishing, so its launch and first instructions overlap that
// kernel's tail. Every kernel calls this first, before it touches memory: it returns once the kernels before it
// have completed and their writes are visible (a no-op when the kernel was launched without the attribute, and
// before sm_90). Kernels never trigger their dependents early, so the chain stays ordered kernel by kernel.
__device__ __forceinline__ void wait_for_prior_kernels()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
