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

#include "ptq161_common.cuh"

namespace lpq {
namespace ptq161 {

namespace {

constexpr int kGroup = 8;              // words per register buffer
constexpr int kTableFloats = 8192;     // 32 KB of signed nibble sums per stage, all tokens of the tile
constexpr int kSalFloats = 2048;       // 8 KB of staged salient inputs per stage, all tokens of the tile

// words per stage: 128 table floats per sign word and token; 8 inputs per code word and token
template <int MT> __host__ __device__ constexpr int bin_stage_words() { return kTableFloats / (MT * 128); }
template <int MT> __host__ __device__ constexpr int sal_stage_words() { return kSalFloats / (MT * 8); }


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
  int wb0, wb1, ws0, ws1;
  split_ranges(a, wb0, wb1, ws0, ws1);

  float acc_b[MT][R], acc_s[MT][R], sum_b[MT], sum_s[MT];
  zero_sums<MT, R>(acc_b, acc_s, sum_b, sum_s);

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
  if constexpr (SMMA) stage_salient_mma<T, MT>(xh, SSW, a, t0, mt, ws0, min(SSW, ws1 - ws0), ws1, sum_s);
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
        stage_salient_mma<T, MT>(xh, SSW, a, t0, mt, stage, min(SSW, ws1 - stage), ws1, sum_s);
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

  finish_block<T, MT, R, SMMA>(a, acc_s, acc_b, sum_b, sum_s, red, &last_block, t0, mt, n0, row_ok);
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
