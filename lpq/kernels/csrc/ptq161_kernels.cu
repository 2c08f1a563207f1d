// lpq: GEMV kernels for the ptq161 format (4-bit salient input channels + binarized rest), batch m <= 16.
//
// Layout read (lpq/formats/ptq161.py has the full description; N = out_features, K = in_features,
// S salient channels, B = K - S binarized channels, both in increasing channel order):
//   qw   uint32 [B/32, N]  sign bits, bit j of word w = binarized channel 32w + j (1 = +1, 0 = -1)
//   sw   uint32 [S/8, N]   4-bit codes, code j of word w = salient channel 8w + j, at bits 4j..4j+3
//   bin_idx / sal_idx int32 [B] / [S]: the input channel of each binarized / salient position
//   colscale float [B]: per-column binarization scale (folded into x here)
//
// y[t, n] = sscale[n] * (sum_j code[j, n] x_S[t, j] - szero[n] * sum_j x_S[t, j])
//         + bscale[n] * sum_j sign[j, n] * colscale[j] * x_B[t, j] + mu[n] * sum_j x_B[t, j] + bias[n]
//
// Main kernel: one thread per output row (consecutive threads read consecutive words: coalesced), a
// block of 256 rows works on one K tile (512 binarized or 128 salient channels) and adds its partial
// sums to fp32 accumulators with atomics (split-K over blockIdx.y). The binarized dot product uses a
// lookup table in shared memory: for every nibble of 4 channels and every token, the 16 possible
// signed sums +-x0 +-x1 +-x2 +-x3; a thread then needs one table read and one add per 4 weights. All
// threads of a warp read the same nibble's 16 entries at once, so the reads never conflict on banks.
// The epilogue kernel applies the per-row scales, zero points, means and bias.
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "ptq161_launch.h"

