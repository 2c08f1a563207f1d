"""The ``uniform`` format: integer codes on a per-group affine grid, packed in GPTQ's layout.

Per linear layer (N = out_features, K = in_features, G = number of groups, b = bits):
  qweight  int32 [K * b / 32, N]  codes packed along the input dimension (see packing.py)
  scales   fp16  [G, N]
  qzeros   int32 [G, ceil(N / c) * w]  zero points packed along the output dimension, stored as is
           (no "minus one" offset: that belongs to GPTQ's v1 convention, handled at export/import)
  g_idx    int32 [K]  only with act-order; otherwise group of column k is k // group_size
A group size that does not divide K leaves a shorter last group (G = ceil(K / group_size)).
"""

from __future__ import annotations

import torch

from ..errors import FormatError
from ..progress import GLOBAL_TIMER
from ..quant import dequantize_codes, group_index, num_groups
from ..spec import QuantSpec
from . import PackedFormat, QuantizedWeight, register_format
from .packing import chunk_shape, pack_cols, pack_rows, packed_length, unpack_cols, unpack_rows


class UniformFormat(PackedFormat):
    name = "uniform"
    version = 1

    def check_shape(self, in_features: int, out_features: int, spec: QuantSpec, layer: str = "") -> None:
        per_chunk, _ = chunk_shape(spec.bits)
        if in_features % per_chunk:
            where = f"layer {layer} " if layer else ""
            raise FormatError(
                f"{where}has in_features={in_features}, but {spec.bits}-bit packing needs a multiple of "
                f"{per_chunk}: choose other bits or exclude it with --ignore"
            )

    def tensor_shapes(self, in_features, out_features, spec):
        self.check_shape(in_features, out_features, spec)
        per_chunk, words = chunk_shape(spec.bits)
        g = num_groups(in_features, spec.group_size)
        shapes = {
            "qweight": ((packed_length(in_features, spec.bits), out_features), torch.int32),
            "scales": ((g, out_features), torch.float16),
            "qzeros": ((g, -(-out_features // per_chunk) * words), torch.int32),
        }
        if spec.act_order:
            shapes["g_idx"] = ((in_features,), torch.int32)
        return shapes

    def g_idx(self, tensors, spec: QuantSpec, in_features: int) -> torch.Tensor:
        if "g_idx" in tensors:
            return tensors["g_idx"]
        return group_index(in_features, spec.group_size, device=tensors["qweight"].device)

    def unpack(self, tensors, spec: QuantSpec, in_features: int, out_features: int):
        """-> codes [N, K] int32, scales [G, N] fp16, zeros [G, N] int32, g_idx [K] int32."""
        codes = unpack_rows(tensors["qweight"], spec.bits, in_features).t()
        zeros = unpack_cols(tensors["qzeros"], spec.bits, out_features)
        return codes, tensors["scales"], zeros, self.g_idx(tensors, spec, in_features)

    def dequantize(self, tensors, spec, in_features, out_features):
        codes, scales, zeros, g_idx = self.unpack(tensors, spec, in_features, out_features)
        return dequantize_codes(codes, scales, zeros, g_idx)

    def concat_outputs(self, weights):
        """Codes, scales and zeros joined along the outputs and packed again (the zeros are packed along N,
        so their words are not simply concatenated). Act-order layers join only with one shared g_idx."""
        first = weights[0]
        if any(w.spec != first.spec or w.in_features != first.in_features for w in weights):
            return None
        parts = [self.unpack(w.tensors, w.spec, w.in_features, w.out_features) for w in weights]
        if first.spec.act_order and any(not torch.equal(p[3], parts[0][3]) for p in parts[1:]):
            return None
        return pack_uniform(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts], dim=1),
                            torch.cat([p[2] for p in parts], dim=1), first.spec,
                            g_idx=parts[0][3] if first.spec.act_order else None)

    def permute_outputs(self, weight, order):
        """Rows (codes, and the scales and zeros of every group) taken in ``order`` and packed again."""
        codes, scales, zeros, g_idx = self.unpack(weight.tensors, weight.spec, weight.in_features, weight.out_features)
        order = order.to(codes.device).long()
        if order.numel() != weight.out_features or not torch.equal(
                torch.sort(order).values, torch.arange(weight.out_features, device=order.device)):
            raise ValueError(f"permute_outputs: order must be a permutation of range({weight.out_features})")
        return pack_uniform(codes[order], scales[:, order], zeros[:, order], weight.spec,
                            g_idx=g_idx if weight.spec.act_order else None)


UNIFORM = register_format(UniformFormat())


def pack_uniform(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    spec: QuantSpec,
    g_idx: torch.Tensor | None = None,
    layer: str = "",
) -> QuantizedWeight:
    """codes [N, K] ints, scales/zeros [G, N], optional g_idx [K] -> a packed QuantizedWeight."""
    n, k = codes.shape
    UNIFORM.check_shape(k, n, spec, layer)
    with GLOBAL_TIMER.phase("pack"):
        tensors = {
            "qweight": pack_rows(codes.t(), spec.bits),
            "scales": scales.to(torch.float16).contiguous(),
            "qzeros": pack_cols(zeros.to(torch.int32), spec.bits),
        }
        if codes.is_cuda:
            torch.cuda.synchronize(codes.device)  # so the time is the packing's, not the next op's
    if spec.act_order:
        if g_idx is None:
            raise ValueError("act-order weights need their g_idx")
        tensors["g_idx"] = g_idx.to(torch.int32).contiguous()
    return QuantizedWeight(spec, k, n, tensors)
