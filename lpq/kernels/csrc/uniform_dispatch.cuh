// lpq: per-bit-width instantiation of the uniform kernels (included by uniform_b<bits>.cu).
#pragma once
#include "uniform_kernels.cuh"
#include "uniform_launch.h"

namespace lpq {

template <int BITS> constexpr int steps_chunks() { return BITS == 2 ? 4 : (BITS == 8 ? 1 : 2); }

template <int BITS, typename T, int S, int MT, int NT, int CPS>
cudaError_t launch_gemm_cfg(const GemmArgs& a, int nwarps, cudaStream_t stream) {
  dim3 grid(a.n_tiles / NT, (a.M + MT * 8 - 1) / (MT * 8));
  size_t smem = (size_t)nwarps * NT * MT * 4 * 32 * sizeof(float);
  uniform_gemm_kernel<BITS, T, S, MT, NT, CPS><<<grid, nwarps * 32, smem, stream>>>(a);
  return cudaGetLastError();
}

template <int BITS, typename T, int S>
cudaError_t launch_gemm_s(const GemmArgs& a, int nwarps, cudaStream_t stream) {
  if (a.M <= 8) return launch_gemm_cfg<BITS, T, S, 1, 1, steps_chunks<BITS>()>(a, nwarps, stream);
  if (a.M <= 16) return launch_gemm_cfg<BITS, T, S, 2, 2, 1>(a, nwarps, stream);
  return launch_gemm_cfg<BITS, T, S, 4, 2, 1>(a, nwarps, stream);
}

template <int BITS, typename T>
cudaError_t launch_gemm_t(int fold, const GemmArgs& a, int nwarps, cudaStream_t stream) {
  switch (fold) {
    case 32: return launch_gemm_s<BITS, T, 32>(a, nwarps, stream);
    case 64: return launch_gemm_s<BITS, T, 64>(a, nwarps, stream);
    case 128: return launch_gemm_s<BITS, T, 128>(a, nwarps, stream);
  }
  return cudaErrorInvalidValue;
}

template <int BITS, typename T>
cudaError_t launch_dequant_t(int fold, const DequantArgs& a, cudaStream_t stream) {
  const int warps = 8;
  const int total = a.n_tiles * a.chunks;
  dim3 grid((total + warps - 1) / warps);
  switch (fold) {
    case 32: uniform_dequant_kernel<BITS, T, 32><<<grid, warps * 32, 0, stream>>>(a); break;
    case 64: uniform_dequant_kernel<BITS, T, 64><<<grid, warps * 32, 0, stream>>>(a); break;
    case 128: uniform_dequant_kernel<BITS, T, 128><<<grid, warps * 32, 0, stream>>>(a); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <int BITS>
cudaError_t launch_gemm_bits(bool bf16, int fold, const GemmArgs& a, int nwarps, cudaStream_t stream) {
  return bf16 ? launch_gemm_t<BITS, __nv_bfloat16>(fold, a, nwarps, stream)
              : launch_gemm_t<BITS, __half>(fold, a, nwarps, stream);
}
template <int BITS>
cudaError_t launch_dequant_bits(bool bf16, int fold, const DequantArgs& a, cudaStream_t stream) {
  return bf16 ? launch_dequant_t<BITS, __nv_bfloat16>(fold, a, stream) : launch_dequant_t<BITS, __half>(fold, a, stream);
}

}  // namespace lpq
