// lpq: uniform-format kernels instantiated for 4-bit codes.
#include "uniform_dispatch.cuh"

namespace lpq {
cudaError_t launch_uniform_gemm_b4(bool bf16, int fold, const GemmArgs& a, int nwarps, int variant, cudaStream_t s) {
  return launch_gemm_bits<4>(bf16, fold, a, nwarps, variant, s);
}
cudaError_t launch_uniform_dequant_b4(bool bf16, int fold, const DequantArgs& a, cudaStream_t s) {
  return launch_dequant_bits<4>(bf16, fold, a, s);
}
}  // namespace lpq
