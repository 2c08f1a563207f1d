// lpq: the streaming GEMV of the ptq161 format (the default kernel; ptq161_kernels.cu keeps the first one).
//
// Layout read (lpq/formats/ptq161.py; N = out_features, S salient and B = K - S binarized channels):
//   qw [B/32, N] sign words, sw [S/8, N] 4-bit code words: both contiguous along N, so consecutive threads
//   (consecutive rows) read consecutive words.
//
// Why a second kernel: the first one gives every block a K tile of 16 words per row and pays, per block,
// a gather of x, a table build, fp32 atomics, plus a memset and an epilogue launch per call; at batch 1 it
// reached 0.35-1.24 TB/s on the H100. Here:
// - a block owns R x 256 rows (R = 2: one 8-byte load covers two rows) and one contiguous K range of each
//   run (split-K over blockIdx.y, about four blocks an SM in all), and streams its words through register
//   double buffers: the loads of the next 8 sign words (the next 4-word step of code words) are in flight
//   while the current ones are summed;
// - the sign words are summed through a table of signed nibble sums in shared memory (16 entries per 4
//   channels per token; all lanes read the same 16-entry group, so the reads never conflict on banks);
//   the byte offset of an entry is ((word >> (4j - 2)) & 0x3C) | group base: one shift and one LOP3,
//   because the group base is a multiple of 64 bytes;
// - the salient codes (default) go through the tensor cores: mma.m16n8k16 with A = the codes of 16 rows
//   (the fp16/bf16 magic number gives code + 1024 / + 128, centred to code - 8 exactly) and B = the staged
//   activations in the matching K order (MmaOps below); about 2.3 instructions a weight against 5 for the
//   FFMA form (variant 3: the 2^23 magic number, an FADD and an FFMA per code, one broadcast LDS.128 per
//   4 channels);
// - each block applies the per-row scales, zero points and means to its own partial sums (the sums of x
//   over its own K range make that exact), so the result is a plain sum over the splits: with one split the
//   block writes y; otherwise it writes fp32 partials [ksplit, m, N], and the last block of a row block (a
//   counter per row block, restored to zero by that block) adds them in split order (deterministic) and
//   writes y. No memset, no second launch.
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "ptq161_launch.h"

