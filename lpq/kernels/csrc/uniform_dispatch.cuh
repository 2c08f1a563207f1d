// lpq: per-bit-width instantiation of the uniform kernels (included by uniform_b<bits>.cu).
#pragma once
#include "uniform_kernels.cuh"
#include "uniform_launch.h"

namespace lpq {

template <int BITS> constexpr int steps_chunks() { return BITS == 2 ? 4 : (BITS == 8 ? 1 : 2); }

template <int BITS, typename T, int S, int MT, int NT, int CPS>
cudaError_t launch_gemm_cfg(const GemmArgs& a, int nwarps, cudaStream_t stream) {
  dim3 grid(a.n_tiles / NT, (a.M + MT * 8 - 1) / (MT * 8));
  size_t smem = (size_t)nwarps * NT * MT * 4 * 32 * sizeof(float) + norm_partial_bytes(a, nwarps);
  uniform_gemm_kernel<BITS, T, S, MT, NT, CPS><<<grid, nwarps * 32, smem, stream>>>(a);
  return cudaGetLastError();
}

// v3 (cp.async ring) launch. The ring's shared memory per block is nwarps * STAGES * stage bytes;
// warps are halved until it fits (and the reduction buffer always fits).
template <int BITS, typename T, int S, int MT, int NT, int STAGES>
cudaError_t launch_gemm_cp_cfg(const GemmArgs& a, int nwarps, cudaStream_t stream, bool pdl = false) {
  using Geo = StageGeom<BITS, S, MT, NT>;
  const int xrows = a.M < MT * 8 ? a.M : MT * 8;
  const size_t stage_bytes = (size_t)Geo::words(xrows) * 4;
  constexpr size_t kMaxSmem = 200 * 1024;
  while (nwarps > 1 && (size_t)nwarps * STAGES * stage_bytes > kMaxSmem) nwarps /= 2;
  size_t smem = (size_t)nwarps * STAGES * stage_bytes;
  const size_t red = (size_t)nwarps * NT * MT * 4 * 32 * sizeof(float);
  if (red > smem) smem = red;
  smem += norm_partial_bytes(a, nwarps);  // after the ring and the reduction buffer (uniform_gemm_cp_kernel)
  auto kern = uniform_gemm_cp_kernel<BITS, T, S, MT, NT, STAGES>;
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
  }
  dim3 grid(a.n_tiles / NT, (a.M + MT * 8 - 1) / (MT * 8));
  // with PDL: the blocks request their first stage's weights, then wait for the previous kernel (uniform_gemm_cp_kernel)
  if (pdl && device_has_pdl()) return launch_with_pdl(kern, grid, dim3(nwarps * 32), smem, stream, a, xrows);
  kern<<<grid, nwarps * 32, smem, stream>>>(a, xrows);
  return cudaGetLastError();
}

