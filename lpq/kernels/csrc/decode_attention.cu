// lpq: attention of one query token over a key/value cache (decode), split along the keys.
//
// Why: at batch 1 a decode step attends 1 query per head over L cached keys. A kernel that gives each
// head one block (the cuDNN and memory-efficient SDPA kernels at q_len = 1) reads a head's 2 x L x D
// values through one SM: 8.4 us a layer for a 7B-shaped model (32 heads, D = 128, L = 384; 6.3 MB that
// the GPU's bandwidth reads in about 2 us; bench/profile_decode.py). Here each (batch, head) is split
// into `splits` runs of keys, one block each, so that the grid covers the GPU, and the last block of a
// (batch, head) to finish (a counter, as in the ptq161 kernels) merges the runs' partial softmax sums in
// split order. One launch.
//
// Grid (splits, H, B), 128 threads. A key's row of D elements is read by D / 8 lanes, 16 bytes each,
// so a warp reads 32 / (D / 8) consecutive rows at once and a block 4x that; a round is kKeysPerThread
// such reads of keys and of values issued back to back before any is used (loads in flight). Each warp
// keeps its own running softmax (online: max, sum, weighted values) over its rows, so the loop has no
// block barrier; the four warps are merged once at the end, then the runs by the last block.
// Scores are in natural units (scale x q.k + an additive mask), as torch computes them; the weights are
// exp2((s - max) x log2(e)).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>

#include "async_copy.cuh"
#include "decode_attention.h"

