"""CUDA kernels for the ``uniform`` format: a fused dequantize-in-registers GEMM for small batches and
dequantize + cuBLAS for large ones.

Importing this module needs torch only; the extension is built on the first CUDA forward (see
``cuda_build.py``). Kernels registered here:

  uniform_cuda          (priority 100) m <= LPQ_FUSED_MAX_M (default 64): the fused kernel, else
                        dequantize into a temporary fp16/bf16 weight and call cuBLAS.
  uniform_cuda_fused    (priority 40)  always the fused kernel (tests, benchmarks).
  uniform_cuda_dequant  (priority 30)  always dequantize + cuBLAS (tests, benchmarks).

All three support bits 2/3/4/8, group sizes that are multiples of 32 (32, 64, 128, ..., and -1 per
channel, a shorter last group included), symmetric and asymmetric grids, act-order (the input is
permuted at run time by the permutation computed at prepare), fp16 and bf16 activations, any
out_features, in_features a multiple of 8, compute capability >= 8.0. ``prepare`` repacks the
canonical tensors once into the kernels' own layout (csrc/uniform_kernels.cuh describes it).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..formats.packing import unpack_cols, unpack_rows
from . import Kernel, cuda_input_problem, log, register_kernel
from . import cuda_build
from .w3_layout import W3_LAYOUT, pack_w3_fields

STATE_KEY = "uniform_cuda"
_SLICE = 4096  # output features repacked at a time (bounds the temporary memory of prepare)


def _fold(gs: int, k: int) -> int:
    """Columns per fold: 128, 64 or 32, dividing the group size so that no fold crosses a group
    (one group per row, as per-channel, takes 128)."""
    if gs >= k:
        return 128
    return next(f for f in (128, 64, 32) if gs % f == 0)


def _to_int32(w: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit values -> int32 with the same bits."""
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def _pack_lane_codes(c: torch.Tensor, bits: int, w3_layout: str = W3_LAYOUT) -> torch.Tensor:
    """c [..., 32 pairs, 2] codes of one lane in one chunk -> [..., 2*bits] words (int64, unsigned).
    3 bits: the "fields" layout of w3_layout.py, or the earlier 2-bit + 1-bit planes (LPQ_W3_LAYOUT=planes)."""
    def pairs_to_words(v: torch.Tensor, b: int) -> torch.Tensor:
        ppw = 16 // b  # pairs per word
        v = v.reshape(*v.shape[:-2], v.shape[-2] // ppw, ppw, 2)
        sh = torch.arange(ppw, device=v.device, dtype=torch.int64) * b
        lo = (v[..., 0] << sh).sum(-1)
        hi = (v[..., 1] << (sh + 16)).sum(-1)
        return lo | hi

    c = c.to(torch.int64)
    if bits == 3 and w3_layout == "fields":
        return pack_w3_fields(c)
    if bits == 3:
        return torch.cat([pairs_to_words(c & 3, 2), pairs_to_words(c >> 2, 1)], dim=-1)
    return pairs_to_words(c, bits)


def repack(tensors: dict[str, torch.Tensor], spec, k: int, n: int) -> dict:
    """The canonical uniform tensors -> the kernels' layout (see csrc/uniform_kernels.cuh)."""
    bits = spec.bits
    gs = k if spec.group_size == -1 else spec.group_size
    fold = _fold(gs, k)
    tpf, folds = fold // 16, 128 // fold
    qweight = tensors["qweight"]
    dev = qweight.device
    k_pad = -(-k // 128) * 128
    chunks = k_pad // 128
    n_pad = -(-n // 32) * 32
    perm = None
    if "g_idx" in tensors and spec.act_order:
        g_idx = tensors["g_idx"].to(dev).long()
        perm = torch.argsort(g_idx, stable=True)
        if not torch.equal(g_idx[perm], torch.arange(k, device=dev) // gs):
            raise ValueError("g_idx does not assign group_size consecutive columns per group after sorting")

    blocks = []
    for n0 in range(0, n_pad, _SLICE):
        n1 = min(n0 + _SLICE, n_pad)
        codes = unpack_rows(qweight[:, n0:min(n1, n)], bits, k)  # [K, ns]
        if perm is not None:
            codes = codes.index_select(0, perm)
        ns = n1 - n0
        full = torch.zeros((ns, k_pad), dtype=torch.int32, device=dev)
        full[: codes.shape[1], :k] = codes.t()
        # [nt, rh, g, chunk, f, t, jj, h, e] -> [nt, chunk, g, t, f, jj, h, rh, e]
        v = full.view(ns // 16, 2, 8, chunks, folds, 4, tpf, 2, 2).permute(0, 3, 2, 5, 4, 6, 7, 1, 8)
        v = v.reshape(ns // 16, chunks, 32, 32, 2)
        words = _pack_lane_codes(v, bits)  # [nt, chunks, 32 lanes, 2b]
        if bits == 3:
            seg = words[..., :4].reshape(ns // 16, chunks, 128)
            tail = words[..., 4:].reshape(ns // 16, chunks, 64)
            blk = torch.cat([seg, tail], dim=-1)
        else:
            segs = 2 * bits // 4
            blk = words.view(ns // 16, chunks, 32, segs, 4).permute(0, 1, 3, 2, 4).reshape(ns // 16, chunks, 64 * bits)
        blocks.append(_to_int32(blk))
        del codes, full, v, words, blk
    qw = torch.cat(blocks, dim=0).contiguous()
    nt = n_pad // 16

    scales = tensors["scales"].to(torch.float16)
    zeros = unpack_cols(tensors["qzeros"], bits, n)
    g = scales.shape[0]
    sp = torch.zeros((g, n_pad), dtype=torch.float16, device=dev)
    sp[:, :n] = scales
    zp = torch.zeros((g, n_pad), dtype=torch.int32, device=dev)
    zp[:, :n] = zeros
    sc = sp.view(g, nt, 2, 8).permute(0, 1, 3, 2).contiguous().view(torch.int32).view(g, nt, 8)
    zz = zp.view(g, nt, 2, 8).permute(0, 1, 3, 2).to(torch.uint8).contiguous().view(torch.int16).view(g, nt, 8)
    return {"qw": qw, "sc": sc.contiguous(), "zp": zz.contiguous(), "perm": perm, "fold": fold, "gs": gs,
            "bits": bits, "n": n, "k": k, "w3_layout": W3_LAYOUT if bits == 3 else None}


def _fused_max_m() -> int:
    try:
        return int(os.environ.get("LPQ_FUSED_MAX_M", "64"))
    except ValueError:
        return 64


GEMM_VARIANTS = (0, 1, 2, 3, 4, 5)


def _gemm_variant() -> int | None:
    """Fused-kernel variant forced by ``LPQ_GEMM_VARIANT`` (benchmarks): 0 the cp.async-ring kernel
    (v3), 1 the register-prefetch kernel (v2), 2 v3 with deeper rings at m <= 8, 3 v3 with two
    n-tiles per warp at m <= 8, 4 two n-tiles per warp and two chunks per ring stage at m <= 8, 5 one
    n-tile per warp and two chunks per stage at m <= 8 (above m = 8, 2-5 run 0). None: the rule of
    :func:`default_variant`."""
    try:
        v = int(os.environ.get("LPQ_GEMM_VARIANT", ""))
    except ValueError:
        return None
    return v if v in GEMM_VARIANTS else None


GEMM_VARIANT = _gemm_variant()

# or-ed into variant 0, 4 or 5: the op launches the kernel with programmatic dependent launch (sm_90+; a plain launch
# elsewhere): its blocks may be scheduled before the previous kernel in the stream ends; they request their first
# stage of weights, then wait for it before they read anything it may write; each lets the next kernel in once its
# own loads are requested (uniform_gemm_kc_kernel, uniform_gemm_cp_kernel). Such a grid is placed while the previous kernel still holds SMs;
# its dynamic shared memory is padded so that no SM takes more than ceil(blocks / SMs) of its blocks (csrc/
# async_copy.cuh, launch_with_pdl; LPQ_PDL_BALANCE=0 turns the padding off): without it, the blocks filled the SMs
# that freed up first, and a grid smaller than the GPU ran on part of it (4096x11008 W3 10.0 us against 8.6).
# On by default for the m = 1 kernels (variants 5 and 4) and for variant 0 at m = 9..16: a decode step of the
# 7B-shaped model took 1.81 ms instead of 1.91 at W3, and W4 at m = 16 4096x4096 6.0 us instead of 7.2 plain
# (bench/RESULTS.md, H100). LPQ_PDL=0 turns it off; LPQ_PDL=1 also
# takes variants 4 and 5 at m = 2..8 (not measured there). Without the padding, variant 4 lost on 8192x28672 (W3
# 41.6 us against 38.9 plain) and only variant 5 takes the flag.
PDL_FLAG = 8


def pdl_settings(env: str | None, balance_env: str | None = None) -> tuple[bool, dict[int, tuple[int, int]]]:
    """(PDL on, {variant: (smallest m, largest m) at which it takes PDL by default}) for values of LPQ_PDL and
    LPQ_PDL_BALANCE: LPQ_PDL unset (or any other value) -> variants 4 and 5 at m = 1 and variant 0 at m = 9..16
    (variant 5 alone with LPQ_PDL_BALANCE=0); "0" -> off; "1" -> variants 4 and 5 up to m = 8 as well."""
    if env == "0":
        return False, {}
    if balance_env == "0" and env != "1":
        return True, {5: (1, 1)}
    m1 = (1, 8) if env == "1" else (1, 1)
    return True, {4: m1, 5: m1, 0: (9, 16)}


PDL, PDL_RULES = pdl_settings(os.environ.get("LPQ_PDL"), os.environ.get("LPQ_PDL_BALANCE"))
# what the extensions read from LPQ_PDL_BALANCE (csrc/async_copy.cuh): the padding of PDL launches, on unless "0"
PDL_BALANCE = os.environ.get("LPQ_PDL_BALANCE") != "0"
# The early trigger: a grid launched with PDL lets the next kernel launch right after its own griddepcontrol.wait
# rather than after its main loop. Which kernels take it is LPQ_PDL_EARLY's list of kernel keys (PDL_EARLY):
# w2/w3/w4 the m = 1 uniform kernels (variants 4 and 5, or-ed with EARLY_FLAG) of those code widths, s2/s3/s4 the
# m = 1 squeezellm LUT ring kernel of those widths (squeezellm_cuda), p161 the ptq161 ring kernel (ptq161_cuda).
# On by default for every key but s2 (not measured in decode), each chosen by a paired A/B of the 7B-shaped decode
# step on the H100 (bench/decode_ab.py, alternating pairs; bench/RESULTS.md) beside the kernel benchmark:
# - w4: decode 0.991x the time (every pair 0.990-0.992); kernel, 11008x4096 11.5 -> 10.6 us, 8192x8192 15.8 -> 14.8.
# - w3, w2: with 8-warp blocks on layers taller than wide (before round 14) W3 lost, decode 1.024x (1.022-1.024);
#   with 4-warp blocks there (TALL_LOW_BIT_WARPS) they gain: W3 0.998x (0.997-0.998), W2 0.996x (0.994-0.998);
#   kernel, 11008x4096 W3 9.5 -> 8.3 us, W2 8.7 -> 8.0.
# - s3: decode 0.998x (0.993-0.998); kernel, 3-bit dense 11008x4096 10.2 -> 9.6 us, 8192x8192 12.8 -> 12.2.
# - s4: decode 1.001x (0.996-1.002), level; kernel, 11008x4096 14.4 -> 13.3 us, 8192x8192 18.3 -> 17.4.
# - p161: decode 0.987x (0.986-0.993, unfused blocks); kernel, 11008x4096 9.9 -> 9.3 us, 28672x8192 25.9 -> 24.7.
EARLY_FLAG = 16
EARLY_ORDER = ("w2", "w3", "w4", "s2", "s3", "s4", "p161")
EARLY_KEYS = frozenset(EARLY_ORDER)
DEFAULT_EARLY: frozenset[str] = frozenset(("w2", "w3", "w4", "s3", "s4", "p161"))


def early_kernels(env: str | None) -> frozenset[str]:
    """Kernel keys that take the early trigger, from LPQ_PDL_EARLY: unset or empty -> the default (DEFAULT_EARLY);
    "0" -> none; "1" -> all (EARLY_KEYS); a comma list of keys such as "w4,s3,p161" (a bare width N means wN, so "4"
    and "3,4" name uniform widths) -> those. Anything else is logged and read as unset, as the other LPQ_ launch
    settings are."""
    if env is None or env.strip() == "":
        return DEFAULT_EARLY
    if env.strip() == "0":
        return frozenset()
    if env.strip() == "1":
        return EARLY_KEYS
    keys = frozenset(("w" + t if t.isdigit() else t) for t in (v.strip().lower() for v in env.split(",")))
    if not keys <= EARLY_KEYS:
        log.warning("LPQ_PDL_EARLY=%r is not 0, 1 or a list of kernel keys among %s (such as w4 or w4,s3,p161): "
                    "using the default", env, ", ".join(sorted(EARLY_KEYS)))
        return DEFAULT_EARLY
    return keys


PDL_EARLY = early_kernels(os.environ.get("LPQ_PDL_EARLY"))


def early_words(keys: frozenset[str] | None = None) -> str:
    """'W4' or 'W4/S3/P161': the kernel keys that take the early trigger (default: PDL_EARLY), for bench notes."""
    keys = PDL_EARLY if keys is None else keys
    return "/".join(k.upper() for k in EARLY_ORDER if k in keys)


def takes_early(key: str) -> bool:
    """Whether the kernel of ``key`` (w4, s3, p161, ...) takes the early trigger under this process's settings."""
    return key in PDL_EARLY


def with_default_pdl(variant: int, m: int, bits: int | None = None) -> int:
    """The variant as the op launches it when the caller did not choose: with PDL_FLAG or-ed in where programmatic
    dependent launch is on for it (PDL_RULES), and EARLY_FLAG with it on variants 4 and 5 of a layer whose code
    width ``bits`` takes the early trigger (PDL_EARLY)."""
    lo_hi = PDL_RULES.get(variant)
    if not PDL or lo_hi is None or not lo_hi[0] <= m <= lo_hi[1]:
        return variant
    return variant | PDL_FLAG | (EARLY_FLAG if takes_early(f"w{bits}") and variant in (4, 5) else 0)


def _valid_variant(v: int) -> bool:
    if not isinstance(v, int):
        return False
    if v in GEMM_VARIANTS or v == 0 | PDL_FLAG:
        return True
    return bool(v & PDL_FLAG) and (v & ~(PDL_FLAG | EARLY_FLAG)) in (4, 5)

# Round 5 (bench/NOTES-kernels.md; H100 timings of every variant x warps in bench/RESULTS.md "round 5"):
# variants 4 and 5 take two chunks per ring stage, which cuts the static main-loop instructions per 16x128
# chunk (sm_90a SASS, fp16, m = 1) from about 189 to 134 (W3, 3 -> 4), 186 to 133 (W2 g64) and 244 to 147
# (W4, 0 -> 5). Measured: at m = 1 the one-n-tile variant 5 is fastest for every width and shape but the
# 2-/3-bit ones with K >= 3 N (8192x28672: variant 4); at m = 2..4 variant 4 for all widths; at m = 5..8
# variant 4 for 4-bit and still variant 3 for 2-/3-bit (W3 28672x8192 m = 8: 53.7 us against 59.3).
M1_WIDE_K = 3  # K >= M1_WIDE_K * N: at m = 1, 2-/3-bit codes keep two n-tiles (variant 4)


def tall_low_bit_warps(env: str | None) -> int:
    """Warps of the m = 1 kernel (variant 5) for 2-/3-bit layers taller than wide, from LPQ_TALL_WARPS: 4 unless it
    says 8 (the rule before round 14, for A/B runs). Another value is logged and read as unset."""
    if env is None or env.strip() in ("", "4"):
        return 4
    if env.strip() == "8":
        return 8
    log.warning("LPQ_TALL_WARPS=%r is not 4 or 8: using 4", env)
    return 4


TALL_LOW_BIT_WARPS = tall_low_bit_warps(os.environ.get("LPQ_TALL_WARPS"))


def default_warps(st: dict, m: int, variant: int = 0) -> int:
    """Warps per block of the fused kernel, fitted to the H100 timings (bench/NOTES-kernels.md rounds 4,
    5 and 14). Variant 5 at m = 1: 8 warps for 4-bit layers taller than wide (N > K) and 2-/3-bit ones wider than
    tall (K > N); TALL_LOW_BIT_WARPS (4) for 2-/3-bit layers taller than wide; else 4. Variant 4:
    4 warps from 129 blocks of two n-tiles up, 8 below (4096x11008, 4096x4096). Variants 0 and 3 (round
    4): with few blocks (< 340) each must keep more chunks in flight, so 8 warps; with many, 4; one
    n-tile per block also 8 when K is short (<= 32 chunks of 128); two n-tiles between 128 and 340
    blocks: 8 only for long K (>= 128 chunks). LPQ_UNIFORM_WARPS=4 or 8 forces one (for A/B runs)."""
    forced = os.environ.get("LPQ_UNIFORM_WARPS")
    if forced in ("4", "8"):
        return int(forced)
    small_m = m <= 8
    n, k = st["n"], st["k"]
    if small_m and variant == 5:
        # 2-/3-bit layers wider than tall (N < K < 3 N) also take 8 (4096x11008 at m = 1, H100, three runs: W3
        # 9.7-10.0 us against 10.2-10.6 with 4; two runs: W2 8.4-9.0 against 9.2-9.6); 4-bit ones keep 4 (11.5-11.6
        # against 11.7-12.0)
        if n > k:
            # taller than wide: 8, but 2-/3-bit layers 4 since round 14 (TALL_LOW_BIT_WARPS). H100 with PDL and the
            # late trigger, one run each: 11008x4096 W3 10.4 -> 9.3 us, W2 9.8 -> 8.8; 28672x8192 W3 38.2 -> 38.8,
            # W2 33.6 -> 32.1; W4 level or slower with 4. Decode A/B (bench/decode_ab.py, LPQ_TALL_WARPS=8 against
            # 4): 8 warps took W3 1.041x and W2 1.042x the time of 4 (every pair 1.037-1.043)
            return TALL_LOW_BIT_WARPS if st["bits"] in (2, 3) else 8
        return 8 if st["bits"] in (2, 3) and k > n else 4
    two_tiles = not small_m or variant in (3, 4)  # the m > 8 kernels always take two n-tiles per block
    blocks = st["sc"].shape[1] // (2 if two_tiles else 1)
    if small_m and variant == 4:
        return 4 if blocks > 128 else 8
    chunks = -(-k // 128)
    if blocks >= 340:
        return 8 if not two_tiles and chunks <= 32 else 4
    if small_m and two_tiles and blocks > 128 and chunks < 128:
        return 4
    return 8


def default_variant(st: dict, m: int) -> int:
    """m = 1: variant 5, or 4 for 2-/3-bit codes with K >= 3 N; m = 2..4: 4; m = 5..8: 4 for 4-bit,
    3 for 2-/3-bit (round 5 timings); 8-bit keeps 0 at every m <= 8. Above m = 8: v3 (variant 0). Up to
    m = 16 its launcher gives 2- to 4-bit layers with >= 8192 outputs a 2-stage ring, which beat v2 there
    (round 9, bench/RESULTS.md; v2 had won against the 3-stage ring)."""
    bits = st["bits"]
    if m <= 8:
        if bits == 8:
            return 0
        if m == 1:
            return 4 if bits in (2, 3) and st["k"] >= M1_WIDE_K * st["n"] else 5
        return 4 if m <= 4 or bits == 4 else 3
    return 0


def _launch_choice(st: dict, x2: torch.Tensor, warps: int | None, variant: int | None) -> tuple[int, int]:
    """(warps, variant) of the fused kernel for x2 [m, k]: the ones given, else the H100 rules; checks x2."""
    if variant is not None and not _valid_variant(variant):  # here: a failing check inside the op ends the process
        raise ValueError(f"lpq uniform_gemm: variant must be one of {GEMM_VARIANTS} (0, 4 and 5 optionally "
                         f"| {PDL_FLAG}; 4 and 5 with it optionally | {EARLY_FLAG}), got {variant}")
    k = st["k"]
    if x2.dim() != 2 or x2.shape[1] != k:
        raise ValueError(f"lpq uniform_gemm: x must be [m, {k}], got {list(x2.shape)}")
    if x2.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"lpq uniform_gemm: activations must be float16 or bfloat16, got {x2.dtype}")
    if not x2.is_cuda or x2.device != st["qw"].device:
        raise ValueError(f"lpq uniform_gemm: x is on {x2.device}, the weights on {st['qw'].device}")
    if variant is None:
        variant = GEMM_VARIANT if GEMM_VARIANT is not None else default_variant(st, x2.shape[0])
        variant = with_default_pdl(variant, x2.shape[0], st["bits"])
    if warps is None:
        warps = default_warps(st, x2.shape[0], variant & ~(PDL_FLAG | EARLY_FLAG))
    return warps, variant


def gemm(st: dict, x2: torch.Tensor, bias: torch.Tensor | None, warps: int | None = None,
         variant: int | None = None, norm_x: torch.Tensor | None = None, norm_eps: float = 0.0,
         swiglu: bool = False, norm_sq: torch.Tensor | None = None) -> torch.Tensor:
    """x2 [m, k] -> [m, n] through the fused kernel; with the epilogues of lpq.epilogue: norm_x [m, k] scales
    every output of token row i by rsqrt(mean(norm_x[i]^2) + norm_eps) (before the bias), or norm_sq [m, slots]
    float32 by rsqrt(sum(norm_sq[i]) / k + norm_eps); swiglu gives silu(gate) * up [m, n / 2] of rows interleaved
    by lpq.epilogue.swiglu_row_order (n % 16 == 0)."""
    warps, variant = _launch_choice(st, x2, warps, variant)
    if norm_x is not None and (norm_x.dim() != 2 or norm_x.shape != x2.shape):
        raise ValueError(f"lpq uniform_gemm: norm_x must be shaped as x {list(x2.shape)}, got {list(norm_x.shape)}")
    if norm_sq is not None and (norm_sq.dim() != 2 or norm_sq.shape[0] != x2.shape[0] or norm_sq.dtype != torch.float32):
        raise ValueError(f"lpq uniform_gemm: norm_sq must be [{x2.shape[0]}, slots] float32, got "
                         f"{list(norm_sq.shape)} {norm_sq.dtype}")
    if norm_x is not None and norm_sq is not None:
        raise ValueError("lpq uniform_gemm: give norm_x or norm_sq, not both")
    if swiglu and st["n"] % 16:
        raise ValueError(f"lpq uniform_gemm: swiglu needs out_features a multiple of 16, got {st['n']}")
    return torch.ops.lpq_cuda.uniform_gemm(x2, st["qw"], st["sc"], st["zp"], bias, st["bits"], st["fold"], st["gs"],
                                           st["n"], st["k"], warps, variant, norm_x, float(norm_eps), bool(swiglu),
                                           norm_sq)


def gemm_residual(st: dict, x2: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor, next_w: torch.Tensor,
                  warps: int | None = None, variant: int | None = None):
    """The residual epilogue (lpq.epilogue.residual_epilogue) in the fused kernel: x2 [m, k], residual [m, n],
    next_w [n] -> (h = x2 @ W.T + bias + residual [m, n], next_w * h [m, n], sums of h^2 per 16 outputs
    [m, n_tiles] float32)."""
    warps, variant = _launch_choice(st, x2, warps, variant)
    m, n = x2.shape[0], st["n"]
    if residual.shape != (m, n) or residual.dtype != x2.dtype:
        raise ValueError(f"lpq uniform_gemm_residual: residual must be [{m}, {n}] {x2.dtype}, got "
                         f"{list(residual.shape)} {residual.dtype}")
    if next_w.shape != (n,) or next_w.dtype != x2.dtype:
        raise ValueError(f"lpq uniform_gemm_residual: next_w must be [{n}] {x2.dtype}, got {list(next_w.shape)} "
                         f"{next_w.dtype}")
    return torch.ops.lpq_cuda.uniform_gemm_residual(x2, st["qw"], st["sc"], st["zp"], bias, st["bits"], st["fold"],
                                                    st["gs"], n, st["k"], warps, variant, residual, next_w)


def dequant(st: dict, dtype: torch.dtype) -> torch.Tensor:
    return torch.ops.lpq_cuda.uniform_dequant(st["qw"], st["sc"], st["zp"], st["bits"], st["fold"], st["gs"], st["n"],
                                              st["k"], dtype == torch.bfloat16)


class UniformCudaKernel(Kernel):
    name = "uniform_cuda"
    formats = ("uniform",)
    priority = 100
    holds_weights = True  # the fused and the dequantize paths both read only the repacked state
    mode = "auto"  # "auto" | "fused" | "dequant"

    def why_not(self, layer, x: torch.Tensor) -> str | None:
        reason = super().why_not(layer, x)
        if reason:
            return reason
        reason = cuda_input_problem(x)
        if reason:
            return reason
        spec = layer.spec
        if spec.bits not in (2, 3, 4, 8):
            return f"bits={spec.bits} not supported (2, 3, 4, 8)"
        if spec.group_size != -1 and spec.group_size % 32:
            return f"group_size={spec.group_size} not supported (a multiple of 32, or -1)"
        k = layer.in_features
        if k % 8:
            return f"in_features={k} is not a multiple of 8"
        if x.shape[-1] != k:
            return f"input has {x.shape[-1]} features, the layer {k}"
        if spec.act_order:
            ok = layer.__dict__.get("_lpq_gidx_ok")
            if ok is None:
                gs = k if spec.group_size == -1 else spec.group_size
                gi = layer.g_idx.long()
                ok = bool(torch.equal(torch.sort(gi).values, torch.arange(k, device=gi.device) // gs))
                layer.__dict__["_lpq_gidx_ok"] = ok
            if not ok:
                return "g_idx does not give every group group_size columns (cannot reorder the input)"
        if not cuda_build.load():
            return f"CUDA extension unavailable: {cuda_build.failure_reason()}"
        return None

    def prepare(self, layer) -> None:
        if STATE_KEY not in layer.kernel_state:
            with torch.no_grad():
                layer.kernel_state[STATE_KEY] = repack(layer.tensors(), layer.spec, layer.in_features, layer.out_features)

    def _state(self, layer) -> dict:
        st = layer.kernel_state.get(STATE_KEY)
        if st is None:
            self.prepare(layer)
            st = layer.kernel_state[STATE_KEY]
        return st

    def _fused(self, m: int) -> bool:
        return self.mode == "fused" or (self.mode == "auto" and m <= _fused_max_m())

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        return self._run(layer, x, None, 0.0, False, None)

    def forward_epilogue(self, layer, x, norm_of, norm_eps, swiglu, norm_sq=None):
        if not self._fused(x.numel() // layer.in_features):  # dequantize + cuBLAS: the epilogues in torch
            return super().forward_epilogue(layer, x, norm_of, norm_eps, swiglu, norm_sq)
        return self._run(layer, x, norm_of, norm_eps, swiglu, norm_sq)

    def forward_residual(self, layer, x, residual, next_w):
        if not self._fused(x.numel() // layer.in_features):
            return super().forward_residual(layer, x, residual, next_w)
        st = self._state(layer)
        x2, bias = self._input(st, layer, x)
        h, x_next, sq = gemm_residual(st, x2, bias, residual.reshape(-1, st["n"]), next_w.to(x.dtype))
        lead = x.shape[:-1]
        return h.reshape(*lead, -1), x_next.reshape(*lead, -1), sq.reshape(*lead, -1)

    @staticmethod
    def _input(st: dict, layer, x: torch.Tensor):
        """x [..., k] -> (x2 [m, k] in the kernel's column order, the bias in x's dtype)."""
        x2 = x.reshape(-1, st["k"])
        if st["perm"] is not None:
            x2 = x2.index_select(1, st["perm"])  # the rms of norm_of needs no reordering
        # no alignment fix-up here: the op copies an unaligned x itself (data_ptr() would break torch.compile)
        bias = layer.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return x2, bias

    def _run(self, layer, x: torch.Tensor, norm_of, norm_eps: float, swiglu: bool, norm_sq) -> torch.Tensor:
        st = self._state(layer)
        x2, bias = self._input(st, layer, x)
        m = x2.shape[0]
        if self._fused(m):
            norm_x = norm_of.reshape(-1, st["k"]) if norm_of is not None else None
            sq = norm_sq.reshape(m, -1) if norm_sq is not None else None
            y = gemm(st, x2, bias, norm_x=norm_x, norm_eps=norm_eps, swiglu=swiglu, norm_sq=sq)
        else:
            y = F.linear(x2, dequant(st, x.dtype), bias)
        return y.reshape(*x.shape[:-1], y.shape[-1])


class UniformCudaFusedKernel(UniformCudaKernel):
    name = "uniform_cuda_fused"
    priority = 40
    mode = "fused"


class UniformCudaDequantKernel(UniformCudaKernel):
    name = "uniform_cuda_dequant"
    priority = 30
    mode = "dequant"


UNIFORM_CUDA = register_kernel(UniformCudaKernel())
UNIFORM_CUDA_FUSED = register_kernel(UniformCudaFusedKernel())
UNIFORM_CUDA_DEQUANT = register_kernel(UniformCudaDequantKernel())
