// lpq: LUT dequantize-GEMM kernels for the `squeezellm` packed format (per-row codebooks + sparse part).
//
// Torch-free, so that it compiles with plain nvcc (the binding is squeezellm_binding.cpp).
//
// Why this design
// ---------------
// At batch 1 the layer is bound by the bytes of its indices (3 bits a weight), so the decode of an
// index into its row's codebook value must cost about one instruction per weight. Each lane keeps the
// codebooks of its two rows in registers, split into a table of low bytes and a table of high bytes,
// and looks up FOUR weights with one byte permute (prmt: four 3-bit selectors pick four bytes out of
// eight) per table; two more permutes interleave low and high bytes into two fp16/bf16 pairs. The
// pairs are the A fragments of mma.m16n8k16 (rows = output features, columns = in features), the
// activations are the B fragment (tokens = the mma's n, 8 per tile), products accumulate in fp32.
//
// Repacked layout (built by lpq/kernels/squeezellm_cuda.py at prepare time)
// -------------------------------------------------------------------------
// W [N, K] is cut into n-tiles of 16 rows and chunks of 128 columns (both zero-padded). Lane
// (g = lane / 4, t = lane % 4) of the warp that owns (n-tile, chunk) holds rows g and g + 8, columns
// 32 t .. 32 t + 31 of the chunk; k-tile jj (0..7) of the mma uses columns 32 t + 4 jj + {0, 1, 2, 3}:
//   A register 0: row g, columns 4jj+{0,1}; 1: row g+8, 4jj+{0,1}; 2: row g, 4jj+{2,3}; 3: row g+8, 4jj+{2,3}
// and the B fragment of the lane is x[token g][32 t + 4 jj + {0, 1}], x[token g][32 t + 4 jj + {2, 3}], so
// every lane reads 32 consecutive activations per chunk with 16-byte loads (the k order inside the
// mma is a permutation of the true order; A and B agree).
//
// Indices of one row in one chunk (32 of them, v[jj][e] = index of column 32 t + 4 jj + e), BITS words:
//   4 bits: word q (0..3) serves jj = 2q (nibbles 0..3) and 2q+1 (nibbles 4..7): nibble low 3 bits =
//           index & 7; bit 3 of v[2q][e] at bit 8e+7, of v[2q+1][e] at bit 8e+3 (the nibbles' top bits).
//   3 bits: word r (0..2) serves jj = 2r (nibbles 0..3) and 2r+1 (nibbles 4..7), low 3 bits of the
//           nibbles; jj = 6, 7 (j = 4 (jj - 6) + e, 0..7): bit b of v[jj][e] at bit 4j+3 of word b.
//   2 bits: word q (0..1) serves jj = 4q + s: s = 0: bits 4e+{0,1}; 1: 16+4e; 2: 4e+2; 3: 16+4e+2.
// Lane words: row g's BITS words, then row g+8's. One chunk of one n-tile is 32 lanes * 2 * BITS
// words, stored as 16-byte segments [seg][lane][4 words]; for 3 bits words 4..5 form a [lane][2] tail.
//
// Codebook of a row in table words (T bit patterns; entry i = lo byte | hi byte << 8):
//   [lo bytes of entries 0..3, 4..7, ...][hi bytes of entries 0..3, 4..7, ...]  (2**BITS / 2 words)
// Sparse part: row pointers sp_ptr [n_tiles * 16 + 1] and entries sp_e (row-major), 4 bytes each: the
// column in the low 16 bits (so K <= 65536), and in the high 16 the fp16 correction v = exact value -
// codebook value at that position (the dense product covered the whole row). The entries of a 16-row
// tile are added in the block that owns the tile: by the ring kernel a warp per row (lanes split the
// entries, shuffles add them); by lut_gemm_kernel spread evenly over the block's threads through a
// shared-memory accumulator.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>
#include <utility>

#include "async_copy.cuh"
#include "squeezellm_launch.h"

namespace lpq {
namespace lut {

template <int I, int N, typename F>
__device__ __forceinline__ void static_for(F&& f) {
  if constexpr (I < N) {
    f(std::integral_constant<int, I>());
    static_for<I + 1, N>(f);
  }
}

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <int BITS> struct Geo {
  static constexpr int WPL = 2 * BITS;          // index words per lane per chunk (2 rows x 32 indices)
  static constexpr int TW = (1 << BITS) / 2;    // table words per row
  static constexpr int SEGS = BITS == 3 ? 1 : WPL / 4;
  static constexpr bool TAIL = BITS == 3;
  static constexpr int CHUNK_WORDS = 32 * WPL;
};

// Byte j of the result = 0xFF if bit 8j+7 of a is set, else 0 (prmt's sign-replicate selectors).
__device__ __forceinline__ uint32_t sign_bytes(uint32_t a) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %1, %2;" : "=r"(d) : "r"(a), "n"(0xBA98));
  return d;
}

// A sparse entry (LutGemmArgs::sp_e): its column in the low 16 bits, its correction (exact value minus the
// codebook value the dense product used there) as fp16 bits in the high 16.
__device__ __forceinline__ int sp_col(uint32_t e) { return (int)(e & 0xFFFFu); }
__device__ __forceinline__ float sp_val(uint32_t e) { return __half2float(__ushort_as_half((unsigned short)(e >> 16))); }

// __byte_perm uses the low 3 bits of each of the 4 low nibbles of s (documented; the upper bits are ignored).
__device__ __forceinline__ uint32_t bperm(uint32_t a, uint32_t b, uint32_t s) { return __byte_perm(a, b, s); }

// prmt as the hardware does it: the 4 low nibbles of s select, and a nibble's bit 3 replicates the sign of
// the byte it selects. __byte_perm must clear those bits first (one LOP3 before every lookup); the decode
// below clears a whole code word once (masked(), both halves) and feeds the halves here.
__device__ __forceinline__ uint32_t prmt_raw(uint32_t a, uint32_t b, uint32_t s) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(s));
  return d;
}
__device__ __forceinline__ uint32_t masked(uint32_t w) { return w & 0x77777777u; }