namespace lpq {
namespace ptq161 {

namespace {

constexpr int kThreads = 256;
constexpr int kGroup = 8;              // words per register buffer
constexpr int kTableFloats = 8192;     // 32 KB of signed nibble sums per stage, all tokens of the tile
constexpr int kSalFloats = 2048;       // 8 KB of staged salient inputs per stage, all tokens of the tile

// words per stage: 128 table floats per sign word and token; 8 inputs per code word and token
template <int MT> __host__ __device__ constexpr int bin_stage_words() { return kTableFloats / (MT * 128); }
template <int MT> __host__ __device__ constexpr int sal_stage_words() { return kSalFloats / (MT * 8); }

__device__ __forceinline__ float to_f(const __half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(const __nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// R consecutive words of one K row (rows n0 .. n0 + R - 1), streamed past L1
template <int R> struct Words;
template <> struct Words<1> {
  uint32_t w[1];
  __device__ __forceinline__ void load(const uint32_t* p) { w[0] = __ldcs(p); }
  __device__ __forceinline__ void zero() { w[0] = 0u; }
};
template <> struct Words<2> {
  uint32_t w[2];
  __device__ __forceinline__ void load(const uint32_t* p) {
    const uint2 v = __ldcs(reinterpret_cast<const uint2*>(p));
    w[0] = v.x;
    w[1] = v.y;
  }
  __device__ __forceinline__ void zero() { w[0] = w[1] = 0u; }
};

// Words [w, w + kGroup) of a run, those below `end` loaded (the others left zero, never summed).
template <int R>
__device__ __forceinline__ void load_group(Words<R> (&g)[kGroup], const uint32_t* __restrict__ base, int w, int end,
                                           int n, int n0, bool row_ok) {
#pragma unroll
  for (int i = 0; i < kGroup; ++i) {
    if (row_ok && w + i < end) g[i].load(base + (size_t)(w + i) * n + n0);
    else g[i].zero();
  }
}

// Table of the binarized stage starting at sign word `w` (count words): tab[t][g][v] for nibble group g
// (channels 4g..4g+3 of the stage), v = the 4 sign bits, entry = sum_i (bit i ? +1 : -1) colscale x. Also adds
// the unscaled inputs of the stage to sum_b[t] (this thread's share; reduced over the block at the end).
template <typename T, int MT>
__device__ __forceinline__ void build_table(float* tab, const StreamArgs& a, int t0, int mt, int w, int count,
                                            float (&sum_b)[MT]) {
  const T* __restrict__ x = reinterpret_cast<const T*>(a.x);
  const int groups = count * 8;
  for (int e = threadIdx.x; e < MT * groups; e += kThreads) {
    const int t = e / groups, g = e - t * groups;
    const int c = w * 32 + 4 * g;  // position in the binarized run
    float q[4] = {0.f, 0.f, 0.f, 0.f};
    if (t < mt) {
      const int4 idx = *reinterpret_cast<const int4*>(a.bin_idx + c);
      const float4 cs = *reinterpret_cast<const float4*>(a.colscale + c);
      const T* xr = x + (size_t)(t0 + t) * a.k;
      const float x0 = to_f(xr[idx.x]), x1 = to_f(xr[idx.y]), x2 = to_f(xr[idx.z]), x3 = to_f(xr[idx.w]);
      sum_b[t] += (x0 + x1) + (x2 + x3);
      q[0] = cs.x * x0;
      q[1] = cs.y * x1;
      q[2] = cs.z * x2;
      q[3] = cs.w * x3;
    }
    // pair sums of channels 0/1 and 2/3 (index: bit 0 = first, bit 1 = second of the pair)
    const float lo[4] = {-q[0] - q[1], q[0] - q[1], -q[0] + q[1], q[0] + q[1]};
    const float hi[4] = {-q[2] - q[3], q[2] - q[3], -q[2] + q[3], q[2] + q[3]};
    float4* out = reinterpret_cast<float4*>(tab + (size_t)(t * groups + g) * 16);
#pragma unroll
    for (int h = 0; h < 4; ++h) out[h] = make_float4(lo[0] + hi[h], lo[1] + hi[h], lo[2] + hi[h], lo[3] + hi[h]);
  }
}

// Salient inputs of the stage starting at code word `w` (count words): xs[t][c], c = 8 per word. Also adds
// them to sum_s[t].
template <typename T, int MT>
__device__ __forceinline__ void stage_salient(float* xs, const StreamArgs& a, int t0, int mt, int w, int count,
                                              float (&sum_s)[MT]) {
  const T* __restrict__ x = reinterpret_cast<const T*>(a.x);
  const int cnt = count * 8;
  for (int e = threadIdx.x; e < MT * cnt; e += kThreads) {
    const int t = e / cnt, c = e - t * cnt;
    float v = 0.f;
    if (t < mt) {
      v = to_f(x[(size_t)(t0 + t) * a.k + a.sal_idx[w * 8 + c]]);
      sum_s[t] += v;
    }
    xs[e] = v;
  }
}

// tab: the stage's table (static shared memory, so the compiler addresses it as a constant plus the entry's
// byte offset); word0: the group's first word within the stage; groups: nibble groups of the stage.
template <int MT, int R>
__device__ __forceinline__ void sum_signs(const Words<R> (&g)[kGroup], int valid, const float* tab, int word0,
                                          int groups, float (&acc)[MT][R]) {
  const char* tab_bytes = reinterpret_cast<const char*>(tab);
#pragma unroll
  for (int i = 0; i < kGroup; ++i) {
    if (i < valid) {  // the same for every thread of the block
      const uint32_t base = (uint32_t)(word0 + i) * 512u;  // 8 groups x 16 floats per word: bits 2-5 stay 0
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const uint32_t w = g[i].w[r];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const uint32_t off = ((j == 0 ? (w << 2) : (w >> (4 * j - 2))) & 0x3Cu) | base;
#pragma unroll
          for (int t = 0; t < MT; ++t)
            acc[t][r] += *reinterpret_cast<const float*>(tab_bytes + off + 64u * j + (uint32_t)(t * groups) * 64u);
        }
      }
    }
  }
}

template <int MT, int R>
__device__ __forceinline__ void sum_codes(const Words<R> (&g)[kGroup], int valid, const float* xs, int word0,
                                          int cnt, float (&acc)[MT][R]) {
#pragma unroll
  for (int i = 0; i < kGroup; ++i) {
    if (i < valid) {
#pragma unroll
      for (int t = 0; t < MT; ++t) {
        const float4 xa = *reinterpret_cast<const float4*>(xs + t * cnt + (word0 + i) * 8);
        const float4 xb = *reinterpret_cast<const float4*>(xs + t * cnt + (word0 + i) * 8 + 4);
        const float xv[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const uint32_t w = g[i].w[r];
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            // code -> float exactly: the integer in the low mantissa bits of 2^23, minus 2^23
            const float q = __uint_as_float(0x4B000000u | ((w >> (4 * j)) & 15u)) - 8388608.f;
            acc[t][r] = fmaf(q, xv[j], acc[t][r]);
          }
        }
      }
    }
  }
}

// ---- salient codes on the tensor cores (variant "stream-mma") ------------------------------------------
// mma.m16n8k16 with A = the codes of 16 output rows and B = the activations (8 token columns, tokens >= MT
// zero). A lane's A fragment is 4 codes of row lane / 4 and 4 of row lane / 4 + 8 per k-step, so the lane
// loads the two rows' code words at word w + lane % 4 and feeds each to two k-steps as it is stored: K is
// permuted to match, within a word the k-step order being (c0, c4 | c1, c5) then (c2, c6 | c3, c7), which
// is what (word >> 4i) & 0x000F000F yields for i = 0..3. The activations are staged in that order, so one
// LDS.128 gives a lane both k-steps' B fragment (token lane / 4, word w + lane % 4).
template <typename T> struct MmaOps;
template <> struct MmaOps<__half> {
  // 0x6400 | q = 1024 + q in fp16; minus 1032 = q - 8, exact
  static constexpr uint32_t kMagic = 0x64006400u;
  __device__ __forceinline__ static uint32_t centre(uint32_t v) {
    __half2 h = *reinterpret_cast<__half2*>(&v);
    h = __hsub2(h, __half2half2(__ushort_as_half((unsigned short)0x6408u)));  // 1032
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ __forceinline__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <> struct MmaOps<__nv_bfloat16> {
  // 0x4300 | q = 128 + q in bf16; minus 136 = q - 8, exact
  static constexpr uint32_t kMagic = 0x43004300u;
  __device__ __forceinline__ static uint32_t centre(uint32_t v) {
    __nv_bfloat162 h = *reinterpret_cast<__nv_bfloat162*>(&v);
    h = __hsub2(h, __bfloat162bfloat162(__ushort_as_bfloat16((unsigned short)0x4308u)));  // 136
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ __forceinline__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// (a & 0x000F000F) | magic in one LOP3 (the compiler splits it in two: LOP3 takes one immediate)
__device__ __forceinline__ uint32_t nibbles_or(uint32_t a, uint32_t magic) {
  uint32_t d;
  asm("lop3.b32 %0, %1, 0x000F000F, %2, 0xEA;" : "=r"(d) : "r"(a), "r"(magic));
  return d;
}

// Salient inputs of the stage at code word `w` in fragment order: xh[t][word][slot], slot s holding code
// s / 2 + (s odd ? 4 : 0) of the word, count rounded up to whole steps of 4 words (zeros past the run).
// Adds the inputs to sum_s[t].
template <typename T, int MT, int SSW>
__device__ __forceinline__ void stage_salient_mma(T* xh, const StreamArgs& a, int t0, int mt, int w, int count,
                                                  int end, float (&sum_s)[MT]) {
  const T* __restrict__ x = reinterpret_cast<const T*>(a.x);
  const int padded = (count + 3) & ~3;
  const int cnt = padded * 8;
  for (int e = threadIdx.x; e < MT * cnt; e += kThreads) {
    const int t = e / cnt, rem = e - t * cnt;
    const int wl = rem >> 3, slot = rem & 7;
    const int code = (slot >> 1) + ((slot & 1) << 2);
    T v;
    *reinterpret_cast<unsigned short*>(&v) = 0;  // +0 in both fp16 and bf16
    if (t < mt && w + wl < end) {
      v = x[(size_t)(t0 + t) * a.k + a.sal_idx[(w + wl) * 8 + code]];
      sum_s[t] += to_f(v);
    }
    xh[(t * SSW + wl) * 8 + slot] = v;
  }
}

// Code words at word w + lane % 4 of the warp's NT16 tiles of 16 rows: c[j][0] row row0 + 16j + lane / 4,
// c[j][1] the row 8 below; 0 past the run or past N.
template <int NT16>
__device__ __forceinline__ void load_codes(uint32_t (&c)[NT16][2], const uint32_t* __restrict__ sw, int w, int end,
                                           int n, int row0) {
  const int lane = threadIdx.x & 31;
  const int word = w + (lane & 3);
#pragma unroll
  for (int j = 0; j < NT16; ++j) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + 16 * j + 8 * h + (lane >> 2);
      c[j][h] = (word < end && row < n) ? __ldcs(sw + (size_t)word * n + row) : 0u;
    }
  }
}

template <typename T, int NT16>
__device__ __forceinline__ void mma_codes(const uint32_t (&c)[NT16][2], uint4 xv, uint32_t magic,
                                          float (&acc)[NT16][4]) {
#pragma unroll
  for (int j = 0; j < NT16; ++j) {
    uint32_t p[2][4];  // [row half][i]: codes i and i + 4, centred
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int i = 0; i < 4; ++i) p[h][i] = MmaOps<T>::centre(nibbles_or(c[j][h] >> (4 * i), magic));
    // A fragment: {row g k 2q.., row g+8 k 2q.., row g k 2q+8.., row g+8 k 2q+8..}
    const uint32_t a0[4] = {p[0][0], p[1][0], p[0][1], p[1][1]};
    const uint32_t a1[4] = {p[0][2], p[1][2], p[0][3], p[1][3]};
    MmaOps<T>::mma(acc[j], a0, xv.x, xv.y);
    MmaOps<T>::mma(acc[j], a1, xv.z, xv.w);
  }
}

template <typename T, int MT, int R, bool SMMA>
__global__ void __launch_bounds__(kThreads) stream_kernel(StreamArgs a) {
  constexpr int SBW = bin_stage_words<MT>();
  constexpr int SSW = sal_stage_words<MT>();
  __shared__ __align__(16) float tab[kTableFloats];
  __shared__ __align__(16) float xs[kSalFloats];
  __shared__ float red[2][MT][kThreads / 32];
  __shared__ int last_block;

  const int t0 = blockIdx.z * MT;
  const int mt = min(MT, a.m - t0);
  const int n0 = (blockIdx.x * kThreads + threadIdx.x) * R;
  const bool row_ok = n0 < a.n;  // R = 2 only when N is even, so n0 + 1 < N too
  const int nbw = a.b / 32, nsw = a.s / 8;
  const int split = blockIdx.y, ksplit = gridDim.y;
  const int wb0 = (int)((long long)nbw * split / ksplit), wb1 = (int)((long long)nbw * (split + 1) / ksplit);
  const int ws0 = (int)((long long)nsw * split / ksplit), ws1 = (int)((long long)nsw * (split + 1) / ksplit);

  float acc_b[MT][R], acc_s[MT][R], sum_b[MT], sum_s[MT];
#pragma unroll
  for (int t = 0; t < MT; ++t) {
    sum_b[t] = sum_s[t] = 0.f;
#pragma unroll
    for (int r = 0; r < R; ++r) acc_b[t][r] = acc_s[t][r] = 0.f;
  }

  // the first words of both runs are requested before any shared-memory work: their latency hides it
  constexpr int NT16 = 2 * R;  // SMMA: tiles of 16 rows per warp (the block's 256 R rows over 8 warps)
  const int mma_row0 = blockIdx.x * kThreads * R + (threadIdx.x >> 5) * 32 * R;
  T* xh = reinterpret_cast<T*>(xs);  // SMMA: [MT][SSW][8] staged salient inputs in fragment order
  Words<R> cur[kGroup], sal_first[kGroup];
  uint32_t codes[NT16][2];
  float cacc[NT16][4];
  load_group<R>(cur, a.qw, wb0, wb1, a.n, n0, row_ok);
  if constexpr (SMMA) {
#pragma unroll
    for (int j = 0; j < NT16; ++j) cacc[j][0] = cacc[j][1] = cacc[j][2] = cacc[j][3] = 0.f;
    load_codes<NT16>(codes, a.sw, ws0, ws1, a.n, mma_row0);
  } else {
    load_group<R>(sal_first, a.sw, ws0, ws1, a.n, n0, row_ok);
  }
  build_table<T, MT>(tab, a, t0, mt, wb0, min(SBW, wb1 - wb0), sum_b);
  if constexpr (SMMA) stage_salient_mma<T, MT, SSW>(xh, a, t0, mt, ws0, min(SSW, ws1 - ws0), ws1, sum_s);
  else stage_salient<T, MT>(xs, a, t0, mt, ws0, min(SSW, ws1 - ws0), sum_s);
  __syncthreads();

  // ---- binarized run: words [wb0, wb1) in stages of SBW words -------------------------------------------
  int stage = wb0;
  for (int w = wb0; w < wb1; w += kGroup) {
    if (w - stage >= SBW) {  // next stage (only when the range exceeds one stage: m > 1 or long K)
      stage = w;
      __syncthreads();
      build_table<T, MT>(tab, a, t0, mt, stage, min(SBW, wb1 - stage), sum_b);
      __syncthreads();
    }
    Words<R> nxt[kGroup];
    load_group<R>(nxt, a.qw, w + kGroup, wb1, a.n, n0, row_ok);
    sum_signs<MT, R>(cur, min(kGroup, wb1 - w), tab, w - stage, min(SBW, wb1 - stage) * 8, acc_b);
#pragma unroll
    for (int i = 0; i < kGroup; ++i) cur[i] = nxt[i];
  }

  // ---- salient run: words [ws0, ws1) in stages of SSW words ---------------------------------------------
  if constexpr (SMMA) {
    const int lane = threadIdx.x & 31;
    uint32_t magic = MmaOps<T>::kMagic;
    asm volatile("" : "+r"(magic));  // kept in a register: the third LOP3 operand
    stage = ws0;
    for (int w = ws0; w < ws1; w += 4) {  // a step: 4 words (32 channels) of each of the warp's rows
      if (w - stage >= SSW) {
        stage = w;
        __syncthreads();
        stage_salient_mma<T, MT, SSW>(xh, a, t0, mt, stage, min(SSW, ws1 - stage), ws1, sum_s);
        __syncthreads();
      }
      uint32_t nxt[NT16][2];
      load_codes<NT16>(nxt, a.sw, w + 4, ws1, a.n, mma_row0);
      uint4 xv = make_uint4(0u, 0u, 0u, 0u);  // token lane / 4; tokens >= MT are zero columns of B
      if ((lane >> 2) < MT) xv = *reinterpret_cast<const uint4*>(xh + ((lane >> 2) * SSW + (w - stage) + (lane & 3)) * 8);
      mma_codes<T, NT16>(codes, xv, magic, cacc);
#pragma unroll
      for (int j = 0; j < NT16; ++j) {
        codes[j][0] = nxt[j][0];
        codes[j][1] = nxt[j][1];
      }
    }
    // C fragment: rows 16j + lane / 4 (c0, c1) and + 8 (c2, c3), tokens 2 (lane % 4) + {0, 1}; through shared
    // memory to the thread that owns each row (the table is free once every warp has left the binarized run)
    __syncthreads();
    float* sal_out = tab;  // [MT][256 R]
    const int tok = 2 * (lane & 3);
#pragma unroll
    for (int j = 0; j < NT16; ++j) {
      const int r = (threadIdx.x >> 5) * 32 * R + 16 * j + (lane >> 2);
      if (tok < MT) {
        sal_out[tok * kThreads * R + r] = cacc[j][0];
        sal_out[tok * kThreads * R + r + 8] = cacc[j][2];
      }
      if (tok + 1 < MT) {
        sal_out[(tok + 1) * kThreads * R + r] = cacc[j][1];
        sal_out[(tok + 1) * kThreads * R + r + 8] = cacc[j][3];
      }
    }
    __syncthreads();
#pragma unroll
    for (int t = 0; t < MT; ++t)
#pragma unroll
      for (int r = 0; r < R; ++r) acc_s[t][r] = sal_out[t * kThreads * R + threadIdx.x * R + r];
  } else {
    stage = ws0;
#pragma unroll
    for (int i = 0; i < kGroup; ++i) cur[i] = sal_first[i];
    for (int w = ws0; w < ws1; w += kGroup) {
      if (w - stage >= SSW) {
        stage = w;
        __syncthreads();
        stage_salient<T, MT>(xs, a, t0, mt, stage, min(SSW, ws1 - stage), sum_s);
        __syncthreads();
      }
      Words<R> nxt[kGroup];
      load_group<R>(nxt, a.sw, w + kGroup, ws1, a.n, n0, row_ok);
      sum_codes<MT, R>(cur, min(kGroup, ws1 - w), xs, w - stage, min(SSW, ws1 - stage) * 8, acc_s);
#pragma unroll
      for (int i = 0; i < kGroup; ++i) cur[i] = nxt[i];
    }
  }

  // ---- the block's sums of x over its K ranges (for the zero points and the means) ----------------------
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int t = 0; t < MT; ++t) {
    float sb = sum_b[t], ss = sum_s[t];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      sb += __shfl_xor_sync(0xffffffffu, sb, o);
      ss += __shfl_xor_sync(0xffffffffu, ss, o);
    }
    if (lane == 0) {
      red[0][t][warp] = sb;
      red[1][t][warp] = ss;
    }
  }
  __syncthreads();
  float xb[MT], xsum[MT];
#pragma unroll
  for (int t = 0; t < MT; ++t) {
    xb[t] = xsum[t] = 0.f;
#pragma unroll
    for (int i = 0; i < kThreads / 32; ++i) {  // fixed order: the same sums in every block
      xb[t] += red[0][t][i];
      xsum[t] += red[1][t][i];
    }
  }

