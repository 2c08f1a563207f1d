// lpq: the ring GEMV of the ptq161 format (m <= 4): the streaming kernel's maths (ptq161_stream.cu), with the
// words brought in by cp.async through a ring in shared memory instead of register double buffers.
//
// Why: the streaming kernel keeps 8 words a thread in flight in registers (80 registers, 3 blocks an SM) and
// runs its binarized words, then its salient words, each with one buffer ahead; Nsight Compute showed its warps
// waiting on memory at 37 % of DRAM peak. Here every warp owns the same 32 R rows in both runs (the sign path's
// rows lane R .. lane R + R - 1 and the tensor-core path's 2 R tiles of 16 rows are the same rows), so a warp
// streams its own rows' words through its own ring: no block barrier inside the loop, NS - 1 stages in flight
// at all times, and the binarized and salient runs are one sequence of stages, so the salient words are in
// flight while the last sign words are summed.
//
// Shared memory (dynamic, sized by the plan):
//   tab  [MT][tab_words * 8][16] f32   signed nibble sums of the block's binarized words (build_table)
//   xh   [MT][sal_words][8] T          the block's salient inputs in fragment order (stage_salient_mma)
//   ring [8 warps][NS][W][STRIDE] u32  W words of the warp's 32 R rows a stage; STRIDE = 32 R + 8: the
//                                      tensor-core reads (word lane % 4, row lane / 4) then hit 32 banks
// The plan keeps MT x (the block's binarized words) <= kRingTableWords, so the table is built once a block.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <atomic>

#include "async_copy.cuh"
#include "ptq161_common.cuh"

namespace lpq {
namespace ptq161 {

namespace {

constexpr int kRingAutoSplit = 16;  // K splits the plan takes at most, unless its table needs more

template <int R> __host__ __device__ constexpr int ring_stride() { return 32 * R + 8; }
template <int R, int NS, int W> __host__ __device__ constexpr int ring_warp_words() { return NS * W * ring_stride<R>(); }

// one sign word of each of the thread's R rows through the table (8 nibbles each). The entry of nibble j is
// at byte base + 64 j + 4 v (v its 4 bits); base (a multiple of 512) has a zero low byte, so one PRMT puts
// 4 v into it: lo / hi hold 4 v of the even / odd nibbles, one byte each (two SHF + LOP3 a word), and the
// 64 j goes into the LDS immediate. 3 instructions a nibble (PRMT, LDS, FADD) instead of 4.
template <int MT, int R>
__device__ __forceinline__ void sum_sign_words(const uint32_t (&w)[R], const char* tab_bytes, uint32_t base, int groups,
                                               float (&acc)[MT][R]) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const uint32_t lo = (w[r] << 2) & 0x3C3C3C3Cu, hi = (w[r] >> 2) & 0x3C3C3C3Cu;
    float v[MT][8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      // result byte 0 = byte j / 2 of lo or hi, bytes 1-3 = bytes 1-3 of base (selector 4-7: the second word)
      const uint32_t off = __byte_perm(j & 1 ? hi : lo, base, 0x7650u | (uint32_t)(j >> 1));
#pragma unroll
      for (int t = 0; t < MT; ++t)
        v[t][j] = *reinterpret_cast<const float*>(tab_bytes + off + 64u * j + (uint32_t)(t * groups) * 64u);
    }
    // a tree of adds: a dependent chain of 4 instead of 8
#pragma unroll
    for (int t = 0; t < MT; ++t)
      acc[t][r] += ((v[t][0] + v[t][1]) + (v[t][2] + v[t][3])) + ((v[t][4] + v[t][5]) + (v[t][6] + v[t][7]));
  }
}

// word i of a stage slot: the thread's R rows
template <int R>
__device__ __forceinline__ void slot_words(const uint32_t* slot, int i, int lane, uint32_t (&w)[R]) {
  constexpr int STRIDE = 32 * R + 8;
  if constexpr (R == 2) {
    const uint2 v = *reinterpret_cast<const uint2*>(slot + i * STRIDE + lane * 2);
    w[0] = v.x;
    w[1] = v.y;
  } else {
    w[0] = slot[i * STRIDE + lane];
  }
}

// blocks an SM the compiler must fit by registers at m = 1 (at most 64 registers): measured, capping them
// lower to fit 5 or 6 blocks (48 / 40 registers) made the kernel slower, not faster
template <int MT> __host__ __device__ constexpr int ring_min_blocks() {
  return MT == 1 ? 4 : 1;
}

// NS: stages a warp's ring (NS - 1 in flight while one is summed)
template <typename T, int MT, int R, int NS, int W>
__global__ void __launch_bounds__(kThreads, ring_min_blocks<MT>()) ring_kernel(StreamArgs a, int tab_words, int sal_words, int pdl_early) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float red[2][MT][kThreads / 32];
  __shared__ int last_block;
  constexpr int STRIDE = ring_stride<R>();
  constexpr int CHUNKS = 8 * R;  // 16-byte chunks in one word of the warp's 32 R rows
  constexpr int NT16 = 2 * R;