// Four weights whose indices' low bits are the 4 low nibbles of s -> (w0, w1), (w2, w3) as T pairs.
// m (4 bits only): byte j = 0xFF where weight j's index has bit 3 set.
template <int BITS>
__device__ __forceinline__ void lookup4(const uint32_t (&tb)[Geo<BITS>::TW], uint32_t s, uint32_t m, uint32_t& u0,
                                        uint32_t& u1) {
  // s: selectors with bit 3 of each of the 4 low nibbles clear (prmt_raw)
  uint32_t lo, hi;
  if constexpr (BITS == 2) {
    lo = prmt_raw(tb[0], tb[1], s);           // nibbles 0..3 -> low bytes (word 0)
    hi = prmt_raw(tb[0], tb[1], s | 0x4444u);  // nibbles 4..7 -> high bytes (word 1)
  } else if constexpr (BITS == 3) {
    lo = prmt_raw(tb[0], tb[1], s);
    hi = prmt_raw(tb[2], tb[3], s);
  } else {
    const uint32_t la = prmt_raw(tb[0], tb[1], s), lb = prmt_raw(tb[2], tb[3], s);
    const uint32_t ha = prmt_raw(tb[4], tb[5], s), hb = prmt_raw(tb[6], tb[7], s);
    lo = (la & ~m) | (lb & m);
    hi = (ha & ~m) | (hb & m);
  }
  u0 = bperm(lo, hi, 0x5140u);  // lo0 hi0 lo1 hi1
  u1 = bperm(lo, hi, 0x7362u);  // lo2 hi2 lo3 hi3
}

// 3 bits: the indices of jj = 6, 7 gathered from the top bits of the nibbles of words 0..2.
__device__ __forceinline__ uint32_t gather3(uint32_t w0, uint32_t w1, uint32_t w2) {
  return ((w0 >> 3) & 0x11111111u) | ((w1 >> 2) & 0x22222222u) | ((w2 >> 1) & 0x44444444u);
}

// A-fragment pair (u0: columns 4jj+{0,1}, u1: 4jj+{2,3}) of k-tile JJ of the row whose words start at OFF.
// wm: the code words masked() (3 and 4 bits: selectors; 4 bits reads the top index bit from w).
template <int BITS, int JJ, int OFF>
__device__ __forceinline__ void decode_jj(const uint32_t (&w)[Geo<BITS>::WPL], const uint32_t (&wm)[Geo<BITS>::WPL],
                                          uint32_t x3, const uint32_t (&tb)[Geo<BITS>::TW], uint32_t& u0, uint32_t& u1) {
  if constexpr (BITS == 3) {
    const uint32_t src = JJ < 6 ? wm[OFF + JJ / 2] : x3;  // x3's nibbles have bit 3 clear
    lookup4<3>(tb, (JJ & 1) ? (src >> 16) : src, 0u, u0, u1);
  } else if constexpr (BITS == 4) {
    const uint32_t p = w[OFF + JJ / 2];
    const uint32_t m = (JJ & 1) ? sign_bytes(p << 4) : sign_bytes(p);
    lookup4<4>(tb, (JJ & 1) ? (wm[OFF + JJ / 2] >> 16) : wm[OFF + JJ / 2], m, u0, u1);
  } else {
    constexpr int SH = ((JJ & 1) ? 16 : 0) + ((JJ & 2) ? 2 : 0);
    lookup4<2>(tb, (w[OFF + JJ / 4] >> SH) & 0x3333u, 0u, u0, u1);
  }
}

// the code words with bit 3 of every nibble cleared, once a chunk (2 bits: unused, its selectors are masked
// per k-tile with 0x3333)
template <int BITS>
__device__ __forceinline__ void mask_codes(const uint32_t (&w)[Geo<BITS>::WPL], uint32_t (&wm)[Geo<BITS>::WPL]) {
#pragma unroll
  for (int i = 0; i < Geo<BITS>::WPL; ++i) wm[i] = BITS == 2 ? 0u : masked(w[i]);
}

template <int BITS>
__device__ __forceinline__ void load_codes(uint32_t (&w)[Geo<BITS>::WPL], const uint32_t* __restrict__ base, int lane) {
  using G = Geo<BITS>;
#pragma unroll
  for (int s = 0; s < G::SEGS; ++s) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(base + s * 128 + lane * 4));
    w[4 * s + 0] = v.x; w[4 * s + 1] = v.y; w[4 * s + 2] = v.z; w[4 * s + 3] = v.w;
  }
  if constexpr (G::TAIL) {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(base + 128 + lane * 2));
    w[4] = v.x; w[5] = v.y;
  }
}

