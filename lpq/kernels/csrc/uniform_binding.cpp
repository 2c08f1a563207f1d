// lpq: torch.library registration of the uniform-format CUDA kernels (ops lpq_cuda::*).
// The fake (meta) implementations are registered from Python (lpq/kernels/cuda_build.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "uniform_launch.h"

namespace lpq {

static void check_packed(const at::Tensor& qw, const at::Tensor& sc, const at::Tensor& zp, int64_t bits,
                         int64_t fold, int64_t n, int64_t k, int64_t& chunks, int64_t& n_tiles) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "lpq uniform kernel: bits must be 2, 3, 4 or 8, got ", bits);
  TORCH_CHECK(fold == 32 || fold == 64 || fold == 128, "lpq uniform kernel: fold must be 32, 64 or 128, got ", fold);
  TORCH_CHECK(qw.is_cuda() && sc.is_cuda() && zp.is_cuda(), "lpq uniform kernel: packed tensors must be on a CUDA device");
  TORCH_CHECK(qw.scalar_type() == at::kInt && sc.scalar_type() == at::kInt && zp.scalar_type() == at::kShort,
              "lpq uniform kernel: expected the repacked tensors (int32 codes, int32 scale pairs, int16 zero pairs)");
  TORCH_CHECK(qw.is_contiguous() && sc.is_contiguous() && zp.is_contiguous(), "lpq uniform kernel: repacked tensors must be contiguous");
  TORCH_CHECK(k % 8 == 0, "lpq uniform kernel: in_features must be a multiple of 8, got ", k);
  TORCH_CHECK(sc.dim() == 3 && sc.size(2) == 8 && zp.sizes() == sc.sizes(), "lpq uniform kernel: bad scale/zero layout");
  n_tiles = sc.size(1);
  chunks = (k + 127) / 128;
  TORCH_CHECK(n_tiles * 16 >= n && n_tiles % 2 == 0, "lpq uniform kernel: scales do not cover out_features=", n);
  TORCH_CHECK(qw.numel() == n_tiles * chunks * 64 * bits, "lpq uniform kernel: code tensor has ", qw.numel(),
              " words, expected ", n_tiles * chunks * 64 * bits, " for this shape");
}

// The checked, contiguous inputs of one fused-kernel call and its GemmArgs (y and the residual outputs unset).
struct GemmCall {
  at::Tensor x, norm_x, norm_sq;
  GemmArgs a{};
};