  float* tab = reinterpret_cast<float*>(smem);
  T* xh = reinterpret_cast<T*>(smem + (size_t)MT * tab_words * 512);
  uint32_t* ring = reinterpret_cast<uint32_t*>(smem + (size_t)MT * tab_words * 512 + (size_t)MT * sal_words * 16);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int t0 = blockIdx.z * MT;
  const int mt = min(MT, a.m - t0);
  const int warp_row0 = (blockIdx.x * kThreads + warp * 32) * R;  // the warp's first row in both runs
  const int n0 = warp_row0 + lane * R;
  const bool row_ok = n0 < a.n;  // R = 2 only when N is even
  int wb0, wb1, ws0, ws1;
  split_ranges(a, wb0, wb1, ws0, ws1);
  const int nbs = (wb1 - wb0 + W - 1) / W, ncs = (ws1 - ws0 + W - 1) / W;
  const int total = nbs + ncs;

  uint32_t* my_ring = ring + warp * ring_warp_words<R, NS, W>();
  const uint32_t ring_s = static_cast<uint32_t>(__cvta_generic_to_shared(my_ring));
  // stage st (sign stages first, then code stages) into slot st % NS; an empty group past the end keeps the
  // wait counts uniform. Chunks of rows >= N or words past the run are skipped: a skipped sign word is never
  // read, a skipped code word meets a zero input (xh is zero past the run), a row >= N is never written.
  auto issue = [&](int st) {
    if (st < total) {
      const bool sign = st < nbs;
      const uint32_t* src = sign ? a.qw : a.sw;
      const int w0 = sign ? wb0 + st * W : ws0 + (st - nbs) * W;
      const int end = sign ? wb1 : ws1;
      const uint32_t dst = ring_s + (uint32_t)((st % NS) * W * STRIDE) * 4u;
#pragma unroll
      for (int u = 0; u < (W * CHUNKS + 31) / 32; ++u) {
        const int c = lane + 32 * u;
        const int wi = c / CHUNKS, ci = c - wi * CHUNKS;
        const int row = warp_row0 + ci * 4;
        const bool on = c < W * CHUNKS && w0 + wi < end && row < a.n;
        cp_async16_cg_if(dst + (uint32_t)(wi * STRIDE + ci * 4) * 4u, src + (size_t)(w0 + wi) * a.n + row, on);
      }
    }
    cp_async_commit();
  };
  // Programmatic dependent launch (no-ops when launched without it): the block may be resident before the kernel it
  // depends on has finished. The prologue's stages hold only weight words (constant); x, and the partials and
  // counters of the split-K reduction, are touched only after griddepcontrol.wait.
#pragma unroll
  for (int st = 0; st < NS - 1; ++st) issue(st);
  // Also before the wait, the other constants the block needs after it, so that none of them is a DRAM round
  // trip on the block's path once the inputs are readable: the channels and column scales of this thread's
  // first staging items (held in registers across the wait; the inputs are then gathered in one round), and
  // the warp's rows of the four row vectors, which finish_block reads at the end (prefetched into L1: no
  // registers held through the loop).
  const int groups = (wb1 - wb0) * 8, cnt = ((ws1 - ws0 + W - 1) / W) * W * 8;  // cnt: whole stages of inputs
  const int items = MT * (groups > cnt ? groups : cnt);
  // Only at m = 1: at m = 2 and 4 the held constants took the kernel from 80 to 96 registers.
  constexpr bool kHoist = MT == 1;
  TableConsts first_tab = {make_int4(0, 0, 0, 0), make_float4(0.f, 0.f, 0.f, 0.f)};
  int first_col = -1;
  if (kHoist && threadIdx.x < MT * groups) first_tab = table_item_consts(a, wb0, groups, threadIdx.x);
  if (kHoist && threadIdx.x < MT * cnt) first_col = salient_item_col(a, ws0, ws1, cnt, threadIdx.x);
  if (lane < 12) {
    // vector lane / 3 at the warp's first, middle and last row: the 32 R floats span at most 3 lines
    const int part = lane % 3;
    int row = warp_row0 + (part == 0 ? 0 : part == 1 ? 16 * R : 32 * R - 1);
    row = row < a.n ? row : a.n - 1;
    prefetch_l1(a.rowvec + (size_t)(lane / 3) * a.n + row);
  } else if (lane < 15 && a.bias) {  // the bias the same way (2-byte elements: 32 R of them span at most 2 lines)
    const int part = lane - 12;
    int row = warp_row0 + (part == 0 ? 0 : part == 1 ? 16 * R : 32 * R - 1);
    row = row < a.n ? row : a.n - 1;
    prefetch_l1(reinterpret_cast<const T*>(a.bias) + row);
  }
  pdl_wait();
  if (pdl_early) pdl_launch_dependents();  // the early trigger (StreamPlan::pdl_early)