template <int BITS>
__device__ __forceinline__ void load_table(uint32_t (&tb)[Geo<BITS>::TW], const uint32_t* __restrict__ src) {
  if constexpr (Geo<BITS>::TW == 2) {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(src));
    tb[0] = v.x; tb[1] = v.y;
  } else {
#pragma unroll
    for (int i = 0; i < Geo<BITS>::TW / 4; ++i) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(src) + i);
      tb[4 * i + 0] = v.x; tb[4 * i + 1] = v.y; tb[4 * i + 2] = v.z; tb[4 * i + 3] = v.w;
    }
  }
}

__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, __half) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, __nv_bfloat16) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// One chunk of one lane: decode both rows' 32 weights k-tile by k-tile and multiply with MT token tiles.
template <int BITS, typename T, int MT>
__device__ __forceinline__ void chunk_mma(const uint32_t (&w)[Geo<BITS>::WPL], const uint32_t (&tb0)[Geo<BITS>::TW],
                                          const uint32_t (&tb1)[Geo<BITS>::TW], const uint32_t (&xw)[MT][16],
                                          float (&acc)[MT][4]) {
  uint32_t x3a = 0, x3b = 0;
  if constexpr (BITS == 3) {
    x3a = gather3(w[0], w[1], w[2]);
    x3b = gather3(w[3], w[4], w[5]);
  }
  uint32_t wm[Geo<BITS>::WPL];
  mask_codes<BITS>(w, wm);
  static_for<0, 8>([&](auto jc) {
    constexpr int jj = decltype(jc)::value;
    uint32_t a[4];
    decode_jj<BITS, jj, 0>(w, wm, x3a, tb0, a[0], a[2]);     // row g
    decode_jj<BITS, jj, BITS>(w, wm, x3b, tb1, a[1], a[3]);  // row g + 8
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) mma16816(acc[mt], a, xw[mt][2 * jj], xw[mt][2 * jj + 1], T());
  });
}

// Fused LUT GEMM for small m. Block: one n-tile (16 output rows) x MT token tiles of 8; its `nwarps`
// warps split the chunks of K (warp w takes chunks w, w + nwarps, ...), U chunks per pipeline step,
// the codes of the next step loaded into registers while this one is decoded. The sparse entries of
// the tile are added by all threads of the block; partial sums are reduced through shared memory.
template <int BITS, typename T, int MT, int U>
__global__ void __launch_bounds__(256, 2) lut_gemm_kernel(LutGemmArgs p) {
  using G = Geo<BITS>;
  constexpr int WPL = G::WPL, TW = G::TW;
  constexpr int TOK = MT * 8;  // token rows of a block (<= 16)
  __shared__ float sp_acc[16 * 16];  // [row in tile][token in block]
  __shared__ int sp_rowp[17];        // the tile's row pointers
  extern __shared__ float red[];     // [nwarps][MT * 4][32]

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int nt = blockIdx.x;
  const int tok0 = blockIdx.y * TOK;
  const T* __restrict__ x = reinterpret_cast<const T*>(p.x);

  uint32_t tb0[TW], tb1[TW];
  load_table<BITS>(tb0, p.tab + (size_t)(nt * 16 + g) * TW);
  load_table<BITS>(tb1, p.tab + (size_t)(nt * 16 + g + 8) * TW);

  const T* xrow[MT];
  bool xval[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int tok = tok0 + mt * 8 + g;
    xval[mt] = tok < p.M;
    xrow[mt] = x + (size_t)(xval[mt] ? tok : 0) * p.K + 32 * t;
  }

  const int n_my = warp < p.chunks ? (p.chunks - warp + nwarps - 1) / nwarps : 0;
  const int nsteps = (n_my + U - 1) / U;
  const uint32_t* __restrict__ qbase = p.qw + (size_t)nt * p.chunks * G::CHUNK_WORDS;

  auto load_step = [&](int s, uint32_t (&w)[U][WPL]) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = s * U + u;
      if (i < n_my) load_codes<BITS>(w[u], qbase + (size_t)(warp + i * nwarps) * G::CHUNK_WORDS, lane);
    }
  };
  float acc[MT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[mt][e] = 0.f;
  auto compute_step = [&](int s, const uint32_t (&w)[U][WPL]) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = s * U + u;
      if (i >= n_my) break;
      const int k0 = (warp + i * nwarps) * 128;
      uint32_t xw[MT][16];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          uint4 q = make_uint4(0, 0, 0, 0);
          if (xval[mt] && k0 + 32 * t + 8 * v < p.K) q = __ldg(reinterpret_cast<const uint4*>(xrow[mt] + k0 + 8 * v));
          xw[mt][4 * v + 0] = q.x; xw[mt][4 * v + 1] = q.y; xw[mt][4 * v + 2] = q.z; xw[mt][4 * v + 3] = q.w;
        }
      chunk_mma<BITS, T, MT>(w[u], tb0, tb1, xw, acc);
    }
  };

  uint32_t wa[U][WPL], wb[U][WPL];
  if (nsteps > 0) load_step(0, wa);

  // sparse entries of this tile (the condition is uniform over the block: the barriers are safe)
  const bool sparse = p.sp_ptr != nullptr;
  const int rows_here = min(TOK, p.M - tok0);
  if (sparse) {
    for (int i = threadIdx.x; i < 16 * 16; i += blockDim.x) sp_acc[i] = 0.f;
    if (threadIdx.x < 17) sp_rowp[threadIdx.x] = p.sp_ptr[nt * 16 + threadIdx.x];
    __syncthreads();
    const int b = sp_rowp[0], e = sp_rowp[16];
    for (int j = b + threadIdx.x; j < e; j += blockDim.x) {
      const uint32_t en = __ldg(p.sp_e + j);
      const float v = sp_val(en);
      int r = 0;  // the entry's row within the tile, from the row pointers
      while (sp_rowp[r + 1] <= j) ++r;
      const T* xc = x + (size_t)tok0 * p.K + sp_col(en);
      for (int tk = 0; tk < rows_here; ++tk) atomicAdd(&sp_acc[r * 16 + tk], v * to_float(xc[(size_t)tk * p.K]));
    }
  }

  for (int s = 0; s < nsteps; s += 2) {
    if (s + 1 < nsteps) load_step(s + 1, wb);
    compute_step(s, wa);
    if (s + 1 >= nsteps) break;
    if (s + 2 < nsteps) load_step(s + 2, wa);
    compute_step(s + 1, wb);
  }

  constexpr int V = MT * 4;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int e = 0; e < 4; ++e) red[(warp * V + mt * 4 + e) * 32 + lane] = acc[mt][e];
  __syncthreads();
  T* __restrict__ y = reinterpret_cast<T*>(p.y);
  const T* __restrict__ bias = reinterpret_cast<const T*>(p.bias);
  for (int i = threadIdx.x; i < V * 32; i += blockDim.x) {
    float s = 0.f;
    for (int w2 = 0; w2 < nwarps; ++w2) s += red[w2 * V * 32 + i];
    const int ln = i & 31, v = i >> 5;
    const int e = v & 3, mt = v >> 2;
    const int r = (ln >> 2) + 8 * (e >> 1);
    const int tl = mt * 8 + 2 * (ln & 3) + (e & 1);
    const int n = nt * 16 + r, tok = tok0 + tl;
    if (n < p.N && tok < p.M) {
      if (sparse) s += sp_acc[r * 16 + tl];
      if (bias) s += to_float(bias[n]);
      y[(size_t)tok * p.N + n] = from_float<T>(s);
    }
  }
}

