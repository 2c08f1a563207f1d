// lpq: dequantize-in-registers GEMM kernels for the `uniform` packed format.
//
// Written for lpq; torch-free so that it compiles with plain nvcc (the torch binding lives in
// uniform_binding.cpp and calls the launchers declared in uniform_launch.h).
//
// Repacked layout (built by lpq/kernels/uniform_cuda.py at prepare time)
// ---------------------------------------------------------------------
// The weight W [N, K] is cut into n-tiles of 16 output rows and chunks of 128 input columns (K is
// zero-padded to a multiple of 128; the activations are read as zero there). Inside a chunk the
// columns are split into folds of S = min(group size, 128) columns (one fold never crosses a group),
// and each fold into S/16 mma k-tiles. Lane (g = lane / 4, t = lane % 4) of a warp holds, for the
// m16n8k16 A fragment of k-tile j (jj = j % (S/16) inside fold f = j / (S/16)):
//   register r (0..3): row g + 8 * (r & 1), columns f*S + t*(S/4) + 4*jj + 2*(r >> 1) + {0, 1}
// so that the B fragment (activations) of a lane is S/4 consecutive columns of x, read with
// 16-byte loads. The k order inside the mma is thus a permutation of the true order; A and B agree.
//
// Codes of one lane in one chunk: 32 "pairs" P = j*4 + r, two codes each (low half, high half).
//   bits 2, 4, 8: word P / (16/b) holds pair i = P % (16/b) at bits [b*i, b*i+b) and [16+b*i, ...).
//   bits 3 ("fields" layout, the default): two triples of words, T = P / 16 holding pairs 16T..16T+15 in
//           its words A = 3T, B = 3T + 1, C = 3T + 2. Every 16-bit half of a word has five whole 3-bit
//           fields and one spare bit (the same bits in both halves: the low code of a pair in the low
//           half, the high code 16 bits up). Bits of one half, low to high (i: pair i of the triple):
//             A: [spare q15.b0 | i0  1-3 | i1  4-6 | i2  7-9 | i3 10-12 | i4 13-15]
//             B: [i8   0-2 | i9  3-5 | spare q15.b1 @6 | i10 7-9 | i11 10-12 | i12 13-15]
//             C: [i5   0-2 | i6  3-5 | i7  6-8 | spare q15.b2 @9 | i13 10-12 | i14 13-15]
//           Pair 15 is the three spare bits. The fp16 decoder reads every field with one mask at bit
//           0, 3 or 6 of w, w >> 1 or w >> 7 (A), w or w >> 7 (B), w or w >> 7 (C), and the spare bits at
//           bits 0 / 1 / 2 of A / B >> 5 / C >> 7: 5 shifts per triple, 3 mask positions (W3Slot below).
//   bits 3 with LPQ_W3_PLANES (the earlier layout, kept for comparison): words 0..3 hold the low two
//           bits as for bits 2; words 4..5 hold the third bit of pair i = P % 16 of word 4 + P / 16 at
//           bits i and 16 + i.
// One chunk of one n-tile is 32 lanes * 2b words, stored as segments of 16 bytes per lane
// ([seg][lane][4 words]); for 3 bits the last two words form a [lane][2 words] tail.
//
// Scales: [G][n_tiles][8] half2 (s[g], s[g+8]); zeros: [G][n_tiles][8] u16 (z[g] | z[g+8] << 8).
// W[n, k] = s * (q - z). q - z is formed exactly in fp16/bf16 (magic-number conversion), the
// products are accumulated by the tensor cores in fp32 per fold, and the fold's sum is scaled in fp32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "async_copy.cuh"
#include "uniform_launch.h"

#include <type_traits>
#include <utility>

namespace lpq {

template <int I, int N, typename F>
__device__ __forceinline__ void static_for(F&& f) {
  if constexpr (I < N) {
    f(std::integral_constant<int, I>());
    static_for<I + 1, N>(f);
  }
}

template <typename T> struct Magic;

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> struct Magic<__half> {
  static constexpr uint32_t word = 0x64006400u;  // 1024.0 in each half
  static constexpr uint32_t one = 0x6400u;
};
template <> struct Magic<__nv_bfloat16> {
  static constexpr uint32_t word = 0x43004300u;  // 128.0 in each bf16 (codes < 128)
  static constexpr uint32_t one = 0x4300u;
};

__device__ __forceinline__ uint32_t lop_and_or(uint32_t a, uint32_t mask, uint32_t c) {
  // (a & mask) | c in one LOP3
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(mask), "r"(c));
  return d;
}

template <typename T> __device__ __forceinline__ uint32_t sub2(uint32_t a, uint32_t b);
template <> __device__ __forceinline__ uint32_t sub2<__half>(uint32_t a, uint32_t b) {
  __half2 r = __hsub2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b));
  return *reinterpret_cast<uint32_t*>(&r);
}
template <> __device__ __forceinline__ uint32_t sub2<__nv_bfloat16>(uint32_t a, uint32_t b) {
  __nv_bfloat162 r = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&a), *reinterpret_cast<__nv_bfloat162*>(&b));
  return *reinterpret_cast<uint32_t*>(&r);
}

// Number of 32-bit words of one lane in one chunk, and its 16-byte segments.
template <int BITS> struct Layout {
  static constexpr int words = 2 * BITS;             // 64 codes * BITS / 32
  static constexpr int segs = (BITS == 3) ? 1 : words / 4;
  static constexpr bool tail = (BITS == 3);           // 2 extra words per lane
};

// Load one lane's codes of one chunk.  base points at the chunk's block of 32 * 2b words.
template <int BITS>
__device__ __forceinline__ void load_codes(uint32_t (&w)[2 * BITS], const uint32_t* __restrict__ base, int lane) {
  using L = Layout<BITS>;
#pragma unroll
  for (int s = 0; s < L::segs; ++s) {
    uint4 v = __ldg(reinterpret_cast<const uint4*>(base + s * 128 + lane * 4));
    w[4 * s + 0] = v.x; w[4 * s + 1] = v.y; w[4 * s + 2] = v.z; w[4 * s + 3] = v.w;
  }
  if constexpr (L::tail) {
    uint2 v = __ldg(reinterpret_cast<const uint2*>(base + 128 + lane * 2));
    w[4] = v.x; w[5] = v.y;
  }
}

// 3-bit "fields" layout (see the top of this file): where pair i (0..14) of a triple sits. The field
// is bits [shift + pos, shift + pos + 3) of word `word` of the triple (A = 0, B = 1, C = 2), read by the
// fp16 decoder as the mask at bit `pos` of (w >> shift). Pair 15: the spare bits, bit b of its codes
// at bit w3_spare_bit(b) of word b (read at bit b of w >> (w3_spare_bit(b) - b)). The CPU emulation in
// lpq/kernels/w3_layout.py holds the same table (tests/test_w3_layout.py compares the two).
struct W3Slot {
  int word, shift, pos;
};
// W3_SLOTS_BEGIN
#define LPQ_W3_SLOTS                                                                                         \
  {0, 1, 0}, {0, 1, 3}, {0, 1, 6}, {0, 7, 3}, {0, 7, 6}, {2, 0, 0}, {2, 0, 3}, {2, 0, 6}, {1, 0, 0}, {1, 0, 3}, \
      {1, 7, 0}, {1, 7, 3}, {1, 7, 6}, {2, 7, 3}, {2, 7, 6}
#define LPQ_W3_SPARE_BITS 0, 6, 9
// W3_SLOTS_END
__host__ __device__ constexpr W3Slot w3_slot(int i) {
  constexpr W3Slot t[15] = {LPQ_W3_SLOTS};
  return t[i];
}
__host__ __device__ constexpr int w3_spare_bit(int b) {
  constexpr int t[3] = {LPQ_W3_SPARE_BITS};
  return t[b];
}

// Pair P (0..31) of a 3-bit lane block as magic + 2^pos * q (fp16/bf16 bits in both halves), pos =
// w3_pos<P, kAtZero>(). The field pairs keep their mask position (the fp16 fast decoder scales it away
// in its HFMA2); with kAtZero every field is first shifted to bit 0, as the generic decoder (magic + q,
// then one subtraction of magic + z) needs. The spare pair is always at bit 0: three LOP3 gather its bits.
template <int P, bool kAtZero>
__host__ __device__ constexpr int w3_pos() {
  return (P % 16 == 15 || kAtZero) ? 0 : w3_slot(P % 16).pos;
}
template <int P, bool kAtZero>
__device__ __forceinline__ uint32_t w3_raw(const uint32_t (&w)[6], uint32_t magic) {
  constexpr int base = 3 * (P / 16), i = P % 16;
  if constexpr (i == 15) {
    static_assert(w3_spare_bit(0) == 0, "spare bit 0 is read in place");
    constexpr int s1 = w3_spare_bit(1) - 1, s2 = w3_spare_bit(2) - 2;
    const uint32_t t = lop_and_or(w[base], 0x00010001u, magic);
    const uint32_t u = lop_and_or(w[base + 1] >> s1, 0x00020002u, t);
    return lop_and_or(w[base + 2] >> s2, 0x00040004u, u);
  } else {
    constexpr W3Slot sl = w3_slot(i);
    constexpr int shift = kAtZero ? sl.shift + sl.pos : sl.shift;
    constexpr int pos = w3_pos<P, kAtZero>();
    const uint32_t v = w[base + sl.word];
    return lop_and_or(shift ? v >> shift : v, 0x00070007u << pos, magic);
  }
}

