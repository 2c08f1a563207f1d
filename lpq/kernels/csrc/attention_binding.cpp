// lpq: torch.library registration of the decode attention kernel (op lpq_attn::decode_attention). The
// Python wrapper (lpq/attention.py) decides when it applies and falls back to SDPA otherwise; the checks
// here guard direct calls. The fake (meta) implementation is registered from Python.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "decode_attention.h"

namespace lpq {

namespace {

int sm_count(int device) {
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms < 1) sms = 1;
  return sms;
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// Runs of keys a (batch, head): enough that the grid holds about kBlocksPerSM blocks an SM, each run whole
// rounds of keys (no run left empty), at most kMaxSplits; a forced count is kept where it leaves no run empty.
std::pair<int, int> plan_splits(int64_t bh, int64_t L, int64_t d, int sms, int64_t force_splits) {
  const int64_t round = attn::keys_per_round((int)d);
  const int64_t most = (L + round - 1) / round;
  int64_t splits = force_splits > 0 ? force_splits : (attn::kBlocksPerSM * sms + bh - 1) / bh;
  splits = std::max<int64_t>(1, std::min<int64_t>({splits, most, (int64_t)attn::kMaxSplits}));
  int64_t kps = (L + splits - 1) / splits;
  kps = (kps + round - 1) / round * round;
  splits = (L + kps - 1) / kps;
  return {(int)splits, (int)kps};
}

// The mask's kind, strides and pointer into a (checked: [B or 1, H or 1, 1, L], keys contiguous).
void set_mask(attn::DecodeArgs& a, const c10::optional<at::Tensor>& mask, int64_t B, int64_t H, int64_t L,
              at::ScalarType dtype) {
  a.mask_kind = attn::kNoMask;
  a.m_sb = a.m_sh = 0;
  a.mask = nullptr;
  if (!mask.has_value() || !mask->defined()) return;
  const at::Tensor& m = *mask;
  TORCH_CHECK(m.is_cuda() && m.dim() == 4 && (m.size(0) == B || m.size(0) == 1) && (m.size(1) == H || m.size(1) == 1) &&
              m.size(2) == 1 && m.size(3) == L && m.stride(3) == 1,
              "lpq decode_attention: the mask must be [B or 1, H or 1, 1, L] with contiguous keys");
  TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == dtype || m.scalar_type() == at::kFloat,
              "lpq decode_attention: the mask must be bool (true = attend) or additive in q's dtype or float32");
  a.mask_kind = m.scalar_type() == at::kBool ? attn::kBoolMask : m.scalar_type() == at::kFloat ? attn::kAddF32 : attn::kAddSame;
  a.m_sb = m.size(0) == 1 ? 0 : m.stride(0);
  a.m_sh = m.size(1) == 1 ? 0 : m.stride(1);
  a.mask = m.data_ptr();
}

// The split plan, the fp32 partials it needs, and the launch of a filled-in a (q, k, v, mask, strides, sizes).
void plan_and_launch(attn::DecodeArgs& a, const at::Tensor& out, const at::Tensor& counters, int64_t force_splits,
                     bool bf16, bool pdl = false) {
  const int sms = sm_count(out.get_device());
  const auto [splits, kps] = plan_splits((int64_t)a.B * a.H, std::max<int64_t>(a.L, 1), a.D, sms, force_splits);
  at::Tensor partial, stats;
  if (splits > 1) {
    partial = at::empty({(int64_t)a.B * a.H * splits * a.D}, out.options().dtype(at::kFloat));
    stats = at::empty({(int64_t)a.B * a.H * splits * 2}, out.options().dtype(at::kFloat));
  }
  a.out = out.data_ptr();
  a.partial = splits > 1 ? partial.data_ptr<float>() : nullptr;
  a.stats = splits > 1 ? stats.data_ptr<float>() : nullptr;
  a.counters = counters.data_ptr<int>();
  a.splits = splits;
  a.keys_per_split = kps;
  const cudaError_t err = attn::launch_decode_attention(bf16, a, pdl, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "lpq decode_attention launch failed: ", cudaGetErrorString(err));
}

}  // namespace