// v4/v5 launch (m <= 8; KC = 2 chunks per stage). The group of a fold is umulhi(kf, gmagic), exact
// while K * gs < 2^32 (gmagic = 0 when one group spans K): kc_groups_exact() says whether it applies.
inline bool kc_groups_exact(const GemmArgs& a) {
  return a.gs >= a.K || (unsigned long long)a.K * (unsigned long long)a.gs < (1ull << 32);
}
// Ring slots a warp of the v4/v5 kernel needs: its stages are chunk pairs warp, warp + nwarps, ..., so
// the busiest warp has ceil(pairs / nwarps); a ring deeper than that is shared memory never used
// (11008x4096, 8 warps: 16 pairs -> 2 stages per warp against a 3-deep W4 ring).
inline int kc_ring_slots(int stages, int chunks, int nwarps) {
  const int pairs = (chunks + 1) / 2;
  const int busiest = (pairs + nwarps - 1) / nwarps;
  return busiest < 1 ? 1 : (busiest < stages ? busiest : stages);
}
template <int BITS, typename T, int S, int NT, int STAGES, int XR>
cudaError_t launch_gemm_kc_xr(const GemmArgs& a, int nwarps, bool pdl, cudaStream_t stream) {
  constexpr int KC = 2;
  using Geo = StageGeomKC<BITS, S, NT, KC>;
  const uint32_t gmagic = a.gs >= a.K ? 0u : 0xFFFFFFFFu / (uint32_t)a.gs + 1u;
  const int xrows = XR == 1 ? 1 : (a.M < 8 ? a.M : 8);
  const size_t stage_bytes = (size_t)Geo::words(xrows) * 4;
  constexpr size_t kMaxSmem = 200 * 1024;
  while (nwarps > 1 && (size_t)nwarps * kc_ring_slots(STAGES, a.chunks, nwarps) * stage_bytes > kMaxSmem) nwarps /= 2;
  const int slots = kc_ring_slots(STAGES, a.chunks, nwarps);
  size_t smem = (size_t)nwarps * slots * stage_bytes;
  const size_t red = (size_t)nwarps * NT * 4 * 32 * sizeof(float);
  if (red > smem) smem = red;
  smem += norm_partial_bytes(a, nwarps);  // after the ring and the reduction buffer (uniform_gemm_kc_kernel)
  // then the operands the one-token kernel stages for its epilogue (uniform_launch.h), placed after the rms partials'
  // room, which a layer with a residual and no norm has as well
  if (XR == 1) {
    if (a.residual && !has_norm(a)) smem += (size_t)nwarps * kNormRows * sizeof(float);
    smem += (size_t)staged_norm_bytes(a) + staged_residual_bytes(a, NT);
  }
  auto kern = uniform_gemm_kc_kernel<BITS, T, S, NT, KC, STAGES, XR>;
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
  }
  dim3 grid(a.n_tiles / NT, (a.M + 7) / 8);
  if (pdl && device_has_pdl()) {
    // launched with programmatic stream serialization: its blocks may be scheduled while the previous
    // kernel in the stream finishes; they request their weights, then wait for it (griddepcontrol.wait)
    // before they read anything it may write (uniform_gemm_kc_kernel)
    return launch_with_pdl(kern, grid, dim3(nwarps * 32), smem, stream, a, xrows, gmagic, slots);
  }
  kern<<<grid, nwarps * 32, smem, stream>>>(a, xrows, gmagic, slots);
  return cudaGetLastError();
}
// m = 1: the one-row kernel (XR = 1); m = 2..8: up to 8 rows (XR = 8).
// Ring depth (stages of two chunks) of v4/v5: 2 at every m <= 8. The smaller ring fits more blocks an
// SM, and a warp is bound by its own instruction latency rather than by loads in flight. The depths
// before (W2 5, W3 4, W4 3) lost at m = 1 on every shape with K >= 8192 (round 8) and at m = 4 on
// every shape (round 9, bench/RESULTS.md); with K = 4096 the ring was already trimmed to 2.
template <int BITS> constexpr int ring_kc() { return 2; }

template <int BITS, typename T, int S, int NT, int STAGES>
cudaError_t launch_gemm_kc_cfg(const GemmArgs& a, int nwarps, bool pdl, cudaStream_t stream) {
  return a.M == 1 ? launch_gemm_kc_xr<BITS, T, S, NT, STAGES, 1>(a, nwarps, pdl, stream)
                  : launch_gemm_kc_xr<BITS, T, S, NT, STAGES, 8>(a, nwarps, pdl, stream);
}

// Ring depth of the m <= 8 kernel: enough chunks in flight per warp for the bytes of a chunk
// (2-bit chunks are 512 bytes, 8-bit 2 KB). variant 2: deeper rings (benchmarks).
template <int BITS> constexpr int ring_m8() { return BITS == 2 ? 8 : (BITS == 3 ? 6 : (BITS == 4 ? 5 : 3)); }
template <int BITS> constexpr int ring_m8_deep() { return BITS == 2 ? 12 : (BITS == 3 ? 10 : (BITS == 4 ? 8 : 5)); }

