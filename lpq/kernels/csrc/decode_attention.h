// lpq: host-side interface of the decode attention kernel (decode_attention.cu).
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace lpq {
namespace attn {

// Mask kinds: none, bool (1 byte a key, nonzero = attend), additive in the query's dtype, additive float32.
enum MaskKind : int { kNoMask = 0, kBoolMask = 1, kAddSame = 2, kAddF32 = 3 };

constexpr int kThreads = 128;   // 4 warps a block
constexpr int kKeysPerThread = 4;  // keys whose rows a thread holds in registers at once (one round)
constexpr int kMaxSplits = 256;     // runs a (batch, head) at most: the merge holds their (max, sum) on chip
constexpr int kBlocksPerSM = 8;     // the automatic plan's target: splits x batch x heads ~ this x SMs

struct DecodeArgs {
  const void* q;      // [B, H, 1, D]: element (b, h, 0, d) at b * q_sb + h * q_sh + d
  const void* k;      // [B, Hkv, L, D]: (b, g, j, d) at b * kv_sb + g * kv_sh + j * kv_sl + d (v alike)
  const void* v;
  const void* mask;   // [B | 1, H | 1, 1, L]: (b, h, j) at b * m_sb + h * m_sh + j, or null
  void* out;          // [B, 1, H, D] contiguous
  float* partial;     // [B * H, splits, D] fp32 partial outputs (splits > 1)
  float* stats;       // [B * H, splits, 2] fp32 a split: max score (natural units), sum of exp(score - max)
  int* counters;      // [B * H] zero on entry; left zero
  int64_t q_sb, q_sh, kv_sb, kv_sh, kv_sl, v_sb, v_sh, v_sl, m_sb, m_sh;
  int B, H, Hkv, L, D;
  int mask_kind;
  float scale;        // softmax scale (applied to q)
  int splits, keys_per_split;
  // rope_cache_attention only (null otherwise): the new token's key and value rows (head g at k_new + g * new_sh),
  // the rotary factors cos / sin [D] of its position, and *position, the cache row it goes to. q then points at
  // the unrotated query; k and v at the cache, which the kernel writes row *position of and reads with that row
  // taken from registers. grid_counter: one more zeroed int32 (left zero), for the grid's last block to add 1
  // to *position.
  const void* k_new;
  const void* v_new;
  const void* cos;
  const void* sin;
  int64_t new_sh;
  int64_t* position;
  int* grid_counter;
};

// Keys of one round of one block (4 warps x keys a warp at once x kKeysPerThread) for head size d.
inline int keys_per_round(int d) { return kThreads / (d / 8) * kKeysPerThread; }

// pdl: launched with programmatic dependent launch (sm_90+; a plain launch elsewhere). The kernel reads the cache's
// first rows before it waits for the previous kernel, everything else after.
cudaError_t launch_decode_attention(bool bf16, const DecodeArgs& a, bool pdl, cudaStream_t stream);

}  // namespace attn
}  // namespace lpq
