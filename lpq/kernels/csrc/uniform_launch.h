// lpq: launchers of the uniform-format kernels (torch-free interface used by uniform_binding.cpp).
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace lpq {

struct GemmArgs {
  const void* x;          // [M, K] T, contiguous, 16-byte aligned rows (K % 8 == 0)
  const uint32_t* qw;     // repacked codes
  const uint32_t* sc;     // [G][n_tiles][8] half2
  const uint16_t* zp;     // [G][n_tiles][8]
  const void* bias;       // [N] T or null
  void* y;                // [M, N] T
  int M, N, K, chunks, n_tiles, gs;  // gs: effective group size (K for per-channel)
  // Fused epilogues (write_block_output in uniform_kernels.cuh); zero-initialised = none.
  // norm_x [M, K] T, or null: every output of token row m is scaled by rsqrt(mean_k(norm_x[m, k]^2) + norm_eps)
  // before the bias, so that with x = w_norm * h and norm_x = h the layer computes W @ RMSNorm(h) (lpq.epilogue).
  const void* norm_x;
  float norm_eps;
  // swiglu != 0: each 16-row n-tile holds 8 gate rows then their 8 up rows (N % 16 == 0); y is [M, N / 2]
  // with y[m, 8 * tile + r] = silu(gate) * up of the tile's rows r and r + 8.
  int swiglu;
};

// Shared memory of the epilogue's rms partial sums: one float per warp and token row (at most 32 rows a block).
constexpr int kNormRows = 32;
inline size_t norm_partial_bytes(const GemmArgs& a, int nwarps) {
  return a.norm_x ? (size_t)nwarps * kNormRows * sizeof(float) : 0;
}

struct DequantArgs {
  const uint32_t* qw;
  const uint32_t* sc;
  const uint16_t* zp;
  void* w;  // [N, K] T
  int N, K, chunks, n_tiles, gs;
};

// Each returns cudaSuccess or the launch error. `fold` is min(group size, 128) in {32, 64, 128}.
// variant: 0 the v3 cp.async-ring fused kernel, 1 the v2 register-prefetch kernel, 2 v3 with deeper rings,
// 3 v3 with two n-tiles per warp, 4/5 two chunks per ring stage with two/one n-tiles per warp (m <= 8;
// uniform_dispatch.cuh).
cudaError_t launch_uniform_gemm(int bits, bool bf16, int fold, const GemmArgs& args, int nwarps, int variant,
                                cudaStream_t stream);
cudaError_t launch_uniform_dequant(int bits, bool bf16, int fold, const DequantArgs& args, cudaStream_t stream);

// Flag or-ed into a variant: launch with programmatic dependent launch (variants 4 and 5, sm_90+).
constexpr int kVariantPDL = 8;

// Tokens per block of the fused kernel for a given m (8, 16 or 32), and the n-tiles per block.
inline int gemm_tokens_per_block(int m) { return m <= 8 ? 8 : (m <= 16 ? 16 : 32); }
inline int gemm_ntiles_per_block(int m) { return m <= 8 ? 1 : 2; }

}  // namespace lpq