  float acc_b[MT][R], acc_s[MT][R], sum_b[MT], sum_s[MT];
  zero_sums<MT, R>(acc_b, acc_s, sum_b, sum_s);
  // the block's table and salient inputs, while the first stages are in flight: a table item and a salient
  // slot a thread and iteration, their loads side by side (two dependent rounds, indices then inputs,
  // instead of four; at m = 1 the first items' indices came before the wait, so one round for them)
  for (int e = threadIdx.x; e < items; e += kThreads) {
    TableConsts tk = first_tab;
    int col = first_col;
    if (!kHoist || e != threadIdx.x) {  // a later item: its constants now
      if (e < MT * groups) tk = table_item_consts(a, wb0, groups, e);
      if (e < MT * cnt) col = salient_item_col(a, ws0, ws1, cnt, e);
    }
    float q[4];
    int index = 0;
    T v;
    if (e < MT * groups) table_item_gather<T, MT>(a, t0, mt, groups, e, tk, q, sum_b);
    if (e < MT * cnt) v = salient_item_gather<T, MT>(a, t0, mt, cnt, sal_words, e, col, index, sum_s);
    if (e < MT * groups) table_item_store(tab, e, q);
    if (e < MT * cnt) xh[index] = v;
  }
  __syncthreads();

  const char* tab_bytes = reinterpret_cast<const char*>(tab);
  float cacc[NT16][4];
#pragma unroll
  for (int j = 0; j < NT16; ++j) cacc[j][0] = cacc[j][1] = cacc[j][2] = cacc[j][3] = 0.f;
  uint32_t magic = MmaOps<T>::kMagic;
  asm volatile("" : "+r"(magic));  // kept in a register: the third LOP3 operand

  for (int st = 0; st < total; ++st) {
    issue(st + NS - 1);  // into the slot summed in the previous iteration
    cp_async_wait<NS - 1>();
    __syncwarp();  // every lane's copies of stage st are visible to the warp
    const uint32_t* slot = my_ring + (st % NS) * W * STRIDE;
    if (st < nbs) {
      const int valid = min(W, wb1 - wb0 - st * W);  // the same for the whole block
      if (valid == W) {  // a full stage without per-word branches: the next word's reads can be hoisted
        uint32_t w[W][R];
#pragma unroll
        for (int i = 0; i < W; ++i) slot_words<R>(slot, i, lane, w[i]);
#pragma unroll
        for (int i = 0; i < W; ++i)
          sum_sign_words<MT, R>(w[i], tab_bytes, (uint32_t)(st * W + i) * 512u, groups, acc_b);
      } else {
#pragma unroll
        for (int i = 0; i < W; ++i) {
          if (i < valid) {
            uint32_t w[R];
            slot_words<R>(slot, i, lane, w);
            sum_sign_words<MT, R>(w, tab_bytes, (uint32_t)(st * W + i) * 512u, groups, acc_b);
          }
        }
      }
    } else {
      // W / 4 tensor-core steps; step q: codes of word 4 q + lane % 4 of the stage, rows 16 j + lane / 4 and 8
      // below; inputs of token lane / 4 (xh is zero past the run, so stale words of a last stage add 0)
#pragma unroll
      for (int q = 0; q < W / 4; ++q) {
        const int wl = (st - nbs) * W + 4 * q;
        uint32_t codes[NT16][2];
#pragma unroll
        for (int j = 0; j < NT16; ++j) {
          codes[j][0] = slot[(4 * q + (lane & 3)) * STRIDE + 16 * j + (lane >> 2)];
          codes[j][1] = slot[(4 * q + (lane & 3)) * STRIDE + 16 * j + 8 + (lane >> 2)];
        }
        uint4 xv = make_uint4(0u, 0u, 0u, 0u);  // tokens >= MT are zero columns of B
        if ((lane >> 2) < MT)
          xv = *reinterpret_cast<const uint4*>(xh + ((lane >> 2) * sal_words + wl + (lane & 3)) * 8);
        mma_codes<T, NT16>(codes, xv, magic, cacc);
      }
    }
    __syncwarp();  // the slot is read before the next iteration refills it
  }
  // every word is requested: the next kernel in the stream may be scheduled (late, unless the early trigger has
  // already let it in)
  if (!pdl_early) pdl_launch_dependents();
  cp_async_wait<0>();
  __syncwarp();