  // ---- this split's share of y: the per-row vectors applied to the partial sums --------------------------
  T* __restrict__ y = reinterpret_cast<T*>(a.y);
  const T* __restrict__ bias = reinterpret_cast<const T*>(a.bias);
  const int ms = a.m;  // the partials' token stride
  float part[MT][R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int n = n0 + r;
    float sscale = 0.f, szero = 0.f, bscale = 0.f, mu = 0.f;
    if (row_ok) {
      sscale = a.rowvec[n];
      szero = a.rowvec[a.n + n];
      bscale = a.rowvec[2 * a.n + n];
      mu = a.rowvec[3 * a.n + n];
    }
#pragma unroll
    for (int t = 0; t < MT; ++t) {
      // SMMA summed (code - 8) x: add 8 sum(x_S) back
      const float sal = SMMA ? acc_s[t][r] + 8.f * xsum[t] : acc_s[t][r];
      part[t][r] = sscale * (sal - szero * xsum[t]) + bscale * acc_b[t][r] + mu * xb[t];
    }
  }
  if (ksplit == 1) {
    if (row_ok) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float bv = bias ? to_f(bias[n0 + r]) : 0.f;
#pragma unroll
        for (int t = 0; t < MT; ++t)
          if (t < mt) store(y + (size_t)(t0 + t) * a.n + n0 + r, part[t][r] + bv);
      }
    }
    return;
  }
  if (row_ok) {
#pragma unroll
    for (int t = 0; t < MT; ++t)
      if (t < mt) {
#pragma unroll
        for (int r = 0; r < R; ++r) a.partial[((size_t)split * ms + t0 + t) * a.n + n0 + r] = part[t][r];
      }
  }
  __threadfence();
  __syncthreads();
  int* counter = a.counters + blockIdx.z * gridDim.x + blockIdx.x;
  if (threadIdx.x == 0) {
    const int prev = atomicAdd(counter, 1);
    last_block = prev == ksplit - 1;
  }
  __syncthreads();
  if (!last_block) return;
  if (threadIdx.x == 0) *counter = 0;  // every split has arrived: ready for the next call
  __threadfence();
  if (!row_ok) return;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const float bv = bias ? to_f(bias[n0 + r]) : 0.f;