// Dense part of W [N, K] in T (the codebook values; the caller writes the sparse values after):
// one warp per (n-tile, chunk), each lane writing 32 consecutive values of rows g and g + 8.
template <int BITS, typename T>
__global__ void __launch_bounds__(256) lut_dequant_kernel(LutDequantArgs p) {
  using G = Geo<BITS>;
  constexpr int WPL = G::WPL, TW = G::TW;
  const int lane = threadIdx.x & 31;
  const int gw = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (gw >= p.n_tiles * p.chunks) return;
  const int nt = gw / p.chunks, chunk = gw % p.chunks;
  const int g = lane >> 2, t = lane & 3;
  uint32_t w[WPL], tb0[TW], tb1[TW];
  load_codes<BITS>(w, p.qw + (size_t)gw * G::CHUNK_WORDS, lane);
  load_table<BITS>(tb0, p.tab + (size_t)(nt * 16 + g) * TW);
  load_table<BITS>(tb1, p.tab + (size_t)(nt * 16 + g + 8) * TW);
  uint32_t x3a = 0, x3b = 0;
  if constexpr (BITS == 3) {
    x3a = gather3(w[0], w[1], w[2]);
    x3b = gather3(w[3], w[4], w[5]);
  }
  uint32_t r0[16], r1[16];  // rows g and g + 8, columns 32 t .. 32 t + 31 as T pairs
  uint32_t wm[WPL];
  mask_codes<BITS>(w, wm);
  static_for<0, 8>([&](auto jc) {
    constexpr int jj = decltype(jc)::value;
    decode_jj<BITS, jj, 0>(w, wm, x3a, tb0, r0[2 * jj], r0[2 * jj + 1]);
    decode_jj<BITS, jj, BITS>(w, wm, x3b, tb1, r1[2 * jj], r1[2 * jj + 1]);
  });
  T* __restrict__ out = reinterpret_cast<T*>(p.w);
  const int n0 = nt * 16 + g, n1 = n0 + 8;
#pragma unroll
  for (int v = 0; v < 4; ++v) {
    const int col = chunk * 128 + 32 * t + 8 * v;
    if (col >= p.K) break;
    if (n0 < p.N)
      *reinterpret_cast<uint4*>(out + (size_t)n0 * p.K + col) = make_uint4(r0[4 * v], r0[4 * v + 1], r0[4 * v + 2], r0[4 * v + 3]);
    if (n1 < p.N)
      *reinterpret_cast<uint4*>(out + (size_t)n1 * p.K + col) = make_uint4(r1[4 * v], r1[4 * v + 1], r1[4 * v + 2], r1[4 * v + 3]);
  }
}

