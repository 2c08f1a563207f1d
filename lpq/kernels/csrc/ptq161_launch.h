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

}  // namespace ptq161
}  // namespace lpq