// [splits, keys a split] that decode_attention would use (tests and benchmarks)
std::vector<int64_t> decode_attention_plan(int64_t batch_heads, int64_t L, int64_t d, int64_t force_splits) {
  TORCH_CHECK(d == 64 || d == 128 || d == 256, "lpq decode_attention: head size must be 64, 128 or 256");
  const int sms = sm_count(c10::cuda::current_device());
  const auto p = plan_splits(batch_heads, std::max<int64_t>(L, 1), d, sms, force_splits);
  return {p.first, p.second};
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& mask, const at::Tensor& counters, double scale,
                            int64_t force_splits) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda(), "lpq decode_attention: q, k, v must be CUDA tensors");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "lpq decode_attention: q, k, v must be 4-D [B, H, L, D]");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Hkv = k.size(1), L = k.size(2);
  TORCH_CHECK(q.size(2) == 1, "lpq decode_attention: one query token a sequence (q [B, H, 1, D])");
  TORCH_CHECK(D == 64 || D == 128 || D == 256, "lpq decode_attention: head size must be 64, 128 or 256, got ", D);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(3) == D && Hkv >= 1 && H % Hkv == 0,
              "lpq decode_attention: k and v must be [B, Hkv, L, D] with H a multiple of Hkv");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() &&
              (q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16),
              "lpq decode_attention: q, k, v must share one dtype, float16 or bfloat16");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "lpq decode_attention: the head dimension must be contiguous");
  TORCH_CHECK(aligned16(q) && aligned16(k) && aligned16(v) && q.stride(0) % 8 == 0 && q.stride(1) % 8 == 0 &&
              k.stride(0) % 8 == 0 && k.stride(1) % 8 == 0 && k.stride(2) % 8 == 0 && v.stride(0) % 8 == 0 &&
              v.stride(1) % 8 == 0 && v.stride(2) % 8 == 0,
              "lpq decode_attention: q, k, v rows must start on 16-byte boundaries");
  TORCH_CHECK(counters.is_cuda() && counters.scalar_type() == at::kInt && counters.is_contiguous() && counters.numel() >= B * H,
              "lpq decode_attention: counters must be int32 zeros, at least B x H of them");
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({B, 1, H, D}, q.options());
  if (B == 0 || H == 0) return out;
  attn::DecodeArgs a{};
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  set_mask(a, mask, B, H, L, q.scalar_type());
  a.q_sb = q.stride(0); a.q_sh = q.stride(1);
  a.kv_sb = k.stride(0); a.kv_sh = k.stride(1); a.kv_sl = k.stride(2);
  a.v_sb = v.stride(0); a.v_sh = v.stride(1); a.v_sl = v.stride(2);
  a.B = (int)B; a.H = (int)H; a.Hkv = (int)Hkv; a.L = (int)L; a.D = (int)D;
  a.scale = (float)scale;
  plan_and_launch(a, out, counters, force_splits, q.scalar_type() == at::kBFloat16);
  return out;
}