namespace lpq {
namespace ptq161 {

constexpr int kThreads = 256;   // rows per block
constexpr int kBinWords = 16;   // words of 32 binarized channels per tile (512 channels)
constexpr int kBinChannels = kBinWords * 32;
constexpr int kNibbles = kBinChannels / 4;  // 128 table groups per token
constexpr int kSalWords = 16;   // words of 8 salient channels per tile (128 channels)
constexpr int kSalChannels = kSalWords * 8;

__device__ __forceinline__ float to_float(const __half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(const __nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void from_float(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void from_float(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// Sum over the block's first `cnt` gathered inputs of token t (one warp per token), added to *out.
template <typename T>
__device__ __forceinline__ void add_input_sum(const T* __restrict__ xrow, const int* __restrict__ idx, int cnt,
                                              float* out) {
  const int lane = threadIdx.x & 31;
  float s = 0.f;
  for (int c = lane; c < cnt; c += 32) s += to_float(xrow[idx[c]]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (lane == 0) atomicAdd(out, s);
}

template <typename T, int MT>
__global__ void __launch_bounds__(kThreads) gemv_kernel(GemvArgs a) {
  extern __shared__ float smem[];
  const int t0 = blockIdx.z * MT;
  const int mt = min(MT, a.m - t0);
  const int n = blockIdx.x * kThreads + threadIdx.x;
  const int warp = threadIdx.x >> 5;
  const T* __restrict__ x = reinterpret_cast<const T*>(a.x);
  float acc[MT];
#pragma unroll
  for (int t = 0; t < MT; ++t) acc[t] = 0.f;

  if (blockIdx.y < a.bin_tiles) {
    // ---- binarized tile: channels [c0, c0 + cnt) of the binarized run -------------------------------
    const int c0 = blockIdx.y * kBinChannels;
    const int cnt = min(kBinChannels, a.b - c0);  // a multiple of 32
    const int words = cnt >> 5;
    float* xs = smem;                        // [MT][512] colscale * x of the gathered channels
    float* tab = smem + MT * kBinChannels;   // [MT][128][16] signed nibble sums
    // issue the weight loads first: they are independent of the shared-memory work below
    uint32_t w[kBinWords];
#pragma unroll
    for (int i = 0; i < kBinWords; ++i)
      w[i] = (n < a.n && i < words) ? __ldg(a.qw + (size_t)((c0 >> 5) + i) * a.n + n) : 0u;
    for (int e = threadIdx.x; e < MT * kBinChannels; e += kThreads) {
      const int t = e / kBinChannels, c = e % kBinChannels;
      float v = 0.f;
      if (t < mt && c < cnt) v = to_float(x[(size_t)(t0 + t) * a.k + a.bin_idx[c0 + c]]) * a.colscale[c0 + c];
      xs[e] = v;
    }
    if (blockIdx.x == 0) {  // sum of the unscaled inputs, for the mean term
      for (int t = warp; t < mt; t += kThreads / 32)
        add_input_sum(x + (size_t)(t0 + t) * a.k, a.bin_idx + c0, cnt, a.sums + (size_t)a.m + t0 + t);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < MT * kNibbles * 16; e += kThreads) {
      const int t = e / (kNibbles * 16), g = (e >> 4) % kNibbles, v = e & 15;
      const float* q = xs + t * kBinChannels + 4 * g;
      tab[e] = ((v & 1) ? q[0] : -q[0]) + ((v & 2) ? q[1] : -q[1]) + ((v & 4) ? q[2] : -q[2]) +
               ((v & 8) ? q[3] : -q[3]);
    }
    __syncthreads();
    if (n < a.n) {
#pragma unroll
      for (int i = 0; i < kBinWords; ++i) {
        if (i < words) {
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const int v = (w[i] >> (4 * j)) & 15;
            const int g = i * 8 + j;
#pragma unroll
            for (int t = 0; t < MT; ++t) acc[t] += tab[(t * kNibbles + g) * 16 + v];
          }
        }
      }
#pragma unroll
      for (int t = 0; t < MT; ++t)
        if (t < mt) atomicAdd(a.acc + ((size_t)a.m + t0 + t) * a.n + n, acc[t]);
    }
  } else {
    // ---- salient tile: channels [c0, c0 + cnt) of the salient run ------------------------------------
    const int c0 = (blockIdx.y - a.bin_tiles) * kSalChannels;
    const int cnt = min(kSalChannels, a.s - c0);  // a multiple of 8
    const int words = cnt >> 3;
    float* xs = smem;  // [MT][128]
    uint32_t w[kSalWords];
#pragma unroll
    for (int i = 0; i < kSalWords; ++i)
      w[i] = (n < a.n && i < words) ? __ldg(a.sw + (size_t)((c0 >> 3) + i) * a.n + n) : 0u;
    for (int e = threadIdx.x; e < MT * kSalChannels; e += kThreads) {
      const int t = e / kSalChannels, c = e % kSalChannels;
      xs[e] = (t < mt && c < cnt) ? to_float(x[(size_t)(t0 + t) * a.k + a.sal_idx[c0 + c]]) : 0.f;
    }
    if (blockIdx.x == 0) {
      for (int t = warp; t < mt; t += kThreads / 32)
        add_input_sum(x + (size_t)(t0 + t) * a.k, a.sal_idx + c0, cnt, a.sums + t0 + t);
    }
    __syncthreads();
    if (n < a.n) {
#pragma unroll
      for (int i = 0; i < kSalWords; ++i) {
        if (i < words) {
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            // code -> float exactly: the integer in the low mantissa bits of 2^23, minus 2^23
            const float q = __int_as_float(0x4B000000 | ((w[i] >> (4 * j)) & 15)) - 8388608.f;
#pragma unroll
            for (int t = 0; t < MT; ++t) acc[t] = fmaf(q, xs[t * kSalChannels + i * 8 + j], acc[t]);
          }
        }
      }
#pragma unroll
      for (int t = 0; t < MT; ++t)
        if (t < mt) atomicAdd(a.acc + (size_t)(t0 + t) * a.n + n, acc[t]);
    }
  }
}

template <typename T>
__global__ void epilogue_kernel(EpilogueArgs a) {
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (size_t)a.m * a.n) return;
  const int t = (int)(i / a.n), n = (int)(i % a.n);
  const float acc_s = a.acc[i], acc_b = a.acc[(size_t)a.m * a.n + i];
  float y = a.sscale[n] * (acc_s - a.szero[n] * a.sums[t]) + a.bscale[n] * acc_b + a.mu[n] * a.sums[a.m + t];
  if (a.bias) y += to_float(reinterpret_cast<const T*>(a.bias)[n]);
  from_float(reinterpret_cast<T*>(a.y) + i, y);
}

template <typename T, int MT>
static cudaError_t launch_mt(const GemvArgs& a, cudaStream_t stream) {
  const size_t smem = (size_t)MT * (kBinChannels + kNibbles * 16) * sizeof(float);
  cudaError_t err = cudaFuncSetAttribute(gemv_kernel<T, MT>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  const int sal_tiles = (a.s + kSalChannels - 1) / kSalChannels;
  dim3 grid((a.n + kThreads - 1) / kThreads, a.bin_tiles + sal_tiles, (a.m + MT - 1) / MT);
  if (grid.y == 0) return cudaSuccess;
  gemv_kernel<T, MT><<<grid, kThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
static cudaError_t launch_typed(const GemvArgs& a, const EpilogueArgs& e, cudaStream_t stream) {
  cudaError_t err;
  if (a.m == 1) err = launch_mt<T, 1>(a, stream);
  else if (a.m == 2) err = launch_mt<T, 2>(a, stream);
  else if (a.m <= 4) err = launch_mt<T, 4>(a, stream);
  else err = launch_mt<T, 8>(a, stream);
  if (err != cudaSuccess) return err;
  const size_t total = (size_t)a.m * a.n;
  epilogue_kernel<T><<<(unsigned)((total + 255) / 256), 256, 0, stream>>>(e);
  return cudaGetLastError();
}

cudaError_t launch_gemv(bool bf16, GemvArgs a, const EpilogueArgs& e, cudaStream_t stream) {
  a.bin_tiles = (a.b + kBinChannels - 1) / kBinChannels;
  return bf16 ? launch_typed<__nv_bfloat16>(a, e, stream) : launch_typed<__half>(a, e, stream);
}

}  // namespace ptq161
}  // namespace lpq
