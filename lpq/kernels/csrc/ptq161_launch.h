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
  bool ring = false;        // the ring kernel (ptq161_ring.cu); the fields below are its own
  int tab_words = 0;        // ring: binarized words of the largest split (the table's size)
  int sal_words = 0;        // ring: salient words of the largest split, rounded up to 4
  size_t smem = 0;          // ring: dynamic shared memory a block
  int ring_stages = 4;      // ring: stages a warp's ring (2, 3 or 4)
  int ring_words = 4;       // ring: words a stage (4; 8 with 2 stages)
  bool pdl = false;         // ring: launched with programmatic dependent launch (sm_90+; a plain launch before)
  bool pdl_early = false;   // ring with pdl: the next kernel may launch right after the block's griddepcontrol.wait
                            // (the early trigger) rather than after its main loop
};

// The launch plan; ksplit_request > 0 forces the number of K splits (clamped to 1..kMaxSplit); one_row
// forces one row per thread; salient_mma sums the salient codes on the tensor cores.
StreamPlan plan_stream(int m, int n, int k, int s, int ksplit_request, bool one_row, bool salient_mma);
cudaError_t launch_stream(bool bf16, const StreamArgs& a, const StreamPlan& p, cudaStream_t stream);

// The ring kernel (ptq161_ring.cu): the streaming kernel's maths with the words brought in by cp.async.
constexpr int kMaxRingM = 4;         // tokens (one tile a launch)
constexpr int kVariantPDL = 16;      // or-ed into a gemv variant: a ring kernel it launches uses programmatic dependent launch
constexpr int kVariantEarly = 32;    // or-ed in with kVariantPDL: that ring kernel takes the early trigger (StreamPlan::pdl_early)
constexpr int kMaxRingSplit = 32;    // K splits at most
constexpr int kRingTableWords = 64;  // tokens x binarized words of a split: one table of at most 32 KB
constexpr int kDeepRingWords = 80;   // automatic, m = 1: 3 stages of 8 words from this many words of 32 rows a warp

// The ring kernel's plan for this problem into p; false where it does not apply (m > kMaxRingM, N not a
// multiple of 4, a table that would need more splits than kMaxRingSplit), and the streaming kernel runs.
// stages, words: the ring's stages a warp (2, 3 or 4) and words a stage (4 or 8; 3 or 4 stages of 8 at m = 1
// only); automatic: also false where the table would need more than 16 splits (the automatic choice takes the
// streaming kernel), and 3 stages of 8 words at m = 1 where a warp's share of a split is kDeepRingWords or more.
bool plan_ring(StreamPlan& p, bool bf16, int m, int n, int k, int s, int ksplit_request, int stages, int words,
               bool automatic);
cudaError_t launch_ring(bool bf16, const StreamArgs& a, const StreamPlan& p, cudaStream_t stream);

}  // namespace ptq161
}  // namespace lpq