// One decode step's attention of a Llama-style block, batch 1: qkv [..., (H + 2 Hkv) D] (the fused projection's row
// for the new token: q heads, then k, then v), cos / sin [..., D] of its position, the static cache k_cache /
// v_cache [1, Hkv, L, D] and position (int64, one element: the row the token goes to). Rotates q and the new key,
// writes the new key and value to row position, attends over the cache (rows past position are the mask's to
// remove) and adds 1 to position -> [1, 1, H, D]. position < L is the caller's to keep (transformers' StaticLayer
// would fail at L); a row past the cache is not written. pdl: launched with programmatic dependent launch.
at::Tensor rope_cache_attention(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor k_cache,
                                at::Tensor v_cache, at::Tensor position, const c10::optional<at::Tensor>& mask,
                                const at::Tensor& counters, double scale, int64_t heads, int64_t force_splits, bool pdl) {
  TORCH_CHECK(qkv.is_cuda() && cos.is_cuda() && sin.is_cuda() && k_cache.is_cuda() && v_cache.is_cuda() && position.is_cuda(),
              "lpq rope_cache_attention: every tensor must be on the GPU");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.size(0) == 1,
              "lpq rope_cache_attention: k_cache and v_cache must be [1, Hkv, L, D] (batch 1)");
  const int64_t Hkv = k_cache.size(1), L = k_cache.size(2), D = k_cache.size(3), H = heads;
  TORCH_CHECK(D == 64 || D == 128 || D == 256, "lpq rope_cache_attention: head size must be 64, 128 or 256, got ", D);
  TORCH_CHECK(H >= 1 && H % Hkv == 0, "lpq rope_cache_attention: the query heads must be a multiple of the cache's ", Hkv);
  TORCH_CHECK(qkv.numel() == (H + 2 * Hkv) * D && qkv.is_contiguous(),
              "lpq rope_cache_attention: qkv must be one contiguous row of (heads + 2 x kv heads) x D = ", (H + 2 * Hkv) * D,
              " elements, got ", qkv.numel());
  TORCH_CHECK(cos.numel() == D && sin.numel() == D && cos.is_contiguous() && sin.is_contiguous(),
              "lpq rope_cache_attention: cos and sin must hold the ", D, " rotary factors of one position, contiguous");
  const auto dt = qkv.scalar_type();
  TORCH_CHECK((dt == at::kHalf || dt == at::kBFloat16) && cos.scalar_type() == dt && sin.scalar_type() == dt &&
              k_cache.scalar_type() == dt && v_cache.scalar_type() == dt,
              "lpq rope_cache_attention: qkv, cos, sin and the cache must share one dtype, float16 or bfloat16");
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1 && k_cache.stride(1) % 8 == 0 && k_cache.stride(2) % 8 == 0 &&
              v_cache.stride(1) % 8 == 0 && v_cache.stride(2) % 8 == 0 && aligned16(k_cache) && aligned16(v_cache) &&
              aligned16(qkv) && aligned16(cos) && aligned16(sin),
              "lpq rope_cache_attention: the rows of qkv, cos, sin and the cache must start on 16-byte boundaries");
  TORCH_CHECK(position.scalar_type() == at::kLong && position.numel() == 1,
              "lpq rope_cache_attention: position must be one int64 (the cache row of the new token)");
  TORCH_CHECK(counters.is_cuda() && counters.scalar_type() == at::kInt && counters.is_contiguous() && counters.numel() >= H + 1,
              "lpq rope_cache_attention: counters must be int32 zeros, at least heads + 1 of them");
  const c10::cuda::CUDAGuard guard(qkv.device());
  at::Tensor out = at::empty({1, 1, H, D}, qkv.options());
  attn::DecodeArgs a{};
  const char* row = reinterpret_cast<const char*>(qkv.data_ptr());
  const int64_t esz = qkv.element_size();
  a.q = row;
  a.k_new = row + H * D * esz;
  a.v_new = row + (H + Hkv) * D * esz;
  a.new_sh = D;
  a.cos = cos.data_ptr();
  a.sin = sin.data_ptr();
  a.position = position.data_ptr<int64_t>();
  a.grid_counter = counters.data_ptr<int>() + H;  // after the per-head counters
  a.k = k_cache.data_ptr();
  a.v = v_cache.data_ptr();
  set_mask(a, mask, 1, H, L, dt);
  a.q_sb = 0; a.q_sh = D;
  a.kv_sb = k_cache.stride(0); a.kv_sh = k_cache.stride(1); a.kv_sl = k_cache.stride(2);
  a.v_sb = v_cache.stride(0); a.v_sh = v_cache.stride(1); a.v_sl = v_cache.stride(2);
  a.B = 1; a.H = (int)H; a.Hkv = (int)Hkv; a.L = (int)L; a.D = (int)D;
  a.scale = (float)scale;
  plan_and_launch(a, out, counters, force_splits, dt == at::kBFloat16, pdl);
  return out;
}

}  // namespace lpq

TORCH_LIBRARY(lpq_attn, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor counters, float scale, int force_splits=0) -> Tensor");
  m.def("rope_cache_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor(c!) position, Tensor? mask, Tensor counters, float scale, int heads, int force_splits=0, bool pdl=False) -> Tensor");
  m.def("plan(int batch_heads, int L, int d, int force_splits=0) -> int[]", &lpq::decode_attention_plan);
}

TORCH_LIBRARY_IMPL(lpq_attn, CUDA, m) {
  m.impl("decode_attention", &lpq::decode_attention);
  m.impl("rope_cache_attention", &lpq::rope_cache_attention);
}