// ---------------------------------------------------------------------------------------------
// Ring kernel (the default): the same decode and mma as lut_gemm_kernel, but every warp streams its
// chunk pairs through a private ring of shared-memory stages with cp.async, so that up to slots - 1
// pairs per warp are in flight while one is decoded (lut_gemm_kernel keeps one step in registers and
// reads the activations from global memory when it uses them). As in the uniform kernels' two-chunk
// ring: a stage is KC = 2 consecutive chunks of the block's n-tile (the pair p = 2 chunks; warp w
// takes pairs w, w + nwarps, ...), one copy issue, one wait and one ring rotation per 256 columns.
//
// Stage layout (32-bit words): codes [2][64 * BITS] (the two chunks as stored: a stage is one
// contiguous copy of 128 * BITS words, BITS 16-byte pieces per lane), then x [xrows][XS] (the pair's
// 256 activation columns of each token row, 16 bytes of padding per row).
//
// Padding needs no branch in the decode: columns of x at or past K are zero-filled by the copy, and
// the second chunk of a stage past the last chunk (odd chunk count) keeps whatever its slot held.
// The decode of any bit pattern is a codebook entry (finite), so those products are exact zeros.
//
// Tokens: blockIdx.x is the token tile (8 rows; XR = 1 for m = 1, else XR = 8 with the block's rows
// copied), blockIdx.y the n-tile, so that the token tiles of one n-tile run at the same time and the
// second reads the codes from L2.
//
// Sparse part: a warp per row, no atomics (see the kernel); the sums go through a shared [16 rows][8
// tokens] array into the final reduction.
__device__ __forceinline__ uint32_t ldg_volatile(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.global.nc.u32 %0, [%1];\n" : "=r"(v) : "l"(p));
  return v;
}

// one activation as float, by a volatile load (kept where it is written, like ldg_volatile)
__device__ __forceinline__ float ldg_act(const __half* p) {
  unsigned short v;
  asm volatile("ld.global.nc.u16 %0, [%1];\n" : "=h"(v) : "l"(p));
  return __half2float(__ushort_as_half(v));
}
__device__ __forceinline__ float ldg_act(const __nv_bfloat16* p) {
  unsigned short v;
  asm volatile("ld.global.nc.u16 %0, [%1];\n" : "=h"(v) : "l"(p));
  return __bfloat162float(__ushort_as_bfloat16(v));
}

template <int BITS> struct RingGeom {
  static constexpr int CHW = 64 * BITS;  // words of one chunk of one n-tile
  static constexpr int CW = 2 * CHW;     // code words of a stage
  static constexpr int XS = 128 + 4;     // words of one activation row of a stage (256 halves + 16 bytes)
  __host__ __device__ static constexpr int words(int xrows) { return CW + xrows * XS; }
};

