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
//   run (split-K over blockIdx.y, about four blocks an SM in all), and streams its words through a register
//   double buffer: the loads of the next 8 words are in flight while the current 8 are summed;
// - the sign words are summed through a table of signed nibble sums in shared memory (16 entries per 4
//   channels per token; all lanes read the same 16-entry group, so the reads never conflict on banks);
//   the byte offset of an entry is ((word >> (4j - 2)) & 0x3C) | group base: one shift and one LOP3,
//   because the group base is a multiple of 64 bytes;
// - the salient codes become floats with the 2^23 magic number (one shift, one LOP3, one FADD) and are
//   FMA'd with the staged inputs (one broadcast LDS.128 per 4 channels);
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

template <typename T, int MT, int R>
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
  Words<R> cur[kGroup], sal_first[kGroup];
  load_group<R>(cur, a.qw, wb0, wb1, a.n, n0, row_ok);
  load_group<R>(sal_first, a.sw, ws0, ws1, a.n, n0, row_ok);
  build_table<T, MT>(tab, a, t0, mt, wb0, min(SBW, wb1 - wb0), sum_b);
  stage_salient<T, MT>(xs, a, t0, mt, ws0, min(SSW, ws1 - ws0), sum_s);
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
    for (int t = 0; t < MT; ++t)
      part[t][r] = sscale * (acc_s[t][r] - szero * xsum[t]) + bscale * acc_b[t][r] + mu * xb[t];
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

template <typename T, int MT, int R>
cudaError_t launch_mt(const StreamArgs& a, const StreamPlan& p, cudaStream_t stream) {
  static bool carveout_set = false;  // once per instance: as much shared memory as the SM has, so that the
  if (!carveout_set) {               // 40 KB blocks are limited by registers, not by the default carveout
    cudaError_t e = cudaFuncSetAttribute(stream_kernel<T, MT, R>, cudaFuncAttributePreferredSharedMemoryCarveout,
                                         (int)cudaSharedmemCarveoutMaxShared);
    if (e != cudaSuccess) return e;
    carveout_set = true;
  }
  dim3 grid(p.row_blocks, p.ksplit, (a.m + MT - 1) / MT);
  stream_kernel<T, MT, R><<<grid, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, int R>
cudaError_t launch_r(const StreamArgs& a, const StreamPlan& p, cudaStream_t stream) {
  if (a.m == 1) return launch_mt<T, 1, R>(a, p, stream);
  if (a.m == 2) return launch_mt<T, 2, R>(a, p, stream);
  if (a.m <= 4) return launch_mt<T, 4, R>(a, p, stream);
  return launch_mt<T, 8, R>(a, p, stream);
}

}  // namespace

StreamPlan plan_stream(int m, int n, int k, int s, int ksplit_request, bool one_row) {
  StreamPlan p;
  p.rows_per_thread = (!one_row && n % 2 == 0 && n >= 8192) ? 2 : 1;
  p.row_blocks = (n + kThreads * p.rows_per_thread - 1) / (kThreads * p.rows_per_thread);
  const int mt = m == 1 ? 1 : (m == 2 ? 2 : (m <= 4 ? 4 : 8));
  const int ztiles = (m + mt - 1) / mt;
  int ks = ksplit_request;
  if (ks <= 0) {  // about four resident blocks an SM in all, at most kMaxSplit
    const int target = 4 * sm_count();
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
  if (p.rows_per_thread == 2) {
    return bf16 ? launch_r<__nv_bfloat16, 2>(a, p, stream) : launch_r<__half, 2>(a, p, stream);
  }
  return bf16 ? launch_r<__nv_bfloat16, 1>(a, p, stream) : launch_r<__half, 1>(a, p, stream);
}

}  // namespace ptq161
}  // namespace lpq