#pragma unroll
    for (int t = 0; t < MT; ++t) {
      if (t < mt) {
        float s = 0.f;
        for (int p = 0; p < ksplit; ++p) s += __ldcg(a.partial + ((size_t)p * ms + t0 + t) * a.n + n0 + r);
        store(y + (size_t)(t0 + t) * a.n + n0 + r, s + bv);
      }
    }
  }
}

int sm_count() {
  static int cached[64] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 132;
  if (cached[dev] == 0) {
    int v = 0;
    cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev);
    cached[dev] = v > 0 ? v : 132;
  }
  return cached[dev];
}

template <typename T, int MT, int R, bool SMMA>
cudaError_t launch_mt(const StreamArgs& a, const StreamPlan& p, cudaStream_t stream) {
  static bool carveout_set = false;  // once per instance: as much shared memory as the SM has, so that the
  if (!carveout_set) {               // 40 KB blocks are limited by registers, not by the default carveout
    cudaError_t e = cudaFuncSetAttribute(stream_kernel<T, MT, R, SMMA>, cudaFuncAttributePreferredSharedMemoryCarveout,
                                         (int)cudaSharedmemCarveoutMaxShared);
    if (e != cudaSuccess) return e;
    carveout_set = true;
  }
  dim3 grid(p.row_blocks, p.ksplit, (a.m + MT - 1) / MT);
  stream_kernel<T, MT, R, SMMA><<<grid, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, int R, bool SMMA>
cudaError_t launch_r(const StreamArgs& a, const StreamPlan& p, cudaStream_t stream) {
  if (a.m == 1) return launch_mt<T, 1, R, SMMA>(a, p, stream);
  if (a.m == 2) return launch_mt<T, 2, R, SMMA>(a, p, stream);
  if (a.m <= 4) return launch_mt<T, 4, R, SMMA>(a, p, stream);
  return launch_mt<T, 8, R, SMMA>(a, p, stream);
}

template <typename T, bool SMMA>
cudaError_t launch_s(const StreamArgs& a, const StreamPlan& p, cudaStream_t stream) {
  return p.rows_per_thread == 2 ? launch_r<T, 2, SMMA>(a, p, stream) : launch_r<T, 1, SMMA>(a, p, stream);
}

}  // namespace

