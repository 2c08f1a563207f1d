"""The ``ptq161`` format: 4-bit salient input channels plus binarized rest with learned scale vectors.

Per linear layer (N = out_features, K = in_features, S = salient input channels = spec.options["salient"],
B = K - S binarized input channels; S and B are chosen so that S % 8 == 0 and B % 32 == 0, hence K % 8 == 0):
  mask     int32 [ceil(K / 32)]  bit (k % 32) of word k // 32 is set when input channel k is salient (K bits)
  qweight  int32 [B / 32, N]     sign bits of the binarized weights: the B non-salient channels in increasing
                                 channel order, 32 per word along K, bit j of a word = channel j of its run,
                                 1 = +1, 0 = -1 (``pack_rows`` with 1-bit codes: the ``uniform`` qweight layout)
  sweight  int32 [S / 8, N]      4-bit codes of the salient channels in increasing channel order, packed along
                                 K exactly as the ``uniform`` format's 4-bit qweight
  sscales  fp16  [N]             per-row scale of the salient grid
  szeros   fp16  [N]             per-row zero point of the salient grid (an integer code in [0, 15])
  bscale   fp16  [N]             per-row binarization scale, alpha * r1 (alpha and the row vector r1 folded)
  colscale fp16  [B]             per-column binarization scale r2 of the binarized channels
  mu       fp16  [N]             row mean of the binarized weights (added back after the sign)

Weight:
  W[n, salient[j]]    = sscales[n] * (code[j, n] - szeros[n])
  W[n, binarized[j]]  = bscale[n] * colscale[j] * sign[j, n] + mu[n]

Every tensor that varies along N is contiguous along N, so a GEMV thread block that owns a run of
output rows reads one word per row per 32 binarized (or 8 salient) input channels with coalesced loads,
as in the ``uniform`` kernels. With x gathered into its salient part x_S [S] and binarized part x_B [B]
(the gather indices follow from ``mask`` once, at load time):
  y[n] = sscales[n] * (sum_j code[j, n] x_S[j] - szeros[n] * sum(x_S))
       + bscale[n] * sum_j sign[j, n] (colscale[j] x_B[j]) + mu[n] * sum(x_B)
so a kernel pre-scales x_B by colscale once per call and needs only sums of signed inputs per row.

S depends on the data and on the layer, so it is recorded per module in ``spec.options["salient"]`` and
every tensor shape follows from (K, N, spec).
"""

from __future__ import annotations

import torch

from ..errors import FormatError
from ..progress import GLOBAL_TIMER
from ..spec import QuantSpec
from . import PackedFormat, QuantizedWeight, register_format
from .packing import pack_rows, unpack_rows

SALIENT_BITS = 4
SALIENT_ALIGN = 8  # 4-bit codes per int32 word
BINARY_ALIGN = 32  # sign bits per int32 word


