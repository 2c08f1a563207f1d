// lpq: host-side interface of the ptq161 GEMV kernels (see ptq161_kernels.cu).
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace lpq {
namespace ptq161 {

struct GemvArgs {
  const void* x;            // [m, k] fp16/bf16 activations, contiguous
  const int* bin_idx;       // [b] input channel of each binarized position
  const int* sal_idx;       // [s] input channel of each salient position
  const float* colscale;    // [b]
  const uint32_t* qw;       // [b/32, n] sign words
  const uint32_t* sw;       // [s/8, n] 4-bit code words
  float* acc;               // [2, m, n] zeroed: salient, binarized partial sums
  float* sums;              // [2, m] zeroed: sum of salient inputs, sum of binarized inputs
  int m, n, k, s, b;
  int bin_tiles;            // set by launch_gemv
};

struct EpilogueArgs {
  const float* acc;         // [2, m, n]
  const float* sums;        // [2, m]
  const float* sscale;      // [n]
  const float* szero;       // [n]
  const float* bscale;      // [n]
  const float* mu;          // [n]
  const void* bias;         // [n] in the activations' dtype, or null
  void* y;                  // [m, n] output in the activations' dtype
  int m, n;
};

cudaError_t launch_gemv(bool bf16, GemvArgs a, const EpilogueArgs& e, cudaStream_t stream);

// The streaming kernel (ptq161_stream.cu), the default.
constexpr int kMaxSplit = 16;    // K splits at most (the last block of a row block adds this many partials)
constexpr int kMaxStreamM = 16;  // tokens per launch (the binding launches larger m in pieces of 16)

struct StreamArgs {
  const void* x;            // [m, k] fp16/bf16 activations, contiguous
  const int* bin_idx;       // [b] input channel of each binarized position
  const int* sal_idx;       // [s] input channel of each salient position
  const float* colscale;    // [b]
  const uint32_t* qw;       // [b/32, n] sign words
  const uint32_t* sw;       // [s/8, n] 4-bit code words
  const float* rowvec;      // [4, n]: sscale, szero, bscale, mu
  const void* bias;         // [n] in the activations' dtype, or null
  void* y;                  // [m, n] output in the activations' dtype
  float* partial;           // [ksplit, m, n] fp32 partial sums (unused with one split)
  int* counters;            // [row_blocks * ceil(m / tile)] zero on entry; left zero
  int m, n, k, s, b;
};

struct StreamPlan {
  int rows_per_thread = 1;  // 2: one 8-byte load covers two rows (N even and >= 8192)
  int row_blocks = 1;       // blocks along N (256 x rows_per_thread rows each)
  int ksplit = 1;           // blocks along K
  bool salient_mma = false; // salient codes on the tensor cores (mma.m16n8k16) instead of FFMA
};

// The launch plan; ksplit_request > 0 forces the number of K splits (clamped to 1..kMaxSplit); one_row
// forces one row per thread; salient_mma sums the salient codes on the tensor cores.
StreamPlan plan_stream(int m, int n, int k, int s, int ksplit_request, bool one_row, bool salient_mma);
cudaError_t launch_stream(bool bf16, const StreamArgs& a, const StreamPlan& p, cudaStream_t stream);

}  // namespace ptq161
}  // namespace lpq
