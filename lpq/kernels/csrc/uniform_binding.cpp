// lpq: torch.library registration of the uniform-format CUDA kernels (ops lpq_cuda::*).
// The fake (meta) implementations are registered from Python (lpq/kernels/cuda_build.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

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

at::Tensor uniform_gemm(const at::Tensor& x_in, const at::Tensor& qw, const at::Tensor& sc, const at::Tensor& zp,
                        const c10::optional<at::Tensor>& bias, int64_t bits, int64_t fold, int64_t gs, int64_t n,
                        int64_t k, int64_t warps, int64_t variant, const c10::optional<at::Tensor>& norm_x_in,
                        double norm_eps, bool swiglu) {
  int64_t chunks, n_tiles;
  check_packed(qw, sc, zp, bits, fold, n, k, chunks, n_tiles);
  TORCH_CHECK(x_in.is_cuda() && x_in.get_device() == qw.get_device(), "lpq uniform_gemm: x must be on the weights' CUDA device");
  TORCH_CHECK(x_in.scalar_type() == at::kHalf || x_in.scalar_type() == at::kBFloat16,
              "lpq uniform_gemm: activations must be float16 or bfloat16, got ", x_in.scalar_type());
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == k, "lpq uniform_gemm: x must be [m, ", k, "], got ", x_in.sizes());
  // the kernel reads x in 16-byte pieces: a strided view or an offset slice is copied here rather than
  // in Python, where reading data_ptr() would break a torch.compile graph at every linear
  at::Tensor x = x_in.contiguous();
  if (reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 != 0) x = x.clone();
  TORCH_CHECK(warps >= 1 && warps <= 8, "lpq uniform_gemm: warps must be in 1..8");
  TORCH_CHECK((variant >= 0 && variant <= 5) || variant == (4 | kVariantPDL) || variant == (5 | kVariantPDL),
              "lpq uniform_gemm: variant must be in 0..5, or 4 or 5 | 8 (programmatic dependent launch)");
  TORCH_CHECK(gs > 0, "lpq uniform_gemm: group size must be positive (in_features for per-channel)");
  const void* bptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->is_cuda() && bias->scalar_type() == x.scalar_type() && bias->numel() == n && bias->is_contiguous(),
                "lpq uniform_gemm: bias must be a contiguous [", n, "] tensor of the activations' dtype");
    bptr = bias->data_ptr();
  }
  // fused epilogues (uniform_launch.h): the rms scale of norm_x's rows, silu(gate) * up of interleaved rows
  at::Tensor norm_x;
  if (norm_x_in.has_value() && norm_x_in->defined()) {
    TORCH_CHECK(norm_x_in->is_cuda() && norm_x_in->get_device() == x.get_device() && norm_x_in->scalar_type() == x.scalar_type()
                    && norm_x_in->dim() == 2 && norm_x_in->size(0) == x.size(0) && norm_x_in->size(1) == k,
                "lpq uniform_gemm: norm_x must be [", x.size(0), ", ", k, "] of x's dtype on x's device, got ",
                norm_x_in->sizes());
    norm_x = norm_x_in->contiguous();
    if (reinterpret_cast<uintptr_t>(norm_x.data_ptr()) % 16 != 0) norm_x = norm_x.clone();
    TORCH_CHECK(norm_eps >= 0.0, "lpq uniform_gemm: norm_eps must be >= 0, got ", norm_eps);
  }
  TORCH_CHECK(!swiglu || n % 16 == 0, "lpq uniform_gemm: swiglu needs out_features a multiple of 16 (8 gate and 8 up "
              "rows a tile), got ", n);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0);
  at::Tensor y = at::empty({m, swiglu ? n / 2 : n}, x.options());
  if (m == 0) return y;
  GemmArgs a{x.data_ptr(), reinterpret_cast<const uint32_t*>(qw.data_ptr()), reinterpret_cast<const uint32_t*>(sc.data_ptr()),
             reinterpret_cast<const uint16_t*>(zp.data_ptr()), bptr, y.data_ptr(), (int)m, (int)n, (int)k, (int)chunks,
             (int)n_tiles, (int)gs, norm_x.defined() ? norm_x.data_ptr() : nullptr, (float)norm_eps, swiglu ? 1 : 0};
  cudaError_t err = launch_uniform_gemm((int)bits, x.scalar_type() == at::kBFloat16, (int)fold, a, (int)warps, (int)variant,
                                        c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "lpq uniform_gemm launch failed: ", cudaGetErrorString(err));
  return y;
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
  m.def("uniform_gemm(Tensor x, Tensor qw, Tensor sc, Tensor zp, Tensor? bias, int bits, int fold, int gs, int n, int k, int warps, int variant=0, Tensor? norm_x=None, float norm_eps=0.0, bool swiglu=False) -> Tensor");
  m.def("uniform_dequant(Tensor qw, Tensor sc, Tensor zp, int bits, int fold, int gs, int n, int k, bool bf16) -> Tensor");
}

TORCH_LIBRARY_IMPL(lpq_cuda, CUDA, m) {
  m.impl("uniform_gemm", &lpq::uniform_gemm);
  m.impl("uniform_dequant", &lpq::uniform_dequant);
}
