"""lpq's CUDA kernels for the uniform format against the pure-torch reference.

The GPU tests skip without CUDA (CI has no GPU); the CPU tests check the import, the fallback to the
reference kernel, and the repacked layout (decoded here independently, following the rules the CUDA
decoder follows, and compared with the canonical codes).
"""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

import lpq.kernels as K
from lpq.errors import LpqError
from lpq.formats.uniform import UNIFORM, pack_uniform
from conftest import assert_pdl_chain_matches_plain
from lpq.kernels import cuda_build, uniform_cuda
from lpq.kernels.w3_layout import W3_SLOTS, W3_SPARE_BITS
from lpq.nn import QuantizedLinear
from lpq.spec import QuantSpec

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (CI has none); run on the device")

BITS = (2, 3, 4, 8)
GROUPS = (32, 64, 128, -1)
M_VALUES = (1, 2, 3, 7, 16, 17, 64, 2048)


def random_qweight(n: int, k: int, spec: QuantSpec, device="cpu", gen=None):
    """Fresh random codes/scales/zeros packed in the uniform format (act-order: a random g_idx)."""
    maxq = (1 << spec.bits) - 1
    gs = k if spec.group_size == -1 else spec.group_size
    g = -(-k // gs)
    codes = torch.randint(0, maxq + 1, (n, k), generator=gen, dtype=torch.int32)
    scales = (torch.rand((g, n), generator=gen) * 0.02 + 0.002).to(torch.float16)
    if spec.sym:
        zeros = torch.full((g, n), (maxq + 1) // 2, dtype=torch.int32)
    else:
        zeros = torch.randint(0, maxq + 1, (g, n), generator=gen, dtype=torch.int32)
    g_idx = None
    if spec.act_order:
        perm = torch.randperm(k, generator=gen)
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[perm] = (torch.arange(k) // gs).to(torch.int32)
    qw = pack_uniform(codes, scales, zeros, spec, g_idx=g_idx)
    qw.tensors = {name: t.to(device) for name, t in qw.tensors.items()}
    return qw


# --------------------------------------------------------------------------------------------- CPU


def test_import_and_fallback_without_cuda(monkeypatch):
    """Importing never builds; without CUDA the reference runs; the build failure warns once."""
    assert "uniform_cuda" in K.available_kernels()
    monkeypatch.delenv("LPQ_KERNEL", raising=False)
    spec = QuantSpec(bits=4, group_size=32)
    qw = random_qweight(24, 64, spec)
    layer = QuantizedLinear.from_quantized(qw, None, torch.float32)
    x = torch.randn(3, 64)
    kernel = K.select_kernel(layer, x)
    assert kernel.name == "reference"
    assert uniform_cuda.UNIFORM_CUDA.why_not(layer, x) is not None
    ref = x @ UNIFORM.dequantize(qw.tensors, spec, 64, 24).t()
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    # a machine without CUDA: load() says no, with exactly one warning however often it is asked
    monkeypatch.setattr(cuda_build.UNIFORM, "state", {"tried": False, "ok": False, "reason": None})
    monkeypatch.setattr(cuda_build, "unavailable_reason", lambda: "CUDA is not available")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert cuda_build.load() is False
        assert cuda_build.load() is False
    assert len([w for w in rec if "lpq: CUDA kernels unavailable" in str(w.message)]) == 1


def decode_repacked(st: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of the repack, written from the decoder's rules: -> codes [N, K], scales [G, N], zeros [G, N]."""
    bits, fold, n, k = st["bits"], st["fold"], st["n"], st["k"]
    tpf = fold // 16
    qw = st["qw"].to(torch.int64) & 0xFFFFFFFF
    nt = st["sc"].shape[1]
    chunks = -(-k // 128)
    blk = qw.view(nt, chunks, 64 * bits)
    if bits == 3:
        seg = blk[..., :128].reshape(nt, chunks, 32, 4)
        tail = blk[..., 128:].reshape(nt, chunks, 32, 2)
        words = torch.cat([seg, tail], dim=-1)
    else:
        words = blk.view(nt, chunks, 2 * bits // 4, 32, 4).permute(0, 1, 3, 2, 4).reshape(nt, chunks, 32, 2 * bits)
    codes = torch.zeros((nt * 16, chunks * 128), dtype=torch.int64)
    lanes = torch.arange(32)
    g, t = lanes // 4, lanes % 4
    for p in range(32):
        j, r = p // 4, p % 4
        if bits in (2, 4):
            w = words[..., p // (16 // bits)]
            sh = bits * (p % (16 // bits))
            lo, hi = (w >> sh) & ((1 << bits) - 1), (w >> (sh + 16)) & ((1 << bits) - 1)
        elif bits == 8:
            w = words[..., p // 2]
            i = p % 2
            lo, hi = (w >> (8 * i)) & 255, (w >> (8 * i + 16)) & 255
        elif st["w3_layout"] == "fields":  # 3 bits: five fields + a spare bit per half (w3_layout.py)
            base, i = 3 * (p // 16), p % 16
            if i < 15:
                word, shift, pos = W3_SLOTS[i]
                w = words[..., base + word]
                lo, hi = (w >> (shift + pos)) & 7, (w >> (shift + pos + 16)) & 7
            else:
                lo = sum(((words[..., base + b] >> bit) & 1) << b for b, bit in enumerate(W3_SPARE_BITS))
                hi = sum(((words[..., base + b] >> (bit + 16)) & 1) << b for b, bit in enumerate(W3_SPARE_BITS))
        else:  # 3 bits, LPQ_W3_LAYOUT=planes
            w = words[..., p // 8]
            sh = 2 * (p % 8)
            h = words[..., 4 + p // 16]
            i = p % 16
            lo = ((w >> sh) & 3) | (((h >> i) & 1) << 2)
            hi = ((w >> (sh + 16)) & 3) | (((h >> (i + 16)) & 1) << 2)
        f, jj = j // tpf, j % tpf
        for e, val in ((0, lo), (1, hi)):
            rows = (torch.arange(nt).view(nt, 1, 1) * 16 + (g + 8 * (r & 1)).view(1, 1, 32)).expand(nt, chunks, 32)
            cols = (torch.arange(chunks).view(1, chunks, 1) * 128 + f * fold + t.view(1, 1, 32) * (fold // 4)
                    + 4 * jj + 2 * (r >> 1) + e).expand(nt, chunks, 32)
            codes[rows.reshape(-1), cols.reshape(-1)] = val.reshape(-1)
    sc = st["sc"].contiguous().view(torch.float16).view(-1, nt, 8, 2)  # [G, nt, g, (row g, row g+8)]
    scales = sc.permute(0, 1, 3, 2).reshape(-1, nt * 16)
    zp = st["zp"].contiguous().view(torch.uint8).view(-1, nt, 8, 2)
    zeros = zp.permute(0, 1, 3, 2).reshape(-1, nt * 16).to(torch.int32)
    return codes[:n, :k].to(torch.int32), scales[:, :n], zeros[:, :n]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("gs", GROUPS)
@pytest.mark.parametrize("shape", [(40, 320), (16, 128)])
def test_repack_layout_cpu(bits, gs, shape):
    n, k = shape
    spec = QuantSpec(bits=bits, group_size=gs, act_order=(gs == 64))
    gen = torch.Generator().manual_seed(bits * 1000 + gs + n)
    qw = random_qweight(n, k, spec, gen=gen)
    st = uniform_cuda.repack(qw.tensors, spec, k, n)
    codes, scales, zeros, g_idx = UNIFORM.unpack(qw.tensors, spec, k, n)
    if st["perm"] is not None:
        codes = codes[:, st["perm"]]
    got_codes, got_scales, got_zeros = decode_repacked(st)
    assert torch.equal(got_codes, codes)
    assert torch.equal(got_scales, scales)
    assert torch.equal(got_zeros, zeros)


# --------------------------------------------------------------------------------------------- GPU


def poison_cache(numel: int, dtype) -> None:
    """Fill freshly freed allocator memory with NaN so that outputs the kernel leaves unwritten show."""
    torch.empty(numel, dtype=dtype, device="cuda").fill_(float("nan"))


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


TOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}  # bf16: its own output rounding is 2**-9


def run_layer(layer, x, kernel_name, monkeypatch):
    monkeypatch.setenv("LPQ_KERNEL", kernel_name)
    layer._kernel = None
    poison_cache(x.shape[0] * layer.out_features * 4 + (1 << 16), x.dtype)
    y = layer(x)
    torch.cuda.synchronize()
    return y


def check_layer(qw, dtype, m_values, kernels, monkeypatch, bias=False, gen=None):
    n, k = qw.out_features, qw.in_features
    w_ref = UNIFORM.dequantize(qw.tensors, qw.spec, k, n).float()
    # the dequantize + cuBLAS path rounds the weights to the activation dtype by design: its reference
    # is those rounded weights (in fp32 maths), so that a small output (N=1) is not judged on that rounding
    w_rounded = w_ref.to(dtype).float()
    b = (torch.randn(n, generator=gen) * 0.1).to(dtype).cuda() if bias else None
    layer = QuantizedLinear.from_quantized(qw, b, dtype)
    for m in m_values:
        x = torch.randn((m, k), generator=gen).to(dtype).cuda()
        refs = {}
        for key, w in (("fused", w_ref), ("dequant", w_rounded)):
            refs[key] = x.float() @ w.t() + (b.float() if b is not None else 0)
        for name in kernels:
            dq = name == "uniform_cuda_dequant" or (name == "uniform_cuda" and m > uniform_cuda._fused_max_m())
            ref = refs["dequant" if dq else "fused"]
            y = run_layer(layer, x, name, monkeypatch)
            assert y.shape == (m, n) and y.dtype == dtype
            assert torch.isfinite(y).all(), f"{name} m={m}: unwritten (NaN) outputs"
            err = rel_err(y, ref)
            assert err < TOL[dtype], f"{name} m={m} {qw.spec.label()} {dtype}: rel err {err:.2e}"


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("gs", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_kernels_match_reference(bits, gs, sym, dtype, monkeypatch):
    """Every kernel, every m, on a shape that hits tile edges (N=200: 12.5 n-tiles; K=320: 2.5 chunks,
    a shorter last group at g128)."""
    gen = torch.Generator().manual_seed(hash((bits, gs, sym, str(dtype))) % 2**31)
    spec = QuantSpec(bits=bits, group_size=gs, sym=sym)
    qw = random_qweight(200, 320, spec, device="cuda", gen=gen)
    check_layer(qw, dtype, M_VALUES, ["uniform_cuda", "uniform_cuda_fused", "uniform_cuda_dequant"], monkeypatch, gen=gen)


def check_variant(st: dict, x: torch.Tensor, w_ref: torch.Tensor, variant: int, label: str) -> None:
    """One fused-kernel variant, called directly with 4 and 8 warps, against x @ w_ref^T; the output
    memory is poisoned before each call so that unwritten elements show as non-finite."""
    assert cuda_build.load(), cuda_build.failure_reason()  # when this test runs first
    ref = x.float() @ w_ref.t()
    for warps in (4, 8):
        poison_cache(x.shape[0] * w_ref.shape[0] * 4 + (1 << 16), x.dtype)
        y = uniform_cuda.gemm(st, x, None, warps=warps, variant=variant)
        torch.cuda.synchronize()
        assert torch.isfinite(y).all(), f"v{variant} w{warps} {label}: unwritten outputs"
        err = rel_err(y, ref)
        assert err < TOL[x.dtype], f"v{variant} w{warps} {label}: rel err {err:.2e}"


# the two-chunk variants also launched with programmatic dependent launch (uniform_cuda.PDL_FLAG)
PDL_VARIANTS = (4 | uniform_cuda.PDL_FLAG, 5 | uniform_cuda.PDL_FLAG)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("variant", uniform_cuda.GEMM_VARIANTS + PDL_VARIANTS)
@pytest.mark.parametrize("bits", BITS)
def test_every_fused_variant_matches_reference(bits, variant):
    """Each fused-kernel variant called directly (the automatic rule only picks some of them), every
    group size, sym/asym, fp16/bf16, 4 and 8 warps, small m, on shapes with half tiles, half chunks and
    a short last group; outputs poisoned before each call."""
    gen = torch.Generator().manual_seed(bits * 10 + variant)
    for (n, k), gs, sym, dtype in [((200, 320), gs, sym, dt) for gs in GROUPS for sym in (False, True)
                                   for dt in (torch.float16, torch.bfloat16)] + [((48, 4104), 128, False, torch.float16)]:
        k = -(-k // {2: 16, 3: 32, 4: 8, 8: 8}[bits]) * {2: 16, 3: 32, 4: 8, 8: 8}[bits]
        qw = random_qweight(n, k, QuantSpec(bits=bits, group_size=gs, sym=sym), device="cuda", gen=gen)
        st = uniform_cuda.repack(qw.tensors, qw.spec, k, n)
        w_ref = UNIFORM.dequantize(qw.tensors, qw.spec, k, n).float()
        for m in (1, 3, 8, 16):
            x = torch.randn((m, k), generator=gen).to(dtype).cuda()
            check_variant(st, x, w_ref, variant, f"{qw.spec.label()} {n}x{k} m={m} {dtype}")


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("variant", [v for v in uniform_cuda.GEMM_VARIANTS if v in (0, 4, 5)] + list(PDL_VARIANTS))
def test_two_chunk_variants_long_groups(variant):
    """Variants 4/5 find the group of each fold of a two-chunk stage by a multiply (umulhi): groups
    longer than a stage (256, 1024 columns), a short last group, an odd chunk count (K = 2944: 23
    chunks, so the last stage's second chunk does not exist) and per-channel; variant 0 beside them
    as a control. fp16 and bf16, m = 1 (the one-row kernel) and 5, 4 and 8 warps, outputs poisoned."""
    gen = torch.Generator().manual_seed(400 + variant)
    n, k = 64, 2944
    for bits in (2, 3, 4, 8):
        for gs in (256, 1024, -1):
            qw = random_qweight(n, k, QuantSpec(bits=bits, group_size=gs), device="cuda", gen=gen)
            st = uniform_cuda.repack(qw.tensors, qw.spec, k, n)
            w_ref = UNIFORM.dequantize(qw.tensors, qw.spec, k, n).float()
            for dtype in (torch.float16, torch.bfloat16):
                for m in (1, 5):
                    x = torch.randn((m, k), generator=gen).to(dtype).cuda()
                    check_variant(st, x, w_ref, variant, f"{qw.spec.label()} {n}x{k} m={m} {dtype}")


def test_default_pdl_rule(monkeypatch):
    """LPQ_PDL: unset -> programmatic dependent launch for variants 4 and 5 at m = 1 and variant 0 at m = 9..16 with
    balanced placement, for variant 5 alone at m = 1 without it (LPQ_PDL_BALANCE=0: variant 4 lost at W3/W2 on
    8192x28672, bench/RESULTS.md round 11); "0" -> none; "1" -> variants 4 and 5 up to m = 8; never variants 1-3.
    The early trigger goes with it on variants 4 and 5 only, for the code widths LPQ_PDL_EARLY names."""
    assert uniform_cuda.pdl_settings(None) == (True, {4: (1, 1), 5: (1, 1), 0: (9, 16)})
    assert uniform_cuda.pdl_settings("", "1") == uniform_cuda.pdl_settings(None)
    assert uniform_cuda.pdl_settings(None, "0") == (True, {5: (1, 1)})
    assert uniform_cuda.pdl_settings("0") == (False, {})
    assert uniform_cuda.pdl_settings("1", "0") == (True, {4: (1, 8), 5: (1, 8), 0: (9, 16)})
    flag, early = uniform_cuda.PDL_FLAG, uniform_cuda.EARLY_FLAG
    cases = (((None, None), {(4, 1): 4 | flag, (5, 1): 5 | flag, (0, 9): 0 | flag, (0, 16): 0 | flag}),
             ((None, "0"), {(5, 1): 5 | flag}),
             (("0", None), {}),
             (("1", None), {(4, 1): 4 | flag, (4, 8): 4 | flag, (5, 1): 5 | flag, (5, 8): 5 | flag, (0, 9): 0 | flag,
                            (0, 16): 0 | flag}))
    for envs, want in cases:
        on, rules = uniform_cuda.pdl_settings(*envs)
        monkeypatch.setattr(uniform_cuda, "PDL", on)
        monkeypatch.setattr(uniform_cuda, "PDL_RULES", rules)
        for early_env in ("0", "1", "4", "3,4", "w2,s4,p161"):
            keys = uniform_cuda.early_kernels(early_env)
            monkeypatch.setattr(uniform_cuda, "PDL_EARLY", keys)
            for bits in (2, 3, 4, 8):
                for variant in uniform_cuda.GEMM_VARIANTS:
                    for m in (1, 8, 9, 16, 17):
                        got = uniform_cuda.with_default_pdl(variant, m, bits)
                        expect = want.get((variant, m), variant)
                        if f"w{bits}" in keys and expect & flag and variant in (4, 5):
                            expect |= early
                        assert got == expect, (envs, early_env, bits, variant, m)
                        assert uniform_cuda._valid_variant(got)


def test_early_trigger_setting(caplog):
    """LPQ_PDL_EARLY: unset -> the default keys; 0 -> none; 1 -> every kernel key; a list of keys (a bare width N
    meaning wN) -> those; anything else is logged and read as unset."""
    early = uniform_cuda.early_kernels
    assert early(None) == early("") == uniform_cuda.DEFAULT_EARLY
    assert early("0") == frozenset()
    assert early("1") == {"w2", "w3", "w4", "s2", "s3", "s4", "p161"}
    assert early("4") == {"w4"} and early(" 3,4") == {"w3", "w4"}
    assert early("w4,S3, p161") == {"w4", "s3", "p161"}
    assert uniform_cuda.early_words(early("p161,s3,4")) == "W4/S3/P161"
    with caplog.at_level("WARNING", logger="lpq.kernels"):
        assert early("8") == uniform_cuda.DEFAULT_EARLY
        assert early("yes") == uniform_cuda.DEFAULT_EARLY
        assert early("s8") == uniform_cuda.DEFAULT_EARLY
    assert sum("LPQ_PDL_EARLY" in r.getMessage() for r in caplog.records) == 3


def test_default_variant_rule():
    """The automatic choice is always a variant the kernels have, with 4 or 8 warps; the round-5 picks on
    the measured shapes; above m = 8 never a two-chunk variant."""
    def st_of(bits, n, k):
        return {"bits": bits, "n": n, "k": k, "sc": torch.zeros(1, -(-n // 32) * 2, 8)}

    for bits in BITS:
        for n, k in ((200, 4096), (4096, 4096), (28672, 8192), (8192, 28672), (4096, 11008)):
            st = st_of(bits, n, k)
            for m in (1, 2, 4, 5, 8, 9, 16, 17, 64):
                v = uniform_cuda.default_variant(st, m)
                assert v in uniform_cuda.GEMM_VARIANTS
                assert v in (0, 1) if m > 8 else (v == 0 if bits == 8 else v in (3, 4, 5))
                assert uniform_cuda.default_warps(st, m, v) in (4, 8)
    # the measured winners (bench/RESULTS.md "round 5")
    pick = uniform_cuda.default_variant
    # taller than wide: 4 warps for 2-/3-bit codes since round 14 (TALL_LOW_BIT_WARPS), 8 for 4-bit
    assert (pick(st_of(3, 28672, 8192), 1), uniform_cuda.default_warps(st_of(3, 28672, 8192), 1, 5)) == (
        5, uniform_cuda.TALL_LOW_BIT_WARPS)
    assert uniform_cuda.default_warps(st_of(4, 11008, 4096), 1, 5) == 8
    assert uniform_cuda.tall_low_bit_warps(None) == 4 and uniform_cuda.tall_low_bit_warps("8") == 8
    assert uniform_cuda.tall_low_bit_warps("6") == 4  # logged, read as unset
    assert (pick(st_of(2, 8192, 28672), 1), uniform_cuda.default_warps(st_of(2, 8192, 28672), 1, 4)) == (4, 4)
    assert (pick(st_of(4, 8192, 28672), 1), uniform_cuda.default_warps(st_of(4, 8192, 28672), 1, 5)) == (5, 4)
    assert pick(st_of(3, 28672, 8192), 8) == 3 and pick(st_of(4, 28672, 8192), 8) == 4
    # wider than tall but K < 3 N (4096x11008): 8 warps for 2-/3-bit codes, 4 for 4-bit (measured 2026-11-24)
    for bits, warps in ((2, 8), (3, 8), (4, 4)):
        st = st_of(bits, 4096, 11008)
        assert (pick(st, 1), uniform_cuda.default_warps(st, 1, 5)) == (5, warps)


def test_unknown_variant_is_refused_before_the_op():
    """A variant number the kernels do not have is a ValueError from the wrapper, before any CUDA call
    (a failing check inside the op ends the process, bench/NOTES-kernels.md)."""
    st = {"k": 64, "qw": torch.zeros(1, dtype=torch.int32)}
    with pytest.raises(ValueError, match="variant"):
        uniform_cuda.gemm(st, torch.zeros(1, 64, dtype=torch.float16), None, variant=len(uniform_cuda.GEMM_VARIANTS))
    # the programmatic-launch flag rides on variants 0, 4 and 5 only, the early trigger on 4 and 5 with it
    flag, early = uniform_cuda.PDL_FLAG, uniform_cuda.EARLY_FLAG
    for bad in (-1, 1 | flag, 3 | flag, len(uniform_cuda.GEMM_VARIANTS) | flag, 2 * flag, 4 | early, flag | early,
                3 * flag):
        with pytest.raises(ValueError, match="variant"):
            uniform_cuda.gemm(st, torch.zeros(1, 64, dtype=torch.float16), None, variant=bad)
    assert all(uniform_cuda._valid_variant(v) for v in (0 | flag, 4 | flag, 5 | flag, 4 | flag | early, 5 | flag | early))


EDGE_SHAPES = [(1, 128), (16, 128), (17, 136), (33, 576), (100, 1000), (4100, 256), (48, 4104), (576, 1536)]


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("shape", EDGE_SHAPES)
@pytest.mark.parametrize("bits", BITS)
def test_tile_edges(bits, shape, monkeypatch):
    n, k = shape
    per_chunk = {2: 16, 3: 32, 4: 8, 8: 8}[bits]
    k = -(-k // per_chunk) * per_chunk
    gen = torch.Generator().manual_seed(n * 7 + k + bits)
    for gs in (32, 128, -1):
        qw = random_qweight(n, k, QuantSpec(bits=bits, group_size=gs), device="cuda", gen=gen)
        check_layer(qw, torch.float16, (1, 5, 16, 40, 300), ["uniform_cuda_fused", "uniform_cuda_dequant"], monkeypatch,
                    bias=True, gen=gen)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("gs", [32, 128])
def test_act_order(bits, gs, monkeypatch):
    gen = torch.Generator().manual_seed(bits + gs)
    spec = QuantSpec(bits=bits, group_size=gs, act_order=True)
    qw = random_qweight(96, 512, spec, device="cuda", gen=gen)
    check_layer(qw, torch.float16, (1, 16, 64, 2048), ["uniform_cuda", "uniform_cuda_fused", "uniform_cuda_dequant"],
                monkeypatch, gen=gen)


@needs_cuda
@pytest.mark.cuda
def test_large_shape_m1(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    for bits, gs in ((4, 128), (3, 128), (2, 64)):
        qw = random_qweight(11008, 4096, QuantSpec(bits=bits, group_size=gs), device="cuda", gen=gen)
        check_layer(qw, torch.float16, (1, 16), ["uniform_cuda"], monkeypatch, gen=gen)


@needs_cuda
@pytest.mark.cuda
def test_unsupported_raise_readable_errors(monkeypatch):
    # group size 16 is not supported by the CUDA kernels: forcing one says why; auto picks the reference
    qw = random_qweight(32, 64, QuantSpec(bits=4, group_size=16), device="cuda")
    layer = QuantizedLinear.from_quantized(qw, None, torch.float16)
    x = torch.randn(2, 64, device="cuda", dtype=torch.float16)
    monkeypatch.setenv("LPQ_KERNEL", "uniform_cuda")
    with pytest.raises(LpqError, match="group_size=16 not supported"):
        layer(x)
    monkeypatch.delenv("LPQ_KERNEL")
    layer._kernel = None
    layer(x)
    assert layer.kernel.name == "reference"
    # in_features not a multiple of 8 (8-bit packing allows multiples of 4)
    qw = random_qweight(32, 36, QuantSpec(bits=8, group_size=-1), device="cuda")
    layer = QuantizedLinear.from_quantized(qw, None, torch.float16)
    monkeypatch.setenv("LPQ_KERNEL", "uniform_cuda_fused")
    with pytest.raises(LpqError, match="multiple of 8"):
        layer(torch.randn(1, 36, device="cuda", dtype=torch.float16))
    # float32 activations
    qw = random_qweight(32, 64, QuantSpec(bits=4, group_size=32), device="cuda")
    layer = QuantizedLinear.from_quantized(qw, None, torch.float32)
    with pytest.raises(LpqError, match="float16 or bfloat16"):
        layer(torch.randn(1, 64, device="cuda"))
    # the op itself checks its arguments with readable messages
    st = uniform_cuda.repack(qw.tensors, qw.spec, 64, 32)
    with pytest.raises(ValueError, match="must be \\[m, 64\\]"):
        uniform_cuda.gemm(st, torch.randn(1, 72, device="cuda", dtype=torch.float16), None)


@needs_cuda
@pytest.mark.cuda
def test_cuda_graph_and_compile(monkeypatch):
    monkeypatch.delenv("LPQ_KERNEL", raising=False)
    gen = torch.Generator().manual_seed(11)
    qw = random_qweight(256, 512, QuantSpec(bits=4, group_size=128), device="cuda", gen=gen)
    layer = QuantizedLinear.from_quantized(qw, None, torch.float16)
    x = torch.randn(1, 512, generator=gen).to(torch.float16).cuda()
    ref = layer(x).clone()
    assert layer.kernel.name == "uniform_cuda"
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        layer(x)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        y = layer(x)
    x.copy_(torch.randn(1, 512, generator=gen).to(torch.float16))
    g.replay()
    torch.cuda.synchronize()
    w = UNIFORM.dequantize(qw.tensors, qw.spec, 512, 256)
    assert rel_err(y, x.float() @ w.t()) < 1e-3
    compiled = torch.compile(lambda t: layer(t) * 2, fullgraph=False)
    torch.testing.assert_close(compiled(x), layer(x) * 2)
    del ref


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("m", (1, 4))
@pytest.mark.parametrize("bits", (4, 3))
def test_pdl_chain_in_cuda_graph(bits, m):
    """A kernel launched with programmatic dependent launch starts while the previous kernel finishes
    and must wait for it before reading its activations. A chain of layers, each reading the output of
    the one before (directly, or through a torch kernel in between), captured in a CUDA graph and
    replayed on new inputs, equals the same chain launched plainly, bit for bit, at every replay: a
    kernel that read its input too early would see the previous replay's values."""
    assert cuda_build.load(), cuda_build.failure_reason()
    gen = torch.Generator().manual_seed(70 + bits + m)
    k = 1024
    sts = []
    for _ in range(6):
        qw = random_qweight(k, k, QuantSpec(bits=bits, group_size=128), device="cuda", gen=gen)
        sts.append(uniform_cuda.repack(qw.tensors, qw.spec, k, k))
    variant = uniform_cuda.default_variant(sts[0], m)
    assert variant in (4, 5)
    assert_pdl_chain_matches_plain(sts, m, k, gen,
                                   lambda st, h: uniform_cuda.gemm(st, h, None, variant=variant | uniform_cuda.PDL_FLAG),
                                   lambda st, h: uniform_cuda.gemm(st, h, None, variant=variant))


def test_fold_divides_group():
    """A fold (128, 64 or 32 columns) must never cross a group (group sizes that are not powers of two are
    rejected by QuantSpec today; the rule is kept general); one group per row takes 128 whatever K is."""
    assert uniform_cuda._fold(128, 4096) == 128 and uniform_cuda._fold(64, 4096) == 64
    assert uniform_cuda._fold(96, 4096) == 32 and uniform_cuda._fold(160, 4096) == 32
    assert uniform_cuda._fold(192, 4096) == 64 and uniform_cuda._fold(72, 72) == 128  # one group per row



@needs_cuda
@pytest.mark.cuda
def test_canonical_copy_leaves_the_gpu_and_comes_back(monkeypatch):
    """After the CUDA kernel repacks, the canonical buffers wait in host memory (one copy of the weights on
    the GPU, not two); tensors(), state_dict() and moving the layer still see the same canonical tensors."""
    monkeypatch.delenv("LPQ_KERNEL", raising=False)
    monkeypatch.delenv("LPQ_KEEP_CANONICAL", raising=False)
    gen = torch.Generator().manual_seed(12)
    spec = QuantSpec(bits=4, group_size=128)
    qw = random_qweight(512, 1024, spec, device="cuda", gen=gen)
    original = {n: t.clone() for n, t in qw.tensors.items()}
    layer = QuantizedLinear.from_quantized(qw, None, torch.float16)
    x = torch.randn(3, 1024, generator=gen).to(torch.float16).cuda()
    y = layer(x)
    assert layer.kernel.name == "uniform_cuda" and layer.canonical_home == x.device
    assert all(getattr(layer, n).device.type == "cpu" for n in original)
    for n, t in layer.tensors().items():
        assert t.device == x.device and torch.equal(t, original[n])
    sd = layer.state_dict()
    assert all(torch.equal(sd[n].cuda(), original[n]) for n in original)
    # the whole step traces as one graph: the forward reads no data_ptr() and no canonical buffer
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), y)
    # to the CPU and back: the canonical buffers return first, the reference kernel computes on the CPU
    layer.cpu()
    assert layer.canonical_home is None and all(getattr(layer, n).device.type == "cpu" for n in original)
    y_cpu = layer(x.cpu().float())
    assert rel_err(y_cpu.cuda().to(torch.float16), y.float()) < 2e-3
    layer.cuda()
    assert all(getattr(layer, n).device.type == "cuda" for n in original)
    torch.testing.assert_close(layer(x), y)
    # new weights through load_state_dict replace the kernel's repacked copy
    other = random_qweight(512, 1024, spec, device="cpu", gen=gen)
    layer.load_state_dict(other.tensors)
    w_other = UNIFORM.dequantize(other.tensors, spec, 1024, 512).float().cuda()
    assert rel_err(layer(x), x.float() @ w_other.t()) < 1e-3
    # LPQ_KEEP_CANONICAL keeps both copies on the GPU
    monkeypatch.setenv("LPQ_KEEP_CANONICAL", "1")
    kept = QuantizedLinear.from_quantized(random_qweight(512, 1024, spec, device="cuda", gen=gen), None, torch.float16)
    kept(x)
    assert kept.canonical_home is None and all(getattr(kept, n).is_cuda for n in original)
