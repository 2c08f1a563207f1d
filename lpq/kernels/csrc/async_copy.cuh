// lpq: asynchronous global -> shared copies (cp.async, sm_80+) and programmatic dependent launch
// (sm_90+), shared by the uniform and the squeezellm kernels. Torch-free.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include <cstdlib>

namespace lpq {

__device__ __forceinline__ void cp_async16_cg(void* smem, const void* gmem, int src_bytes) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async16_ca(void* smem, const void* gmem, int src_bytes) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// A hint that the line holding p be brought into L1 (and L2): no register, no wait; a later load of it then
// misses neither.
__device__ __forceinline__ void prefetch_l1(const void* p) { asm volatile("prefetch.global.L1 [%0];\n" ::"l"(p)); }

// Programmatic dependent launch (sm_90+): wait for the grid this one depends on (all its memory
// visible), and let the next grid launch early. Both are no-ops for a grid launched without the
// programmatic-serialization attribute, and compiled out below sm_90.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" :::);
#endif
}
// Host side: whether the current device has programmatic dependent launch (compute capability 9.0; checked once per
// device), and a launch with it: the kernel's blocks may be scheduled while the previous kernel in the stream ends;
// they must wait for it (pdl_wait) before reading anything it may write.
inline bool device_has_pdl() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  static int cached[64] = {0};  // 0 unknown, 1 no, 2 yes
  if (dev < 0 || dev >= 64) return false;
  if (cached[dev] == 0) {
    int major = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cached[dev] = major >= 9 ? 2 : 1;
  }
  return cached[dev] == 2;
}
// Balanced placement (the default; LPQ_PDL_BALANCE=0 turns it off): a grid launched with PDL is placed while the previous kernel still holds
// SMs, and its blocks fill the SMs that free up first up to their full occupancy; a grid of fewer blocks than the
// GPU holds then runs on part of the SMs. Its dynamic shared memory is padded so that an SM holds at most
// ceil(blocks / SMs) of them, the count an even placement gives (the padding is never read).
struct SmGeometry {
  int sms = 0, smem_per_sm = 0, reserved_per_block = 0, max_optin = 0;
};
inline const SmGeometry* sm_geometry() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return nullptr;
  static SmGeometry cached[64];
  SmGeometry& g = cached[dev];
  if (g.sms == 0) {
    cudaDeviceGetAttribute(&g.smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev);
    cudaDeviceGetAttribute(&g.reserved_per_block, cudaDevAttrReservedSharedMemoryPerBlock, dev);
    cudaDeviceGetAttribute(&g.max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    cudaDeviceGetAttribute(&g.sms, cudaDevAttrMultiProcessorCount, dev);
  }
  return g.sms > 0 ? &g : nullptr;
}
inline bool pdl_balance_enabled() {
  static const int on = [] {
    const char* e = std::getenv("LPQ_PDL_BALANCE");
    return e != nullptr && e[0] == '0' ? 0 : 1;
  }();
  return on != 0;
}
// the dynamic shared memory that keeps an SM at ceil(blocks / SMs) blocks: (cap + 1) blocks of it do not fit
inline size_t pdl_balanced_smem(size_t needed, long long blocks) {
  const SmGeometry* g = sm_geometry();
  if (g == nullptr || blocks <= 0) return needed;
  const long long cap = (blocks + g->sms - 1) / g->sms;
  const long long pad = (long long)g->smem_per_sm / (cap + 1) - g->reserved_per_block + 16;
  if (pad <= (long long)needed || pad > (long long)g->max_optin) return needed;
  return (size_t)pad;
}

template <typename... Params, typename... Args>
cudaError_t launch_with_pdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                            Args... args) {
  if (pdl_balance_enabled()) {
    const size_t padded = pdl_balanced_smem(smem, (long long)grid.x * grid.y * grid.z);
    if (padded > smem) {
      // raise the kernel's limit where it is lower, never lower it: a launcher may have raised it for a larger call
      cudaFuncAttributes fa;
      cudaError_t e = cudaFuncGetAttributes(&fa, kernel);
      if (e == cudaSuccess && (size_t)fa.maxDynamicSharedSizeBytes < padded)
        e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)padded);
      if (e != cudaSuccess) return e;
      smem = padded;
    }
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  const cudaError_t e = cudaLaunchKernelEx(&cfg, kernel, args...);
  return e != cudaSuccess ? e : cudaGetLastError();
}

__device__ __forceinline__ void cp_async16_cg_s(uint32_t s, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
// the copy only where `on` (a predicated instruction, no branch)
__device__ __forceinline__ void cp_async16_cg_if(uint32_t s, const void* gmem, bool on) {
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %2, 0;\n @p cp.async.cg.shared.global [%0], [%1], 16;\n}\n" ::"r"(s),
      "l"(gmem), "r"((int)on));
}
__device__ __forceinline__ void cp_async16_ca_s(uint32_t s, const void* gmem, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
// one 4-byte word (both addresses 4-byte aligned)
__device__ __forceinline__ void cp_async4_ca_s(uint32_t s, const void* gmem) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(gmem));
}

}  // namespace lpq