static GemmCall prepare_gemm(const at::Tensor& x_in, const at::Tensor& qw, const at::Tensor& sc, const at::Tensor& zp,
                             const c10::optional<at::Tensor>& bias, int64_t bits, int64_t fold, int64_t gs, int64_t n,
                             int64_t k, int64_t warps, int64_t variant, const c10::optional<at::Tensor>& norm_x_in,
                             const c10::optional<at::Tensor>& norm_sq_in, double norm_eps) {
  int64_t chunks, n_tiles;
  check_packed(qw, sc, zp, bits, fold, n, k, chunks, n_tiles);
  TORCH_CHECK(x_in.is_cuda() && x_in.get_device() == qw.get_device(), "lpq uniform_gemm: x must be on the weights' CUDA device");
  TORCH_CHECK(x_in.scalar_type() == at::kHalf || x_in.scalar_type() == at::kBFloat16,
              "lpq uniform_gemm: activations must be float16 or bfloat16, got ", x_in.scalar_type());
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == k, "lpq uniform_gemm: x must be [m, ", k, "], got ", x_in.sizes());
  GemmCall c;
  // the kernel reads x in 16-byte pieces: a strided view or an offset slice is copied here rather than
  // in Python, where reading data_ptr() would break a torch.compile graph at every linear
  c.x = x_in.contiguous();
  if (reinterpret_cast<uintptr_t>(c.x.data_ptr()) % 16 != 0) c.x = c.x.clone();
  const at::Tensor& x = c.x;
  TORCH_CHECK(warps >= 1 && warps <= 8, "lpq uniform_gemm: warps must be in 1..8");
  const int64_t base = variant & ~(int64_t)(kVariantPDL | kVariantEarly);
  const bool pdl_flags_ok = (variant & kVariantEarly) == 0 || (variant & kVariantPDL) != 0;
  TORCH_CHECK((variant >= 0 && variant <= 5) || ((base == 4 || base == 5) && (variant & kVariantPDL) && pdl_flags_ok) ||
                  variant == (0 | kVariantPDL),
              "lpq uniform_gemm: variant must be in 0..5, or 0, 4 or 5 | 8 (programmatic dependent launch), 4 or 5 "
              "optionally also | 16 (the next kernel let in right after the wait)");
  TORCH_CHECK(gs > 0, "lpq uniform_gemm: group size must be positive (in_features for per-channel)");
  const void* bptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->is_cuda() && bias->scalar_type() == x.scalar_type() && bias->numel() == n && bias->is_contiguous(),
                "lpq uniform_gemm: bias must be a contiguous [", n, "] tensor of the activations' dtype");
    bptr = bias->data_ptr();
  }
  // fused epilogues (uniform_launch.h): the rms scale of norm_x's rows or of norm_sq's slots
  const bool has_nx = norm_x_in.has_value() && norm_x_in->defined();
  const bool has_nsq = norm_sq_in.has_value() && norm_sq_in->defined();
  TORCH_CHECK(!(has_nx && has_nsq), "lpq uniform_gemm: give norm_x or norm_sq, not both");
  if (has_nx) {
    TORCH_CHECK(norm_x_in->is_cuda() && norm_x_in->get_device() == x.get_device() && norm_x_in->scalar_type() == x.scalar_type()
                    && norm_x_in->dim() == 2 && norm_x_in->size(0) == x.size(0) && norm_x_in->size(1) == k,
                "lpq uniform_gemm: norm_x must be [", x.size(0), ", ", k, "] of x's dtype on x's device, got ",
                norm_x_in->sizes());
    c.norm_x = norm_x_in->contiguous();
    if (reinterpret_cast<uintptr_t>(c.norm_x.data_ptr()) % 16 != 0) c.norm_x = c.norm_x.clone();
  }
  if (has_nsq) {
    TORCH_CHECK(norm_sq_in->is_cuda() && norm_sq_in->get_device() == x.get_device()
                    && norm_sq_in->scalar_type() == at::kFloat && norm_sq_in->dim() == 2 && norm_sq_in->size(0) == x.size(0)
                    && norm_sq_in->size(1) >= 1,
                "lpq uniform_gemm: norm_sq must be [", x.size(0), ", slots] float32 on x's device, got ",
                norm_sq_in->sizes(), " ", norm_sq_in->scalar_type());
    c.norm_sq = norm_sq_in->contiguous();
  }
  if (has_nx || has_nsq) TORCH_CHECK(norm_eps >= 0.0, "lpq uniform_gemm: norm_eps must be >= 0, got ", norm_eps);
  c.a.x = x.data_ptr();
  c.a.qw = reinterpret_cast<const uint32_t*>(qw.data_ptr());
  c.a.sc = reinterpret_cast<const uint32_t*>(sc.data_ptr());
  c.a.zp = reinterpret_cast<const uint16_t*>(zp.data_ptr());
  c.a.bias = bptr;
  c.a.M = (int)x.size(0);
  c.a.N = (int)n;
  c.a.K = (int)k;
  c.a.chunks = (int)chunks;
  c.a.n_tiles = (int)n_tiles;
  c.a.gs = (int)gs;
  c.a.norm_x = c.norm_x.defined() ? c.norm_x.data_ptr() : nullptr;
  c.a.norm_eps = (float)norm_eps;
  c.a.norm_sq = c.norm_sq.defined() ? c.norm_sq.data_ptr<float>() : nullptr;
  c.a.norm_slots = c.norm_sq.defined() ? (int)c.norm_sq.size(1) : 0;
  return c;
}

static void launch(const GemmCall& c, int64_t bits, int64_t fold, int64_t warps, int64_t variant) {
  GemmArgs a = c.a;
  a.pdl_early = (variant & kVariantEarly) != 0 ? 1 : 0;
  cudaError_t err = launch_uniform_gemm((int)bits, c.x.scalar_type() == at::kBFloat16, (int)fold, a, (int)warps, (int)(variant & ~kVariantEarly),
                                        c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "lpq uniform_gemm launch failed: ", cudaGetErrorString(err));
}

at::Tensor uniform_gemm(const at::Tensor& x_in, const at::Tensor& qw, const at::Tensor& sc, const at::Tensor& zp,
                        const c10::optional<at::Tensor>& bias, int64_t bits, int64_t fold, int64_t gs, int64_t n,
                        int64_t k, int64_t warps, int64_t variant, const c10::optional<at::Tensor>& norm_x,
                        double norm_eps, bool swiglu, const c10::optional<at::Tensor>& norm_sq) {
  GemmCall c = prepare_gemm(x_in, qw, sc, zp, bias, bits, fold, gs, n, k, warps, variant, norm_x, norm_sq, norm_eps);
  TORCH_CHECK(!swiglu || n % 16 == 0, "lpq uniform_gemm: swiglu needs out_features a multiple of 16 (8 gate and 8 up "
              "rows a tile), got ", n);
  const c10::cuda::CUDAGuard guard(c.x.device());
  const int64_t m = c.x.size(0);
  at::Tensor y = at::empty({m, swiglu ? n / 2 : n}, c.x.options());
  if (m == 0) return y;
  c.a.y = y.data_ptr();
  c.a.swiglu = swiglu ? 1 : 0;
  launch(c, bits, fold, warps, variant);
  return y;
}