namespace lpq {
namespace attn {
namespace {

constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void put(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void put(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// 8 elements of a 16-byte piece as floats
__device__ __forceinline__ void unpack8(const uint4& u, float (&f)[8], __half) {
  const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __half22float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}
__device__ __forceinline__ void unpack8(const uint4& u, float (&f)[8], __nv_bfloat16) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __bfloat1622float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

// 8 floats rounded to T into a 16-byte piece (the layout unpack8 reads)
__device__ __forceinline__ uint4 pack8(const float (&f)[8], __half) {
  uint4 u;
  __half2* h = reinterpret_cast<__half2*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
  return u;
}
__device__ __forceinline__ uint4 pack8(const float (&f)[8], __nv_bfloat16) {
  uint4 u;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
  return u;
}

// Piece `sub` (elements sub*8 .. +7) of the rotary embedding of the row x [D]: x cos + rotate_half(x) sin with
// rotate_half(x) = (-x[D/2:], x[:D/2]), so element e pairs with e +- D/2, which is in piece sub +- D/16. Computed
// in fp32 and rounded once to T (as inductor computes transformers' apply_rotary_pos_emb).
template <typename T, int D>
__device__ __forceinline__ uint4 rope_piece(const T* x, const T* cs, const T* sn, int sub) {
  constexpr int LPK = D / 8;
  const int partner = (sub + LPK / 2) % LPK;
  float xf[8], pf[8], cf[8], sf[8], o[8];
  unpack8(__ldg(reinterpret_cast<const uint4*>(x + sub * 8)), xf, T());
  unpack8(__ldg(reinterpret_cast<const uint4*>(x + partner * 8)), pf, T());
  unpack8(__ldg(reinterpret_cast<const uint4*>(cs + sub * 8)), cf, T());
  unpack8(__ldg(reinterpret_cast<const uint4*>(sn + sub * 8)), sf, T());
  const float sign = sub < LPK / 2 ? -1.f : 1.f;
#pragma unroll
  for (int e = 0; e < 8; ++e) o[e] = fmaf(sign * pf[e], sf[e], xf[e] * cf[e]);
  return pack8(o, T());
}

template <typename T>
__device__ __forceinline__ float mask_term(const DecodeArgs& a, const char* mrow, int j) {
  switch (a.mask_kind) {
    case kBoolMask: return mrow[j] ? 0.f : -CUDART_INF_F;
    case kAddSame: return to_f(reinterpret_cast<const T*>(mrow)[j]);
    case kAddF32: return reinterpret_cast<const float*>(mrow)[j];
    default: return 0.f;
  }
}

// ROPE (rope_cache_attention): q, and the new key at row p = *position, are rotated here; the new key and value
// go to row p of the cache (written by the one block whose run holds p, for the first query head of their group)
// and every block takes that row from registers instead of the cache; the grid's last block adds 1 to *position.
template <typename T, int D, bool ROPE>
__global__ void __launch_bounds__(kThreads) decode_attention_kernel(DecodeArgs a) {
  constexpr int LPK = D / 8;                  // lanes a key row
  constexpr int KPW = 32 / LPK;               // rows a warp reads at once
  constexpr int KPB = (kThreads / 32) * KPW;  // rows a block reads at once
  constexpr int KT = kKeysPerThread;
  constexpr int RK = KPB * KT;                // rows a round
  constexpr int NW = kThreads / 32;
  __shared__ float red[NW][D];                // the warps' partial outputs
  __shared__ float wstat[NW][2];              // the warps' (max, sum)
  __shared__ int last_block;

  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int grp = h / (a.H / a.Hkv);  // the key/value head of this query head
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sub = lane % LPK;                  // this lane's 16-byte piece of a row: elements sub*8 .. +7
  const int kin = warp * KPW + lane / LPK;     // this lane's row inside a block-wide read
  const int j0 = split * a.keys_per_split;
  const int n = max(0, min(a.L, j0 + a.keys_per_split) - j0);  // keys of this run
  const T* kb = reinterpret_cast<const T*>(a.k) + b * a.kv_sb + grp * a.kv_sh + (int64_t)j0 * a.kv_sl + sub * 8;
  const T* vb = reinterpret_cast<const T*>(a.v) + b * a.v_sb + grp * a.v_sh + (int64_t)j0 * a.v_sl + sub * 8;
  // A round's key and value rows: each lane issues its KT rows of each at once, zeros past the run.
  uint4 kr[KT], vr[KT];
  auto load_round = [&](int r0) {
#pragma unroll
    for (int t = 0; t < KT; ++t) {
      const int j = r0 + t * KPB + kin;
      const bool in = j < n;
      kr[t] = in ? __ldg(reinterpret_cast<const uint4*>(kb + (int64_t)j * a.kv_sl)) : make_uint4(0, 0, 0, 0);
      vr[t] = in ? __ldg(reinterpret_cast<const uint4*>(vb + (int64_t)j * a.v_sl)) : make_uint4(0, 0, 0, 0);
    }
  };
  // The first round is requested before anything else, and (launched with programmatic dependent launch) before
  // the kernel this one follows has ended: the cache's rows were written by earlier steps. The one row this step
  // writes (ROPE) is replaced from registers below, whatever was loaded for it. q, the new key and value, the
  // position and the mask are read after the wait.
  load_round(0);
  pdl_wait();

  float qf[8];
  int p = -1;                   // ROPE: the new row (relative to this run's first key j0)
  uint4 knew = make_uint4(0, 0, 0, 0), vnew = make_uint4(0, 0, 0, 0);  // ROPE: its piece `sub`
  if constexpr (ROPE) {
    const T* cs = reinterpret_cast<const T*>(a.cos);
    const T* sn = reinterpret_cast<const T*>(a.sin);
    const T* q = reinterpret_cast<const T*>(a.q) + b * a.q_sb + h * a.q_sh;
    unpack8(rope_piece<T, D>(q, cs, sn, sub), qf, T());  // q rounded to T after the rotation, as in torch
    knew = rope_piece<T, D>(reinterpret_cast<const T*>(a.k_new) + grp * a.new_sh, cs, sn, sub);
    vnew = __ldg(reinterpret_cast<const uint4*>(reinterpret_cast<const T*>(a.v_new) + grp * a.new_sh + sub * 8));
    p = (int)*a.position - j0;
  } else {
    const T* q = reinterpret_cast<const T*>(a.q) + b * a.q_sb + h * a.q_sh + sub * 8;
    unpack8(*reinterpret_cast<const uint4*>(q), qf, T());
  }
#pragma unroll
  for (int e = 0; e < 8; ++e) qf[e] *= a.scale;
  if constexpr (ROPE) {
    // the cache's row p: written once, by the block whose run holds it, for the first query head of the group.
    // Only this block loads row p, and it replaces what it loaded by knew / vnew: no value read races the store.
    if (p >= 0 && p < n && h % (a.H / a.Hkv) == 0 && threadIdx.x < LPK) {
      *reinterpret_cast<uint4*>(const_cast<T*>(kb) + (int64_t)p * a.kv_sl) = knew;
      *reinterpret_cast<uint4*>(const_cast<T*>(vb) + (int64_t)p * a.v_sl) = vnew;
    }
  }
  const int msz = a.mask_kind == kBoolMask ? 1 : a.mask_kind == kAddF32 ? 4 : (int)sizeof(T);
  const char* mrow = a.mask_kind == kNoMask ? nullptr
                     : reinterpret_cast<const char*>(a.mask) + (b * a.m_sb + h * a.m_sh + j0) * msz;

  // One pass over the run, a round at a time: every lane issues its KT key and KT value rows at once, then
  // the warp folds them into its own running softmax (max mx, sum l and the weighted values acc, each
  // relative to mx) without a block barrier; the four warps are merged once at the end.
  float mx = -CUDART_INF_F, l = 0.f;
  float acc[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) acc[e] = 0.f;
  for (int r0 = 0; r0 < n; r0 += RK) {
    if (r0 > 0) load_round(r0);
    if constexpr (ROPE) {
      // the new row from registers, in place of what was loaded for it (the old row, or the writer's store in
      // flight: either way unused). Swapped after the loads so that they do not wait for *position.
#pragma unroll
      for (int t = 0; t < KT; ++t) {
        if (r0 + t * KPB + kin == p) {
          kr[t] = knew;
          vr[t] = vnew;
        }
      }
    }
    float s[KT];
    float rmax = -CUDART_INF_F;
#pragma unroll
    for (int t = 0; t < KT; ++t) {
      float kf[8];
      unpack8(kr[t], kf, T());
      float d = 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) d = fmaf(qf[e], kf[e], d);
#pragma unroll
      for (int o = LPK / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
      const int j = r0 + t * KPB + kin;
      // natural units (scale x q.k + mask): a mask of float32's lowest stays finite here, as in torch
      s[t] = j < n ? d + (mrow ? mask_term<T>(a, mrow, j) : 0.f) : -CUDART_INF_F;
      rmax = fmaxf(rmax, s[t]);
    }
#pragma unroll
    for (int o = 16; o >= LPK; o >>= 1) rmax = fmaxf(rmax, __shfl_xor_sync(0xffffffffu, rmax, o));
    const float mnew = fmaxf(mx, rmax);
    if (mnew == -CUDART_INF_F) continue;  // nothing attended yet (warp-uniform)
    const float f = exp2f((mx - mnew) * kLog2e);  // 0 while mx is -inf
    l *= f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] *= f;
#pragma unroll
    for (int t = 0; t < KT; ++t) {
      const float p = exp2f((s[t] - mnew) * kLog2e);  // 0 for keys past the run or masked out
      l += p;
      float vf[8];
      unpack8(vr[t], vf, T());
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[e] = fmaf(p, vf[e], acc[e]);
    }
    mx = mnew;
  }
  // the warp's lanes holding the same columns (same sub) are LPK apart: their sums are the warp's
#pragma unroll
  for (int o = LPK; o < 32; o <<= 1) {
    l += __shfl_xor_sync(0xffffffffu, l, o);
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] += __shfl_xor_sync(0xffffffffu, acc[e], o);
  }
  if (lane < LPK) {
#pragma unroll
    for (int e = 0; e < 8; ++e) red[warp][sub * 8 + e] = acc[e];
  }
  if (lane == 0) {
    wstat[warp][0] = mx;
    wstat[warp][1] = l;
  }
  __syncthreads();
  if constexpr (ROPE) {
    // every thread of this block has read *position (before its loop): count the block in, and the grid's last
    // block moves the cache on by one row (transformers' StaticLayer: cumulative_length += 1)
    if (threadIdx.x == 0) {
      const int blocks = (int)(gridDim.x * gridDim.y * gridDim.z);
      if (atomicAdd(a.grid_counter, 1) == blocks - 1) {
        *a.position += 1;
        *a.grid_counter = 0;  // ready for the next call
      }
    }
  }
  // merge the warps: the block's max, sum, and each column's weighted values relative to that max
  float bmx = -CUDART_INF_F;
#pragma unroll
  for (int w = 0; w < NW; ++w) bmx = fmaxf(bmx, wstat[w][0]);
  float wf[NW], bl = 0.f;
#pragma unroll
  for (int w = 0; w < NW; ++w) {
    wf[w] = wstat[w][0] == -CUDART_INF_F ? 0.f : exp2f((wstat[w][0] - bmx) * kLog2e);
    bl = fmaf(wstat[w][1], wf[w], bl);
  }

  const int bh = b * a.H + h;
  T* out = reinterpret_cast<T*>(a.out) + (int64_t)bh * D;  // [B, 1, H, D] contiguous: row (b, h)
  if (a.splits == 1) {
    for (int d = threadIdx.x; d < D; d += kThreads) {
      float o = 0.f;
#pragma unroll
      for (int w = 0; w < NW; ++w) o = fmaf(red[w][d], wf[w], o);
      put(out + d, bl > 0.f ? o / bl : 0.f);
    }
    return;
  }
  float* part = a.partial + ((int64_t)bh * a.splits + split) * D;
  for (int d = threadIdx.x; d < D; d += kThreads) {
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < NW; ++w) o = fmaf(red[w][d], wf[w], o);
    part[d] = o;
  }
  if (threadIdx.x == 0) {
    a.stats[((int64_t)bh * a.splits + split) * 2] = bmx;
    a.stats[((int64_t)bh * a.splits + split) * 2 + 1] = bl;
  }
  // publish this run (one release after the barrier), then the last run to arrive merges them all
  __syncthreads();
  if (threadIdx.x == 0) {
    int prev;
    int* counter = a.counters + bh;
    asm volatile("atom.release.gpu.global.add.s32 %0, [%1], 1;" : "=r"(prev) : "l"(counter) : "memory");
    const bool last = prev == a.splits - 1;
    if (last) {
      asm volatile("fence.acq_rel.gpu;" ::: "memory");
      *counter = 0;  // ready for the next call
    }
    last_block = last;
  }
  __syncthreads();
  if (!last_block) return;
  // The merge: every run's (max, sum) into shared memory at once, then each column's partials in loads of
  // 8 in flight (the runs' order fixed: the result does not depend on the order they finished in).
  __shared__ float run_w[kMaxSplits];  // a run's weight exp2((max - M) log2 e), 0 for a run wholly masked
  __shared__ float run_l[kMaxSplits];
  const float* st = a.stats + (int64_t)bh * a.splits * 2;
  for (int s = threadIdx.x; s < a.splits; s += kThreads) {
    const float2 v = __ldcg(reinterpret_cast<const float2*>(st) + s);
    run_w[s] = v.x;
    run_l[s] = v.y;
  }
  __syncthreads();
  float M = -CUDART_INF_F;
  for (int s = 0; s < a.splits; ++s) M = fmaxf(M, run_w[s]);
  __syncthreads();  // every thread has read the maxima before they are replaced by weights
  for (int s = threadIdx.x; s < a.splits; s += kThreads)
    run_w[s] = run_w[s] == -CUDART_INF_F ? 0.f : exp2f((run_w[s] - M) * kLog2e);
  __syncthreads();
  float lsum = 0.f;
  for (int s = 0; s < a.splits; ++s) lsum = fmaf(run_l[s], run_w[s], lsum);
  for (int d = threadIdx.x; d < D; d += kThreads) {
    const float* src = a.partial + (int64_t)bh * a.splits * D + d;
    float o = 0.f;
    for (int s0 = 0; s0 < a.splits; s0 += 8) {
      float v[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = s0 + i < a.splits ? __ldcg(src + (int64_t)(s0 + i) * D) : 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i)
        if (s0 + i < a.splits) o = fmaf(v[i], run_w[s0 + i], o);
    }
    put(out + d, lsum > 0.f ? o / lsum : 0.f);
  }
}

template <typename T, int D, bool ROPE>
cudaError_t launch_d(const DecodeArgs& a, bool pdl, cudaStream_t stream) {
  const dim3 grid(a.splits, a.H, a.B);
  if (!pdl) {
    decode_attention_kernel<T, D, ROPE><<<grid, kThreads, 0, stream>>>(a);
    return cudaGetLastError();
  }
  return launch_with_pdl(decode_attention_kernel<T, D, ROPE>, grid, dim3(kThreads), 0, stream, a);
}

template <typename T, bool ROPE>
cudaError_t launch_t(const DecodeArgs& a, bool pdl, cudaStream_t stream) {
  switch (a.D) {
    case 64: return launch_d<T, 64, ROPE>(a, pdl, stream);
    case 128: return launch_d<T, 128, ROPE>(a, pdl, stream);
    case 256: return launch_d<T, 256, ROPE>(a, pdl, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_decode_attention(bool bf16, const DecodeArgs& a, bool pdl, cudaStream_t stream) {
  // The kernel lets the next one launch only as it ends: letting it in at the start, or after the loop over the keys,
  // was measured slower in a decode step (the output projection's blocks then take SMs while this grid runs).
  pdl = pdl && device_has_pdl();
  if (a.position != nullptr)
    return bf16 ? launch_t<__nv_bfloat16, true>(a, pdl, stream) : launch_t<__half, true>(a, pdl, stream);
  return bf16 ? launch_t<__nv_bfloat16, false>(a, pdl, stream) : launch_t<__half, false>(a, pdl, stream);
}

}  // namespace attn
}  // namespace lpq