  // C fragments (rows 16 j + lane / 4 and + 8, tokens 2 (lane % 4) + {0, 1}) to the lane that owns each row:
  // both are in this warp, so through the warp's own ring
  float* sal_out = reinterpret_cast<float*>(my_ring);  // [MT][32 R]
  const int tok = 2 * (lane & 3);
#pragma unroll
  for (int j = 0; j < NT16; ++j) {
    const int r = 16 * j + (lane >> 2);
    if (tok < MT) {
      sal_out[tok * 32 * R + r] = cacc[j][0];
      sal_out[tok * 32 * R + r + 8] = cacc[j][2];
    }
    if (tok + 1 < MT) {
      sal_out[(tok + 1) * 32 * R + r] = cacc[j][1];
      sal_out[(tok + 1) * 32 * R + r + 8] = cacc[j][3];
    }
  }
  __syncwarp();
#pragma unroll
  for (int t = 0; t < MT; ++t)
#pragma unroll
    for (int r = 0; r < R; ++r) acc_s[t][r] = sal_out[t * 32 * R + lane * R + r];

  finish_block<T, MT, R, true>(a, acc_s, acc_b, sum_b, sum_s, red, &last_block, t0, mt, n0, row_ok);
}

size_t ring_smem(int mt, int r, int ns, int w, int tab_words, int sal_words, size_t esz) {
  return (size_t)mt * tab_words * 512 + (size_t)mt * sal_words * 8 * esz +
         (size_t)(kThreads / 32) * ns * w * (32 * r + 8) * 4;
}

// resident blocks an SM of one instance at a given dynamic shared memory, cached by the KB (the query costs
// microseconds, a decode step calls it for every layer)
template <typename T, int MT, int R, int NS, int W>
int ring_occupancy(size_t smem) {
  static std::atomic<int> cache[232];
  static std::atomic<bool> attr_set{false};
  if (!attr_set.load()) {
    cudaFuncSetAttribute(ring_kernel<T, MT, R, NS, W>, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024);
    cudaFuncSetAttribute(ring_kernel<T, MT, R, NS, W>, cudaFuncAttributePreferredSharedMemoryCarveout,
                         (int)cudaSharedmemCarveoutMaxShared);
    attr_set.store(true);
  }
  const size_t kb = (smem + 1023) / 1024;
  if (kb >= 232) return 0;
  int v = cache[kb].load();
  if (v == 0) {
    int blocks = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, ring_kernel<T, MT, R, NS, W>, kThreads, kb * 1024) != cudaSuccess)
      blocks = 0;
    v = blocks > 0 ? blocks : -1;
    cache[kb].store(v);
  }
  return v > 0 ? v : 0;
}

