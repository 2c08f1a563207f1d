"""CUDA kernels for the ``squeezellm`` format: a fused LUT dequantize-GEMM (codebooks held in registers,
sparse part added in the same kernel) for small batches, and dequantize + cuBLAS for large ones.

Importing this module needs torch only; the extension (ops ``torch.ops.lpq_lut.*``) is built on the
first CUDA forward (``cuda_build.load_lut``). Kernels registered here:

  squeezellm_cuda          (priority 100) m <= LPQ_LUT_FUSED_MAX_M (default 16): the fused kernel
                           (the cp.async ring kernel up to m = 8 and with a sparse part, else the
                           register-prefetch one; LPQ_LUT_VARIANT=ring|first forces one; on sm_90+
                           the ring kernel up to m = 8 is launched with programmatic dependent launch,
                           LPQ_PDL=0 turns it off),
                           else dequantize into a temporary fp16/bf16 weight and call cuBLAS.
  squeezellm_cuda_fused    (priority 40)  always the fused kernel (any m; tests, benchmarks).
  squeezellm_cuda_dequant  (priority 30)  always dequantize + cuBLAS (tests, benchmarks).

All three support bits 2/3/4, fp16 and bf16 activations, any out_features, in_features a multiple of
8 below 2**27 (every shape the format accepts), compute capability >= 8.0; the fused kernel takes a
layer with a sparse part up to in_features 65536 (its entries hold 16-bit columns), and
``squeezellm_cuda`` runs dequantize + cuBLAS at every m on a wider one. ``prepare`` repacks the
canonical tensors once (csrc/squeezellm_kernels.cuh describes the layout) and keeps the result in
``layer.kernel_state``. bf16 activations use the codebooks rounded to bf16, as the reference kernel
does (it rounds the dequantized weight to the activation dtype). The sparse values stay exact in the
dequantize path; the fused kernel adds each as codebook value + a correction rounded to fp16
(``pack_sparse_entries``).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..errors import LpqError
from ..formats.packing import unpack_rows
from . import Kernel, cuda_input_problem, register_kernel
from . import cuda_build
from . import uniform_cuda

STATE_KEY = "squeezellm_cuda"
BITS = (2, 3, 4)
MAX_K = 1 << 27  # in_features limit of the kernels (the binding checks it too)
MAX_SPARSE_K = 1 << 16  # a sparse entry of the fused kernel holds its column in 16 bits
_SLICE = 2048  # output features repacked at a time (bounds the temporary memory of prepare)


def _to_int32(w: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit values -> int32 with the same bits."""
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def pack_row_words(v: torch.Tensor, bits: int) -> torch.Tensor:
    """v [..., 8 (k-tile jj), 4 (e)] indices of one row's 32 columns of a lane in a chunk (column
    32 t + 4 jj + e) -> [..., bits] words (int64 holding uint32), as the decoder reads them."""
    v = v.to(torch.int64)
    e = torch.arange(4, device=v.device, dtype=torch.int64)
    words = []
    if bits == 4:
        for q in range(4):
            a, b = v[..., 2 * q, :], v[..., 2 * q + 1, :]
            w = ((a & 7) << (4 * e)) | ((b & 7) << (16 + 4 * e)) | (((a >> 3) & 1) << (8 * e + 7)) \
                | (((b >> 3) & 1) << (8 * e + 3))
            words.append(w.sum(-1))  # disjoint bits: the sum is the OR
    elif bits == 3:
        extra = torch.cat([v[..., 6, :], v[..., 7, :]], dim=-1)  # [..., 8] indices j = 4 (jj - 6) + e
        j = torch.arange(8, device=v.device, dtype=torch.int64)
        for r in range(3):
            a, b = v[..., 2 * r, :], v[..., 2 * r + 1, :]
            w = ((a & 7) << (4 * e)).sum(-1) + ((b & 7) << (16 + 4 * e)).sum(-1)
            w = w + (((extra >> r) & 1) << (4 * j + 3)).sum(-1)
            words.append(w)
    elif bits == 2:
        shifts = (0, 16, 2, 18)
        for q in range(2):
            w = sum(((v[..., 4 * q + s, :] & 3) << (shifts[s] + 4 * e)).sum(-1) for s in range(4))
            words.append(w)
    else:
        raise ValueError(f"squeezellm kernels hold 2, 3 or 4 bits, got {bits}")
    return torch.stack(words, dim=-1)