// variant 0: v3 cp.async ring kernel (default); 1: the v2 register-prefetch kernel; 2: v3 with
// deeper rings at m <= 8; 3: v3 with two n-tiles per warp at m <= 8 (the per-chunk copy, activation
// and scale work shared by 32 output rows instead of 16); 4: two n-tiles and two chunks per ring stage
// at m <= 8 (uniform_gemm_kc_kernel); 5: one n-tile and two chunks per stage at m <= 8. Above m = 8,
// variants 2-5 run variant 0.
// variant | kVariantPDL (variants 4 and 5 at m <= 8, variant 0 at m = 9..16): launched with programmatic dependent
// launch on sm_90+.
template <int BITS, typename T, int S>
cudaError_t launch_gemm_s(const GemmArgs& a, int nwarps, int variant_flags, cudaStream_t stream) {
  const bool pdl = (variant_flags & kVariantPDL) != 0;
  const int variant = variant_flags & ~kVariantPDL;
  if (variant == 1) {
    if (a.M <= 8) return launch_gemm_cfg<BITS, T, S, 1, 1, steps_chunks<BITS>()>(a, nwarps, stream);
    if (a.M <= 16) return launch_gemm_cfg<BITS, T, S, 2, 2, 1>(a, nwarps, stream);
    return launch_gemm_cfg<BITS, T, S, 4, 2, 1>(a, nwarps, stream);
  }
  if (a.M <= 8) {
    if (variant == 2) return launch_gemm_cp_cfg<BITS, T, S, 1, 1, ring_m8_deep<BITS>()>(a, nwarps, stream);
    if (variant == 3) return launch_gemm_cp_cfg<BITS, T, S, 1, 2, ring_m8<BITS>()>(a, nwarps, stream);
    // K * gs >= 2^32 (not exact for umulhi): the one-chunk kernel with the same n-tiles per warp
    if (variant == 4) {
      return kc_groups_exact(a) ? launch_gemm_kc_cfg<BITS, T, S, 2, ring_kc<BITS>()>(a, nwarps, pdl, stream)
                                : launch_gemm_cp_cfg<BITS, T, S, 1, 2, ring_m8<BITS>()>(a, nwarps, stream);
    }
    if (variant == 5) {
      return kc_groups_exact(a) ? launch_gemm_kc_cfg<BITS, T, S, 1, ring_kc<BITS>()>(a, nwarps, pdl, stream)
                                : launch_gemm_cp_cfg<BITS, T, S, 1, 1, ring_m8<BITS>()>(a, nwarps, stream);
    }
  }
  // 9 <= m <= 16 on 2- to 4-bit layers with >= 8192 outputs: a 2-stage ring (more blocks an SM; round 9,
  // bench/RESULTS.md); with fewer outputs (few blocks) 3 stages keep more chunks in flight
  // (variant 0 | kVariantPDL: launched with programmatic dependent launch, up to m = 16)
  if (a.M <= 16 && a.M > 8 && a.N >= 8192 && BITS <= 4) return launch_gemm_cp_cfg<BITS, T, S, 2, 2, 2>(a, nwarps, stream, pdl);
  if (a.M <= 16) return launch_gemm_cp_cfg<BITS, T, S, 2, 2, 3>(a, nwarps, stream, pdl);
  return launch_gemm_cp_cfg<BITS, T, S, 4, 2, 2>(a, nwarps, stream);
}

template <int BITS, typename T>
cudaError_t launch_gemm_t(int fold, const GemmArgs& a, int nwarps, int variant, cudaStream_t stream) {
  switch (fold) {
    case 32: return launch_gemm_s<BITS, T, 32>(a, nwarps, variant, stream);
    case 64: return launch_gemm_s<BITS, T, 64>(a, nwarps, variant, stream);
    case 128: return launch_gemm_s<BITS, T, 128>(a, nwarps, variant, stream);
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
cudaError_t launch_gemm_bits(bool bf16, int fold, const GemmArgs& a, int nwarps, int variant, cudaStream_t stream) {
  return bf16 ? launch_gemm_t<BITS, __nv_bfloat16>(fold, a, nwarps, variant, stream)
              : launch_gemm_t<BITS, __half>(fold, a, nwarps, variant, stream);
}
template <int BITS>
cudaError_t launch_dequant_bits(bool bf16, int fold, const DequantArgs& a, cudaStream_t stream) {
  return bf16 ? launch_dequant_t<BITS, __nv_bfloat16>(fold, a, stream) : launch_dequant_t<BITS, __half>(fold, a, stream);
}

}  // namespace lpq