template <typename T, int MT, int R, int NS, int W>
bool plan_ring_mt(StreamPlan& p, int n, int k, int s, int ksplit_request, bool automatic) {
  const int nbw = (k - s) / 32, nsw = s / 8;
  const int ztiles = 1;  // m <= 4: one token tile
  const int words = nbw > nsw ? nbw : nsw;
  // the table holds the block's binarized words once: MT x (words a split) <= kRingTableWords
  int ks_min = (MT * nbw + kRingTableWords - 1) / kRingTableWords;
  if (ks_min < 1) ks_min = 1;
  if (ks_min > kMaxRingSplit || ks_min > (words > 0 ? words : 1)) return false;
  // the automatic choice leaves to the streaming kernel what needs more than 16 splits (measured: m = 4 on
  // 4096x11008, 18 splits, 22.4 us against 20.5)
  if (automatic && ks_min > kRingAutoSplit) return false;
  auto words_of = [](int total, int ks) { return (total + ks - 1) / ks; };
  auto smem_of = [&](int ks) {
    const int sal = (words_of(nsw, ks) + W - 1) / W * W;
    return ring_smem(MT, R, NS, W, words_of(nbw, ks), sal, sizeof(T));
  };
  int ks = ksplit_request;
  if (ks > 0) {
    if (ks < ks_min) ks = ks_min;
  } else {  // the most splits, up to 16, that still run in one wave (each split costs a table build and a
    ks = ks_min;  // partial; measured on the H100, more than 16 splits was slower on every shape)
    const int most = ks_min > kRingAutoSplit ? ks_min : kRingAutoSplit;
    const int cap = words < most ? words : most;
    for (int c = ks_min; c <= cap; ++c) {
      const int occ = ring_occupancy<T, MT, R, NS, W>(smem_of(c));
      if (occ > 0 && p.row_blocks * c * ztiles <= occ * sm_count()) ks = c;
    }
  }
  if (ks > kMaxRingSplit) ks = kMaxRingSplit;
  if (words > 0 && ks > words) ks = words;
  if (ks < 1) ks = 1;
  if (ring_occupancy<T, MT, R, NS, W>(smem_of(ks)) == 0) return false;
  p.ksplit = ks;
  p.tab_words = words_of(nbw, ks);
  p.sal_words = (words_of(nsw, ks) + W - 1) / W * W;
  p.smem = smem_of(ks);
  return true;
}

// the ring's shape (stages, words a stage): (4, 4), (3, 4), (2, 4), (2, 8), and at m = 1 also (3, 8) and (4, 8):
// 16 or 24 words a warp in flight; measured faster on the large layers only (the automatic rule in plan_ring).
// Other m: not built, to keep the build short; the plan falls back to (2, 8).
template <int MT, int NS, int W> constexpr bool ring_built() { return W == 4 || NS == 2 || MT == 1; }

template <typename T, int MT, int R>
bool plan_ring_ns(StreamPlan& p, int n, int k, int s, int ksplit_request, bool automatic) {
  if (p.ring_words == 8 && MT != 1) p.ring_stages = 2;
  if (p.ring_words == 8 && p.ring_stages == 4) return plan_ring_mt<T, MT, R, ring_built<MT, 4, 8>() ? 4 : 2, 8>(p, n, k, s, ksplit_request, automatic);
  if (p.ring_words == 8 && p.ring_stages == 3) return plan_ring_mt<T, MT, R, ring_built<MT, 3, 8>() ? 3 : 2, 8>(p, n, k, s, ksplit_request, automatic);
  if (p.ring_words == 8) return plan_ring_mt<T, MT, R, 2, 8>(p, n, k, s, ksplit_request, automatic);
  if (p.ring_stages == 2) return plan_ring_mt<T, MT, R, 2, 4>(p, n, k, s, ksplit_request, automatic);
  return p.ring_stages == 3 ? plan_ring_mt<T, MT, R, 3, 4>(p, n, k, s, ksplit_request, automatic)
                            : plan_ring_mt<T, MT, R, 4, 4>(p, n, k, s, ksplit_request, automatic);
}

template <typename T, int MT>
bool plan_ring_r(StreamPlan& p, int n, int k, int s, int ksplit_request, bool automatic) {
  return p.rows_per_thread == 2 ? plan_ring_ns<T, MT, 2>(p, n, k, s, ksplit_request, automatic)
                                : plan_ring_ns<T, MT, 1>(p, n, k, s, ksplit_request, automatic);
}

template <typename T>
bool plan_ring_t(StreamPlan& p, int m, int n, int k, int s, int ksplit_request, bool automatic) {
  if (m == 1) return plan_ring_r<T, 1>(p, n, k, s, ksplit_request, automatic);
  if (m == 2) return plan_ring_r<T, 2>(p, n, k, s, ksplit_request, automatic);
  return plan_ring_r<T, 4>(p, n, k, s, ksplit_request, automatic);
}

template <typename T, int MT, int R, int NS, int W>
cudaError_t launch_ring_mt(const StreamArgs& a, const StreamPlan& p, cudaStream_t stream) {
  dim3 grid(p.row_blocks, p.ksplit, 1);
  if (p.pdl && device_has_pdl())
    return launch_with_pdl(ring_kernel<T, MT, R, NS, W>, grid, dim3(kThreads), p.smem, stream, a, p.tab_words, p.sal_words,
                           p.pdl_early ? 1 : 0);
  ring_kernel<T, MT, R, NS, W><<<grid, kThreads, p.smem, stream>>>(a, p.tab_words, p.sal_words, 0);
  return cudaGetLastError();
}

