"""``QuantizedLinear``: a linear layer whose weight is held packed, computed by a chosen kernel."""

from __future__ import annotations

import os

import torch
from torch import nn

from .formats import QuantizedWeight, get_format
from .kernels import Kernel, select_kernel
from .spec import QuantSpec


class QuantizedLinear(nn.Module):
    """y = x @ W.T + b with W stored in a packed format (buffers named by the format).

    The kernel is chosen on the first forward (when the device and dtype of the input are known)
    and re-chosen if either changes.

    A kernel that repacks the weights into its own layout and reads only that copy (``holds_weights``,
    e.g. the CUDA kernels) would otherwise leave two copies of the quantized weights on the GPU. After
    such a kernel is prepared on a GPU, the canonical buffers move to host memory (``canonical_home``
    remembers the device): ``tensors()``, ``dequantize()`` and ``state_dict()`` still give the canonical
    tensors, and moving the layer brings them back first. ``LPQ_KEEP_CANONICAL=1`` keeps both on the GPU.
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
        self.canonical_home: torch.device | None = None  # set while the canonical buffers wait in host memory
        self.register_load_state_dict_post_hook(_forget_kernel)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> "QuantizedLinear":
        layer = cls(qw.in_features, qw.out_features, qw.spec, bias=bias is not None, dtype=dtype, device="meta")
        for name, tensor in qw.tensors.items():
            setattr(layer, name, tensor)  # buffers: replace the meta placeholders
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        return layer

    def _canonical_names(self) -> list[str]:
        return list(get_format(self.spec.format).tensor_shapes(self.in_features, self.out_features, self.spec))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The canonical tensors of the format, on the device the layer computes on."""
        out = {n: getattr(self, n) for n in self._canonical_names()}
        if self.canonical_home is not None:
            out = {n: t.to(self.canonical_home) for n, t in out.items()}
        return out

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.spec, self.in_features, self.out_features, self.tensors())

    def dequantize(self) -> torch.Tensor:
        """[out_features, in_features] float32 through the format's reference dequantize."""
        return self.quantized_weight().dequantize()

    @property
    def kernel(self) -> Kernel | None:
        return self._kernel

    def forward(self, x: torch.Tensor, norm_of: torch.Tensor | None = None, norm_eps: float = 0.0,
                swiglu: bool = False, norm_sq: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features]. With the epilogues of lpq.epilogue: ``norm_of`` h [..., in]
        gives W @ (x * rsqrt(mean(h^2) + norm_eps)) (x = w * h: RMSNorm folded in), or ``norm_sq`` [..., slots] the
        same with sum(h^2) given in slots (float32; from ``forward_residual``); ``swiglu`` gives silu(gate) * up
        [..., out_features / 2] of rows interleaved by lpq.epilogue.swiglu_row_order. The kernel computes them
        where it can, else they run in torch around it."""
        self._ensure_kernel(x)
        if norm_of is None and norm_sq is None and not swiglu:
            return self._kernel.forward(self, x)
        return self._kernel.forward_epilogue(self, x, norm_of, norm_eps, swiglu, norm_sq)

    def forward_residual(self, x: torch.Tensor, residual: torch.Tensor, next_w: torch.Tensor):
        """The layer that closes a pre-norm block's branch, with the block's residual add and the next RMSNorm's
        weight (lpq.epilogue.residual_epilogue): -> (h = self(x) + residual, next_w * h, sums of h^2 [..., slots]
        float32 for the next projection's ``norm_sq``)."""
        self._ensure_kernel(x)
        return self._kernel.forward_residual(self, x, residual, next_w)

    def _ensure_kernel(self, x: torch.Tensor) -> None:
        key = (x.device, x.dtype)
        if self._kernel is None or self._kernel_key != key:
            self._kernel = select_kernel(self, x)
            self._kernel_key = key
            self._restore_canonical()
            self.kernel_state = {}
            self._kernel.prepare(self)
            if self._kernel.holds_weights and _host_copy_helps(x.device) and not os.environ.get("LPQ_KEEP_CANONICAL"):
                self._release_canonical(x.device)

    def _release_canonical(self, device: torch.device) -> None:
        for n in self._canonical_names():
            t = getattr(self, n)
            if t.device.type != "cpu":
                setattr(self, n, t.to("cpu"))  # a registered buffer: replaced in place, still saved
        self.canonical_home = device

    def _restore_canonical(self) -> None:
        if self.canonical_home is not None:
            for n in self._canonical_names():
                setattr(self, n, getattr(self, n).to(self.canonical_home))
            self.canonical_home = None

    def _apply(self, fn, recurse=True):
        # moving the layer (to(), cuda(), half()) invalidates a kernel's repacked copy; the canonical
        # buffers first return to the device they left, so that fn sees one consistent layer
        self._restore_canonical()
        self._kernel, self._kernel_key, self.kernel_state = None, None, {}
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.spec.label()}"


def _forget_kernel(module: "QuantizedLinear", incompatible_keys) -> None:
    """After load_state_dict the kernel's repacked copy holds the old weights: choose and prepare again.
    Weights loaded into buffers that wait in host memory stay there until the next forward repacks them."""
    module._kernel, module._kernel_key, module.kernel_state = None, None, {}


def _host_copy_helps(device: torch.device) -> bool:
    """Whether moving the canonical buffers to host memory frees accelerator memory (not on the CPU)."""
    return device.type != "cpu"
