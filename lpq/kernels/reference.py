"""The reference kernel: the format's own pure-torch dequantize, then a dense matmul. Any device."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import Kernel, register_kernel


class ReferenceKernel(Kernel):
    name = "reference"
    priority = -100

    def why_not(self, layer, x):
        return None

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        dense = layer.kernel_state.get("dense")  # set by lpq.evaluate.dense_weights() on the CPU
        w = dense if dense is not None and dense.dtype == x.dtype else layer.dequantize().to(x.dtype)  # [N, K]
        return F.linear(x, w, layer.bias)


REFERENCE = register_kernel(ReferenceKernel())