// Launch bounds: 4 blocks an SM for the 2-/3-bit m = 1 instances with a sparse part (62 registers with
// 4-byte entries, no spills; uncapped they took 66-72, 3 blocks an SM); the 4-bit one would spill.
template <int BITS, typename T, int XR, int STAGES, bool SPARSE>
__global__ void __launch_bounds__(256, (SPARSE && XR == 1 && BITS != 4) ? 4 : 1) lut_gemm_ring_kernel(LutGemmArgs p, int xrows_arg, int slots) {
  static_assert(XR == 1 || XR == 8, "one token row, or up to one token tile");
  using G = Geo<BITS>;
  using R = RingGeom<BITS>;
  constexpr int WPL = G::WPL, TW = G::TW;
  extern __shared__ __align__(16) uint32_t smem[];
  __shared__ float sp_acc[16 * 8];  // [row in tile][token in block]

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int tok0 = blockIdx.x * 8;
  const int nt = blockIdx.y;
  const int xrows = XR == 1 ? 1 : xrows_arg;
  const int stage_words = R::words(xrows);
  const int rows_here = XR == 1 ? 1 : min(8, p.M - tok0);  // >= 1
  uint32_t* ring = smem + (size_t)warp * slots * stage_words;
  const uint32_t ring_s = static_cast<uint32_t>(__cvta_generic_to_shared(ring));
  const T* __restrict__ x = reinterpret_cast<const T*>(p.x);

  const int pairs = (p.chunks + 1) / 2;
  const int n_my = warp < pairs ? (pairs - warp + nwarps - 1) / nwarps : 0;
  const int kstep = nwarps * 256;

  // per-lane copy state, advanced by one warp step per issued stage
  const uint32_t* qsrc = p.qw + ((size_t)nt * p.chunks + (size_t)warp * 2) * R::CHW + 4 * lane;
  const size_t q_step = (size_t)nwarps * R::CW;
  int c_issue = warp * 2;
  int k_issue = warp * 256;
  const T* xsrc = x + (size_t)tok0 * p.K + lane * 8;
  uint32_t slot_w = 0;  // byte offset of the slot to fill
  // a stage's copies in two parts: the codes (constant), then the activations and the step to the next stage
  auto issue_codes = [&]() {
    const uint32_t st = ring_s + slot_w;
    const bool second = c_issue + 1 < p.chunks;
#pragma unroll
    for (int q = 0; q < BITS; ++q) {
      // piece q of this lane: words 128 q + 4 lane of the stage; chunk 0 ends at word CHW
      const uint32_t d = st + (uint32_t)((128 * q + 4 * lane) * 4);
      if (128 * q + 128 <= R::CHW) cp_async16_cg_s(d, qsrc + 128 * q);
      else cp_async16_cg_if(d, qsrc + 128 * q, 128 * q + 4 * lane < R::CHW || second);
    }
    qsrc += q_step;
  };
  auto issue_x = [&]() {
    const uint32_t st = ring_s + slot_w;
    // activations: one 16-byte piece per lane and token row (columns past K zero-filled; the source
    // then points at x itself, which is valid)
    const bool in = k_issue + lane * 8 < p.K;
    const T* src = in ? xsrc + k_issue : x;
    const uint32_t d = st + (uint32_t)(R::CW * 4 + lane * 16);
    if constexpr (XR == 1) {
      cp_async16_ca_s(d, src, in ? 16 : 0);
    } else {
      uint32_t dr = d;
#pragma unroll 1
      for (int r = 0; r < rows_here; ++r, dr += R::XS * 4, src += p.K) cp_async16_ca_s(dr, src, in ? 16 : 0);
    }
    c_issue += nwarps * 2;
    k_issue += kstep;
    slot_w += (uint32_t)(stage_words * 4);
    if (slot_w == (uint32_t)(slots * stage_words * 4)) slot_w = 0;
  };
  auto issue = [&]() {
    issue_codes();
    issue_x();
  };

  // Programmatic dependent launch (no-ops when launched without it): the block may be resident before the kernel it
  // depends on has finished. The first stage's codes, the codebooks and the sparse row pointers (constant) are
  // requested before griddepcontrol.wait; x, which the previous kernel may write, only after it.
  static_assert(STAGES >= 2, "the ring has at least two stages");
  if (0 < n_my) issue_codes();
  uint32_t tb0[TW], tb1[TW];
  load_table<BITS>(tb0, p.tab + (size_t)(nt * 16 + g) * TW);
  load_table<BITS>(tb1, p.tab + (size_t)(nt * 16 + g + 8) * TW);

  // sparse part, a warp per row (rows warp, warp + nwarps, ...), its lanes split as XR tokens x SL entry
  // slices (lane = token + XR * slice): each lane sums v * x[token][col] over the row's entries
  // slice, slice + SL, ...; shuffles add the slices; one lane writes the (row, token) sum. No atomics
  // (a shared-memory fp32 atomicAdd is a compare-and-swap loop that serialises on conflicts). The first
  // SP_HOLD entries of each slice of the warp's first two rows are loaded now (volatile loads: kept ahead of the
  // loop, not sunk to their use), their activations gathered at the first stage; the rest after the loop.
  constexpr int SL = 32 / XR;
  constexpr int SP_HOLD = 2;  // entries per lane and row held from before the loop: 2 * SL of each row
  const int tk_l = lane % XR, sl = lane / XR;
  // a dense-only layer runs an instance without the sparse code (none of its registers held through
  // the main loop)
  constexpr bool sparse = SPARSE;
  const T* xb = x + (size_t)tok0 * p.K;
  const bool x_ok = tk_l < rows_here;
  int rb[2] = {0, 0}, re[2] = {0, 0};
  uint32_t pe[2][SP_HOLD];  // held entries (sp_col / sp_val)
  float px[2][SP_HOLD];
  if (sparse) {
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int r = warp + q * nwarps;
      if (r < 16) {
        rb[q] = (int)ldg_volatile(reinterpret_cast<const uint32_t*>(p.sp_ptr) + nt * 16 + r);
        re[q] = (int)ldg_volatile(reinterpret_cast<const uint32_t*>(p.sp_ptr) + nt * 16 + r + 1);
      }
    }
  }
  pdl_wait();
  if (p.pdl_early) pdl_launch_dependents();  // the early trigger (LutGemmArgs::pdl_early)
  if (0 < n_my) issue_x();
  cp_async_commit();
#pragma unroll
  for (int i = 1; i < STAGES - 1; ++i) {
    if (i < n_my) issue();
    cp_async_commit();
  }
#pragma unroll
  for (int q = 0; q < 2; ++q)
