"""Kernels that compute ``x @ W.T`` for a packed ``QuantizedLinear``, registered as plugins.

Each kernel declares what it can run (``why_not`` returns the reason it cannot, or None) and a
priority; ``select_kernel`` picks the highest-priority valid kernel for a layer and an input, logs
why the others were skipped, and falls back to the pure-torch reference, which runs anything on any
device. ``LPQ_KERNEL=<name>`` forces one kernel (``LPQ_KERNEL=reference`` for the reference).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import torch

from ..errors import LpqError

if TYPE_CHECKING:
    from ..nn import QuantizedLinear

log = logging.getLogger("lpq.kernels")

_KERNELS: list["Kernel"] = []


class Kernel:
    name: str = ""
    formats: tuple[str, ...] = ()
    priority: int = 0
    # True when prepare() leaves a complete copy of the weights in layer.kernel_state and forward never
    # reads the canonical buffers again: the layer may then keep its canonical tensors in host memory
    holds_weights: bool = False

    def why_not(self, layer: "QuantizedLinear", x: torch.Tensor) -> str | None:
        """None if this kernel can run ``layer`` on input ``x``, else the reason it cannot."""
        if layer.spec.format not in self.formats:
            return f"format {layer.spec.format!r} not supported"
        return None

    def prepare(self, layer: "QuantizedLinear") -> None:
        """One-time work at selection, e.g. repacking the weights into the kernel's own layout."""

    def forward(self, layer: "QuantizedLinear", x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_epilogue(self, layer: "QuantizedLinear", x: torch.Tensor, norm_of: torch.Tensor | None,
                         norm_eps: float, swiglu: bool, norm_sq: torch.Tensor | None = None) -> torch.Tensor:
        """``forward`` with the epilogues of lpq.epilogue (RMSNorm folded in, swiglu of interleaved rows). This
        generic form applies them in torch around ``forward``; a kernel that computes them itself overrides it."""
        from ..epilogue import generic_forward

        return generic_forward(lambda t: self.forward(layer, t), x, norm_of, norm_eps, swiglu, norm_sq)

    def forward_residual(self, layer: "QuantizedLinear", x: torch.Tensor, residual: torch.Tensor,
                         next_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``forward`` followed by lpq.epilogue.residual_epilogue -> (h, next_w * h, sums of h^2); in torch here."""
        from ..epilogue import residual_epilogue

        return residual_epilogue(self.forward(layer, x), residual, next_w)


def cuda_input_problem(x: torch.Tensor) -> str | None:
    """Why lpq's CUDA kernels cannot take input ``x`` (not on a GPU, not fp16/bf16, a GPU older than sm_80), or None."""
    if not x.is_cuda:
        return f"input is on {x.device.type}, not CUDA"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"activations are {x.dtype}; the CUDA kernels take float16 or bfloat16"
    major, _ = torch.cuda.get_device_capability(x.device)
    if major < 8:
        return f"compute capability {major}.x < 8.0"
    return None


def register_kernel(kernel: Kernel) -> Kernel:
    _KERNELS.append(kernel)
    _KERNELS.sort(key=lambda k: -k.priority)
    return kernel


def available_kernels() -> list[str]:
    return [k.name for k in _KERNELS]


def get_kernel(name: str) -> Kernel:
    for k in _KERNELS:
        if k.name == name:
            return k
    raise LpqError(f"LPQ_KERNEL={name} names no kernel: choose one of {', '.join(available_kernels())}")


def select_kernel(layer: "QuantizedLinear", x: torch.Tensor) -> Kernel:
    forced = os.environ.get("LPQ_KERNEL")
    if forced:
        kernel = get_kernel(forced)
        reason = kernel.why_not(layer, x)
        if reason:
            raise LpqError(f"LPQ_KERNEL={forced} cannot run this layer: {reason}")
        return kernel
    for kernel in _KERNELS:
        reason = kernel.why_not(layer, x)
        if reason is None:
            return kernel
        if not torch.compiler.is_compiling():  # dynamo cannot trace logging calls (a graph break)
            log.debug("kernel %s skipped for %s: %s", kernel.name, layer.extra_repr(), reason)
    raise LpqError(f"no kernel can run format {layer.spec.format!r}")  # the reference runs everything


from . import reference  # noqa: E402,F401
from . import uniform_cuda  # noqa
from . import squeezellm_cuda  # noqa
from . import ptq161_cuda  # noqa