// The four A registers of k-tile J (values magic + q, not yet zero-shifted).
template <int BITS, typename T, int J>
__device__ __forceinline__ void decode_tile(const uint32_t (&w)[2 * BITS], uint32_t (&a)[4]) {
  constexpr uint32_t M = Magic<T>::word;
#ifndef LPQ_W3_PLANES
  constexpr bool kFields = BITS == 3;
#else
  constexpr bool kFields = false;
#endif
  if constexpr (kFields) {
    static_for<0, 4>([&](auto rc) {
      constexpr int r = decltype(rc)::value;
      a[r] = w3_raw<J * 4 + r, true>(w, M);
    });
  } else {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int P = J * 4 + r;
      if constexpr (BITS == 4) {
        a[r] = lop_and_or(w[P / 4] >> (4 * (P % 4)), 0x000F000Fu, M);
      } else if constexpr (BITS == 2) {
        a[r] = lop_and_or(w[P / 8] >> (2 * (P % 8)), 0x00030003u, M);
      } else if constexpr (BITS == 3) {  // LPQ_W3_PLANES: a 2-bit plane and a 1-bit plane
        uint32_t lo = lop_and_or(w[P / 8] >> (2 * (P % 8)), 0x00030003u, M);
        const int i = P % 16;  // the third bit sits at bit i: move it to bit 2
        const uint32_t h = w[4 + P / 16];
        a[r] = lop_and_or(i >= 2 ? (h >> (i - 2)) : (h << (2 - i)), 0x00040004u, lo);
      } else {  // 8 bits, fp16 only here: bytes i and i+2 of the word, with 0x64 as high bytes
        const int i = P % 2;
        a[r] = __byte_perm(w[P / 2], 0x64646464u, 0x4040 | (i + 2) << 8 | i);
      }
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

// q - z for all four registers of a tile. zz[0]: row g, zz[1]: row g + 8 (magic + z in both halves).
// 8-bit codes with bf16 activations cannot use the bf16 magic (codes >= 128): they go through fp32.
template <int BITS, typename T, int J>
__device__ __forceinline__ void tile_a(const uint32_t (&w)[2 * BITS], const uint32_t (&zz)[2], const float (&zf)[2],
                                       uint32_t (&a)[4]) {
  if constexpr (BITS == 8 && std::is_same<T, __nv_bfloat16>::value) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int P = J * 4 + r;
      const int i = P % 2;
      // floats 2^23 + q built from the bytes (byte i, byte i + 2)
      float f0 = __uint_as_float(__byte_perm(w[P / 2], 0x4B000000u, 0x7440 | i));
      float f1 = __uint_as_float(__byte_perm(w[P / 2], 0x4B000000u, 0x7440 | (i + 2)));
      __nv_bfloat162 v = __floats2bfloat162_rn(f0 - zf[r & 1], f1 - zf[r & 1]);
      a[r] = *reinterpret_cast<uint32_t*>(&v);
    }
  } else {
    decode_tile<BITS, std::conditional_t<BITS == 8, __half, T>, J>(w, a);
#pragma unroll
    for (int r = 0; r < 4; ++r) a[r] = sub2<T>(a[r], zz[r & 1]);
  }
}


// fp16, 2-, 3- and 4-bit codes: no shift per register. A mask at bit position b*i of a byte gives the fp16
// 1024 + 2^(b*i) * q (exact, inside the 10 mantissa bits); one HFMA2 with 2^(-b*i) and -(1024/2^(b*i) + z)
// then yields q - z exactly. Positions i (0 .. 8/b - 1) inside a byte, the byte chosen by one shift
// per word. off[r][i]: the half2 bits of -(1024/2^(b*i) + z) for row g (r = 0) and g + 8 (r = 1).
// 3 bits (fields layout): masks at bit 0, 3 or 6 (i = 0, 1, 2) of a word or of one of its shifts
// (w3_raw): 1024 + 2^6 q <= 1472 stays in [1024, 2048), and so does 2^(10-6) + z inside fast_off.
template <int BITS> struct FastDecode {
#ifndef LPQ_W3_PLANES
  static constexpr bool ok = (BITS == 2 || BITS == 3 || BITS == 4);
#else
  static constexpr bool ok = (BITS == 2 || BITS == 4);
#endif
  static constexpr int npos = ok ? (BITS == 3 ? 3 : 8 / BITS) : 1;  // mask positions
};
template <int BITS>
__device__ __forceinline__ uint32_t fast_off(uint32_t z, int i) {
  // fp16 of -(2^(10 - BITS*i) + z): exponent 25 - BITS*i, z at mantissa bit BITS*i; both halves
  return z * ((1u << (BITS * i)) * 0x00010001u) + ((uint32_t)((25 - BITS * i) << 10 | 0x8000) * 0x00010001u);
}
template <int BITS, int J>
__device__ __forceinline__ void tile_a_fast(const uint32_t (&w)[2 * BITS], const uint32_t (&off)[2][FastDecode<BITS>::npos],
                                            uint32_t (&a)[4]) {
  constexpr uint32_t M = Magic<__half>::word;
  if constexpr (BITS == 3) {
    // one LOP3 (three for the spare pair) and one HFMA2 per register; the shifts of w3_raw are shared
    // by the pairs of a word (CSE: 5 per triple)
    static_for<0, 4>([&](auto rc) {
      constexpr int r = decltype(rc)::value;
      constexpr int P = J * 4 + r;
      constexpr int pos = w3_pos<P, false>();
      const uint32_t raw = w3_raw<P, false>(w, M);
      constexpr uint32_t inv = (uint32_t)((15 - pos) << 10) * 0x00010001u;  // 2^(-pos) in both halves
      __half2 v = __hfma2(*reinterpret_cast<const __half2*>(&raw), *reinterpret_cast<const __half2*>(&inv),
                          *reinterpret_cast<const __half2*>(&off[r & 1][pos / 3]));
      a[r] = *reinterpret_cast<uint32_t*>(&v);
    });
  } else {
    constexpr int ppw = 16 / BITS;  // pairs per word
    constexpr int npos = FastDecode<BITS>::npos;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int P = J * 4 + r;
      const int i = P % ppw;  // pair index inside the word
      const int byte = i / npos, pos = i % npos;
      const uint32_t base = byte ? (w[P / ppw] >> (8 * byte)) : w[P / ppw];
      const uint32_t mask = ((1u << BITS) - 1) * 0x00010001u << (BITS * pos);
      const uint32_t raw = lop_and_or(base, mask, M);
      const uint32_t inv = (uint32_t)((15 - BITS * pos) << 10) * 0x00010001u;  // 2^(-BITS*pos) in both halves
      __half2 v = __hfma2(*reinterpret_cast<const __half2*>(&raw), *reinterpret_cast<const __half2*>(&inv),
                          *reinterpret_cast<const __half2*>(&off[r & 1][pos]));
      a[r] = *reinterpret_cast<uint32_t*>(&v);
    }
  }
}

// Small-m fused kernel.  Block: `nwarps` warps (dynamic), NT n-tiles, MT token tiles of 8.
// The warps of a block split the chunks of K; CPS consecutive chunks form one pipeline step.
// ---------------------------------------------------------------------------------------------
// Fused epilogues (GemmArgs::norm_x, GemmArgs::swiglu), shared by the three fused kernels.
//
// RMSNorm folded into the layer: RMSNorm(h) = w * h * r with r = rsqrt(mean(h^2) + eps) one scalar per token,
// so W @ RMSNorm(h) = r * (W @ (w * h)). The caller passes x = w * h (elementwise, fused by the compiler into the
// kernel that produced h) and norm_x = h; each block sums the squares of its token rows of h once (these L2 reads
// overlap the block's first weight copies) and scales its outputs by r. The reduction that would otherwise be a
// kernel of its own between two linears disappears.