#pragma unroll
    for (int h = 0; h < SP_HOLD; ++h) {
      const int j = rb[q] + sl + h * SL;
      pe[q][h] = 0u;  // column 0, value +0
      if (j < re[q]) pe[q][h] = ldg_volatile(p.sp_e + j);
    }
  auto gather = [&]() {
#pragma unroll
    for (int q = 0; q < 2; ++q)
#pragma unroll
      for (int h = 0; h < SP_HOLD; ++h)
        px[q][h] = rb[q] + sl + h * SL < re[q] && x_ok ? ldg_act(xb + (size_t)tk_l * p.K + sp_col(pe[q][h])) : 0.f;
  };
  bool gathered = false;

  float acc[1][4] = {{0.f, 0.f, 0.f, 0.f}};
  // this lane's B fragment row (rows past the block's: any valid row, their outputs are dropped)
  const int x_lane = R::CW + (XR == 1 ? 0 : min(g, rows_here - 1) * R::XS) + 16 * t;
  int slot_r = 0;  // word offset of the slot to read
  for (int i = 0; i < n_my; ++i) {
    if (i + STAGES - 1 < n_my) issue();
    cp_async_commit();
    cp_async_wait<STAGES - 1>();
    __syncwarp();
    const uint32_t* st = ring + slot_r;
    slot_r += stage_words;
    if (slot_r == slots * stage_words) slot_r = 0;
    if (sparse && i == 0) {
      gather();
      gathered = true;
    }
    static_for<0, 2>([&](auto cc) {
      constexpr int c = decltype(cc)::value;
      const uint32_t* cb = st + c * R::CHW;
      uint32_t w[WPL];
#pragma unroll
      for (int s = 0; s < G::SEGS; ++s) {
        const uint4 v = *reinterpret_cast<const uint4*>(cb + s * 128 + lane * 4);
        w[4 * s + 0] = v.x; w[4 * s + 1] = v.y; w[4 * s + 2] = v.z; w[4 * s + 3] = v.w;
      }
      if constexpr (G::TAIL) {
        const uint2 v = *reinterpret_cast<const uint2*>(cb + 128 + lane * 2);
        w[4] = v.x; w[5] = v.y;
      }
      uint32_t xw[1][16];
      const uint32_t* xs = st + x_lane + c * 64;
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        const uint4 u = *reinterpret_cast<const uint4*>(xs + 4 * v);
        xw[0][4 * v + 0] = u.x; xw[0][4 * v + 1] = u.y; xw[0][4 * v + 2] = u.z; xw[0][4 * v + 3] = u.w;
      }
      chunk_mma<BITS, T, 1>(w, tb0, tb1, xw, acc);
    });
    __syncwarp();  // every lane has read the slot before it is refilled
  }
  // every stage is requested: the next kernel in the stream may be scheduled (late, unless the early trigger has
  // already let it in; a second trigger is a no-op)
  if (!p.pdl_early) pdl_launch_dependents();
  cp_async_wait<0>();
  __syncthreads();  // the ring is reused for the reduction; sp_acc is zeroed

  if (sparse) {
    if (!gathered) gather();  // a warp without stages
    // the rest of row r from entry j on, added to a; then the slices summed and the (row, token) written
    auto finish_row = [&](int r, int j, int e, float a) {
#pragma unroll 4
      for (; j < e; j += SL) {
        const uint32_t en = __ldg(p.sp_e + j);
        a += x_ok ? sp_val(en) * to_float(xb[(size_t)tk_l * p.K + sp_col(en)]) : 0.f;
      }
#pragma unroll
      for (int off = XR; off < 32; off <<= 1) a += __shfl_xor_sync(0xFFFFFFFFu, a, off);
      if (sl == 0) sp_acc[r * 8 + tk_l] = a;
    };
    float held[2] = {0.f, 0.f};
#pragma unroll
    for (int q = 0; q < 2; ++q)
#pragma unroll
      for (int h = 0; h < SP_HOLD; ++h) held[q] += sp_val(pe[q][h]) * px[q][h];
    if (warp < 16) finish_row(warp, rb[0] + sl + SP_HOLD * SL, re[0], held[0]);
    if (warp + nwarps < 16) finish_row(warp + nwarps, rb[1] + sl + SP_HOLD * SL, re[1], held[1]);
    for (int r = warp + 2 * nwarps; r < 16; r += nwarps)
      finish_row(r, __ldg(p.sp_ptr + nt * 16 + r) + sl, __ldg(p.sp_ptr + nt * 16 + r + 1), 0.f);
  }
  float* red = reinterpret_cast<float*>(smem);  // [nwarps][4][32]
#pragma unroll
  for (int e = 0; e < 4; ++e) red[(warp * 4 + e) * 32 + lane] = acc[0][e];
  __syncthreads();
  T* __restrict__ y = reinterpret_cast<T*>(p.y);
  const T* __restrict__ bias = reinterpret_cast<const T*>(p.bias);
  for (int i = threadIdx.x; i < 4 * 32; i += blockDim.x) {
    float s = 0.f;
    for (int w2 = 0; w2 < nwarps; ++w2) s += red[w2 * 128 + i];
    const int ln = i & 31, e = i >> 5;
    const int r = (ln >> 2) + 8 * (e >> 1);
    const int tl = 2 * (ln & 3) + (e & 1);
    const int n = nt * 16 + r, tok = tok0 + tl;
    if (n < p.N && tok < p.M && (XR == 8 || tl == 0)) {
      if (sparse) s += sp_acc[r * 8 + tl];
      if (bias) s += to_float(bias[n]);
      y[(size_t)tok * p.N + n] = from_float<T>(s);
    }
  }
}

// ------------------------------------------------------------------------------------ launchers

// Chunks per pipeline step (codes of 2 steps live in registers): about 16-32 words per step, fewer with
// 2 token tiles so that the kernel fits 128 registers (2 blocks of 8 warps per SM) without spilling.
template <int BITS, int MT> constexpr int steps_chunks() { return BITS == 2 ? (MT == 1 ? 8 : 4) : (BITS == 3 ? 4 : (MT == 1 ? 4 : 2)); }

