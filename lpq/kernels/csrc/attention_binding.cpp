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
  int kind = attn::kNoMask;
  int64_t m_sb = 0, m_sh = 0;
  const void* mptr = nullptr;
  if (mask.has_value() && mask->defined()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.is_cuda() && m.dim() == 4 && (m.size(0) == B || m.size(0) == 1) && (m.size(1) == H || m.size(1) == 1) &&
                m.size(2) == 1 && m.size(3) == L && m.stride(3) == 1,
                "lpq decode_attention: the mask must be [B or 1, H or 1, 1, L] with contiguous keys");
    TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == q.scalar_type() || m.scalar_type() == at::kFloat,
                "lpq decode_attention: the mask must be bool (true = attend) or additive in q's dtype or float32");
    kind = m.scalar_type() == at::kBool ? attn::kBoolMask : m.scalar_type() == at::kFloat ? attn::kAddF32 : attn::kAddSame;
    m_sb = m.size(0) == 1 ? 0 : m.stride(0);
    m_sh = m.size(1) == 1 ? 0 : m.stride(1);
    mptr = m.data_ptr();
  }
  TORCH_CHECK(counters.is_cuda() && counters.scalar_type() == at::kInt && counters.is_contiguous() && counters.numel() >= B * H,
              "lpq decode_attention: counters must be int32 zeros, at least B x H of them");
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({B, 1, H, D}, q.options());
  if (B == 0 || H == 0) return out;
  const int sms = sm_count(q.get_device());
  const auto [splits, kps] = plan_splits(B * H, std::max<int64_t>(L, 1), D, sms, force_splits);
  at::Tensor partial, stats;
  if (splits > 1) {
    partial = at::empty({B * H * splits * D}, q.options().dtype(at::kFloat));
    stats = at::empty({B * H * splits * 2}, q.options().dtype(at::kFloat));
  }
  attn::DecodeArgs a{};
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.mask = mptr;
  a.out = out.data_ptr();
  a.partial = splits > 1 ? partial.data_ptr<float>() : nullptr;
  a.stats = splits > 1 ? stats.data_ptr<float>() : nullptr;
  a.counters = counters.data_ptr<int>();
  a.q_sb = q.stride(0); a.q_sh = q.stride(1);
  a.kv_sb = k.stride(0); a.kv_sh = k.stride(1); a.kv_sl = k.stride(2);
  a.v_sb = v.stride(0); a.v_sh = v.stride(1); a.v_sl = v.stride(2);
  a.m_sb = m_sb; a.m_sh = m_sh;
  a.B = (int)B; a.H = (int)H; a.Hkv = (int)Hkv; a.L = (int)L; a.D = (int)D;
  a.mask_kind = kind;
  a.scale = (float)scale;
  a.splits = splits;
  a.keys_per_split = kps;
  const cudaError_t err = attn::launch_decode_attention(q.scalar_type() == at::kBFloat16, a, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "lpq decode_attention launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace lpq

TORCH_LIBRARY(lpq_attn, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor counters, float scale, int force_splits=0) -> Tensor");
  m.def("plan(int batch_heads, int L, int d, int force_splits=0) -> int[]", &lpq::decode_attention_plan);
}

TORCH_LIBRARY_IMPL(lpq_attn, CUDA, m) { m.impl("decode_attention", &lpq::decode_attention); }