StreamPlan plan_stream(int m, int n, int k, int s, int ksplit_request, bool one_row, bool salient_mma) {
  StreamPlan p;
  p.salient_mma = salient_mma;
  p.rows_per_thread = (!one_row && n % 2 == 0 && n >= 8192) ? 2 : 1;
  p.row_blocks = (n + kThreads * p.rows_per_thread - 1) / (kThreads * p.rows_per_thread);
  const int mt = m == 1 ? 1 : (m == 2 ? 2 : (m <= 4 ? 4 : 8));
  const int ztiles = (m + mt - 1) / mt;
  int ks = ksplit_request;
  if (ks <= 0) {  // about four blocks an SM in all, at most kMaxSplit (two a SM measured slower: fewer warps
    const int target = 4 * sm_count();  // in flight for a kernel that waits on memory latency)
    const int per = p.row_blocks * ztiles;
    ks = (target + per - 1) / per;
  }
  const int words = (k - s) / 32 > s / 8 ? (k - s) / 32 : s / 8;
  if (ks > words) ks = words;
  if (ks > kMaxSplit) ks = kMaxSplit;
  if (ks < 1) ks = 1;
  p.ksplit = ks;
  return p;
}

cudaError_t launch_stream(bool bf16, const StreamArgs& a, const StreamPlan& p, cudaStream_t stream) {
  if (a.m < 1 || a.m > kMaxStreamM) return cudaErrorInvalidValue;
  if (p.salient_mma) {
    return bf16 ? launch_s<__nv_bfloat16, true>(a, p, stream) : launch_s<__half, true>(a, p, stream);
  }
  return bf16 ? launch_s<__nv_bfloat16, false>(a, p, stream) : launch_s<__half, false>(a, p, stream);
}

}  // namespace ptq161
}  // namespace lpq