// Sums of squares of token rows tok0 .. tok0 + rows - 1 of norm_x, one partial per warp and row:
// part[warp * kNormRows + r]. R rows at a time (1 for the one-token kernel, else 8), the thread's 16-byte loads of
// those rows in flight together.
template <typename T, int R>
__device__ __forceinline__ void norm_partials(const GemmArgs& p, int tok0, int rows, float* part) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (p.norm_sq) {  // the sums of squares are given in slots (another layer's residual epilogue): add them up
    for (int r = 0; r < rows; ++r) {
      const float* sq = p.norm_sq + (size_t)(tok0 + r) * p.norm_slots;
      float q = 0.f;
      for (int j = threadIdx.x; j < p.norm_slots; j += blockDim.x) q += __ldg(sq + j);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) q += __shfl_xor_sync(0xffffffffu, q, o);
      if (lane == 0) part[warp * kNormRows + r] = q;
    }
    return;
  }
  const T* __restrict__ h = reinterpret_cast<const T*>(p.norm_x);
  for (int r0 = 0; r0 < rows; r0 += R) {
    float s[R];
#pragma unroll
    for (int i = 0; i < R; ++i) s[i] = 0.f;
    for (int k = threadIdx.x * 8; k < p.K; k += blockDim.x * 8) {
      uint4 v[R];
#pragma unroll
      for (int i = 0; i < R; ++i)
        v[i] = r0 + i < rows ? __ldg(reinterpret_cast<const uint4*>(h + (size_t)(tok0 + r0 + i) * p.K + k))
                             : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
      for (int i = 0; i < R; ++i) {
        const T* e = reinterpret_cast<const T*>(&v[i]);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const float f = to_float(e[j]);
          s[i] = fmaf(f, f, s[i]);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < R; ++i) {
      float q = s[i];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) q += __shfl_xor_sync(0xffffffffu, q, o);
      if (lane == 0 && r0 + i < rows) part[warp * kNormRows + r0 + i] = q;
    }
  }
}

// The block's outputs from the warps' partial sums red[(warp * V + v) * 32 + lane], V = NT * MT * 4 values a lane
// in the mma C-fragment order: value v = (a * MT + b) * 4 + e of lane ln is output row (nt0 + a) * 16 + ln / 4 +
// 8 * (e / 2) of token tok0 + 8 * b + 2 * (ln % 4) + e % 2. Each output is the sum over warps, times the rms scale of
// its token row (norm_x or norm_sq), plus the bias; with swiglu, rows r and r + 8 of a tile (gate, up), each rounded
// to T as the unfused layer's output would be, give silu(gate) * up at column 8 * tile + r of y [M, N / 2]; with a
// residual, y = h = output + residual, next_w * h goes to y_next and each n-tile's sum of h^2 to out_sq (the residual
// and next_w values from ``staged`` where the one-token kernel copied them to shared memory).
template <typename T, int NT, int MT>
__device__ __forceinline__ void write_block_output(const GemmArgs& p, float* red, const float* part, int nwarps,
                                                   int nt0, int tok0, const T* staged = nullptr) {
  constexpr int V = NT * MT * 4;
  T* __restrict__ y = reinterpret_cast<T*>(p.y);
  const T* __restrict__ bias = reinterpret_cast<const T*>(p.bias);
  const bool normed = has_norm(p);
  auto value = [&](int v, int ln, int n, int tok) {
    float s = 0.f;
    for (int w = 0; w < nwarps; ++w) s += red[(w * V + v) * 32 + ln];
    if (normed) {
      float q = 0.f;
      for (int w = 0; w < nwarps; ++w) q += part[w * kNormRows + (tok - tok0)];
      s *= rsqrtf(q / (float)p.K + p.norm_eps);
    }
    if (bias) s += to_float(bias[n]);
    return s;
  };
  if (!p.swiglu) {
    const T* __restrict__ res = reinterpret_cast<const T*>(p.residual);
    const T* __restrict__ next_w = reinterpret_cast<const T*>(p.next_w);
    T* __restrict__ y_next = reinterpret_cast<T*>(p.y_next);
    for (int i = threadIdx.x; i < V * 32; i += blockDim.x) {
      const int ln = i & 31, v = i >> 5;
      const int e = v & 3, b = (v >> 2) % MT, a = (v >> 2) / MT;
      const int n = (nt0 + a) * 16 + (ln >> 2) + 8 * (e >> 1);
      const int tok = tok0 + b * 8 + 2 * (ln & 3) + (e & 1);
      const bool in = n < p.N && tok < p.M;
      float sq = 0.f;
      if (in) {
        const size_t o = (size_t)tok * p.N + n;
        T out = from_float<T>(value(v, ln, n, tok));
        if (res) {
          // staged (one token): residual [NT * 16] then next_w [NT * 16] of this block's outputs
          const int j = n - nt0 * 16;
          const float r = staged ? to_float(staged[j]) : to_float(res[o]);
          out = from_float<T>(to_float(out) + r);  // the block's residual add, in T as torch rounds it
          const float h = to_float(out);
          sq = h * h;
          if (next_w) y_next[o] = from_float<T>(to_float(staged ? staged[NT * 16 + j] : next_w[n]) * h);
        }
        y[o] = out;
      }
      // this thread alone reads entry i of warp 0 (above): it now holds that output's h^2 (0 outside y)
      if (p.out_sq) red[i] = sq;
    }
    if (p.out_sq) {
      // each (token row, n-tile) pair: the 16 rows' h^2 summed by 16 lanes in a fixed order (deterministic), one
      // float to out_sq[tok, tile]. Row r of tile a for token tl of the block is entry v * 32 + ln with
      // e = 2 (r / 8) + tl % 2, ln = 4 (r % 8) + (tl % 8) / 2, v = (a * MT + tl / 8) * 4 + e.
      __syncthreads();
      const int rows = min(MT * 8, p.M - tok0);
      const int total = rows * NT * 16;
      const int lane = threadIdx.x & 31;
      for (int base = (threadIdx.x >> 5) * 32; base < total; base += blockDim.x) {
        const int q = base + lane, pair = q >> 4, r = q & 15;
        const int tl = pair / NT, a = pair % NT;
        float s = 0.f;
        if (q < total) {
          const int e = 2 * (r >> 3) + (tl & 1), ln = 4 * (r & 7) + ((tl & 7) >> 1);
          s = red[((a * MT + (tl >> 3)) * 4 + e) * 32 + ln];
        }
#pragma unroll
        for (int o = 8; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o, 16);
        if (q < total && r == 0) p.out_sq[(size_t)(tok0 + tl) * p.n_tiles + nt0 + a] = s;
      }
    }
  } else {
    const int nh = p.N >> 1;
    for (int i = threadIdx.x; i < V * 16; i += blockDim.x) {
      const int ln = i & 31, u = i >> 5;  // u: (a, b, e % 2); the gate value is e = e % 2, its up value e + 2
      const int e = u & 1, b = (u >> 1) % MT, a = (u >> 1) / MT;
      const int v = (a * MT + b) * 4 + e;
      const int n = (nt0 + a) * 16 + (ln >> 2);
      const int tok = tok0 + b * 8 + 2 * (ln & 3) + e;
      if (n < p.N && tok < p.M) {
        const float gate = to_float(from_float<T>(value(v, ln, n, tok)));
        const float up = to_float(from_float<T>(value(v + 2, ln, n + 8, tok)));
        y[(size_t)tok * nh + (nt0 + a) * 8 + (ln >> 2)] = from_float<T>(gate / (1.f + __expf(-gate)) * up);
      }
    }
  }
}