template <int BITS, typename T, int MT>
cudaError_t launch_gemm_mt(const LutGemmArgs& a, int nwarps, cudaStream_t stream) {
  dim3 grid(a.n_tiles, (a.M + MT * 8 - 1) / (MT * 8));
  const size_t smem = (size_t)nwarps * MT * 4 * 32 * sizeof(float);
  lut_gemm_kernel<BITS, T, MT, steps_chunks<BITS, MT>()><<<grid, nwarps * 32, smem, stream>>>(a);
  return cudaGetLastError();
}

// Ring depth (stages of two chunks per warp) of the ring kernel: 2. With 8 activation rows a stage is
// 2.2-3.8x larger, and 2 stages keep two blocks of 8 warps an SM. At m = 1 a warp is bound by its own
// instruction latency (Nsight Compute: issue slots half busy, math-pipe throttle the first stall
// reason, DRAM at 62 %), not by loads in flight: 2 stages fit 4 blocks an SM instead of 3 and beat the
// 3-5 stages of before on every shape (bench/NOTES-kernels.md, "squeezellm ring kernel, round 5").
constexpr int kLutRingStages = 2;

// The slots a warp uses: its stages are pairs warp, warp + nwarps, ..., so the busiest has
// ceil(pairs / nwarps); a deeper ring would be shared memory never written.
inline int lut_ring_slots(int stages, int chunks, int nwarps) {
  const int pairs = (chunks + 1) / 2;
  const int busiest = (pairs + nwarps - 1) / nwarps;
  return busiest < 1 ? 1 : (busiest < stages ? busiest : stages);
}

template <int BITS, typename T, int XR>
cudaError_t launch_ring_xr(const LutGemmArgs& a, int nwarps, bool pdl, cudaStream_t stream) {
  constexpr int STAGES = kLutRingStages;
  const int xrows = XR == 1 ? 1 : (a.M < 8 ? a.M : 8);
  const size_t stage_bytes = (size_t)RingGeom<BITS>::words(xrows) * 4;
  constexpr size_t kMaxSmem = 200 * 1024;
  while (nwarps > 1 && (size_t)nwarps * lut_ring_slots(STAGES, a.chunks, nwarps) * stage_bytes > kMaxSmem) nwarps /= 2;
  const int slots = lut_ring_slots(STAGES, a.chunks, nwarps);
  size_t smem = (size_t)nwarps * slots * stage_bytes;
  const size_t red = (size_t)nwarps * 4 * 32 * sizeof(float);
  if (red > smem) smem = red;
  auto kern = a.sp_ptr != nullptr ? lut_gemm_ring_kernel<BITS, T, XR, STAGES, true>
                                   : lut_gemm_ring_kernel<BITS, T, XR, STAGES, false>;
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
  }
  dim3 grid((a.M + 7) / 8, a.n_tiles);
  // with programmatic stream serialization: the blocks may be scheduled while the previous kernel ends; they request
  // their first codes, then wait for it before reading x (lut_gemm_ring_kernel)
  if (pdl && device_has_pdl()) return launch_with_pdl(kern, grid, dim3(nwarps * 32), smem, stream, a, xrows, slots);
  kern<<<grid, nwarps * 32, smem, stream>>>(a, xrows, slots);
  return cudaGetLastError();
}

// variant 0: the ring kernel (m = 1: one activation row; else token tiles of 8); 1: lut_gemm_kernel.
// The ring kernel's grid has the n-tiles in y (at most 65535): more tiles take lut_gemm_kernel.
// variant 0 | kLutVariantPDL: the ring kernel launched with programmatic dependent launch (sm_90+).
template <int BITS, typename T>
cudaError_t launch_gemm_t(const LutGemmArgs& a, int nwarps, int variant_flags, cudaStream_t stream) {
  const bool pdl = (variant_flags & kLutVariantPDL) != 0;
  const int variant = variant_flags & ~kLutVariantPDL;
  if (variant == 0 && a.n_tiles <= 65535) {
    return a.M == 1 ? launch_ring_xr<BITS, T, 1>(a, nwarps, pdl, stream)
                    : launch_ring_xr<BITS, T, 8>(a, nwarps, pdl, stream);
  }
  if (a.M <= 8) return launch_gemm_mt<BITS, T, 1>(a, nwarps, stream);
  return launch_gemm_mt<BITS, T, 2>(a, nwarps, stream);
}

template <int BITS>
cudaError_t launch_gemm_bits(bool bf16, const LutGemmArgs& a, int nwarps, int variant, cudaStream_t stream) {
  return bf16 ? launch_gemm_t<BITS, __nv_bfloat16>(a, nwarps, variant, stream)
              : launch_gemm_t<BITS, __half>(a, nwarps, variant, stream);
}

template <int BITS>
cudaError_t launch_dequant_bits(bool bf16, const LutDequantArgs& a, cudaStream_t stream) {
  const int warps = 8;
  const int total = a.n_tiles * a.chunks;
  dim3 grid((total + warps - 1) / warps);
  if (bf16) lut_dequant_kernel<BITS, __nv_bfloat16><<<grid, warps * 32, 0, stream>>>(a);
  else lut_dequant_kernel<BITS, __half><<<grid, warps * 32, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace lut
}  // namespace lpq