def spec_salient(spec: QuantSpec) -> int:
    return int((spec.options or {}).get("salient", 0) or 0)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """[K] bool -> [ceil(K / 32)] int32, channel k at bit k % 32 of word k // 32."""
    k = mask.numel()
    pad = (-k) % 32
    bits = torch.cat([mask.to(torch.int64), mask.new_zeros(pad, dtype=torch.int64)]).view(-1, 32)
    words = (bits << torch.arange(32, device=mask.device)).sum(dim=1)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_mask(words: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: [ceil(K / 32)] int32 -> [K] bool."""
    shifts = torch.arange(32, device=words.device, dtype=torch.int32)
    bits = (words.to(torch.int32).view(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:k].bool()


class PTQ161Format(PackedFormat):
    name = "ptq161"
    version = 1

    def check_shape(self, in_features: int, out_features: int, spec: QuantSpec, layer: str = "") -> None:
        where = f"layer {layer} " if layer else ""
        if spec.bits != SALIENT_BITS:
            raise FormatError(f"{where}asks for {spec.bits}-bit salient channels: the ptq161 format keeps them at 4 bits (--bits 4)")
        if in_features % SALIENT_ALIGN:
            raise FormatError(
                f"{where}has in_features={in_features}, but ptq161 packing needs a multiple of {SALIENT_ALIGN}: "
                "exclude it with --ignore"
            )
        s = spec_salient(spec)
        if s < 0 or s > in_features or s % SALIENT_ALIGN or (in_features - s) % BINARY_ALIGN:
            raise FormatError(
                f"{where}records salient={s} of {in_features} input channels; ptq161 needs a multiple of "
                f"{SALIENT_ALIGN} that leaves a multiple of {BINARY_ALIGN} binarized: the config is damaged"
            )

    def tensor_shapes(self, in_features, out_features, spec):
        self.check_shape(in_features, out_features, spec)
        s = spec_salient(spec)
        b = in_features - s
        return {
            "mask": ((-(-in_features // 32),), torch.int32),
            "qweight": ((b // 32, out_features), torch.int32),
            "sweight": ((s * SALIENT_BITS // 32, out_features), torch.int32),
            "sscales": ((out_features,), torch.float16),
            "szeros": ((out_features,), torch.float16),
            "bscale": ((out_features,), torch.float16),
            "colscale": ((b,), torch.float16),
            "mu": ((out_features,), torch.float16),
        }

    def in_features_from_shapes(self, shapes: dict[str, tuple], spec: QuantSpec) -> int:
        """K from the stored shapes (for ``lpq inspect``): 32 binarized channels per qweight word + S."""
        return shapes["qweight"][0] * 32 + spec_salient(spec)

    def unpack(self, tensors, spec: QuantSpec, in_features: int, out_features: int):
        """-> mask [K] bool, signs [N, B] float (+-1), codes [N, S] int32, and the float32 vectors."""
        s = spec_salient(spec)
        b = in_features - s
        mask = unpack_mask(tensors["mask"], in_features)
        if int(mask.sum()) != s:
            raise FormatError(f"the ptq161 mask marks {int(mask.sum())} salient channels, its spec says {s}: the checkpoint is damaged")
        signs = unpack_rows(tensors["qweight"], 1, b).t().float() * 2 - 1 if b else torch.zeros(out_features, 0, device=mask.device)
        codes = unpack_rows(tensors["sweight"], SALIENT_BITS, s).t() if s else torch.zeros(out_features, 0, dtype=torch.int32, device=mask.device)
        return mask, signs, codes

    def dequantize(self, tensors, spec, in_features, out_features):
        mask, signs, codes = self.unpack(tensors, spec, in_features, out_features)
        w = torch.empty(out_features, in_features, dtype=torch.float32, device=signs.device)
        scale, zero = tensors["sscales"].float(), tensors["szeros"].float()
        w[:, mask] = (codes.float() - zero[:, None]) * scale[:, None]
        w[:, ~mask] = binarized(signs, tensors["bscale"].float(), tensors["colscale"].float(), tensors["mu"].float())
        return w


def binarized(signs: torch.Tensor, bscale: torch.Tensor, colscale: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """signs [N, B] (+-1), bscale [N], colscale [B], mu [N] -> (bscale colscale^T) * signs + mu, [N, B]."""
    return bscale[:, None] * colscale[None, :] * signs + mu[:, None]


PTQ161 = register_format(PTQ161Format())


def pack_ptq161(
    mask: torch.Tensor,
    signs: torch.Tensor,
    codes: torch.Tensor,
    sscales: torch.Tensor,
    szeros: torch.Tensor,
    bscale: torch.Tensor,
    colscale: torch.Tensor,
    mu: torch.Tensor,
    spec: QuantSpec,
    layer: str = "",
) -> QuantizedWeight:
    """mask [K] bool, signs [N, B] (> 0 means +1), codes [N, S] in [0, 15], sscales/szeros/bscale/mu [N],
    colscale [B] -> a packed QuantizedWeight whose spec records format and S."""
    n, b = signs.shape
    s = int(mask.sum())
    k = mask.numel()
    if codes.shape != (n, s) or b != k - s:
        raise ValueError(f"codes {tuple(codes.shape)} / signs {tuple(signs.shape)} do not fit a mask of {s} of {k}")
    spec = spec.replace(format="ptq161", group_size=-1, act_order=False, options={**(spec.options or {}), "salient": s})
    PTQ161.check_shape(k, n, spec, layer)
    with GLOBAL_TIMER.phase("pack"):
        tensors = {
            "mask": pack_mask(mask),
            "qweight": pack_rows((signs > 0).to(torch.int32).t(), 1) if b else signs.new_zeros(0, n, dtype=torch.int32),
            "sweight": pack_rows(codes.t(), SALIENT_BITS) if s else signs.new_zeros(0, n, dtype=torch.int32),
            "sscales": sscales.to(torch.float16).contiguous(),
            "szeros": szeros.to(torch.float16).contiguous(),
            "bscale": bscale.to(torch.float16).contiguous(),
            "colscale": colscale.to(torch.float16).contiguous(),
            "mu": mu.to(torch.float16).contiguous(),
        }
        if signs.is_cuda:
            torch.cuda.synchronize(signs.device)
    return QuantizedWeight(spec, k, n, tensors)