template <int BITS, typename T, int S, int MT, int NT, int CPS>
__global__ void __launch_bounds__(256) uniform_gemm_kernel(GemmArgs p) {
  constexpr int WPL = 2 * BITS;
  constexpr int TPF = S / 16;        // k-tiles per fold
  constexpr int FOLDS = 128 / S;     // folds per chunk
  constexpr int XW = S / 8;          // x words (half2) per fold per lane
  extern __shared__ float red[];

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int nt0 = blockIdx.x * NT;
  const int tok0 = blockIdx.y * (MT * 8);

  float acc[NT][MT][4];
#pragma unroll
  for (int a = 0; a < NT; ++a)
#pragma unroll
    for (int b = 0; b < MT; ++b)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[a][b][c] = 0.f;
  // the rms partial sums (fused RMSNorm) follow the reduction buffer
  if (has_norm(p)) norm_partials<T, 8>(p, tok0, min(MT * 8, p.M - tok0), red + nwarps * (NT * MT * 4) * 32);

  const T* __restrict__ x = reinterpret_cast<const T*>(p.x);
  // token rows of this lane (B fragment column g of each token tile)
  const T* xrow[MT];
  bool xvalid[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    int tok = tok0 + mt * 8 + g;
    xvalid[mt] = tok < p.M;
    xrow[mt] = x + (size_t)(xvalid[mt] ? tok : 0) * p.K;
  }

  const size_t chunk_words = 32 * WPL;
  const int nsteps_total = (p.chunks + CPS - 1) / CPS;

  // one pipeline step: the codes and the scale/zero words of CPS chunks
  uint32_t wcur[CPS][NT][WPL], wnxt[CPS][NT][WPL];
  uint32_t scur[CPS][FOLDS][NT], snxt[CPS][FOLDS][NT];
  uint32_t zcur[CPS][FOLDS][NT], znxt[CPS][FOLDS][NT];
  auto load_step = [&](int st, uint32_t (&w)[CPS][NT][WPL], uint32_t (&sv)[CPS][FOLDS][NT],
                       uint32_t (&zv)[CPS][FOLDS][NT]) {
#pragma unroll
    for (int c = 0; c < CPS; ++c) {
      const int chunk = st * CPS + c;
      if (chunk < p.chunks) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
          load_codes<BITS>(w[c][nt], p.qw + ((size_t)(nt0 + nt) * p.chunks + chunk) * chunk_words, lane);
#pragma unroll
        for (int f = 0; f < FOLDS; ++f) {
          const int kf = chunk * 128 + f * S;
          const int grp = kf < p.K ? kf / p.gs : 0;  // folds past K (padding) are skipped later
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            const size_t si = ((size_t)grp * p.n_tiles + nt0 + nt) * 8 + g;
            sv[c][f][nt] = __ldg(p.sc + si);
            zv[c][f][nt] = __ldg(p.zp + si);
          }
        }
      }
    }
  };

  int step = warp;
  if (step < nsteps_total) load_step(step, wcur, scur, zcur);
  for (; step < nsteps_total; step += nwarps) {
    const int nstep = step + nwarps;
    if (nstep < nsteps_total) load_step(nstep, wnxt, snxt, znxt);
#pragma unroll
    for (int c = 0; c < CPS; ++c) {
      const int chunk = step * CPS + c;
      if (chunk >= p.chunks) break;
      const int k0 = chunk * 128;
      static_for<0, FOLDS>([&](auto fc) {
        constexpr int f = decltype(fc)::value;
        const int kf = k0 + f * S;
        if (kf >= p.K) return;  // a fold wholly in the zero padding of K
        // activations of this fold: S/4 consecutive columns per lane and token tile
        uint32_t xw[MT][XW];
        const int kx = kf + t * (S / 4);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
          for (int v = 0; v < XW / 4; ++v) {
            uint4 u = make_uint4(0, 0, 0, 0);
            if (xvalid[mt] && kx + v * 8 < p.K) u = __ldg(reinterpret_cast<const uint4*>(xrow[mt] + kx + v * 8));
            xw[mt][4 * v + 0] = u.x; xw[mt][4 * v + 1] = u.y; xw[mt][4 * v + 2] = u.z; xw[mt][4 * v + 3] = u.w;
          }
        }
        float s_lo[NT], s_hi[NT];
        uint32_t zz[NT][2];
        float zf[NT][2];
        // fp16 3-bit codes use the mask + HFMA2 decoder here too (2/4-bit keep the shift decoder in v2)
        constexpr bool kFast = BITS == 3 && FastDecode<BITS>::ok && std::is_same<T, __half>::value;
        constexpr int NPOS = FastDecode<BITS>::npos;
        uint32_t off[NT][2][NPOS];
        (void)off;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          uint32_t s2 = scur[c][f][nt];
          uint32_t z2 = zcur[c][f][nt];
          __half2 sh = *reinterpret_cast<__half2*>(&s2);
          s_lo[nt] = __low2float(sh);
          s_hi[nt] = __high2float(sh);
          uint32_t zl = z2 & 0xFF, zh = (z2 >> 8) & 0xFF;
          constexpr uint32_t one = Magic<std::conditional_t<BITS == 8, __half, T>>::one;
          zz[nt][0] = (one | zl) * 0x00010001u;
          zz[nt][1] = (one | zh) * 0x00010001u;
          zf[nt][0] = 8388608.f + (float)zl;
          zf[nt][1] = 8388608.f + (float)zh;
          if constexpr (kFast) {
#pragma unroll
            for (int i = 0; i < NPOS; ++i) {
              off[nt][0][i] = fast_off<BITS>(zl, i);
              off[nt][1][i] = fast_off<BITS>(zh, i);
            }
          }
        }
        float gacc[NT][MT][4];
#pragma unroll
        for (int a = 0; a < NT; ++a)
#pragma unroll
          for (int b = 0; b < MT; ++b)
#pragma unroll
            for (int e = 0; e < 4; ++e) gacc[a][b][e] = 0.f;
        // k-tiles of this fold
        static_for<0, TPF>([&](auto jc) {
          constexpr int jj = decltype(jc)::value;
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            uint32_t a[4];
            if constexpr (kFast) {
              tile_a_fast<BITS, f * TPF + jj>(wcur[c][nt], off[nt], a);
            } else {
              const uint32_t zzn[2] = {zz[nt][0], zz[nt][1]};
              const float zfn[2] = {zf[nt][0], zf[nt][1]};
              tile_a<BITS, T, f * TPF + jj>(wcur[c][nt], zzn, zfn, a);
            }
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) mma16816(gacc[nt][mt], a, xw[mt][2 * jj], xw[mt][2 * jj + 1], T());
          }
        });
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            acc[nt][mt][0] += s_lo[nt] * gacc[nt][mt][0];
            acc[nt][mt][1] += s_lo[nt] * gacc[nt][mt][1];
            acc[nt][mt][2] += s_hi[nt] * gacc[nt][mt][2];
            acc[nt][mt][3] += s_hi[nt] * gacc[nt][mt][3];
          }
      });
    }
#pragma unroll
    for (int c = 0; c < CPS; ++c)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int w = 0; w < WPL; ++w) wcur[c][nt][w] = wnxt[c][nt][w];
#pragma unroll
    for (int c = 0; c < CPS; ++c)
#pragma unroll
      for (int f = 0; f < FOLDS; ++f)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          scur[c][f][nt] = snxt[c][f][nt];
          zcur[c][f][nt] = znxt[c][f][nt];
        }
  }

  // reduce the warps' partial sums: red[warp][value][lane]
  constexpr int V = NT * MT * 4;
#pragma unroll
  for (int a = 0; a < NT; ++a)
#pragma unroll
    for (int b = 0; b < MT; ++b)
#pragma unroll
      for (int e = 0; e < 4; ++e) red[(warp * V + (a * MT + b) * 4 + e) * 32 + lane] = acc[a][b][e];
  __syncthreads();
  write_block_output<T, NT, MT>(p, red, red + nwarps * V * 32, nwarps, nt0, tok0);
}

// ---------------------------------------------------------------------------------------------
// v3 small-m fused kernel: the same maths as uniform_gemm_kernel, but every warp streams its chunks
// (codes, the chunk's activation columns, and the scale/zero words of its folds) through a private
// ring of STAGES shared-memory buffers with cp.async, so that STAGES - 1 chunks per warp are in flight
// while one is decoded (the register-prefetch kernel above keeps one step in flight and loads the
// activations when they are used). No block-wide barrier until the final reduction.
//
// Stage layout (32-bit words): codes [NT][32 * 2b] (the global chunk layout), x [xrows][XS]
// (xrows = min(MT * 8, M) token rows of 128 columns, padded to XS words), scales [NT][FOLDS][8],
// zeros [NT][FOLDS][4] (8 u16).
constexpr int kXS = 68;  // words per activation row of a stage (128 halves + 16 bytes of padding)

template <int BITS, int S, int MT, int NT>
struct StageGeom {
  static constexpr int WPL = 2 * BITS;
  static constexpr int FOLDS = 128 / S;
  static constexpr int CW = NT * 32 * WPL;      // code words
  static constexpr int SCW = NT * FOLDS * 8;    // scale words
  static constexpr int ZW = NT * FOLDS * 4;     // zero words
  __host__ __device__ static int words(int xrows) { return CW + xrows * kXS + SCW + ZW; }
};

