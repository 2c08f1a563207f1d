"""Fused sibling projections: linears that read the same input run as one wider linear (inference only).

In a decoder block, q/k/v read the same hidden states, and so do the MLP's gate and up projections. At batch 1
each linear is one GEMV whose time is partly fixed (launch, ramp to full bandwidth, tail), so one GEMV of
4096 -> 12288 outputs takes less time than three of 4096 outputs. ``fuse_siblings(model)`` joins each such group
into one layer (``nn.Linear`` weights concatenated, or a packed format's ``concat_outputs``) and puts in each
sibling's place a small module that returns its slice of the joint output. The model's own forward code is
untouched: the first sibling called on a tensor computes the joint output, the others find it there (by the
identity of their input) and take their columns; after the last sibling the reference is dropped. A sibling
called on another tensor than the one cached (or on the same tensor modified in place, outside torch.compile)
computes the joint output again, so results never depend on the order of the calls.

This changes the module tree (the siblings' weights now live in the fused layer), so fuse a model only to run
it: save or re-quantize the unfused model. ``torch.compile`` traces it as one graph (the cache is plain Python
state between the sibling calls).
"""

from __future__ import annotations

import torch
from torch import nn

from .nn import QuantizedLinear

# names of sibling linears that read the same input, per block (LLaMA, Mistral, Qwen2, Gemma, ...)
SIBLING_GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class SharedProjection(nn.Module):
    """The fused linear of one sibling group and the joint output of its last input."""

    def __init__(self, fused: nn.Module, names: tuple[str, ...], widths: list[int]) -> None:
        super().__init__()
        self.fused = fused
        self.names = names
        self.widths = widths
        self._x: torch.Tensor | None = None
        self._version = -1
        self._y: torch.Tensor | None = None
        self._served = 0

    def output_for(self, x: torch.Tensor) -> torch.Tensor:
        stale = self._x is not x
        if not stale and not torch.compiler.is_compiling():
            stale = self._version != x._version  # modified in place since (eager only)
        if stale:
            self._y = self.fused(x)
            self._x, self._served = x, 0
            if not torch.compiler.is_compiling():
                self._version = x._version
        y = self._y
        self._served += 1
        if self._served == len(self.names):  # every sibling has its slice: hold nothing between calls
            self._x = self._y = None
        return y

    def extra_repr(self) -> str:
        return f"siblings={'/'.join(self.names)}, widths={self.widths}"


class SiblingSlice(nn.Module):
    """Stands where a sibling linear was: its columns [start, stop) of the shared joint output."""

    def __init__(self, shared: SharedProjection, start: int, stop: int, in_features: int) -> None:
        super().__init__()
        # a plain attribute, not a submodule: the fused weights are registered once, on the parent
        object.__setattr__(self, "shared", shared)
        self.start, self.stop = start, stop
        self.in_features, self.out_features = in_features, stop - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.output_for(x)[..., self.start:self.stop]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, columns [{self.start}, {self.stop})"


def join_linears(layers: list[nn.Module]) -> nn.Module | None:
    """One layer computing the outputs of ``layers`` side by side, or None if they cannot be joined (different
    types, inputs, dtypes, devices, specs, bias presence, or a packed format without ``concat_outputs``)."""
    first = layers[0]
    has_bias = [getattr(layer, "bias", None) is not None for layer in layers]
    if len(set(has_bias)) != 1 or len({type(layer) for layer in layers}) != 1:
        return None
    if type(first) is nn.Linear:
        weights = [layer.weight for layer in layers]
        if len({(w.shape[1], w.dtype, w.device) for w in weights}) != 1:
            return None
        out = nn.Linear(first.in_features, sum(w.shape[0] for w in weights), bias=has_bias[0],
                        dtype=first.weight.dtype, device=first.weight.device)
        with torch.no_grad():
            out.weight.copy_(torch.cat(weights))
            if has_bias[0]:
                out.bias.copy_(torch.cat([layer.bias for layer in layers]))
        out.requires_grad_(False)
        return out
    if type(first) is QuantizedLinear:
        qws = [layer.quantized_weight() for layer in layers]
        joined = qws[0].format.concat_outputs(qws)
        if joined is None:
            return None
        bias = torch.cat([layer.bias for layer in layers]) if has_bias[0] else None
        dtype = first.bias.dtype if has_bias[0] else torch.float16
        home = first.canonical_home or first.qweight.device
        out = QuantizedLinear.from_quantized(joined.to(home), bias.to(home) if bias is not None else None, dtype)
        return out
    return None


def fuse_siblings(model: nn.Module, groups: tuple[tuple[str, ...], ...] = SIBLING_GROUPS) -> list[str]:
    """Join every group of sibling linears of ``model`` (in place); -> the names of the fused groups, e.g.
    ``model.layers.0.self_attn.q_proj+k_proj+v_proj``. A group whose members cannot be joined stays as it was."""
    fused = []
    for parent_name, parent in list(model.named_modules()):
        for names in groups:
            layers = [getattr(parent, n, None) for n in names]
            if any(not isinstance(layer, (nn.Linear, QuantizedLinear)) for layer in layers):
                continue
            joined = join_linears(layers)
            if joined is None:
                continue
            widths = [layer.out_features for layer in layers]
            shared = SharedProjection(joined, names, widths)
            parent.add_module("fused_" + "_".join(names), shared)
            start = 0
            for name, width in zip(names, widths):
                setattr(parent, name, SiblingSlice(shared, start, start + width, layers[0].in_features))
                start += width
            fused.append(f"{parent_name}.{'+'.join(names)}" if parent_name else "+".join(names))
    return fused
