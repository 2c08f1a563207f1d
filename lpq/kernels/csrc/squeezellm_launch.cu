// lpq: dispatch of the squeezellm LUT kernels on the bit width.
#include "squeezellm_launch.h"

namespace lpq {
namespace lut {
#define LPQ_LUT_DECL(B)                                                                                   \
  cudaError_t launch_lut_gemm_b##B(bool bf16, const LutGemmArgs& a, int nwarps, int variant, cudaStream_t s);     \
  cudaError_t launch_lut_dequant_b##B(bool bf16, const LutDequantArgs& a, cudaStream_t s);
LPQ_LUT_DECL(2)
LPQ_LUT_DECL(3)
LPQ_LUT_DECL(4)
#undef LPQ_LUT_DECL

cudaError_t launch_lut_gemm(int bits, bool bf16, const LutGemmArgs& a, int nwarps, int variant, cudaStream_t s) {
  switch (bits) {
    case 2: return launch_lut_gemm_b2(bf16, a, nwarps, variant, s);
    case 3: return launch_lut_gemm_b3(bf16, a, nwarps, variant, s);
    case 4: return launch_lut_gemm_b4(bf16, a, nwarps, variant, s);
  }
  return cudaErrorInvalidValue;
}
cudaError_t launch_lut_dequant(int bits, bool bf16, const LutDequantArgs& a, cudaStream_t s) {
  switch (bits) {
    case 2: return launch_lut_dequant_b2(bf16, a, s);
    case 3: return launch_lut_dequant_b3(bf16, a, s);
    case 4: return launch_lut_dequant_b4(bf16, a, s);
  }
  return cudaErrorInvalidValue;
}
}  // namespace lut
}  // namespace lpq