template <int BITS, typename T, int S, int MT, int NT, int STAGES>
__global__ void __launch_bounds__(256) uniform_gemm_cp_kernel(GemmArgs p, int xrows) {
  using G = StageGeom<BITS, S, MT, NT>;
  constexpr int WPL = G::WPL;
  constexpr int TPF = S / 16;
  constexpr int FOLDS = G::FOLDS;
  constexpr int XW = S / 8;
  extern __shared__ __align__(16) uint32_t smem[];

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int nt0 = blockIdx.x * NT;
  const int tok0 = blockIdx.y * (MT * 8);
  const int stage_words = G::words(xrows);
  uint32_t* ring = smem + (size_t)warp * STAGES * stage_words;

  const T* __restrict__ x = reinterpret_cast<const T*>(p.x);
  const int rows_here = min(xrows, p.M - tok0);  // token rows this block really has
  const size_t chunk_words = 32 * WPL;
  // chunks of this warp: warp, warp + nwarps, ...
  const int n_my = warp < p.chunks ? (p.chunks - warp + nwarps - 1) / nwarps : 0;

  // per-lane copy state, advanced by one warp step (nwarps chunks) per issued chunk
  const uint32_t* qsrc = p.qw + ((size_t)nt0 * p.chunks + warp) * chunk_words + 4 * lane;
  const size_t q_nt = (size_t)p.chunks * chunk_words, q_step = (size_t)nwarps * chunk_words;
  const int xr0 = lane >> 4, xc = (lane & 15) * 8;        // x pieces: rows xr0, xr0 + 2, ...; column xc
  const T* xsrc = x + (size_t)(tok0 + xr0) * p.K + xc;     // + k0
  const size_t x_row2 = 2 * (size_t)p.K;                    // a lane's next x row: 2 rows down
  const bool s_lane = lane < NT * FOLDS * 3;               // per (nt, fold): 2 pieces of scales, 1 of zeros
  const int s_piece = lane % 3, s_nf = lane / 3, s_nt = s_nf / FOLDS, s_f = s_nf % FOLDS;
  const uint32_t s_off = s_piece < 2 ? (uint32_t)(s_nf * 8 + s_piece * 4) : (uint32_t)(G::SCW + s_nf * 4);
  // group of a fold start: kf / gs = umulhi(kf, floor(2^32 / gs) + 1), exact while kf * gs < 2^32
  const uint32_t gmagic = 0xFFFFFFFFu / (uint32_t)p.gs + 1u;
  const bool fastdiv = (unsigned long long)p.K * (unsigned long long)p.gs < (1ull << 32);
  int k_issue = warp * 128;
  int slot_w = 0;
  // a stage's copies in two parts: the weights (codes, scales, zeros: constant), then the activations and the step
  // to the next stage
  auto issue_weights = [&]() {
    uint32_t* st = ring + slot_w * stage_words;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int q = 0; q < (8 * WPL + 31) / 32; ++q)
        if ((8 * WPL) % 32 == 0 || lane + 32 * q < 8 * WPL)
          cp_async16_cg(st + nt * 32 * WPL + 4 * (lane + 32 * q), qsrc + nt * q_nt + 128 * q, 16);
    qsrc += q_step;
    if (s_lane) {
      const uint32_t kf = (uint32_t)(k_issue + s_f * S);
      uint32_t grp = 0;
      if (kf < (uint32_t)p.K) grp = fastdiv ? __umulhi(kf, gmagic) : kf / (uint32_t)p.gs;  // padding folds: skipped at use
      const size_t si = ((size_t)grp * p.n_tiles + nt0 + s_nt) * 8;
      uint32_t* dst = st + G::CW + xrows * kXS + s_off;
      if (s_piece < 2) cp_async16_cg(dst, p.sc + si + s_piece * 4, 16);
      else cp_async16_cg(dst, p.zp + si, 16);
    }
  };
  auto issue_activations = [&]() {
    uint32_t* st = ring + slot_w * stage_words;
    const int k0 = k_issue;
    uint32_t* xs = st + G::CW;
    {
      const bool in = k0 + xc < p.K;
      const T* src = xsrc + (in ? k0 : -xc);
      if constexpr (MT == 1) {
        // rows xr0, xr0 + 2, ... below rows_here (<= 8): a fixed trip count, predicated, so the copy
        // has no loop-remainder code (it was about a tenth of the m <= 8 loop's instructions). Not for
        // MT > 1: there the unrolled form cost W2 at m = 16 up to 17 % (H100, round 4).
#pragma unroll
        for (int j = 0; j < 4; ++j)
          if (xr0 + 2 * j < rows_here) cp_async16_ca(xs + (xr0 + 2 * j) * kXS + xc / 2, src + j * x_row2, in ? 16 : 0);
      } else {
        for (int r = xr0; r < rows_here; r += 2, src += x_row2)
          cp_async16_ca(xs + r * kXS + xc / 2, src, in ? 16 : 0);
      }
    }
    k_issue += nwarps * 128;
    slot_w = slot_w + 1 == STAGES ? 0 : slot_w + 1;
  };
  auto issue = [&]() {
    issue_weights();
    issue_activations();
  };

  float acc[NT][MT][4];
#pragma unroll
  for (int a = 0; a < NT; ++a)
#pragma unroll
    for (int b = 0; b < MT; ++b)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[a][b][c] = 0.f;

  // Programmatic dependent launch (no-ops when launched without it), as in uniform_gemm_kc_kernel: only the first
  // stage's weights are requested before griddepcontrol.wait; x and norm_x are read after it.
  if (n_my > 0) issue_weights();
  pdl_wait();
  if (n_my > 0) issue_activations();
  cp_async_commit();
#pragma unroll
  for (int i = 1; i < STAGES - 1; ++i) {
    if (i < n_my) issue();
    cp_async_commit();
  }
  // the rms partial sums (fused RMSNorm), past the ring and the reduction buffer, read while the copies fly
  float* norm_part = reinterpret_cast<float*>(smem) + max(nwarps * STAGES * stage_words, nwarps * NT * MT * 4 * 32);
  if (has_norm(p)) norm_partials<T, 8>(p, tok0, rows_here, norm_part);
  int slot_r = 0;
  for (int i = 0; i < n_my; ++i) {
    if (i + STAGES - 1 < n_my) issue();
    cp_async_commit();
    cp_async_wait<STAGES - 1>();
    __syncwarp();
    const uint32_t* st = ring + slot_r * stage_words;
    slot_r = slot_r + 1 == STAGES ? 0 : slot_r + 1;
    const uint32_t* xs = st + G::CW;
    const uint32_t* ss = xs + xrows * kXS;
    const uint16_t* zs = reinterpret_cast<const uint16_t*>(ss + G::SCW);
    const int k0 = (warp + i * nwarps) * 128;
    uint32_t w[NT][WPL];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const uint32_t* cb = st + nt * 32 * WPL;
#pragma unroll
      for (int s = 0; s < Layout<BITS>::segs; ++s) {
        const uint4 v = *reinterpret_cast<const uint4*>(cb + s * 128 + lane * 4);
        w[nt][4 * s + 0] = v.x; w[nt][4 * s + 1] = v.y; w[nt][4 * s + 2] = v.z; w[nt][4 * s + 3] = v.w;
      }
      if constexpr (Layout<BITS>::tail) {
        const uint2 v = *reinterpret_cast<const uint2*>(cb + 128 + lane * 2);
        w[nt][4] = v.x; w[nt][5] = v.y;
      }
    }
    static_for<0, FOLDS>([&](auto fc) {
      constexpr int f = decltype(fc)::value;
      if (k0 + f * S >= p.K) return;  // a fold wholly in the zero padding of K
      uint32_t xw[MT][XW];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int r = min(mt * 8 + g, xrows - 1);  // rows past M: any valid row (their outputs are dropped)
        const uint32_t* xr = xs + r * kXS + (f * S + t * (S / 4)) / 2;
#pragma unroll
        for (int v = 0; v < XW / 4; ++v) {
          const uint4 u = *reinterpret_cast<const uint4*>(xr + 4 * v);
          xw[mt][4 * v + 0] = u.x; xw[mt][4 * v + 1] = u.y; xw[mt][4 * v + 2] = u.z; xw[mt][4 * v + 3] = u.w;
        }
      }
      float s_lo[NT], s_hi[NT];
      uint32_t zz[NT][2];
      float zf[NT][2];
      constexpr bool kFast = FastDecode<BITS>::ok && std::is_same<T, __half>::value;
      constexpr int NPOS = FastDecode<BITS>::npos;
      uint32_t off[NT][2][NPOS];
      (void)off;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        uint32_t s2 = ss[(nt * FOLDS + f) * 8 + g];
        const uint32_t z2 = zs[(nt * FOLDS + f) * 8 + g];
        const __half2 sh = *reinterpret_cast<__half2*>(&s2);
        s_lo[nt] = __low2float(sh);
        s_hi[nt] = __high2float(sh);
        const uint32_t zl = z2 & 0xFF, zh = (z2 >> 8) & 0xFF;
        constexpr uint32_t one = Magic<std::conditional_t<BITS == 8, __half, T>>::one;
        zz[nt][0] = (one | zl) * 0x00010001u;
        zz[nt][1] = (one | zh) * 0x00010001u;
        zf[nt][0] = 8388608.f + (float)zl;
        zf[nt][1] = 8388608.f + (float)zh;
        if constexpr (kFast) {
#pragma unroll
          for (int i = 0; i < NPOS; ++i) {
            off[nt][0][i] = fast_off<BITS>(zl, i);
            off[nt][1][i] = fast_off<BITS>(zh, i);
          }
        }
      }
      float gacc[NT][MT][4];
#pragma unroll
      for (int a = 0; a < NT; ++a)
