// lpq: torch.library registration of the squeezellm LUT kernels (ops lpq_lut::*).
// The fake (meta) implementations are registered from Python (lpq/kernels/cuda_build.py). The Python
// wrappers (lpq/kernels/squeezellm_cuda.py) check every argument first; these checks are the last line.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "squeezellm_launch.h"

namespace lpq {
namespace lut {

static void check_packed(const at::Tensor& qw, const at::Tensor& tab, int64_t bits, int64_t n, int64_t k, int64_t& chunks,
                         int64_t& n_tiles) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4, "lpq lut kernel: bits must be 2, 3 or 4, got ", bits);
  TORCH_CHECK(qw.is_cuda() && tab.is_cuda() && qw.get_device() == tab.get_device(),
              "lpq lut kernel: packed tensors must be on one CUDA device");
  TORCH_CHECK(qw.scalar_type() == at::kInt && tab.scalar_type() == at::kInt, "lpq lut kernel: expected int32 repacked tensors");
  TORCH_CHECK(qw.is_contiguous() && tab.is_contiguous(), "lpq lut kernel: repacked tensors must be contiguous");
  TORCH_CHECK(k > 0 && k % 8 == 0 && k < (int64_t(1) << 27), "lpq lut kernel: in_features must be a multiple of 8 below 2**27, got ", k);
  TORCH_CHECK(tab.dim() == 2 && tab.size(1) == (int64_t(1) << bits) / 2 && tab.size(0) % 16 == 0 && tab.size(0) >= n,
              "lpq lut kernel: bad codebook table shape ", tab.sizes());
  n_tiles = tab.size(0) / 16;
  chunks = (k + 127) / 128;
  TORCH_CHECK(qw.numel() == n_tiles * chunks * 64 * bits, "lpq lut kernel: index tensor has ", qw.numel(), " words, expected ",
              n_tiles * chunks * 64 * bits);
}

at::Tensor lut_gemm(const at::Tensor& x_in, const at::Tensor& qw, const at::Tensor& tab, const c10::optional<at::Tensor>& sp_ptr,
                    const c10::optional<at::Tensor>& sp_e, const c10::optional<at::Tensor>& bias, int64_t bits, int64_t n, int64_t k, int64_t warps,
                    int64_t variant) {
  int64_t chunks, n_tiles;
  check_packed(qw, tab, bits, n, k, chunks, n_tiles);
  TORCH_CHECK(x_in.is_cuda() && x_in.get_device() == qw.get_device(), "lpq lut_gemm: x must be on the weights' CUDA device");
  TORCH_CHECK(x_in.scalar_type() == at::kHalf || x_in.scalar_type() == at::kBFloat16,
              "lpq lut_gemm: activations must be float16 or bfloat16, got ", x_in.scalar_type());
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == k, "lpq lut_gemm: x must be [m, ", k, "], got ", x_in.sizes());
  // the kernel reads x in 16-byte pieces: a strided view or an offset slice is copied here rather than
  // in Python, where reading data_ptr() would break a torch.compile graph at every linear
  at::Tensor x = x_in.contiguous();
  if (reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 != 0) x = x.clone();
  TORCH_CHECK(warps >= 1 && warps <= 8, "lpq lut_gemm: warps must be in 1..8");
  TORCH_CHECK(variant == 0 || variant == 1 || variant == (0 | kLutVariantPDL) ||
                  variant == (0 | kLutVariantPDL | kLutVariantEarly),
              "lpq lut_gemm: variant must be 0 (ring), 1 (register prefetch), ", kLutVariantPDL,
              " (ring, programmatic dependent launch) or ", kLutVariantPDL | kLutVariantEarly,
              " (the same with the early trigger), got ", variant);
  const int* pp = nullptr;
  const uint32_t* pe = nullptr;
  if (sp_ptr.has_value() && sp_ptr->defined()) {
    TORCH_CHECK(sp_e.has_value() && sp_e->defined(), "lpq lut_gemm: the sparse part needs sp_ptr and sp_e");
    TORCH_CHECK(k <= 65536, "lpq lut_gemm: a sparse part needs in_features <= 65536 (16-bit columns), got ", k);
    TORCH_CHECK(sp_ptr->scalar_type() == at::kInt && sp_ptr->numel() == n_tiles * 16 + 1 && sp_ptr->is_contiguous() &&
                    sp_e->scalar_type() == at::kInt && sp_e->is_contiguous() && sp_ptr->device() == qw.device() &&
                    sp_e->device() == qw.device(),
                "lpq lut_gemm: bad sparse tensors");
    pp = sp_ptr->data_ptr<int>();
    pe = reinterpret_cast<const uint32_t*>(sp_e->data_ptr());
  }
  const void* bptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->is_cuda() && bias->scalar_type() == x.scalar_type() && bias->numel() == n && bias->is_contiguous(),
                "lpq lut_gemm: bias must be a contiguous [", n, "] tensor of the activations' dtype");
    bptr = bias->data_ptr();
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0);
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0) return y;
  LutGemmArgs a{x.data_ptr(), reinterpret_cast<const uint32_t*>(qw.data_ptr()), reinterpret_cast<const uint32_t*>(tab.data_ptr()),
                pp, pe, bptr, y.data_ptr(), (int)m, (int)n, (int)k, (int)chunks, (int)n_tiles,
                (variant & kLutVariantEarly) != 0 ? 1 : 0};
  cudaError_t err = launch_lut_gemm((int)bits, x.scalar_type() == at::kBFloat16, a, (int)warps,
                                    (int)(variant & ~kLutVariantEarly),
                                    c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "lpq lut_gemm launch failed: ", cudaGetErrorString(err));
  return y;
}

at::Tensor lut_dequant(const at::Tensor& qw, const at::Tensor& tab, int64_t bits, int64_t n, int64_t k, bool bf16) {
  int64_t chunks, n_tiles;
  check_packed(qw, tab, bits, n, k, chunks, n_tiles);
  const c10::cuda::CUDAGuard guard(qw.device());
  at::Tensor w = at::empty({n, k}, qw.options().dtype(bf16 ? at::kBFloat16 : at::kHalf));
  LutDequantArgs a{reinterpret_cast<const uint32_t*>(qw.data_ptr()), reinterpret_cast<const uint32_t*>(tab.data_ptr()),
                   w.data_ptr(), (int)n, (int)k, (int)chunks, (int)n_tiles};
  cudaError_t err = launch_lut_dequant((int)bits, bf16, a, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "lpq lut_dequant launch failed: ", cudaGetErrorString(err));
  return w;
}

}  // namespace lut
}  // namespace lpq

TORCH_LIBRARY(lpq_lut, m) {
  m.def("lut_gemm(Tensor x, Tensor qw, Tensor tab, Tensor? sp_ptr, Tensor? sp_e, Tensor? bias, int bits, int n, int k, int warps, int variant=0) -> Tensor");
  m.def("lut_dequant(Tensor qw, Tensor tab, int bits, int n, int k, bool bf16) -> Tensor");
}

TORCH_LIBRARY_IMPL(lpq_lut, CUDA, m) {
  m.impl("lut_gemm", &lpq::lut::lut_gemm);
  m.impl("lut_dequant", &lpq::lut::lut_dequant);
}
