// lpq: device code shared by the ptq161 GEMV kernels of ptq161_stream.cu and ptq161_ring.cu: the signed
// nibble table of the binarized channels, the salient codes on the tensor cores, and the end of a block
// (row vectors applied to its partial sums, split-K partials added by the last block of a row block).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "ptq161_launch.h"

namespace lpq {
namespace ptq161 {

constexpr int kThreads = 256;

__device__ __forceinline__ float to_f(const __half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(const __nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// This block's K split (blockIdx.y of gridDim.y) of both runs: sign words [wb0, wb1), code words [ws0, ws1).
__device__ __forceinline__ void split_ranges(const StreamArgs& a, int& wb0, int& wb1, int& ws0, int& ws1) {
  const int nbw = a.b / 32, nsw = a.s / 8;
  const int split = blockIdx.y, ksplit = gridDim.y;
  wb0 = (int)((long long)nbw * split / ksplit);
  wb1 = (int)((long long)nbw * (split + 1) / ksplit);
  ws0 = (int)((long long)nsw * split / ksplit);
  ws1 = (int)((long long)nsw * (split + 1) / ksplit);
}

template <int MT, int R>
__device__ __forceinline__ void zero_sums(float (&acc_b)[MT][R], float (&acc_s)[MT][R], float (&sum_b)[MT],
                                          float (&sum_s)[MT]) {
#pragma unroll
  for (int t = 0; t < MT; ++t) {
    sum_b[t] = sum_s[t] = 0.f;
#pragma unroll
    for (int r = 0; r < R; ++r) acc_b[t][r] = acc_s[t][r] = 0.f;
  }
}

// Table of the binarized stage starting at sign word `w` (count words): tab[t][g][v] for nibble group g
// (channels 4g..4g+3 of the stage), v = the 4 sign bits, entry = sum_i (bit i ? +1 : -1) colscale x. Also adds
// the unscaled inputs of the stage to sum_b[t] (this thread's share; reduced over the block at the end).
// Item e of the table (token e / groups, group e % groups): its four colscale x, loads only (so that a caller
// can put other loads beside them), adding the inputs to sum_b. Split in two: the constants of the item (its
// four input channels and column scales: weights of the layer, which a kernel may load before its
// griddepcontrol.wait) and the inputs gathered through them (only after it).
struct TableConsts {
  int4 idx;   // the four input channels of the item's nibble group
  float4 cs;  // their column scales
};

__device__ __forceinline__ TableConsts table_item_consts(const StreamArgs& a, int w, int groups, int e) {
  const int g = e % groups;
  const int c = w * 32 + 4 * g;  // position in the binarized run
  return TableConsts{*reinterpret_cast<const int4*>(a.bin_idx + c), *reinterpret_cast<const float4*>(a.colscale + c)};
}

template <typename T, int MT>
__device__ __forceinline__ void table_item_gather(const StreamArgs& a, int t0, int mt, int groups, int e,
                                                  const TableConsts& k, float (&q)[4], float (&sum_b)[MT]) {
  const int t = e / groups;
  q[0] = q[1] = q[2] = q[3] = 0.f;
  if (t < mt) {
    const T* __restrict__ xr = reinterpret_cast<const T*>(a.x) + (size_t)(t0 + t) * a.k;
    const float x0 = to_f(xr[k.idx.x]), x1 = to_f(xr[k.idx.y]), x2 = to_f(xr[k.idx.z]), x3 = to_f(xr[k.idx.w]);
    sum_b[t] += (x0 + x1) + (x2 + x3);
    q[0] = k.cs.x * x0;
    q[1] = k.cs.y * x1;
    q[2] = k.cs.z * x2;
    q[3] = k.cs.w * x3;
  }
}

template <typename T, int MT>
__device__ __forceinline__ void table_item_inputs(const StreamArgs& a, int t0, int mt, int w, int groups, int e,
                                                  float (&q)[4], float (&sum_b)[MT]) {
  table_item_gather<T, MT>(a, t0, mt, groups, e, table_item_consts(a, w, groups, e), q, sum_b);
}

// the 16 signed sums of item e's four inputs into the table
__device__ __forceinline__ void table_item_store(float* tab, int e, const float (&q)[4]) {
  // pair sums of channels 0/1 and 2/3 (index: bit 0 = first, bit 1 = second of the pair)
  const float lo[4] = {-q[0] - q[1], q[0] - q[1], -q[0] + q[1], q[0] + q[1]};
  const float hi[4] = {-q[2] - q[3], q[2] - q[3], -q[2] + q[3], q[2] + q[3]};
  float4* out = reinterpret_cast<float4*>(tab + (size_t)e * 16);
#pragma unroll
  for (int h = 0; h < 4; ++h) out[h] = make_float4(lo[0] + hi[h], lo[1] + hi[h], lo[2] + hi[h], lo[3] + hi[h]);
}

template <typename T, int MT>
__device__ __forceinline__ void build_table(float* tab, const StreamArgs& a, int t0, int mt, int w, int count,
                                            float (&sum_b)[MT]) {
  const int groups = count * 8;
  for (int e = threadIdx.x; e < MT * groups; e += kThreads) {
    float q[4];
    table_item_inputs<T, MT>(a, t0, mt, w, groups, e, q, sum_b);
    table_item_store(tab, e, q);
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

// Salient inputs of the stage at code word `w` in fragment order: xh[t][word][slot] (ssw words a token), slot s holding code
// s / 2 + (s odd ? 4 : 0) of the word, count rounded up to whole steps of 4 words (zeros past the run).
// Adds the inputs to sum_s[t].
// Slot e of the staged inputs (cnt slots a token: token e / cnt, word rem / 8, slot rem % 8): its input, a
// load only, added to sum_s; +0 past the run. Stored at xh[(t * ssw + word) * 8 + slot] = xh[index].
// Split in two as the table's items are: the slot's input channel (a constant of the layer; -1 past the run),
// then the input gathered through it.
__device__ __forceinline__ int salient_item_col(const StreamArgs& a, int w, int end, int cnt, int e) {
  const int rem = e % cnt;
  const int wl = rem >> 3, slot = rem & 7;
  const int code = (slot >> 1) + ((slot & 1) << 2);
  return w + wl < end ? a.sal_idx[(w + wl) * 8 + code] : -1;
}

template <typename T, int MT>
__device__ __forceinline__ T salient_item_gather(const StreamArgs& a, int t0, int mt, int cnt, int ssw, int e, int col,
                                                 int& index, float (&sum_s)[MT]) {
  const int t = e / cnt, rem = e - t * cnt;
  const int wl = rem >> 3, slot = rem & 7;
  index = (t * ssw + wl) * 8 + slot;
  T v;
  *reinterpret_cast<unsigned short*>(&v) = 0;  // +0 in both fp16 and bf16
  if (t < mt && col >= 0) {
    v = reinterpret_cast<const T*>(a.x)[(size_t)(t0 + t) * a.k + col];
    sum_s[t] += to_f(v);
  }
  return v;
}

template <typename T, int MT>
__device__ __forceinline__ T salient_item_input(const StreamArgs& a, int t0, int mt, int w, int end, int cnt, int ssw,
                                                int e, int& index, float (&sum_s)[MT]) {
  return salient_item_gather<T, MT>(a, t0, mt, cnt, ssw, e, salient_item_col(a, w, end, cnt, e), index, sum_s);
}

template <typename T, int MT>
__device__ __forceinline__ void stage_salient_mma(T* xh, int ssw, const StreamArgs& a, int t0, int mt, int w,
                                                  int count, int end, float (&sum_s)[MT]) {
  const int cnt = ((count + 3) & ~3) * 8;
  for (int e = threadIdx.x; e < MT * cnt; e += kThreads) {
    int index;
    const T v = salient_item_input<T, MT>(a, t0, mt, w, end, cnt, ssw, e, index, sum_s);
    xh[index] = v;
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

inline int sm_count() {
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

// The end of a block of either streaming kernel (grid: row blocks x K splits x token tiles). acc_s: the sum of
// (code - 8) x (SMMA) or code x over the block's salient channels; acc_b: the sum of colscale sign x over its
// binarized channels; sum_b / sum_s: this thread's share of the sums of x over those channels. Each block
// applies the per-row vectors to its own sums (exact: the sums of x are over its own K range), so y is a plain
// sum over the splits: one split writes y, otherwise fp32 partials [ksplit, m, N] and the last block of the
// row block (a counter each, restored to zero by it) adds them in split order (deterministic) and writes y.
template <typename T, int MT, int R, bool SMMA>
__device__ __forceinline__ void finish_block(const StreamArgs& a, const float (&acc_s)[MT][R], const float (&acc_b)[MT][R],
                                             const float (&sum_b)[MT], const float (&sum_s)[MT],
                                             float (*red)[MT][kThreads / 32], int* last_block, int t0, int mt, int n0,
                                             bool row_ok) {
  const int split = blockIdx.y, ksplit = gridDim.y;
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
  // The block's partials are published by one release at GPU scope after the barrier (release is
  // cumulative over the writes the barrier ordered before it); the last block then acquires every other
  // block's with a fence after the same atomic. This replaces a __threadfence() in every thread on both
  // sides: an SC fence (MEMBAR.SC.GPU) that each thread waited on at the end of every block. The acquire
  // is a separate fence in the last block only: an acquiring atomic invalidates the SM's L1 in every
  // block, which cost the co-resident blocks their cached activations (measured at m = 4).
  __syncthreads();
  int* counter = a.counters + blockIdx.z * gridDim.x + blockIdx.x;
  if (threadIdx.x == 0) {
    int prev;
    asm volatile("atom.release.gpu.global.add.s32 %0, [%1], 1;" : "=r"(prev) : "l"(counter) : "memory");
    const bool last = prev == ksplit - 1;
    if (last) {
      asm volatile("fence.acq_rel.gpu;" ::: "memory");
      *counter = 0;  // every split has arrived: ready for the next call
    }
    *last_block = last;
  }
  __syncthreads();
  if (!*last_block || !row_ok) return;
#pragma unroll 1  // one output at a time: unrolled, the loads of every output would be hoisted together
  for (int r = 0; r < R; ++r) {
    const float bv = bias ? to_f(bias[n0 + r]) : 0.f;
#pragma unroll 1
    for (int t = 0; t < MT; ++t) {
      if (t < mt) {
        // in split order (deterministic); 8 loads in flight at once (predicated), so that the sum waits
        // for one or two L2 round trips (16 was spilling registers at 64), not one per split
        const float* src = a.partial + (size_t)(t0 + t) * a.n + n0 + r;
        const size_t stride = (size_t)ms * a.n;
        float s = 0.f;
        for (int p = 0; p < ksplit; p += 8) {
          float v[8];
#pragma unroll
          for (int i = 0; i < 8; ++i) v[i] = p + i < ksplit ? __ldcg(src + (p + i) * stride) : 0.f;
#pragma unroll
          for (int i = 0; i < 8; ++i)
            if (p + i < ksplit) s += v[i];
        }
        store(y + (size_t)(t0 + t) * a.n + n0 + r, s + bv);
      }
    }
  }
}

}  // namespace ptq161
}  // namespace lpq