#pragma unroll
        for (int b = 0; b < MT; ++b)
#pragma unroll
          for (int e = 0; e < 4; ++e) gacc[a][b][e] = 0.f;
      static_for<0, TPF>([&](auto jc) {
        constexpr int jj = decltype(jc)::value;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          uint32_t a[4];
          if constexpr (kFast) {
            tile_a_fast<BITS, f * TPF + jj>(w[nt], off[nt], a);
          } else {
            const uint32_t zzn[2] = {zz[nt][0], zz[nt][1]};
            const float zfn[2] = {zf[nt][0], zf[nt][1]};
            tile_a<BITS, T, f * TPF + jj>(w[nt], zzn, zfn, a);
          }
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) mma16816(gacc[nt][mt], a, xw[mt][2 * jj], xw[mt][2 * jj + 1], T());
        }
      });
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          acc[nt][mt][0] += s_lo[nt] * gacc[nt][mt][0];
          acc[nt][mt][1] += s_lo[nt] * gacc[nt][mt][1];
          acc[nt][mt][2] += s_hi[nt] * gacc[nt][mt][2];
          acc[nt][mt][3] += s_hi[nt] * gacc[nt][mt][3];
        }
    });
    __syncwarp();  // every lane has read this buffer before it is refilled
  }
  pdl_launch_dependents();  // every load is requested: the next kernel may be scheduled (late, as in the kc kernel)
  cp_async_wait<0>();
  __syncthreads();  // the ring is reused for the reduction

  constexpr int V = NT * MT * 4;
  float* red = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int a = 0; a < NT; ++a)
#pragma unroll
    for (int b = 0; b < MT; ++b)
#pragma unroll
      for (int e = 0; e < 4; ++e) red[(warp * V + (a * MT + b) * 4 + e) * 32 + lane] = acc[a][b][e];
  __syncthreads();
  write_block_output<T, NT, MT>(p, red, norm_part, nwarps, nt0, tok0);
}

// ---------------------------------------------------------------------------------------------
// v4/v5 small-m fused kernel (m <= 8, one token tile): the v3 ring with KC = 2 chunks per stage, so
// that one copy issue, one wait, one ring rotation and one loop step serve 256 columns instead of
// 128. The copy issue keeps its per-lane state in registers across stages and has no branches: code
// pointers advanced by a constant (the second chunk's copy predicated off past the last chunk), one
// 16-byte activation piece per lane and token row (a stage row is 256 columns = 32 lanes x 16 bytes),
// and a fold's scale/zero words found by one umulhi (the group) and one 32 x 32 -> 64-bit multiply-add
// (the address), no 64-bit index arithmetic. NT = 2 (v4): two 16-row n-tiles per warp as v3; NT = 1
// (v5). XR: token rows of a stage, 1 (m = 1: one activation copy, everything fixed at compile time)
// or 8 (m = 2..8: a loop over the block's rows).
//
// Stage layout (32-bit words): codes [NT][KC][32 * 2b] (each n-tile's KC chunks are consecutive in the
// global layout too), scales [NT][KC * FOLDS][8], zeros [NT][KC * FOLDS][4] (8 u16), x [xrows][XS]
// (KC * 128 halves of a token row + 16 bytes of padding).
//
// Padding needs no branch in the decode loop: columns of x at or past K are zero-filled by the copy,
// the codes there are zero (repack), a fold wholly past K reads the scales of group 0, and the second
// chunk of a stage past the last chunk (odd chunk count) keeps whatever codes its slot held, which the
// masks decode to finite values: every such product is an exact 0.
//
// Group of a fold: grp = umulhi(kf, gmagic) with gmagic = floor((2^32 - 1) / gs) + 1, exact while
// K * gs < 2^32 (the launcher falls back to v3/v0 otherwise); gmagic = 0 when one group spans K.
template <int BITS, int S, int NT, int KC>
struct StageGeomKC {
  static constexpr int WPL = 2 * BITS;
  static constexpr int FOLDS = 128 / S;
  static constexpr int SF = KC * FOLDS;          // folds per stage
  static constexpr int CHW = 32 * WPL;           // words of one chunk of one n-tile
  static constexpr int CW = NT * KC * CHW;       // code words
  static constexpr int XS = KC * 64 + 4;         // words per activation row
  static constexpr int SCW = NT * SF * 8;        // scale words
  static constexpr int ZW = NT * SF * 4;         // zero words
  static constexpr int XOFF = CW + SCW + ZW;     // first activation word
  static constexpr int SPIECES = NT * SF * 3;    // 16-byte scale/zero pieces per stage
  static constexpr int SQ = (SPIECES + 31) / 32; // pieces per lane (rounds)
  static constexpr int CPIECES = 8 * WPL;        // 16-byte code pieces of one chunk of one n-tile
  static constexpr int CQ = (CPIECES + 31) / 32;
  __host__ __device__ static constexpr int words(int xrows) { return XOFF + xrows * XS; }
};

template <int BITS, typename T, int S, int NT, int KC, int STAGES, int XR>
__global__ void __launch_bounds__(256) uniform_gemm_kc_kernel(GemmArgs p, int xrows_arg, uint32_t gmagic, int slots) {
  static_assert(KC == 2, "a stage row of activations is 32 lanes x 8 halves = 2 chunks");
  static_assert(XR == 1 || XR == 8, "one token row, or up to one token tile");
  using G = StageGeomKC<BITS, S, NT, KC>;
  constexpr int WPL = G::WPL;
  constexpr int TPF = S / 16;
  constexpr int FOLDS = G::FOLDS;
  constexpr int SF = G::SF;
  constexpr int CHW = G::CHW;
  constexpr int XW = S / 8;
  extern __shared__ __align__(16) uint32_t smem[];

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int nt0 = blockIdx.x * NT;
  const int tok0 = blockIdx.y * 8;
  const int xrows = XR == 1 ? 1 : xrows_arg;
  const int stage_words = G::words(xrows);
  // slots = min(STAGES, stages of the busiest warp) (kc_ring_slots): a warp never holds more stages than it
  // has, so a short K needs less shared memory per block and more blocks fit on an SM
  uint32_t* ring = smem + (size_t)warp * slots * stage_words;
  const uint32_t ring_s = static_cast<uint32_t>(__cvta_generic_to_shared(ring));

  const T* __restrict__ x = reinterpret_cast<const T*>(p.x);
  const int rows_here = XR == 1 ? 1 : min(8, p.M - tok0);  // token rows this block really has (>= 1)
  const int pairs = (p.chunks + KC - 1) / KC;
  // stages of this warp: chunk pairs warp, warp + nwarps, ...
  const int n_my = warp < pairs ? (pairs - warp + nwarps - 1) / nwarps : 0;
  const int kstep = nwarps * KC * 128;

  // ---- per-lane copy state (advanced by one warp step per issued stage)
  const uint32_t* qsrc = p.qw + ((size_t)nt0 * p.chunks + (size_t)warp * KC) * CHW + 4 * lane;
  const size_t q_nt = (size_t)p.chunks * CHW, q_step = (size_t)nwarps * KC * CHW;
  int c_issue = warp * KC;  // first chunk of the next stage to issue
  int k_issue = warp * KC * 128;
  const T* xsrc = x + (size_t)tok0 * p.K + lane * 8;
  // scale/zero pieces: piece l = lane + 32 q -> (n-tile, fold of the stage, scale half 0/1 or zeros)
  const char* s_src[G::SQ];
  uint32_t s_gstride[G::SQ], s_dst[G::SQ];
  int s_koff[G::SQ];
  bool s_on[G::SQ];
#pragma unroll
  for (int q = 0; q < G::SQ; ++q) {
    const int l = lane + 32 * q;
    s_on[q] = l < G::SPIECES;
    const int piece = l % 3, nf = l / 3, nt = min(nf / SF, NT - 1), fa = nf % SF;
    s_koff[q] = fa * S;
    if (piece < 2) {
      s_src[q] = reinterpret_cast<const char*>(p.sc + (size_t)(nt0 + nt) * 8 + piece * 4);
      s_gstride[q] = (uint32_t)p.n_tiles * 32u;  // bytes per group: n_tiles x 8 half2
      s_dst[q] = (uint32_t)(G::CW * 4 + (nt * SF + fa) * 32 + piece * 16);
    } else {
      s_src[q] = reinterpret_cast<const char*>(p.zp + (size_t)(nt0 + nt) * 8);
      s_gstride[q] = (uint32_t)p.n_tiles * 16u;  // n_tiles x 8 u16
      s_dst[q] = (uint32_t)(G::CW * 4 + G::SCW * 4 + (nt * SF + fa) * 16);
    }
  }
  uint32_t slot_w = 0;  // byte offset of the slot to fill
  // A stage's copies in two parts: the weights (codes, scales, zeros: constant, so they may be requested before
  // the kernel this one depends on has finished), then the activations, which also move the state on a stage.
  auto issue_weights = [&]() {
    const uint32_t st = ring_s + slot_w;
    const bool second = c_issue + 1 < p.chunks;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int c = 0; c < KC; ++c)
#pragma unroll
        for (int q = 0; q < G::CQ; ++q) {
          const bool lane_ok = G::CPIECES % 32 == 0 || lane + 32 * q < G::CPIECES;
          const uint32_t d = st + (uint32_t)(((nt * KC + c) * CHW + 4 * (lane + 32 * q)) * 4);
          const uint32_t* src = qsrc + nt * q_nt + c * CHW + 128 * q;
          if (c == 0 && (G::CPIECES % 32 == 0 || q + 1 < G::CQ)) cp_async16_cg_s(d, src);
          else cp_async16_cg_if(d, src, lane_ok && (c == 0 || second));
        }
#pragma unroll
    for (int q = 0; q < G::SQ; ++q) {
      const uint32_t kf = (uint32_t)(k_issue + s_koff[q]);
      // a fold in the padding of K: group 0 (valid; its products are zero)
      const uint32_t grp = kf < (uint32_t)p.K ? __umulhi(kf, gmagic) : 0u;
      const char* src = s_src[q] + (size_t)grp * s_gstride[q];
      if (G::SPIECES % 32 == 0) cp_async16_cg_s(st + s_dst[q], src);
      else cp_async16_cg_if(st + s_dst[q], src, s_on[q]);
    }
  };
  auto issue_activations = [&]() {
    const uint32_t st = ring_s + slot_w;
    qsrc += q_step;
    {
      // activations: one 16-byte piece per lane per token row; columns past K are zero-filled (the
      // source then points at x itself, which is valid). xsrc already holds the lane's column
      // (lane * 8): only the stage's first column is added here.
      const bool in = k_issue + lane * 8 < p.K;
      const T* src = in ? xsrc + k_issue : x;
      const uint32_t d = st + (uint32_t)(G::XOFF * 4 + lane * 16);
      if constexpr (XR == 1) {
        cp_async16_ca_s(d, src, in ? 16 : 0);
      } else {
        uint32_t dr = d;
#pragma unroll 1
        for (int r = 0; r < rows_here; ++r, dr += G::XS * 4, src += p.K) cp_async16_ca_s(dr, src, in ? 16 : 0);
      }
    }
    c_issue += nwarps * KC;
    k_issue += kstep;
    slot_w += (uint32_t)(stage_words * 4);
    if (slot_w == (uint32_t)(slots * stage_words * 4)) slot_w = 0;
  };
  auto issue = [&]() {
    issue_weights();
    issue_activations();
  };

  float acc[NT][4];