def pack_codes(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """idx [ns, K] (ns a multiple of 16) row-major codebook indices -> the kernel's words for these
    ns / 16 n-tiles: int32 [ns / 16, chunks, 64 * bits] (K zero-padded to whole chunks of 128)."""
    ns, k = idx.shape
    chunks = -(-k // 128)
    full = torch.zeros((ns, chunks * 128), dtype=torch.int64, device=idx.device)
    full[:, :k] = idx
    # [nt, rho (row half), g, chunk, t, jj, e] -> [nt, chunk, g, t, rho, jj, e]: lane = 4 g + t
    v = full.view(ns // 16, 2, 8, chunks, 4, 8, 4).permute(0, 3, 2, 4, 1, 5, 6)
    words = pack_row_words(v, bits)  # [nt, chunks, 8, 4, 2, bits]
    words = words.reshape(ns // 16, chunks, 32, 2 * bits)  # per lane: row g's words, then row g+8's
    if bits == 3:
        blk = torch.cat([words[..., :4].reshape(ns // 16, chunks, 128), words[..., 4:].reshape(ns // 16, chunks, 64)], -1)
    else:
        segs = 2 * bits // 4
        blk = words.view(ns // 16, chunks, 32, segs, 4).permute(0, 1, 3, 2, 4).reshape(ns // 16, chunks, 64 * bits)
    return _to_int32(blk)


def pack_tables(lut: torch.Tensor, dtype: torch.dtype, n_pad: int) -> torch.Tensor:
    """lut [N, 2**b] -> int32 [n_pad, 2**b / 2]: per row the low bytes of the entries in dtype (four
    entries a word), then the high bytes. Rows past N are zero."""
    n, c = lut.shape
    bitsv = lut.to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF  # [N, c] bit patterns
    lo, hi = bitsv & 0xFF, bitsv >> 8
    sh = torch.arange(4, device=lut.device, dtype=torch.int64) * 8
    tl = (lo.view(n, c // 4, 4) << sh).sum(-1)
    th = (hi.view(n, c // 4, 4) << sh).sum(-1)
    out = torch.zeros((n_pad, c // 2), dtype=torch.int64, device=lut.device)
    out[:n] = torch.cat([tl, th], dim=1)
    return _to_int32(out)


def _sparse(tensors: dict, k: int, n: int):
    """The CSR part with duplicate positions merged (values summed in fp32, as the reference's
    accumulating index_put does) -> rows, cols (int64, row-major order), vals (fp32); or None."""
    if "sp_val" not in tensors or tensors["sp_val"].numel() == 0:
        return None
    rowptr = tensors["sp_rowptr"].long()
    rows = torch.repeat_interleave(torch.arange(n, device=rowptr.device), rowptr[1:] - rowptr[:-1])
    lin = rows * k + tensors["sp_col"].long()
    uniq, inv = torch.unique(lin, sorted=True, return_inverse=True)
    vals = torch.zeros(uniq.numel(), dtype=torch.float32, device=lin.device).index_add_(0, inv, tensors["sp_val"].float())
    return uniq // k, uniq % k, vals


def pack_sparse_entries(cols: torch.Tensor, vals: torch.Tensor, dense_there: torch.Tensor) -> torch.Tensor:
    """The fused kernel's sparse entries (int32): column (< 65536) in the low 16 bits, and in the high 16
    the fp16 bits of the correction vals - dense_there (the exact value minus the codebook value the
    dense product uses at that position). The correction is rounded to fp16: the weight the kernel
    applies there is dense_there + fp16(vals - dense_there), within 2**-11 of |vals - dense_there| of the
    exact value (an outlier's own fp16 rounding is as large)."""
    delta = (vals - dense_there).to(torch.float16)
    if not bool(torch.isfinite(delta).all()):
        raise LpqError("squeezellm sparse part: a value minus its codebook value overflows float16; "
                       "requantize the layer (its weights exceed the float16 range)")
    bits = delta.view(torch.int16).to(torch.int64) & 0xFFFF
    return _to_int32(cols.to(torch.int64) | (bits << 16)).contiguous()


def fused_problem(st: dict) -> str | None:
    """Why the fused kernel cannot run this state (None: it can)."""
    return _wide_sparse(st["k"], st["sp_ptr"] is not None)


def _wide_sparse(k: int, sparse: bool) -> str | None:
    if sparse and k > MAX_SPARSE_K:
        return f"in_features={k} with a sparse part: the fused kernel holds columns below {MAX_SPARSE_K}"
    return None


def repack(tensors: dict[str, torch.Tensor], spec, k: int, n: int) -> dict:
    """The canonical squeezellm tensors -> the kernels' state (see csrc/squeezellm_kernels.cuh)."""
    bits = spec.bits
    qweight, lut = tensors["qweight"], tensors["lut"]
    dev = qweight.device
    n_pad = -(-n // 16) * 16
    n_tiles = n_pad // 16
    sparse = _sparse(tensors, k, n)
    blocks, sp_idx = [], None
    if sparse is not None:
        rows, cols, vals = sparse
        sp_idx = torch.empty_like(rows)
    for n0 in range(0, n_pad, _SLICE):
        n1 = min(n0 + _SLICE, n_pad)
        idx = torch.zeros((n1 - n0, k), dtype=torch.int64, device=dev)
        if n0 < n:
            part = unpack_rows(qweight[:, n0:min(n1, n)], bits, k).t().long()  # [ns, K]
            idx[: part.shape[0]] = part
            if sparse is not None:  # the dense index stored at each sparse position of these rows
                sel = (rows >= n0) & (rows < min(n1, n))
                sp_idx[sel] = part[rows[sel] - n0, cols[sel]]
        blocks.append(pack_codes(idx, bits))
        del idx
    st = {"qw": torch.cat(blocks, 0).contiguous().view(-1), "bits": bits, "n": n, "k": k, "n_tiles": n_tiles,
          "tab": {torch.float16: pack_tables(lut, torch.float16, n_pad),
                  torch.bfloat16: pack_tables(lut, torch.bfloat16, n_pad)},
          "sp_ptr": None, "sp_e": {}, "sp_rows": None, "sp_cols": None, "sp_vals": None}
    if sparse is not None:
        # entries in row-major order (as _sparse returns them); sp_ptr [n_pad + 1]: first entry of each
        # row, so a tile's entries are sp_ptr[16 t] .. sp_ptr[16 t + 16]
        counts = torch.bincount(rows, minlength=n_pad)
        row_ptr = torch.zeros(n_pad + 1, dtype=torch.int64, device=dev)
        row_ptr[1:] = torch.cumsum(counts, 0)
        st["sp_ptr"] = row_ptr.to(torch.int32)
        if k <= MAX_SPARSE_K:  # wider layers keep only the CSR part, for the dequantize path
            for dt in (torch.float16, torch.bfloat16):
                st["sp_e"][dt] = pack_sparse_entries(cols, vals, lut.to(dt).float()[rows, sp_idx])
        st.update(sp_rows=rows, sp_cols=cols, sp_vals=vals)
    return st


def _fused_max_m() -> int:
    try:
        return int(os.environ.get("LPQ_LUT_FUSED_MAX_M", "16"))
    except ValueError:
        return 16


def default_warps(st: dict, m: int, variant: int = 0) -> int:
    """Warps per block (one 16-row tile each, splitting K). The ring kernel: 8, but 4 at m = 1 on a dense-only
    layer with few tiles and a short K (<= 512 tiles, <= 64 chunks of 128: 4096x4096, 8192x8192). The first
    kernel: 8 when the tiles are few, so that each SM has enough loads in flight; 4 when there are many tiles
    and K is short. LPQ_LUT_WARPS forces one."""
    forced = os.environ.get("LPQ_LUT_WARPS")
    if forced and forced.isdigit() and 1 <= int(forced) <= 8:
        return int(forced)
    chunks = -(-st["k"] // 128)
    if variant == 0:
        # two H100 sweeps (round 9 and 2026-11-24): dense 8192x8192 3-bit 13.5 us with 4 warps against 14.4 with
        # 8, 4-bit 18.8-18.9 against 19.9-20.3; 4096x4096 4-bit 7.05 against 7.33; every other shape, and every
        # layer with a sparse part, ties or wants 8
        dense = st.get("sp_ptr") is None
        return 4 if m == 1 and dense and st["n_tiles"] <= 512 and chunks <= 64 else 8
    return 4 if st["n_tiles"] >= 1024 and chunks <= 64 else 8


VARIANTS = {"ring": 0, "first": 1}  # the cp.async ring kernel; the first, register-prefetch kernel
RING_MAX_M = 8  # above this, on a dense-only layer, the first kernel (16 tokens a block, codes read once) is faster


def default_variant(m: int = 1, sparse: bool = False) -> int:
    """The fused kernel for m tokens: the ring kernel up to RING_MAX_M and on layers with a sparse part
    (its per-row sparse sums beat the first kernel's atomics at every m), else the first kernel
    (bench/RESULTS.md, "Kernels (squeezellm LUT)"). LPQ_LUT_VARIANT=ring|first forces one."""
    name = os.environ.get("LPQ_LUT_VARIANT")
    if name is None:
        return VARIANTS["ring"] if m <= RING_MAX_M or sparse else VARIANTS["first"]
    if name not in VARIANTS:
        raise LpqError(f"LPQ_LUT_VARIANT={name!r} is not known: choose {', '.join(VARIANTS)}")
    return VARIANTS[name]


# Or-ed into the ring variant: launched with programmatic dependent launch (csrc/squeezellm_launch.h kLutVariantPDL),
# its grid padded for an even placement as the uniform kernel's (csrc/async_copy.cuh). The ring kernel requests its
# first codes, codebooks and sparse row pointers before it waits for the kernel ahead of it. On by default with the
# uniform kernels' switch (LPQ_PDL=0 turns both off): at m = 1 on every layer, at m = 2..PDL_MAX_M on dense-only ones.
# H100, balanced placement: m = 1 faster or level on every shape and format measured (4096x11008 3-bit dense 9.9 ->
# 8.7 us); m = 4 and 8 faster on every dense-only layer, but a layer with a sparse part lost on two shapes of six at
# each (8192x8192 m = 8: 30.9 -> 33.1 us), bench/RESULTS.md.
PDL_FLAG = 8
PDL_MAX_M = 8
# Or-ed in with PDL_FLAG (csrc/squeezellm_launch.h kLutVariantEarly): the ring kernel lets the next kernel launch right
# after its own griddepcontrol.wait (the early trigger), at m = 1 for the code widths whose key (s2, s3, s4) is in
# uniform_cuda.PDL_EARLY (LPQ_PDL_EARLY).
EARLY_FLAG = 16


def with_default_pdl(variant: int, m: int, sparse: bool = False, bits: int | None = None) -> int:
    """The variant as gemm launches it when the caller did not choose: the ring kernel with PDL_FLAG where programmatic
    dependent launch is on (uniform_cuda.PDL): m = 1, or m <= PDL_MAX_M on a dense-only layer; with EARLY_FLAG too at
    m = 1 where the early trigger is on for ``bits`` (uniform_cuda.takes_early)."""
    on = uniform_cuda.PDL and variant == VARIANTS["ring"] and (m == 1 or (m <= PDL_MAX_M and not sparse))
    if not on:
        return variant
    return variant | PDL_FLAG | (EARLY_FLAG if m == 1 and uniform_cuda.takes_early(f"s{bits}") else 0)


GEMM_CODES = (*VARIANTS.values(), VARIANTS["ring"] | PDL_FLAG, VARIANTS["ring"] | PDL_FLAG | EARLY_FLAG)


def gemm(st: dict, x2: torch.Tensor, bias: torch.Tensor | None, warps: int | None = None,
         variant: int | None = None) -> torch.Tensor:
    """x2 [m, K] fp16/bf16 -> [m, N] through the fused LUT kernel (dense + sparse + bias); the op makes
    a contiguous, 16-byte aligned copy of x where it needs one. variant: 0 the ring kernel, 1 the first
    kernel (csrc/squeezellm_kernels.cuh), 0 | PDL_FLAG the ring kernel with programmatic dependent launch, and
    | EARLY_FLAG with its early trigger; None: default_variant(m), with PDL where with_default_pdl says."""
    k, n = st["k"], st["n"]
    if x2.dim() != 2 or x2.shape[1] != k:
        raise ValueError(f"lpq lut_gemm: x must be [m, {k}], got {list(x2.shape)}")
    if x2.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"lpq lut_gemm: activations must be float16 or bfloat16, got {x2.dtype}")
    if not x2.is_cuda or x2.device != st["qw"].device:
        raise ValueError(f"lpq lut_gemm: x is on {x2.device}, the weights on {st['qw'].device}")
    if bias is not None and (bias.dtype != x2.dtype or bias.numel() != n or not bias.is_contiguous()):
        raise ValueError(f"lpq lut_gemm: bias must be a contiguous [{n}] tensor of dtype {x2.dtype}")
    if variant is None:
        sparse = st["sp_ptr"] is not None
        variant = with_default_pdl(default_variant(x2.shape[0], sparse), x2.shape[0], sparse, st["bits"])
    if variant not in GEMM_CODES:
        raise ValueError(f"lpq lut_gemm: variant must be one of {sorted(VARIANTS.values())}, "
                         f"{VARIANTS['ring'] | PDL_FLAG} (ring, programmatic dependent launch) or "
                         f"{VARIANTS['ring'] | PDL_FLAG | EARLY_FLAG} (the same with the early trigger), got {variant}")
    if warps is None:
        warps = default_warps(st, x2.shape[0], variant & ~(PDL_FLAG | EARLY_FLAG))
    if not 1 <= warps <= 8:
        raise ValueError(f"lpq lut_gemm: warps must be in 1..8, got {warps}")
    problem = fused_problem(st)
    if problem:
        raise ValueError(f"lpq lut_gemm: {problem}")
    sp_e = st["sp_e"][x2.dtype] if st["sp_ptr"] is not None else None
    return torch.ops.lpq_lut.lut_gemm(x2, st["qw"], st["tab"][x2.dtype], st["sp_ptr"], sp_e, bias,
                                      st["bits"], n, k, warps, variant)


def dequant(st: dict, dtype: torch.dtype) -> torch.Tensor:
    """The weight [N, K] in dtype: codebook values by the CUDA kernel, then the exact sparse values."""
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"lpq lut_dequant: dtype must be float16 or bfloat16, got {dtype}")
    w = torch.ops.lpq_lut.lut_dequant(st["qw"], st["tab"][dtype], st["bits"], st["n"], st["k"], dtype == torch.bfloat16)
    if st["sp_rows"] is not None:
        w[st["sp_rows"], st["sp_cols"]] = st["sp_vals"].to(dtype)  # the dense part is zero there
    return w


def _has_sparse(layer) -> bool:
    sp = getattr(layer, "sp_val", None)  # the canonical CSR values (a buffer of the layer)
    return sp is not None and sp.numel() > 0


class SqueezeLLMCudaKernel(Kernel):
    name = "squeezellm_cuda"
    formats = ("squeezellm",)
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
        if layer.spec.bits not in BITS:
            return f"bits={layer.spec.bits} not supported (2, 3, 4)"
        k = layer.in_features
        if k % 8:
            return f"in_features={k} is not a multiple of 8"
        if k >= MAX_K:
            return f"in_features={k} is too large (below {MAX_K})"
        if x.shape[-1] != k:
            return f"input has {x.shape[-1]} features, the layer {k}"
        reason = _wide_sparse(k, _has_sparse(layer)) if self.mode == "fused" else None
        if reason:
            return reason
        if not cuda_build.load_lut():
            return f"CUDA extension unavailable: {cuda_build.lut_failure_reason()}"
        return None

    def prepare(self, layer) -> None:
        if STATE_KEY not in layer.kernel_state:
            with torch.no_grad():
                layer.kernel_state[STATE_KEY] = repack(layer.tensors(), layer.spec, layer.in_features, layer.out_features)

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        st = layer.kernel_state.get(STATE_KEY)
        if st is None:
            self.prepare(layer)
            st = layer.kernel_state[STATE_KEY]
        k, n = st["k"], st["n"]
        x2 = x.reshape(-1, k)
        # no alignment fix-up here: the op copies an unaligned x itself (data_ptr() would break torch.compile)
        bias = layer.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        m = x2.shape[0]
        if self.mode == "fused" or (self.mode == "auto" and m <= _fused_max_m() and fused_problem(st) is None):
            y = gemm(st, x2, bias.contiguous() if bias is not None else None)
        else:
            y = F.linear(x2, dequant(st, x.dtype), bias)
        return y.reshape(*x.shape[:-1], n)


class SqueezeLLMCudaFusedKernel(SqueezeLLMCudaKernel):
    name = "squeezellm_cuda_fused"
    priority = 40
    mode = "fused"


class SqueezeLLMCudaDequantKernel(SqueezeLLMCudaKernel):
    name = "squeezellm_cuda_dequant"
    priority = 30
    mode = "dequant"


SQUEEZELLM_CUDA = register_kernel(SqueezeLLMCudaKernel())
SQUEEZELLM_CUDA_FUSED = register_kernel(SqueezeLLMCudaFusedKernel())
SQUEEZELLM_CUDA_DEQUANT = register_kernel(SqueezeLLMCudaDequantKernel())