template <typename T, int MT, int R>
cudaError_t launch_ring_ns(const StreamArgs& a, const StreamPlan& p, cudaStream_t stream) {
  if (p.ring_words == 8 && p.ring_stages == 4) return launch_ring_mt<T, MT, R, ring_built<MT, 4, 8>() ? 4 : 2, 8>(a, p, stream);
  if (p.ring_words == 8 && p.ring_stages == 3) return launch_ring_mt<T, MT, R, ring_built<MT, 3, 8>() ? 3 : 2, 8>(a, p, stream);
  if (p.ring_words == 8) return launch_ring_mt<T, MT, R, 2, 8>(a, p, stream);
  if (p.ring_stages == 2) return launch_ring_mt<T, MT, R, 2, 4>(a, p, stream);
  return p.ring_stages == 3 ? launch_ring_mt<T, MT, R, 3, 4>(a, p, stream)
                            : launch_ring_mt<T, MT, R, 4, 4>(a, p, stream);
}

template <typename T, int MT>
cudaError_t launch_ring_r(const StreamArgs& a, const StreamPlan& p, cudaStream_t stream) {
  return p.rows_per_thread == 2 ? launch_ring_ns<T, MT, 2>(a, p, stream) : launch_ring_ns<T, MT, 1>(a, p, stream);
}

template <typename T>
cudaError_t launch_ring_t(const StreamArgs& a, const StreamPlan& p, cudaStream_t stream) {
  if (a.m == 1) return launch_ring_r<T, 1>(a, p, stream);
  if (a.m == 2) return launch_ring_r<T, 2>(a, p, stream);
  return launch_ring_r<T, 4>(a, p, stream);
}

}  // namespace

bool plan_ring(StreamPlan& p, bool bf16, int m, int n, int k, int s, int ksplit_request, int stages, int words,
               bool automatic) {
  if (m < 1 || m > kMaxRingM || n % 4 != 0) return false;  // 16-byte copies of 4 rows' words
  auto plan_with = [&](StreamPlan& q, int ns) {
    q = StreamPlan{};
    q.ring = true;
    q.ring_words = words == 8 ? 8 : 4;
    q.ring_stages = (ns == 2 || ns == 3) ? ns : 4;
    if (q.ring_words == 8 && m != 1) q.ring_stages = 2;  // (3, 8) and (4, 8) are built for m = 1 only
    q.salient_mma = true;
    q.rows_per_thread = (n % 2 == 0 && n >= 8192) ? 2 : 1;
    q.row_blocks = (n + kThreads * q.rows_per_thread - 1) / (kThreads * q.rows_per_thread);
    return bf16 ? plan_ring_t<__nv_bfloat16>(q, m, n, k, s, ksplit_request, automatic)
                : plan_ring_t<__half>(q, m, n, k, s, ksplit_request, automatic);
  };
  if (!plan_with(p, stages)) return false;
  // The automatic choice at m = 1: a third stage of 8 words where a warp's share of a split, under the 2-stage
  // plan, is at least kDeepRingWords words of 32 rows (sign words + salient words rounded to whole stages, times
  // the rows a thread). Measured on the H100 (us, 2 -> 3 stages; that count in brackets): 28672x8192 (94)
  // 24.0 -> 22.5, 8192x28672 (186) 24.2 -> 23.5; 8192x8192 (58) 10.3 -> 11.0, 4096x11008 (42) 8.4 -> 8.6,
  // 11008x4096 (30) 8.9 -> 9.9.
  if (automatic && m == 1 && p.ring_words == 8 && p.ring_stages == 2 &&
      (p.tab_words + p.sal_words) * p.rows_per_thread >= kDeepRingWords) {
    StreamPlan deep;
    if (plan_with(deep, 3)) p = deep;
  }
  return true;
}

cudaError_t launch_ring(bool bf16, const StreamArgs& a, const StreamPlan& p, cudaStream_t stream) {
  if (!p.ring || a.m < 1 || a.m > kMaxRingM) return cudaErrorInvalidValue;
  return bf16 ? launch_ring_t<__nv_bfloat16>(a, p, stream) : launch_ring_t<__half>(a, p, stream);
}

}  // namespace ptq161
}  // namespace lpq
