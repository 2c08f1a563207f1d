"""Work a linear layer can fold into its own kernel (an epilogue): pure functions over tensors, and the generic
path that any layer runs when its kernel does not fold them.

Two epilogues, both for decoder blocks at small batch, where every kernel between two linears costs a few
microseconds of latency whatever its size (bench/profile_decode.py):

``norm_of`` (RMSNorm folded into the next linear). RMSNorm(h) = w * h * r with one scalar r = rsqrt(mean(h^2) + eps)
per token, so ``W @ RMSNorm(h) = r * (W @ (w * h))``. The block passes x = w * h (an elementwise product that the
compiler fuses into the kernel producing h) and ``norm_of=h``; lpq's uniform CUDA kernel sums the squares of h
inside the linear and scales its outputs, so that no reduction kernel runs between the residual add and the
projection. Note that x = w * h is formed before normalising: in float16 it overflows where |w * h| > 65504,
which RMSNorm's own order (normalise, then scale) would not; see ``lpq.fuse.fold_norms``.

``norm_sq`` (the same scale from sums of squares already made): ``r = rsqrt(sum(sq) / K + eps)`` where sq [..., S]
float32 holds sum(h^2) split in any number of slots. The layer that produced h gives them (below), so the consumer
adds a few hundred floats instead of reading h.

``residual`` (the layer closing a pre-norm block's branch: o_proj, down_proj). ``residual_epilogue``: h = y +
residual (the block's add, rounded as torch rounds it), x_next = w_next * h (the input of the next RMSNorm's folded
consumer) and sum(h^2) for its ``norm_sq``. With both, the residual add and the RMSNorm between two linears need no
kernel of their own: ``lpq.fuse.DecodeBlock``.

``swiglu`` (a gated MLP's activation folded into its joint gate/up linear). The joint linear's rows interleave
gate and up in tiles of ``SWIGLU_TILE`` rows (``swiglu_row_order``): rows [g0..g7, u0..u7, g8..g15, u8..u15, ...].
Its output [..., 2 I] then gives silu(gate) * up [..., I] with gate and up of one output in the same 16-row tile,
where the kernel's epilogue can combine them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SWIGLU_TILE = 8  # rows of gate, then of up, per 16-row tile of lpq's fused kernel (its mma C fragment: rows r, r + 8)
EPILOGUES = ("rms_norm", "swiglu", "residual")


def rms_scale(h: torch.Tensor, eps: float) -> torch.Tensor:
    """h [..., K] -> r [..., 1] float32 = rsqrt(mean(h^2) + eps), as transformers' RMSNorm computes it."""
    return torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + eps)


def apply_rms(x: torch.Tensor, h: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., K] (= w * h) scaled by h's rms scale, in x's dtype: the input the linear would see unfolded."""
    return (x.float() * rms_scale(h, eps)).to(x.dtype)


def rms_scale_from_sq(sq: torch.Tensor, k: int, eps: float) -> torch.Tensor:
    """sq [..., S] float32 (slots of sum(h^2) over K features) -> r [..., 1] float32 = rsqrt(sum / K + eps)."""
    return torch.rsqrt(sq.float().sum(-1, keepdim=True) / k + eps)


def residual_epilogue(y: torch.Tensor, residual: torch.Tensor, next_w: torch.Tensor):
    """y [..., N] (a linear's output), residual [..., N], next_w [N] -> (h = y + residual in y's dtype,
    x_next = next_w * h in h's dtype, sq [..., 1] float32 = sum(h^2))."""
    h = y + residual
    x_next = (next_w.to(h.dtype) * h).to(h.dtype)
    return h, x_next, h.float().pow(2).sum(-1, keepdim=True)


def swiglu_row_order(width: int, device=None) -> torch.Tensor:
    """Row order of the joint [gate; up] weight (2 * width rows) that interleaves them by SWIGLU_TILE:
    [0..7, width..width+7, 8..15, width+8..width+15, ...]. width must be a multiple of SWIGLU_TILE."""
    if width % SWIGLU_TILE:
        raise ValueError(f"swiglu_row_order: width {width} is not a multiple of {SWIGLU_TILE}")
    rows = torch.arange(width, device=device).view(-1, SWIGLU_TILE)
    return torch.stack([rows, rows + width], dim=1).reshape(-1)


def swiglu_interleaved(y: torch.Tensor) -> torch.Tensor:
    """y [..., 2 I] in swiglu_row_order -> silu(gate) * up [..., I] (in y's dtype)."""
    t = y.unflatten(-1, (-1, 2, SWIGLU_TILE))
    return (F.silu(t[..., 0, :]) * t[..., 1, :]).flatten(-2)


def generic_forward(linear, x: torch.Tensor, norm_of: torch.Tensor | None = None, norm_eps: float = 0.0,
                    swiglu: bool = False, norm_sq: torch.Tensor | None = None) -> torch.Tensor:
    """``linear(x)`` with the epilogues applied around it in torch (any layer; also the reference of the fused
    kernels): x scaled by the rms scale of ``norm_of`` (or of ``norm_sq``'s sums) first, silu(gate) * up of the
    interleaved output after."""
    if norm_of is not None:
        x = apply_rms(x, norm_of, norm_eps)
    elif norm_sq is not None:
        x = (x.float() * rms_scale_from_sq(norm_sq, x.shape[-1], norm_eps)).to(x.dtype)
    y = linear(x)
    return swiglu_interleaved(y) if swiglu else y


def linear_forward(layer, x: torch.Tensor, norm_of: torch.Tensor | None = None, norm_eps: float = 0.0,
                   swiglu: bool = False, norm_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Run ``layer`` (an nn.Linear, or a QuantizedLinear whose kernel may fold the epilogues) with the epilogues."""
    from .nn import QuantizedLinear

    if isinstance(layer, QuantizedLinear):
        return layer(x, norm_of=norm_of, norm_eps=norm_eps, swiglu=swiglu, norm_sq=norm_sq)
    return generic_forward(layer, x, norm_of, norm_eps, swiglu, norm_sq)


def linear_residual(layer, x: torch.Tensor, residual: torch.Tensor, next_w: torch.Tensor):
    """``residual_epilogue(layer(x), residual, next_w)``, inside the kernel where a QuantizedLinear's can."""
    from .nn import QuantizedLinear

    if isinstance(layer, QuantizedLinear):
        return layer.forward_residual(x, residual, next_w)
    return residual_epilogue(layer(x), residual, next_w)
