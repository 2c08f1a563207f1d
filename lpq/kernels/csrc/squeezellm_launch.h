// lpq: launchers of the squeezellm (LUT) kernels; torch-free interface used by squeezellm_binding.cpp.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace lpq {
namespace lut {

struct LutGemmArgs {
  const void* x;          // [M, K] T, contiguous, 16-byte aligned rows (K % 8 == 0)
  const uint32_t* qw;     // repacked indices: [n_tiles][chunks][32 lanes * 2 * BITS words] (squeezellm_kernels.cuh)
  const uint32_t* tab;    // [n_tiles * 16][2**BITS / 2] byte-split codebooks in T (fp16 or bf16 bit patterns)
  const int* sp_ptr;      // [n_tiles * 16 + 1] first sparse entry of each row (row-major entries), or null (dense only)
  const uint32_t* sp_e;   // [nnz] column (low 16 bits, K <= 65536) | fp16 bits of the sparse value minus the
                          // codebook value at that position (high 16)
  const void* bias;       // [N] T or null
  void* y;                // [M, N] T
  int M, N, K, chunks, n_tiles;
  int pdl_early;          // 1: the ring kernel lets the next kernel launch right after its own griddepcontrol.wait
                          // (the early trigger, kLutVariantEarly); 0: after its main loop
};

struct LutDequantArgs {
  const uint32_t* qw;
  const uint32_t* tab;
  void* w;  // [N, K] T (dense part only: the caller writes the sparse values)
  int N, K, chunks, n_tiles;
};

// Or-ed into variant 0: the ring kernel launched with programmatic dependent launch (on sm_90+; a plain launch before).
constexpr int kLutVariantPDL = 8;
// Or-ed in with kLutVariantPDL: the early trigger (LutGemmArgs::pdl_early).
constexpr int kLutVariantEarly = 16;

// Each returns cudaSuccess or the launch error. nwarps in 1..8 (warps of a block split K); variant 0:
// the cp.async ring kernel, 1: the register-prefetch kernel (squeezellm_kernels.cuh); 0 | kLutVariantPDL, optionally | kLutVariantEarly.
cudaError_t launch_lut_gemm(int bits, bool bf16, const LutGemmArgs& args, int nwarps, int variant, cudaStream_t stream);
cudaError_t launch_lut_dequant(int bits, bool bf16, const LutDequantArgs& args, cudaStream_t stream);

}  // namespace lut
}  // namespace lpq
