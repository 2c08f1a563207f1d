"""RTN: round to nearest on a per-group min-max grid. Needs no calibration data."""

from __future__ import annotations

import torch

from ..formats import QuantizedWeight
from ..formats.uniform import pack_uniform
from ..quant import fit_groups, group_index, quantize_codes
from ..spec import QuantSpec
from . import Method, register_method


def rtn_quantize(weight: torch.Tensor, spec: QuantSpec, layer: str = "", mse: bool = False) -> QuantizedWeight:
    """weight [N, K] -> uniform-format QuantizedWeight, rounding each weight to its group's grid
    (min-max, or with ``mse`` the clipped range that minimises the rounding error)."""
    scales, zeros = fit_groups(weight, spec.bits, spec.group_size, spec.sym, mse)
    g_idx = group_index(weight.shape[1], spec.group_size, device=weight.device)
    codes = quantize_codes(weight, scales, zeros, g_idx, spec.bits)
    return pack_uniform(codes, scales, zeros, spec, layer=layer)


@register_method
class RTN(Method):
    name = "rtn"
    needs_calibration = False
    option_names = ("mse",)

    def quantize_layer(self, name, weight, observer, spec):
        return rtn_quantize(weight, spec, layer=name, mse=bool(self.options.get("mse")))
