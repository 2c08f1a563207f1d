// lpq: dispatch of the uniform-format kernels on the bit width.
#include "uniform_kernels.cuh"
#include "uniform_launch.h"

namespace lpq {
#define LPQ_DECL(B)                                                                                         \
  cudaError_t launch_uniform_gemm_b##B(bool bf16, int fold, const GemmArgs& a, int nwarps, int variant, cudaStream_t s); \
  cudaError_t launch_uniform_dequant_b##B(bool bf16, int fold, const DequantArgs& a, cudaStream_t s);
LPQ_DECL(2)
LPQ_DECL(3)
LPQ_DECL(4)
LPQ_DECL(8)
#undef LPQ_DECL

cudaError_t launch_uniform_gemm(int bits, bool bf16, int fold, const GemmArgs& a, int nwarps, int variant, cudaStream_t s) {
  switch (bits) {
    case 2: return launch_uniform_gemm_b2(bf16, fold, a, nwarps, variant, s);
    case 3: return launch_uniform_gemm_b3(bf16, fold, a, nwarps, variant, s);
    case 4: return launch_uniform_gemm_b4(bf16, fold, a, nwarps, variant, s);
    case 8: return launch_uniform_gemm_b8(bf16, fold, a, nwarps, variant, s);
  }
  return cudaErrorInvalidValue;
}
cudaError_t launch_uniform_dequant(int bits, bool bf16, int fold, const DequantArgs& a, cudaStream_t s) {
  switch (bits) {
    case 2: return launch_uniform_dequant_b2(bf16, fold, a, s);
    case 3: return launch_uniform_dequant_b3(bf16, fold, a, s);
    case 4: return launch_uniform_dequant_b4(bf16, fold, a, s);
    case 8: return launch_uniform_dequant_b8(bf16, fold, a, s);
  }
  return cudaErrorInvalidValue;
}
}  // namespace lpq