#pragma unroll
  for (int a = 0; a < NT; ++a)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[a][c] = 0.f;

  // Programmatic dependent launch (no-ops when launched without it): the block may be resident before the kernel it
  // depends on has finished. Only the first stage's weights (codes, scales, zeros: constant) are requested before
  // griddepcontrol.wait; everything the previous kernels write (x, norm_x, norm_sq, residual) is read after it.
  if (n_my > 0) issue_weights();
  pdl_wait();
  if (p.pdl_early) pdl_launch_dependents();  // the early trigger (GemmArgs::pdl_early)
  // fused RMSNorm: the rms partial sums go past the ring and the reduction buffer. One token row (XR = 1): the row
  // of norm_x is copied into shared memory (after the partials) with the first stage's copies, and summed after
  // the main loop, so that its latency hides behind the weight stream (summing it up front, from L2, held every
  // block's main loop back: +1.7 us on 12288x4096 W4, H100). Up to 8 rows: summed up front from L2.
  float* norm_part = reinterpret_cast<float*>(smem) + max(nwarps * slots * stage_words, nwarps * NT * 4 * 32);
  if constexpr (XR == 1) {
    if (p.norm_x) {
      const uint32_t hs = static_cast<uint32_t>(__cvta_generic_to_shared(norm_part + nwarps * kNormRows));
      const T* h = reinterpret_cast<const T*>(p.norm_x) + (size_t)tok0 * p.K;
      for (int k = threadIdx.x * 8; k < p.K; k += blockDim.x * 8) cp_async16_ca_s(hs + 2 * k, h + k, 16);
    } else if (p.norm_sq) {  // the token's slots of sums of squares (a few hundred floats), the same way
      const uint32_t hs = static_cast<uint32_t>(__cvta_generic_to_shared(norm_part + nwarps * kNormRows));
      const float* sq = p.norm_sq + (size_t)tok0 * p.norm_slots;
      for (int j = threadIdx.x; j < p.norm_slots; j += blockDim.x) cp_async4_ca_s(hs + 4 * j, sq + j);
    }
    if (p.residual) {
      // the residual and next_w values of this block's NT * 16 outputs, 16-byte pieces zero-filled past N: read in
      // the epilogue from shared memory instead of from L2 or DRAM after the main loop (the base pointers are
      // 16-byte aligned, tok0 = 0)
      const uint32_t es = static_cast<uint32_t>(__cvta_generic_to_shared(norm_part + nwarps * kNormRows)) +
                          (uint32_t)staged_norm_bytes(p);
      constexpr int kPieces = NT * 2;  // per array
      if (threadIdx.x < 2 * kPieces) {
        const int arr = threadIdx.x / kPieces, pc = threadIdx.x % kPieces;
        const int n = nt0 * 16 + pc * 8;
        const T* base = reinterpret_cast<const T*>(arr == 0 ? p.residual : p.next_w);
        const int bytes = base == nullptr ? 0 : 2 * max(0, min(8, p.N - n));
        cp_async16_ca_s(es + (uint32_t)((arr * NT * 16 + pc * 8) * 2), bytes ? base + n : p.residual, bytes);
      }
    }
  } else {
    if (has_norm(p)) norm_partials<T, XR>(p, tok0, rows_here, norm_part);
  }
  // the first stage's activations join its weights in the first copy group
  if (n_my > 0) issue_activations();
  cp_async_commit();
