// lpq: torch.library registration of the ptq161 GEMV kernel (op lpq_ptq161::gemv). The Python wrapper
// (lpq/kernels/ptq161_cuda.py) checks every argument first and raises readable errors; the checks here
// guard direct calls. The fake (meta) implementation is registered from Python.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "ptq161_launch.h"

namespace lpq {

namespace {

// variants 0 (automatic: 2 stages of 8 words, the fastest ring on most shapes and batches measured on the
// H100; 3 at m = 1 on large layers, see plan_ring), 4, 6, 7, 8, 9 and 10 (ring: 4, 3, 2 stages of 4 words, 2, 3, 4 stages of 8): the ring kernel where its plan applies (m <= kMaxRingM, N a multiple of 4,
// both word tensors 16-byte aligned for its cp.async copies), else the streaming kernel; 2, 3 and 5: the
// streaming kernel
ptq161::StreamPlan choose_plan(int64_t variant, bool bf16, int mc, int64_t n, int64_t k, int64_t s, int64_t ksplit,
                               bool aligned16) {
  ptq161::StreamPlan plan;
  const bool ring = variant == 0 || variant == 4 || (variant >= 6 && variant <= 10);
  const int stages = variant == 4 || variant == 10 ? 4 : variant == 6 || variant == 9 ? 3 : 2;
  const int words = variant == 0 || variant >= 8 ? 8 : 4;
  if (ring && aligned16 &&
      ptq161::plan_ring(plan, bf16, mc, (int)n, (int)k, (int)s, (int)ksplit, stages, words, variant == 0))
    return plan;
  return ptq161::plan_stream(mc, (int)n, (int)k, (int)s, (int)ksplit, variant == 2, variant != 3);
}

}  // namespace

// The plan a gemv call of m <= kMaxStreamM tokens would launch (benchmarks and tests):
// [kernel (0 streaming, 1 ring), K splits, rows a thread, ring stages, ring words a stage], for 16-byte
// aligned word tensors.
std::vector<int64_t> ptq161_plan(int64_t m, int64_t n, int64_t k, int64_t s, int64_t variant, int64_t ksplit, bool bf16) {
  TORCH_CHECK(m >= 1 && m <= ptq161::kMaxStreamM && n >= 1 && s >= 0 && s <= k, "lpq ptq161_plan: bad problem");
  variant &= ~(ptq161::kVariantPDL | ptq161::kVariantEarly);  // launch properties
  TORCH_CHECK(variant >= 0 && variant <= 10 && variant != 1, "lpq ptq161_plan: the first kernel has no plan");
  const ptq161::StreamPlan p = choose_plan(variant, bf16, (int)m, n, k, s, ksplit, true);
  return {p.ring ? 1 : 0, p.ksplit, p.rows_per_thread, p.ring ? p.ring_stages : 0, p.ring ? p.ring_words : 0};
}

at::Tensor ptq161_gemv(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& sw, const at::Tensor& bin_idx,
                       const at::Tensor& sal_idx, const at::Tensor& colscale, const at::Tensor& rowvec,
                       const c10::optional<at::Tensor>& bias, const at::Tensor& counters, int64_t n, int64_t k,
                       int64_t variant_flags, int64_t ksplit) {
  const bool pdl = (variant_flags & ptq161::kVariantPDL) != 0;
  const bool early = (variant_flags & ptq161::kVariantEarly) != 0;
  const int64_t variant = variant_flags & ~(ptq161::kVariantPDL | ptq161::kVariantEarly);
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.size(1) == k && x.is_contiguous(), "lpq ptq161_gemv: x must be a contiguous CUDA [m, ", k, "] tensor");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, "lpq ptq161_gemv: activations must be float16 or bfloat16");
  const int64_t s = sal_idx.numel(), b = bin_idx.numel();
  TORCH_CHECK(s + b == k && s % 8 == 0 && b % 32 == 0, "lpq ptq161_gemv: salient/binarized split does not fit in_features=", k);
  TORCH_CHECK(qw.scalar_type() == at::kInt && sw.scalar_type() == at::kInt && bin_idx.scalar_type() == at::kInt &&
              sal_idx.scalar_type() == at::kInt && colscale.scalar_type() == at::kFloat && rowvec.scalar_type() == at::kFloat,
              "lpq ptq161_gemv: wrong tensor dtypes");
  TORCH_CHECK(qw.numel() == b / 32 * n && sw.numel() == s / 8 * n && colscale.numel() == b && rowvec.numel() == 4 * n,
              "lpq ptq161_gemv: packed tensors do not match n=", n, ", k=", k);
  TORCH_CHECK(qw.is_contiguous() && sw.is_contiguous() && bin_idx.is_contiguous() && sal_idx.is_contiguous() &&
              colscale.is_contiguous() && rowvec.is_contiguous(), "lpq ptq161_gemv: tensors must be contiguous");
  const void* bptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == n && bias->scalar_type() == x.scalar_type() && bias->is_contiguous(), "lpq ptq161_gemv: bad bias");
    bptr = bias->data_ptr();
  }
  TORCH_CHECK(variant >= 0 && variant <= 10,
              "lpq ptq161_gemv: variant must be 0 (automatic), 1 (first kernel), 2 (streaming, one row a thread), "
              "3 (streaming, salient codes by FFMA), 4 (ring), 5 (streaming), 6 (ring of 3 stages), 7 (ring of 2), "
              "8, 9 or 10 (ring of 2, 3 or 4 stages of 8 words), optionally or-ed with ", ptq161::kVariantPDL,
              " (a ring kernel launched with programmatic dependent launch) and then ", ptq161::kVariantEarly,
              " (its early trigger)");
  TORCH_CHECK(!early || pdl, "lpq ptq161_gemv: the early trigger (", ptq161::kVariantEarly, ") needs ",
              ptq161::kVariantPDL, " (programmatic dependent launch) with it");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0);
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return y;
  const float* rv = rowvec.data_ptr<float>();  // [4, n]: sscale, szero, bscale, mu
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err = cudaSuccess;
  if (variant == 1) {
    at::Tensor acc = at::zeros({2, m, n}, x.options().dtype(at::kFloat));
    at::Tensor sums = at::zeros({2, m}, x.options().dtype(at::kFloat));
    ptq161::GemvArgs a{x.data_ptr(), bin_idx.data_ptr<int>(), sal_idx.data_ptr<int>(), colscale.data_ptr<float>(),
                       reinterpret_cast<const uint32_t*>(qw.data_ptr()), reinterpret_cast<const uint32_t*>(sw.data_ptr()),
                       acc.data_ptr<float>(), sums.data_ptr<float>(), (int)m, (int)n, (int)k, (int)s, (int)b, 0};
    ptq161::EpilogueArgs e{acc.data_ptr<float>(), sums.data_ptr<float>(), rv, rv + n, rv + 2 * n, rv + 3 * n, bptr,
                           y.data_ptr(), (int)m, (int)n};
    err = ptq161::launch_gemv(x.scalar_type() == at::kBFloat16, a, e, stream);
  } else {
    // launched in pieces of at most kMaxStreamM tokens; each piece leaves the counters at zero
    TORCH_CHECK(counters.is_cuda() && counters.scalar_type() == at::kInt && counters.is_contiguous() &&
                counters.numel() >= 2 * ((n + 255) / 256), "lpq ptq161_gemv: counters must be int32 [2 * ceil(n / 256)] zeros");
    const size_t esz = x.element_size();
    const bool aligned16 = reinterpret_cast<uintptr_t>(qw.data_ptr()) % 16 == 0 &&
                           reinterpret_cast<uintptr_t>(sw.data_ptr()) % 16 == 0;
    for (int64_t t0 = 0; t0 < m && err == cudaSuccess; t0 += ptq161::kMaxStreamM) {
      const int mc = (int)std::min<int64_t>(ptq161::kMaxStreamM, m - t0);
      const bool bf16 = x.scalar_type() == at::kBFloat16;
      ptq161::StreamPlan plan = choose_plan(variant, bf16, mc, n, k, s, ksplit, aligned16);
      const bool ring = plan.ring;
      plan.pdl = ring && pdl;
      plan.pdl_early = plan.pdl && early;
      at::Tensor partial;
      if (plan.ksplit > 1) partial = at::empty({plan.ksplit, mc, n}, x.options().dtype(at::kFloat));
      ptq161::StreamArgs a{static_cast<const char*>(x.data_ptr()) + t0 * k * esz, bin_idx.data_ptr<int>(),
                           sal_idx.data_ptr<int>(), colscale.data_ptr<float>(),
                           reinterpret_cast<const uint32_t*>(qw.data_ptr()), reinterpret_cast<const uint32_t*>(sw.data_ptr()),
                           rv, bptr, static_cast<char*>(y.data_ptr()) + t0 * n * esz,
                           plan.ksplit > 1 ? partial.data_ptr<float>() : nullptr, counters.data_ptr<int>(),
                           mc, (int)n, (int)k, (int)s, (int)b};
      err = ring ? ptq161::launch_ring(bf16, a, plan, stream) : ptq161::launch_stream(bf16, a, plan, stream);
    }
  }
  TORCH_CHECK(err == cudaSuccess, "lpq ptq161_gemv launch failed: ", cudaGetErrorString(err));
  return y;
}

}  // namespace lpq

TORCH_LIBRARY(lpq_ptq161, m) {
  m.def("gemv(Tensor x, Tensor qw, Tensor sw, Tensor bin_idx, Tensor sal_idx, Tensor colscale, Tensor rowvec, Tensor? bias, Tensor counters, int n, int k, int variant, int ksplit) -> Tensor");
  m.def("plan(int m, int n, int k, int s, int variant, int ksplit, bool bf16) -> int[]", &lpq::ptq161_plan);
}

TORCH_LIBRARY_IMPL(lpq_ptq161, CUDA, m) { m.impl("gemv", &lpq::ptq161_gemv); }
