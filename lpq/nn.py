"""``QuantizedLinear``: a linear layer whose weight is held packed, computed by a chosen kernel."""

from __future__ import annotations

import torch
from torch import nn

from .formats import QuantizedWeight, get_format
from .kernels import Kernel, select_kernel
from .spec import QuantSpec


class QuantizedLinear(nn.Module):
    """y = x @ W.T + b with W stored in a packed format (buffers named by the format).

    The kernel is chosen on the first forward (when the device and dtype of the input are known)
    and re-chosen if either changes.
    """

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = False,
                 dtype: torch.dtype = torch.float16, device=None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.spec = spec
        for name, tensor in get_format(spec.format).empty(in_features, out_features, spec, device).items():
            self.register_buffer(name, tensor)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._kernel: Kernel | None = None
        self._kernel_key: tuple | None = None
        self.kernel_state: dict = {}  # a kernel's own repacked copy of the weights, if it keeps one

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> "QuantizedLinear":
        layer = cls(qw.in_features, qw.out_features, qw.spec, bias=bias is not None, dtype=dtype, device="meta")
        for name, tensor in qw.tensors.items():
            setattr(layer, name, tensor)  # buffers: replace the meta placeholders
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        return layer

    def tensors(self) -> dict[str, torch.Tensor]:
        names = get_format(self.spec.format).tensor_shapes(self.in_features, self.out_features, self.spec)
        return {n: getattr(self, n) for n in names}

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.spec, self.in_features, self.out_features, self.tensors())

    def dequantize(self) -> torch.Tensor:
        """[out_features, in_features] float32 through the format's reference dequantize."""
        return self.quantized_weight().dequantize()

    @property
    def kernel(self) -> Kernel | None:
        return self._kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.dtype)
        if self._kernel is None or self._kernel_key != key:
            self._kernel = select_kernel(self, x)
            self._kernel_key = key
            self.kernel_state = {}
            self._kernel.prepare(self)
        return self._kernel.forward(self, x)

    def _apply(self, fn, recurse=True):
        # moving the layer (to(), cuda(), half()) invalidates a kernel's repacked copy
        self._kernel, self._kernel_key, self.kernel_state = None, None, {}
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.spec.label()}"
