"""The maths of uniform (integer-grid) quantization, as pure functions over tensors.

Conventions (shared by every method and by the packed ``uniform`` format):
  weight W: [N, K] = [out_features, in_features]
  group g of input column k: g_idx[k] (k // group_size unless act-order permuted it)
  scales, zeros: [G, N]; scales are rounded to fp16 because that is how they are stored
  code q = clamp(round(W / s) + z, 0, 2**bits - 1);  dequantized W = s * (q - z)
"""

from __future__ import annotations

import torch


def group_index(in_features: int, group_size: int, device=None) -> torch.Tensor:
    """[K] int32 group of each input column; a last group shorter than ``group_size`` is allowed."""
    gs = in_features if group_size == -1 else group_size
    return (torch.arange(in_features, device=device) // gs).to(torch.int32)


def num_groups(in_features: int, group_size: int) -> int:
    gs = in_features if group_size == -1 else group_size
    return -(-in_features // gs)


def _grid_from_range(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """scale, zero of the grid spanning [xmin, xmax] (xmin <= 0 <= xmax), scale rounded to fp16."""
    maxq = (1 << bits) - 1
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    dead = (xmin == 0) & (xmax == 0)
    xmin = torch.where(dead, -torch.ones_like(xmin), xmin)
    xmax = torch.where(dead, torch.ones_like(xmax), xmax)
    scale = ((xmax - xmin) / maxq).to(torch.float16).float()
    scale = torch.where(scale == 0, torch.full_like(scale, 6.1e-5), scale)  # fp16 underflow guard
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def fit_minmax(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max grid per leading index over the last dim: w [..., M] -> scale [...], zero [...].

    Asymmetric: the range is [min(w, 0), max(w, 0)] (zero always representable). Symmetric: the
    range is [-max|w|, max|w|] with the zero code fixed at 2**(bits-1). A range that is all zero gets
    [-1, 1] so that the scale is never 0. The scale is rounded to fp16 first and the zero derived from
    the rounded scale, so that fake quantization here equals what the stored tensors dequantize to.
    """
    w = w.float()
    return _grid_from_range(w.amin(dim=-1).clamp(max=0), w.amax(dim=-1).clamp(min=0), bits, sym)


def fit_mse(w: torch.Tensor, bits: int, sym: bool, grid: int = 100, max_shrink: float = 0.8,
            norm: float = 2.4) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`fit_minmax`, but the range is shrunk by the factor in {1, 0.99, ..., 1 - max_shrink}
    that minimises sum |w - Q(w)|**norm per leading index: clipping a few outliers buys a finer grid
    for all other weights. (norm 2.4 and 80 candidates are the values the GPTQ authors used.)
    """
    maxq = (1 << bits) - 1
    w = w.float()
    xmin, xmax = w.amin(dim=-1).clamp(max=0), w.amax(dim=-1).clamp(min=0)
    best_scale, best_zero = _grid_from_range(xmin, xmax, bits, sym)
    best_err = torch.full_like(best_scale, float("inf"))
    for i in range(int(max_shrink * grid)):
        p = 1.0 - i / grid
        scale, zero = _grid_from_range(p * xmin, p * xmax, bits, sym)
        q = torch.clamp(torch.round(w / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, maxq)
        err = (scale.unsqueeze(-1) * (q - zero.unsqueeze(-1)) - w).abs_().pow_(norm).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def fit_range(w: torch.Tensor, bits: int, sym: bool, mse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid of each row of w [..., M]: min-max, or with ``mse`` the error-minimising clipped range."""
    return fit_mse(w, bits, sym) if mse else fit_minmax(w, bits, sym)


def fit_groups(w: torch.Tensor, bits: int, group_size: int, sym: bool, mse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid of every group of consecutive columns: w [N, K] -> scales [G, N], zeros [G, N].

    A shorter last group is padded by repeating its own first column, which leaves its min and max
    unchanged (with ``mse`` the repeated column weighs a little more in the error; that is all).
    """
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    g = -(-k // gs)
    pad = g * gs - k
    if pad:
        w = torch.cat([w, w[:, (g - 1) * gs : (g - 1) * gs + 1].expand(n, pad)], dim=1)
    scale, zero = fit_range(w.reshape(n, g, gs), bits, sym, mse)  # [N, G]
    return scale.t().contiguous(), zero.t().contiguous()


def quantize_codes(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, bits: int
) -> torch.Tensor:
    """Codes of W on the given grid: w [N, K], scales/zeros [G, N], g_idx [K] -> codes [N, K] int32."""
    g = g_idx.long()
    s = scales.float()[g].t()  # [N, K]
    z = zeros.float()[g].t()
    return torch.clamp(torch.round(w.float() / s) + z, 0, (1 << bits) - 1).to(torch.int32)


def dequantize_codes(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor
) -> torch.Tensor:
    """W = s * (q - z): codes [N, K], scales/zeros [G, N], g_idx [K] -> [N, K] float32."""
    g = g_idx.long()
    return (codes.t().float() - zeros.float()[g]).mul_(scales.float()[g]).t()


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """Round-to-nearest on the min-max grid, returned dequantized (same shape and dtype as w)."""
    scales, zeros = fit_groups(w, bits, group_size, sym)
    g_idx = group_index(w.shape[1], group_size, device=w.device)
    q = quantize_codes(w, scales, zeros, g_idx, bits)
    return dequantize_codes(q, scales, zeros, g_idx).to(w.dtype)
