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
  // norm_sq [M, norm_slots] float, or null (and norm_x null): the rms scale of token row m comes from sums of
  // squares another layer's residual epilogue wrote, rsqrt(sum_j norm_sq[m, j] / K + norm_eps).
  const float* norm_sq;
  int norm_slots;
  // Residual epilogue (not with swiglu), for the layer that closes a pre-norm block's branch (o_proj, down_proj):
  // residual [M, N] T, or null: y = h = (the output rounded to T) + residual, rounded to T (the block's add).
  // Then, with next_w [N] T: y_next [M, N] T = next_w * h (the x of the next RMSNorm folded into its consumer), and
  // out_sq [M, n_tiles] float: the sum over n-tile j's rows of h^2 (in fp32), the consumer's norm_sq.
  const void* residual;
  const void* next_w;
  void* y_next;
  float* out_sq;
  // launched with PDL: 1 lets the next kernel launch right after this grid's wait instead of after its main loop
  int pdl_early;
};

// Shared memory of the epilogue's rms partial sums: one float per warp and token row (at most 32 rows a block).
constexpr int kNormRows = 32;
__host__ __device__ inline bool has_norm(const GemmArgs& a) { return a.norm_x != nullptr || a.norm_sq != nullptr; }
inline size_t norm_partial_bytes(const GemmArgs& a, int nwarps) {
  return has_norm(a) ? (size_t)nwarps * kNormRows * sizeof(float) : 0;
}
// The one-token kernel (XR = 1) stages its epilogue's operands in shared memory with its first copies, after the rms
// partials: the token's row of norm_x, or its slots of norm_sq (in 16-byte pieces), then the residual and next_w
// values of the block's NT * 16 outputs (2-byte T). Sizes in bytes.
__host__ __device__ inline int staged_norm_bytes(const GemmArgs& a) {
  return a.norm_x ? a.K * 2 : (a.norm_sq ? (a.norm_slots + 3) / 4 * 16 : 0);
}
__host__ __device__ inline int staged_residual_bytes(const GemmArgs& a, int nt) { return a.residual ? 2 * nt * 16 * 2 : 0; }

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
// Flag or-ed in with kVariantPDL: the grid lets the next kernel launch right after its own wait (GemmArgs::pdl_early).
constexpr int kVariantEarly = 16;

// Tokens per block of the fused kernel for a given m (8, 16 or 32), and the n-tiles per block.
inline int gemm_tokens_per_block(int m) { return m <= 8 ? 8 : (m <= 16 ? 16 : 32); }
inline int gemm_ntiles_per_block(int m) { return m <= 8 ? 1 : 2; }

}  // namespace lpq
