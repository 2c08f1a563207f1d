"""Quantization methods, registered by name.

A method is a plugin with a small surface (see ``Method``): what statistics it needs from the
calibration data (an ``Observer`` per linear layer, or none), and a pure function from
(weight, statistics, spec) to a packed ``QuantizedWeight``. Methods that work on a whole block at
once (block-wise optimisation) or on the whole model first (gradients, sensitivities) override
``quantize_block`` or ``prepare``; the block-by-block driver in ``lpq.driver`` is the same for all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..errors import SpecError
from ..formats import QuantizedWeight
from ..spec import QuantSpec

if TYPE_CHECKING:
    from ..driver import BlockContext, QuantizationRun

_METHODS: dict[str, type["Method"]] = {}


class Observer:
    """Accumulates statistics of one linear layer's inputs during the calibration pass."""

    def update(self, inputs: torch.Tensor) -> None:  # inputs: [..., in_features]
        raise NotImplementedError


class Method:
    """Base class of a quantization method plugin."""

    name: str = ""
    #: True if the method needs calibration activations (observers); False: weights alone suffice.
    needs_calibration: bool = False
    #: Quantize a block's linears in execution stages, each stage seeing the quantized earlier ones.
    sequential: bool = False
    #: The method options this plugin understands (others are refused with a clear error).
    option_names: tuple[str, ...] = ()

    def __init__(self, **options: Any) -> None:
        self.options = options

    def check_spec(self, spec: QuantSpec) -> None:
        """Refuse (SpecError) a width this method cannot produce, before any model is loaded or calibrated."""

    # ---- whole-model hook -------------------------------------------------------------------------
    def prepare(self, run: "QuantizationRun") -> None:
        """Called once before the first block (e.g. a backward pass for Fisher information)."""

    # ---- per-layer plugin surface ----------------------------------------------------------------
    def make_observer(self, name: str, in_features: int, spec: QuantSpec, device: torch.device) -> Observer | None:
        return None

    def quantize_layer(
        self, name: str, weight: torch.Tensor, observer: Observer | None, spec: QuantSpec
    ) -> QuantizedWeight:
        """weight [out_features, in_features] float32 on the work device -> packed result."""
        raise NotImplementedError

    # ---- per-block driver hook (default: observers + quantize_layer, stage by stage) --------------
    def quantize_block(self, ctx: "BlockContext") -> None:
        stages = ctx.stages() if self.sequential else [list(ctx.linears)]
        for stage in stages:
            observers = {}
            if self.needs_calibration:
                observers = {
                    n: self.make_observer(n, ctx.in_features(n), ctx.spec(n), ctx.device) for n in stage
                }
                ctx.observe({n: o for n, o in observers.items() if o is not None})
            for n in stage:
                qw = self.quantize_layer(ctx.qualified(n), ctx.weight(n), observers.get(n), ctx.spec(n))
                ctx.set_result(n, qw)
                observers.pop(n, None)  # free statistics (Hessians are large) as soon as possible


def register_method(cls: type[Method]) -> type[Method]:
    _METHODS[cls.name] = cls
    return cls


def get_method(name: str, **options: Any) -> Method:
    if name not in _METHODS:
        raise SpecError(f"unknown method {name!r}: choose one of {', '.join(sorted(_METHODS))}")
    cls = _METHODS[name]
    unknown = sorted(k for k, v in options.items() if k not in cls.option_names and v is not None)
    if unknown:
        allowed = ", ".join(cls.option_names) or "none"
        raise SpecError(f"method {name} does not take option(s) {', '.join(unknown)} (it takes: {allowed})")
    return cls(**options)


def available_methods() -> list[str]:
    return sorted(_METHODS)


from . import rtn  # noqa: E402,F401  (registers the built-in methods)
from . import gptq  # noqa: E402,F401
from . import squeezellm  # noqa: E402,F401
from . import ptq161  # noqa: E402,F401