// The layer that closes a pre-norm block's branch (uniform_launch.h, residual epilogue):
// -> (h = y + residual [m, n], next_w * h [m, n], per-n-tile sums of h^2 [m, n_tiles] float32).
std::tuple<at::Tensor, at::Tensor, at::Tensor> uniform_gemm_residual(
    const at::Tensor& x_in, const at::Tensor& qw, const at::Tensor& sc, const at::Tensor& zp,
    const c10::optional<at::Tensor>& bias, int64_t bits, int64_t fold, int64_t gs, int64_t n, int64_t k, int64_t warps,
    int64_t variant, const at::Tensor& residual_in, const at::Tensor& next_w_in) {
  GemmCall c = prepare_gemm(x_in, qw, sc, zp, bias, bits, fold, gs, n, k, warps, variant, c10::nullopt, c10::nullopt, 0.0);
  const int64_t m = c.x.size(0);
  TORCH_CHECK(residual_in.is_cuda() && residual_in.get_device() == c.x.get_device()
                  && residual_in.scalar_type() == c.x.scalar_type() && residual_in.dim() == 2 && residual_in.size(0) == m
                  && residual_in.size(1) == n,
              "lpq uniform_gemm_residual: residual must be [", m, ", ", n, "] of x's dtype on x's device, got ",
              residual_in.sizes());
  TORCH_CHECK(next_w_in.is_cuda() && next_w_in.get_device() == c.x.get_device() && next_w_in.scalar_type() == c.x.scalar_type()
                  && next_w_in.dim() == 1 && next_w_in.size(0) == n,
              "lpq uniform_gemm_residual: next_w must be [", n, "] of x's dtype on x's device, got ", next_w_in.sizes());
  // the one-token kernel copies the block's residual and next_w values in 16-byte pieces: aligned bases
  at::Tensor residual = residual_in.contiguous(), next_w = next_w_in.contiguous();
  if (reinterpret_cast<uintptr_t>(residual.data_ptr()) % 16 != 0) residual = residual.clone();
  if (reinterpret_cast<uintptr_t>(next_w.data_ptr()) % 16 != 0) next_w = next_w.clone();
  const c10::cuda::CUDAGuard guard(c.x.device());
  at::Tensor h = at::empty({m, n}, c.x.options());
  at::Tensor x_next = at::empty({m, n}, c.x.options());
  at::Tensor sq = at::empty({m, (int64_t)c.a.n_tiles}, c.x.options().dtype(at::kFloat));
  if (m == 0) return {h, x_next, sq};
  c.a.y = h.data_ptr();
  c.a.residual = residual.data_ptr();
  c.a.next_w = next_w.data_ptr();
  c.a.y_next = x_next.data_ptr();
  c.a.out_sq = sq.data_ptr<float>();
  launch(c, bits, fold, warps, variant);
  return {h, x_next, sq};
}

at::Tensor uniform_dequant(const at::Tensor& qw, const at::Tensor& sc, const at::Tensor& zp, int64_t bits, int64_t fold,
                           int64_t gs, int64_t n, int64_t k, bool bf16) {
  int64_t chunks, n_tiles;
  check_packed(qw, sc, zp, bits, fold, n, k, chunks, n_tiles);
  TORCH_CHECK(gs > 0, "lpq uniform_dequant: group size must be positive (in_features for per-channel)");
  const c10::cuda::CUDAGuard guard(qw.device());
  at::Tensor w = at::empty({n, k}, qw.options().dtype(bf16 ? at::kBFloat16 : at::kHalf));
  DequantArgs a{reinterpret_cast<const uint32_t*>(qw.data_ptr()), reinterpret_cast<const uint32_t*>(sc.data_ptr()),
                reinterpret_cast<const uint16_t*>(zp.data_ptr()), w.data_ptr(), (int)n, (int)k, (int)chunks, (int)n_tiles,
                (int)gs};
  cudaError_t err = launch_uniform_dequant((int)bits, bf16, (int)fold, a, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "lpq uniform_dequant launch failed: ", cudaGetErrorString(err));
  return w;
}

}  // namespace lpq

TORCH_LIBRARY(lpq_cuda, m) {
  m.def("uniform_gemm(Tensor x, Tensor qw, Tensor sc, Tensor zp, Tensor? bias, int bits, int fold, int gs, int n, int k, int warps, int variant=0, Tensor? norm_x=None, float norm_eps=0.0, bool swiglu=False, Tensor? norm_sq=None) -> Tensor");
  m.def("uniform_gemm_residual(Tensor x, Tensor qw, Tensor sc, Tensor zp, Tensor? bias, int bits, int fold, int gs, int n, int k, int warps, int variant, Tensor residual, Tensor next_w) -> (Tensor, Tensor, Tensor)");
  m.def("uniform_dequant(Tensor qw, Tensor sc, Tensor zp, int bits, int fold, int gs, int n, int k, bool bf16) -> Tensor");
}

TORCH_LIBRARY_IMPL(lpq_cuda, CUDA, m) {
  m.impl("uniform_gemm", &lpq::uniform_gemm);
  m.impl("uniform_gemm_residual", &lpq::uniform_gemm_residual);
  m.impl("uniform_dequant", &lpq::uniform_dequant);
}