#pragma unroll
  for (int i = 1; i < STAGES - 1; ++i) {
    if (i < n_my) issue();
    cp_async_commit();
  }
  // this lane's B fragment row (rows past M: any valid row, their outputs are dropped) and column
  const int x_lane = G::XOFF + (XR == 1 ? 0 : min(g, xrows - 1) * G::XS) + t * (S / 8);
  int slot_r = 0;  // word offset of the slot to read
  for (int i = 0; i < n_my; ++i) {
    if (i + STAGES - 1 < n_my) issue();
    cp_async_commit();
    cp_async_wait<STAGES - 1>();
    __syncwarp();
    const uint32_t* st = ring + slot_r;
    slot_r += stage_words;
    if (slot_r == slots * stage_words) slot_r = 0;
    const uint32_t* xs = st + x_lane;
    const uint32_t* ss = st + G::CW;
    const uint16_t* zs = reinterpret_cast<const uint16_t*>(ss + G::SCW);
    static_for<0, KC>([&](auto cc) {
      constexpr int c = decltype(cc)::value;
      uint32_t w[NT][WPL];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const uint32_t* cb = st + (nt * KC + c) * CHW;
#pragma unroll
        for (int s = 0; s < Layout<BITS>::segs; ++s) {
          const uint4 v = *reinterpret_cast<const uint4*>(cb + s * 128 + lane * 4);
          w[nt][4 * s + 0] = v.x; w[nt][4 * s + 1] = v.y; w[nt][4 * s + 2] = v.z; w[nt][4 * s + 3] = v.w;
        }
        if constexpr (Layout<BITS>::tail) {
          const uint2 v = *reinterpret_cast<const uint2*>(cb + 128 + lane * 2);
          w[nt][4] = v.x; w[nt][5] = v.y;
        }
      }
      static_for<0, FOLDS>([&](auto fc) {
        constexpr int f = decltype(fc)::value;
        constexpr int fs = c * FOLDS + f;  // fold index inside the stage
        uint32_t xw[XW];
#pragma unroll
        for (int v = 0; v < XW / 4; ++v) {
          const uint4 u = *reinterpret_cast<const uint4*>(xs + (c * 128 + f * S) / 2 + 4 * v);
          xw[4 * v + 0] = u.x; xw[4 * v + 1] = u.y; xw[4 * v + 2] = u.z; xw[4 * v + 3] = u.w;
        }
        float s_lo[NT], s_hi[NT];
        uint32_t zz[NT][2];
        float zf[NT][2];
        constexpr bool kFast = FastDecode<BITS>::ok && std::is_same<T, __half>::value;
        constexpr int NPOS = FastDecode<BITS>::npos;
        uint32_t off[NT][2][NPOS];
        (void)off;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          uint32_t s2 = ss[(nt * SF + fs) * 8 + g];
          const uint32_t z2 = zs[(nt * SF + fs) * 8 + g];
          const __half2 sh = *reinterpret_cast<__half2*>(&s2);
          s_lo[nt] = __low2float(sh);
          s_hi[nt] = __high2float(sh);
          const uint32_t zl = z2 & 0xFF, zh = (z2 >> 8) & 0xFF;
          constexpr uint32_t one = Magic<std::conditional_t<BITS == 8, __half, T>>::one;
          zz[nt][0] = (one | zl) * 0x00010001u;
          zz[nt][1] = (one | zh) * 0x00010001u;
          zf[nt][0] = 8388608.f + (float)zl;
          zf[nt][1] = 8388608.f + (float)zh;
          if constexpr (kFast) {
#pragma unroll
            for (int j = 0; j < NPOS; ++j) {
              off[nt][0][j] = fast_off<BITS>(zl, j);
              off[nt][1][j] = fast_off<BITS>(zh, j);
            }
          }
        }
        float gacc[NT][4];
#pragma unroll
        for (int a = 0; a < NT; ++a)
#pragma unroll
          for (int e = 0; e < 4; ++e) gacc[a][e] = 0.f;
        static_for<0, TPF>([&](auto jc) {
          constexpr int jj = decltype(jc)::value;
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            uint32_t a[4];
            if constexpr (kFast) {
              tile_a_fast<BITS, f * TPF + jj>(w[nt], off[nt], a);
            } else {
              const uint32_t zzn[2] = {zz[nt][0], zz[nt][1]};
              const float zfn[2] = {zf[nt][0], zf[nt][1]};
              tile_a<BITS, T, f * TPF + jj>(w[nt], zzn, zfn, a);
            }
            mma16816(gacc[nt], a, xw[2 * jj], xw[2 * jj + 1], T());
          }
        });
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          acc[nt][0] += s_lo[nt] * gacc[nt][0];
          acc[nt][1] += s_lo[nt] * gacc[nt][1];
          acc[nt][2] += s_hi[nt] * gacc[nt][2];
          acc[nt][3] += s_hi[nt] * gacc[nt][3];
        }
      });
    });
    __syncwarp();  // every lane has read this buffer before it is refilled
  }
  // every byte this block reads is requested: the next kernel in the stream may be scheduled. (Letting it in right
  // after the wait instead was measured: its blocks then crowd the first SMs to free up, and decode lost 0.1 ms.)
  pdl_launch_dependents();
  cp_async_wait<0>();
  if constexpr (XR == 1) {
    if (p.norm_x) {  // this thread's own copies of the norm_x row: visible to it after the wait
      const T* hs = reinterpret_cast<const T*>(norm_part + nwarps * kNormRows);
      float q = 0.f;
      for (int k = threadIdx.x * 8; k < p.K; k += blockDim.x * 8) {
        const uint4 v = *reinterpret_cast<const uint4*>(hs + k);
        const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const float f = to_float(e[j]);
          q = fmaf(f, f, q);
        }
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) q += __shfl_xor_sync(0xffffffffu, q, o);
      if (lane == 0) norm_part[warp * kNormRows] = q;
    } else if (p.norm_sq) {  // this thread's own copies of the slots
      const float* ss = norm_part + nwarps * kNormRows;
      float q = 0.f;
      for (int j = threadIdx.x; j < p.norm_slots; j += blockDim.x) q += ss[j];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) q += __shfl_xor_sync(0xffffffffu, q, o);
      if (lane == 0) norm_part[warp * kNormRows] = q;
    }
  }
  __syncthreads();  // the ring is reused for the reduction

  constexpr int V = NT * 4;
  float* red = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int a = 0; a < NT; ++a)
#pragma unroll
    for (int e = 0; e < 4; ++e) red[(warp * V + a * 4 + e) * 32 + lane] = acc[a][e];
  __syncthreads();
  const T* staged = nullptr;  // this block's residual, then next_w values (above)
  if constexpr (XR == 1) {
    if (p.residual)
      staged = reinterpret_cast<const T*>(reinterpret_cast<const char*>(norm_part + nwarps * kNormRows) + staged_norm_bytes(p));
  }
  write_block_output<T, NT, 1>(p, red, norm_part, nwarps, nt0, tok0, staged);
}

// One warp per (n-tile, chunk): W[n, k] = s * (q - z), written in the true k order. The warp's
// 16 x 128 tile is staged in shared memory and written as whole 256-byte row segments (two rows per
// warp store), not as the fragment layout's scattered 16-byte pieces.
template <int BITS, typename T, int S>
__global__ void __launch_bounds__(256) uniform_dequant_kernel(DequantArgs p) {
  constexpr int WPL = 2 * BITS;
  constexpr int TPF = S / 16;
  constexpr int FOLDS = 128 / S;
  const int lane = threadIdx.x & 31;
  const int gw = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (gw >= p.n_tiles * p.chunks) return;
  const int nt = gw / p.chunks, chunk = gw % p.chunks;
  const int g = lane >> 2, t = lane & 3;
  uint32_t w[WPL];
  load_codes<BITS>(w, p.qw + (size_t)gw * 32 * WPL, lane);
  T* __restrict__ out = reinterpret_cast<T*>(p.w);
  __shared__ __align__(16) uint32_t tile_s[8][16 * kXS];  // [warp][row][128 values + pad]
  uint32_t* tile = tile_s[threadIdx.x >> 5];
  static_for<0, FOLDS>([&](auto fc) {
    constexpr int f = decltype(fc)::value;
    const int kf = chunk * 128 + f * S;
    if (kf >= p.K) return;  // a fold wholly in the zero padding of K
    const int grp = kf / p.gs;
    const size_t si = ((size_t)grp * p.n_tiles + nt) * 8 + g;
    uint32_t s2 = __ldg(p.sc + si);
    uint32_t z2 = __ldg(p.zp + si);
    __half2 sh = *reinterpret_cast<__half2*>(&s2);
    const float sl = __low2float(sh), shi = __high2float(sh);
    const uint32_t zl = z2 & 0xFF, zh = (z2 >> 8) & 0xFF;
    constexpr uint32_t one = Magic<std::conditional_t<BITS == 8, __half, T>>::one;
    uint32_t zz[2] = {(one | zl) * 0x00010001u, (one | zh) * 0x00010001u};
    float zf[2] = {8388608.f + (float)zl, 8388608.f + (float)zh};
    uint32_t lo[S / 8], hi[S / 8];  // S/4 values of row g and of row g + 8
    static_for<0, TPF>([&](auto jc) {
            constexpr int jj = decltype(jc)::value;
            uint32_t a[4];
            tile_a<BITS, T, f * TPF + jj>(w, zz, zf, a);
            // a holds exact integers q - z in T; scale in fp32, round once
#pragma unroll
            for (int r = 0; r < 4; ++r) {
              float2 v;
              if constexpr (std::is_same<T, __half>::value) {
                v = __half22float2(*reinterpret_cast<__half2*>(&a[r]));
              } else {
                v = __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&a[r]));
              }
              const float s = (r & 1) ? shi : sl;
              uint32_t o;
              if constexpr (std::is_same<T, __half>::value) {
                __half2 h = __floats2half2_rn(v.x * s, v.y * s);
                o = *reinterpret_cast<uint32_t*>(&h);
              } else {
                __nv_bfloat162 h = __floats2bfloat162_rn(v.x * s, v.y * s);
                o = *reinterpret_cast<uint32_t*>(&h);
              }
              // register r: row g + 8 (r & 1), columns 4 jj + 2 (r >> 1)
              if (r & 1) hi[2 * jj + (r >> 1)] = o;
              else lo[2 * jj + (r >> 1)] = o;
            }
    });
    const int kx = f * S + t * (S / 4);  // column inside the chunk
#pragma unroll
    for (int v = 0; v < S / 32; ++v) {
      *reinterpret_cast<uint4*>(tile + g * kXS + kx / 2 + 4 * v) = make_uint4(lo[4 * v], lo[4 * v + 1], lo[4 * v + 2], lo[4 * v + 3]);
      *reinterpret_cast<uint4*>(tile + (g + 8) * kXS + kx / 2 + 4 * v) =
          make_uint4(hi[4 * v], hi[4 * v + 1], hi[4 * v + 2], hi[4 * v + 3]);
    }
  });
  __syncwarp();
#pragma unroll
  for (int it = 0; it < 8; ++it) {
    const int piece = it * 32 + lane, row = piece >> 4, c16 = piece & 15;
    const int n = nt * 16 + row, col = chunk * 128 + c16 * 8;
    if (n < p.N && col < p.K)
      *reinterpret_cast<uint4*>(out + (size_t)n * p.K + col) = *reinterpret_cast<const uint4*>(tile + row * kXS + c16 * 4);
  }
}

}  // namespace lpq
