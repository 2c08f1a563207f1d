// lpq: squeezellm LUT kernels instantiated for 4-bit indices.
#include "squeezellm_kernels.cuh"

namespace lpq {
namespace lut {
cudaError_t launch_lut_gemm_b4(bool bf16, const LutGemmArgs& a, int nwarps, int variant, cudaStream_t s) {
  return launch_gemm_bits<4>(bf16, a, nwarps, variant, s);
}
cudaError_t launch_lut_dequant_b4(bool bf16, const LutDequantArgs& a, cudaStream_t s) {
  return launch_dequant_bits<4>(bf16, a, s);
}
}  // namespace lut
}  // namespace lpq
