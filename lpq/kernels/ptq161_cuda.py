"""CUDA GEMV for the ``ptq161`` format (4-bit salient channels + binarized rest), batch 1 to 16.

Importing this module needs torch only; the extension (op ``torch.ops.lpq_ptq161.gemv``) is built on
the first CUDA forward, like the uniform kernels (``cuda_build``). Kernel registered here:

  ptq161_cuda  (priority 100) m <= 4 (N a multiple of 4): the ring GEMV of csrc/ptq161_ring.cu;
               other m <= 16: the streaming GEMV of csrc/ptq161_stream.cu. Both sum the sign words
               through a nibble lookup table in shared memory and the salient 4-bit codes on the
               tensor cores, split K across blocks and let the last block of each row block add the
               partials (one launch). The ring kernel brings the words in by cp.async through a ring
               of stages a warp; the streaming one through register double buffers.
               m > 16: the format's dequantize on the GPU + cuBLAS.
               ``LPQ_PTQ161_VARIANT`` (default ``auto``, the choice above): ``ring`` / ``ring3`` /
               ``ring2`` the ring kernel with 4 / 3 / 2 stages of 4 words where it applies, ``ring2w8``
               / ``ring3w8`` / ``ring4w8`` with 2 / 3 / 4 stages of 8 words (3 and 4 at m = 1 only;
               ``auto`` takes 2, or 3 at m = 1 where a warp's share of a K split is 80 words of 32
               rows or more: the large layers); ``stream`` the streaming kernel;
               ``stream-1row`` the streaming kernel with one row a thread where its plan would take
               two; ``stream-ffma`` the streaming kernel with the salient codes converted to fp32 and
               FMA'd (its first form); ``first`` the first kernel (csrc/ptq161_kernels.cu: short K
               tiles, fp32 atomics, a memset and an epilogue launch), kept for comparison.
               ``LPQ_PTQ161_KSPLIT=S`` forces S splits along K (benchmarks).
               On sm_90+ the ring kernel is launched with programmatic dependent launch (``LPQ_PDL=0``
               turns it off, as for the uniform and LUT kernels): it requests its first weight words
               while the kernel ahead of it finishes, and waits for it before reading x.

It reads the canonical tensors as they are stored (no repack); ``prepare`` only derives, once, the
channel indices of the salient and binarized runs from the mask and float32 copies of the small
per-row and per-column vectors, and a small int32 buffer of per-row-block counters that the
streaming kernel uses to find the last block of each split-K reduction (it leaves them at zero, so
two calls of one layer must not run concurrently on different streams).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from . import Kernel, cuda_build, cuda_input_problem, register_kernel
from . import uniform_cuda

log = logging.getLogger("lpq.kernels")

STATE_KEY = "ptq161_cuda"
MAX_FUSED_M = 16
SOURCES = ["ptq161_binding.cpp", "ptq161_kernels.cu", "ptq161_stream.cu", "ptq161_ring.cu"]
HEADERS = ["ptq161_launch.h", "ptq161_common.cuh", "async_copy.cuh"]

VARIANTS = {"auto": 0, "first": 1, "stream-1row": 2, "stream-ffma": 3, "ring": 4, "stream": 5, "ring3": 6, "ring2": 7, "ring2w8": 8,
            "ring3w8": 9, "ring4w8": 10}
ROWS_PER_COUNTER = 256  # the kernel's smallest row block; two token tiles per launch
# Or-ed into the variant: a ring kernel the call launches uses programmatic dependent launch (csrc/ptq161_launch.h
# kVariantPDL): its prologue requests weight words only, then waits for the kernel ahead of it. On by default with the
# uniform kernels' switch (LPQ_PDL=0 turns both off); the ring kernel runs at m <= 4.
PDL_FLAG = 16
# Or-ed in with PDL_FLAG (kVariantEarly): that ring kernel lets the next kernel launch right after its own
# griddepcontrol.wait (the early trigger); at m = 1 where the key p161 is in uniform_cuda.PDL_EARLY (LPQ_PDL_EARLY).
EARLY_FLAG = 32
RING_VARIANTS = ("auto", "ring", "ring3", "ring2", "ring2w8", "ring3w8", "ring4w8")


def with_default_pdl(variant: str, m: int = 1) -> int:
    """The op's variant code for a variant name, with PDL_FLAG where programmatic dependent launch is on
    (uniform_cuda.PDL) and the variant may run the ring kernel, and EARLY_FLAG with it at m = 1 where the early
    trigger is on for ptq161 (uniform_cuda.takes_early("p161"))."""
    if not (uniform_cuda.PDL and variant in RING_VARIANTS):
        return VARIANTS[variant]
    return VARIANTS[variant] | PDL_FLAG | (EARLY_FLAG if m == 1 and uniform_cuda.takes_early("p161") else 0)



def _register_fakes() -> None:
    @torch.library.register_fake("lpq_ptq161::gemv")
    def _gemv_fake(x, qw, sw, bin_idx, sal_idx, colscale, rowvec, bias, counters, n, k, variant, ksplit):
        return x.new_empty((x.shape[0], n))


EXTENSION = cuda_build.Extension("lpq_ptq161", SOURCES, HEADERS, _register_fakes, "ptq161 CUDA kernel")


def load() -> bool:
    """Build/load the extension once. True if the op is usable; otherwise one warning, and False."""
    return EXTENSION.load()


def prepare_state(tensors: dict[str, torch.Tensor], spec, k: int, n: int) -> dict:
    """The canonical tensors -> what the kernel reads: channel indices of both runs (from the mask),
    float32 column scales, the four per-row vectors stacked [4, N] (sscale, szero, bscale, mu) and
    the streaming kernel's zeroed counters [2 * ceil(N / 256)] int32."""
    from ..formats.ptq161 import spec_salient, unpack_mask

    mask = unpack_mask(tensors["mask"], k)
    s = spec_salient(spec)
    if int(mask.sum()) != s:
        raise ValueError(f"the ptq161 mask marks {int(mask.sum())} salient channels, the spec {s}")
    channels = torch.arange(k, device=mask.device, dtype=torch.int32)
    rowvec = torch.stack([tensors[name].float() for name in ("sscales", "szeros", "bscale", "mu")]).contiguous()
    return {
        "qw": tensors["qweight"].contiguous(),
        "sw": tensors["sweight"].contiguous(),
        "bin_idx": channels[~mask].contiguous(),
        "sal_idx": channels[mask].contiguous(),
        "colscale": tensors["colscale"].float().contiguous(),
        "rowvec": rowvec,
        "counters": torch.zeros(2 * (-(-n // ROWS_PER_COUNTER)), dtype=torch.int32, device=mask.device),
        "n": n,
        "k": k,
    }


def _variant_from_env() -> str:
    name = os.environ.get("LPQ_PTQ161_VARIANT", "auto")
    if name not in VARIANTS:
        raise ValueError(f"LPQ_PTQ161_VARIANT={name!r}: use one of {', '.join(VARIANTS)}")
    return name


def gemv(st: dict, x2: torch.Tensor, bias: torch.Tensor | None, variant: str | None = None,
         ksplit: int | None = None) -> torch.Tensor:
    """x2 [m, K] fp16/bf16 (m <= 16 for speed; any m is correct) -> [m, N].

    variant: one of VARIANTS ("auto" picks the kernel; else LPQ_PTQ161_VARIANT); ksplit: K splits of the
    ring or streaming kernel, 0 or None for its own plan (else LPQ_PTQ161_KSPLIT)."""
    if variant is None:
        v = with_default_pdl(_variant_from_env(), x2.shape[0])
    elif variant in VARIANTS:
        v = with_default_pdl(variant, x2.shape[0])
    else:
        raise ValueError(f"lpq ptq161 gemv: variant {variant!r}: use one of {', '.join(VARIANTS)}")
    k, n = st["k"], st["n"]
    if x2.dim() != 2 or x2.shape[1] != k:
        raise ValueError(f"lpq ptq161 gemv: x must be [m, {k}], got {list(x2.shape)}")
    if x2.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"lpq ptq161 gemv: activations must be float16 or bfloat16, got {x2.dtype}")
    if not x2.is_cuda or x2.device != st["qw"].device:
        raise ValueError(f"lpq ptq161 gemv: x is on {x2.device}, the weights on {st['qw'].device}")
    if bias is not None and (bias.numel() != n or bias.dtype != x2.dtype):
        raise ValueError(f"lpq ptq161 gemv: bias must be [{n}] of the activations' dtype")
    if ksplit is None:
        ksplit = int(os.environ.get("LPQ_PTQ161_KSPLIT", "0") or 0)
    if not load():
        raise RuntimeError(f"lpq ptq161 gemv: the CUDA extension is unavailable ({EXTENSION.failure_reason()})")
    return torch.ops.lpq_ptq161.gemv(x2.contiguous(), st["qw"], st["sw"], st["bin_idx"], st["sal_idx"],
                                     st["colscale"], st["rowvec"], bias, st["counters"], n, k, v, ksplit)


def plan(st: dict, m: int, dtype: torch.dtype = torch.float16, variant: str = "auto", ksplit: int = 0) -> dict:
    """What a gemv call of m <= 16 tokens launches: {"kernel": "ring" | "stream", "ksplit", "rows_per_thread",
    "stages", "words"} (the last two: the ring's stages a warp and words a stage). Needs the built extension and a CUDA device (the ring plan reads the kernel's occupancy)."""
    if variant not in VARIANTS or variant == "first":
        raise ValueError(f"lpq ptq161 plan: variant {variant!r}: use one of {', '.join(v for v in VARIANTS if v != 'first')}")
    if not load():
        raise RuntimeError(f"lpq ptq161 plan: the CUDA extension is unavailable ({EXTENSION.failure_reason()})")
    s = st["sal_idx"].numel()
    kernel, ks, rows, stages, words = torch.ops.lpq_ptq161.plan(m, st["n"], st["k"], s, VARIANTS[variant], ksplit,
                                                                dtype == torch.bfloat16)
    return {"kernel": "ring" if kernel == 1 else "stream", "ksplit": ks, "rows_per_thread": rows, "stages": stages,
            "words": words}


class PTQ161CudaKernel(Kernel):
    name = "ptq161_cuda"
    formats = ("ptq161",)
    priority = 100

    def why_not(self, layer, x: torch.Tensor) -> str | None:
        reason = super().why_not(layer, x)
        if reason:
            return reason
        reason = cuda_input_problem(x)
        if reason:
            return reason
        if x.shape[-1] != layer.in_features:
            return f"input has {x.shape[-1]} features, the layer {layer.in_features}"
        if not load():
            return f"CUDA extension unavailable: {EXTENSION.failure_reason()}"
        return None

    def prepare(self, layer) -> None:
        if STATE_KEY not in layer.kernel_state:
            with torch.no_grad():
                layer.kernel_state[STATE_KEY] = prepare_state(layer.tensors(), layer.spec, layer.in_features,
                                                              layer.out_features)

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        st = layer.kernel_state.get(STATE_KEY)
        if st is None:
            self.prepare(layer)
            st = layer.kernel_state[STATE_KEY]
        x2 = x.reshape(-1, st["k"])
        bias = layer.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        if x2.shape[0] <= MAX_FUSED_M:
            y = gemv(st, x2, bias)
        else:  # prefill: the weights are read once per call either way; cuBLAS does the FLOPs
            y = F.linear(x2, layer.dequantize().to(x.dtype), bias)
        return y.reshape(*x.shape[:-1], st["n"])


PTQ161_CUDA = register_kernel(PTQ161CudaKernel())
