"""lpq's CUDA LUT kernels for the squeezellm format against the format's reference dequantize.

The GPU tests skip without CUDA (CI has no GPU). The CPU tests check the import and the fallback, and
the repacked layout: the kernels' decoder is emulated here bit for bit (byte permutes included),
following csrc/squeezellm_kernels.cuh, and must give back the canonical weights exactly.
"""

from __future__ import annotations

import pytest
import torch

import lpq.kernels as K
from lpq.errors import LpqError
from lpq.formats.squeezellm import SQUEEZELLM, pack_squeezellm
from conftest import assert_pdl_chain_matches_plain
from lpq.kernels import cuda_build, squeezellm_cuda
from lpq.nn import QuantizedLinear
from lpq.spec import QuantSpec

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (CI has none); run on the device")

BITS = (2, 3, 4)
M_VALUES = (1, 2, 3, 7, 16, 17, 64)
KERNELS = ["squeezellm_cuda", "squeezellm_cuda_fused", "squeezellm_cuda_dequant"]


def random_squeezellm(n: int, k: int, bits: int, density: float = 0.0, device="cpu", gen=None, dense_row: bool = False):
    """Fresh random indices, sorted random fp16 codebooks and (density > 0) a random sparse part whose
    positions keep random dense indices (the kernels must not assume the nearest-zero centroid)."""
    idx = torch.randint(0, 1 << bits, (n, k), generator=gen)
    lut = torch.sort(torch.randn(n, 1 << bits, generator=gen) * 0.05, dim=1).values
    mask = None
    weight = None
    if density > 0:
        mask = torch.rand(n, k, generator=gen) < density
        if dense_row:  # one row far heavier than the others (balance across threads)
            mask[n // 2] = torch.rand(k, generator=gen) < 0.5
        weight = torch.randn(n, k, generator=gen) * 0.3
    qw = pack_squeezellm(idx, lut, mask, weight, QuantSpec(bits=bits, method="squeezellm"))
    qw.tensors = {name: t.to(device) for name, t in qw.tensors.items()}
    return qw


# ----------------------------------------------------------------------------------- CPU emulation


def _u32(t) -> torch.Tensor:
    return torch.as_tensor(t).to(torch.int64) & 0xFFFFFFFF


def byte_perm(a, b, s):
    """__byte_perm(a, b, s): result byte i = byte ((s >> 4 i) & 7) of the 8 bytes {b, a}."""
    a, b, s = torch.broadcast_tensors(_u32(a), _u32(b), _u32(s))
    src = torch.stack([(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)], -1)
    out = torch.zeros_like(a)
    for i in range(4):
        sel = (s >> (4 * i)) & 7
        out |= torch.gather(src, -1, sel.unsqueeze(-1)).squeeze(-1) << (8 * i)
    return out


def sign_bytes(a):
    """prmt with selectors 0xBA98: byte j = 0xFF if bit 8 j + 7 of a is set."""
    a = _u32(a)
    out = torch.zeros_like(a)
    for j in range(4):
        out |= ((a >> (8 * j + 7)) & 1) * (0xFF << (8 * j))
    return out


def lookup4(bits, tb, s, m):
    if bits == 2:
        lo, hi = byte_perm(tb[0], tb[1], s), byte_perm(tb[0], tb[1], s | 0x4444)
    elif bits == 3:
        lo, hi = byte_perm(tb[0], tb[1], s), byte_perm(tb[2], tb[3], s)
    else:
        la, lb = byte_perm(tb[0], tb[1], s), byte_perm(tb[2], tb[3], s)
        ha, hb = byte_perm(tb[4], tb[5], s), byte_perm(tb[6], tb[7], s)
        inv = m ^ 0xFFFFFFFF
        lo, hi = (la & inv) | (lb & m), (ha & inv) | (hb & m)
    return byte_perm(lo, hi, 0x5140), byte_perm(lo, hi, 0x7362)


def decode_jj(bits, jj, w, off, x3, tb):
    if bits == 3:
        src = w[off + jj // 2] if jj < 6 else x3
        return lookup4(3, tb, (src >> 16) if jj & 1 else src, 0)
    if bits == 4:
        p = w[off + jj // 2]
        m = sign_bytes((p << 4) & 0xFFFFFFFF) if jj & 1 else sign_bytes(p)
        return lookup4(4, tb, (p >> 16) if jj & 1 else p, m)
    sh = (16 if jj & 1 else 0) + (2 if jj & 2 else 0)
    return lookup4(2, tb, (w[off + jj // 4] >> sh) & 0x3333, 0)


def emulate_dense(st: dict, dtype) -> torch.Tensor:
    """The dense part of W [N, K] as the kernels decode it from the repacked state (values in dtype)."""
    bits, n, k, nt = st["bits"], st["n"], st["k"], st["n_tiles"]
    chunks = -(-k // 128)
    blk = _u32(st["qw"]).view(nt, chunks, 64 * bits)
    if bits == 3:  # load_codes: one 16-byte segment [lane][4] and a [lane][2] tail
        words = torch.cat([blk[..., :128].reshape(nt, chunks, 32, 4), blk[..., 128:].reshape(nt, chunks, 32, 2)], -1)
    else:
        words = blk.view(nt, chunks, 2 * bits // 4, 32, 4).permute(0, 1, 3, 2, 4).reshape(nt, chunks, 32, 2 * bits)
    w = [words[..., i] for i in range(2 * bits)]  # [nt, chunks, 32 lanes]
    tab = _u32(st["tab"][dtype]).view(nt, 16, -1)
    lanes = torch.arange(32)
    g, t = lanes // 4, lanes % 4
    tb0 = [tab[:, g, i].unsqueeze(1) for i in range(tab.shape[-1])]  # [nt, 1, 32]: row g of each tile
    tb1 = [tab[:, g + 8, i].unsqueeze(1) for i in range(tab.shape[-1])]
    x3 = [None, None]
    if bits == 3:
        x3 = [((w[o] >> 3) & 0x11111111) | ((w[o + 1] >> 2) & 0x22222222) | ((w[o + 2] >> 1) & 0x44444444) for o in (0, 3)]
    out = torch.zeros((nt * 16, chunks * 128), dtype=torch.int64)
    for jj in range(8):
        for rho, tb in ((0, tb0), (1, tb1)):
            u0, u1 = decode_jj(bits, jj, w, rho * bits, x3[rho], tb)
            rows = (torch.arange(nt).view(nt, 1, 1) * 16 + (g + 8 * rho).view(1, 1, 32)).expand(nt, chunks, 32)
            for e, val in enumerate((u0 & 0xFFFF, u0 >> 16, u1 & 0xFFFF, u1 >> 16)):
                cols = (torch.arange(chunks).view(1, chunks, 1) * 128 + 32 * t.view(1, 1, 32) + 4 * jj + e).expand(nt, chunks, 32)
                out[rows.reshape(-1), cols.reshape(-1)] = val.reshape(-1)
    return out[:n, :k].to(torch.int32).to(torch.int16).view(dtype)


def emulate_full(st: dict, dtype) -> torch.Tensor:
    """Dense part + the sparse corrections the fused kernel adds, as it finds them per 16-row tile (fp32)."""
    w = emulate_dense(st, dtype).float()
    if st["sp_ptr"] is None:
        return w
    ptr, e = st["sp_ptr"].long(), st["sp_e"][dtype].long() & 0xFFFFFFFF
    rows = torch.repeat_interleave(torch.arange(ptr.numel() - 1), ptr[1:] - ptr[:-1])  # per-row pointers
    cols = e & 0xFFFF
    v = _fp16_from_bits(e >> 16)
    assert bool((rows < st["n"]).all())
    w.index_put_((rows, cols), v, accumulate=True)
    return w


def _fp16_from_bits(b: torch.Tensor) -> torch.Tensor:
    """int64 holding 16-bit patterns -> their float16 values as float32."""
    return torch.where(b >= 2**15, b - 2**16, b).to(torch.int16).view(torch.float16).float()


def test_import_and_fallback_without_cuda(monkeypatch):
    assert {"squeezellm_cuda", "squeezellm_cuda_fused", "squeezellm_cuda_dequant"} <= set(K.available_kernels())
    monkeypatch.delenv("LPQ_KERNEL", raising=False)
    qw = random_squeezellm(24, 64, 3, density=0.05, gen=torch.Generator().manual_seed(0))
    layer = QuantizedLinear.from_quantized(qw, None, torch.float32)
    x = torch.randn(3, 64)
    assert K.select_kernel(layer, x).name == "reference"
    assert "not CUDA" in squeezellm_cuda.SQUEEZELLM_CUDA.why_not(layer, x)
    ref = x @ SQUEEZELLM.dequantize(qw.tensors, qw.spec, 64, 24).t()
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("LPQ_KERNEL", "reference")
    layer._kernel = None
    assert K.select_kernel(layer, x).name == "reference"
    # a uniform layer is not this kernel's format
    from lpq.formats.uniform import pack_uniform
    uq = pack_uniform(torch.zeros(8, 64, dtype=torch.int32), torch.ones(1, 8, dtype=torch.float16),
                      torch.zeros(1, 8, dtype=torch.int32), QuantSpec(bits=4, group_size=-1))
    assert "format" in squeezellm_cuda.SQUEEZELLM_CUDA.why_not(QuantizedLinear.from_quantized(uq, None, torch.float16), x)


def test_extensions_without_cuda_warn_once(monkeypatch):
    import warnings

    monkeypatch.setattr(cuda_build.UNIFORM, "state", {"tried": False, "ok": False, "reason": None})
    monkeypatch.setattr(cuda_build.LUT, "state", {"tried": False, "ok": False, "reason": None})
    monkeypatch.setattr(cuda_build, "unavailable_reason", lambda: "CUDA is not available")
    from lpq.kernels import attention_cuda, ptq161_cuda

    for ext in (ptq161_cuda.EXTENSION, attention_cuda.EXTENSION):
        monkeypatch.setattr(ext, "state", {"tried": False, "ok": False, "reason": None})
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert cuda_build.load_lut() is False
        assert cuda_build.load_lut() is False
        assert cuda_build.load() is False
        assert ptq161_cuda.load() is False and attention_cuda.load() is False
    # one warning for the machine, whichever extension asks first and however often
    assert len([w for w in rec if "unavailable" in str(w.message)]) == 1
    assert len([w for w in rec if "CUDA kernels unavailable" in str(w.message)]) == 1
    assert cuda_build.lut_failure_reason() == "CUDA is not available"
    assert ptq161_cuda.EXTENSION.failure_reason() == attention_cuda.failure_reason() == "CUDA is not available"


def test_variant_and_warps_choice(monkeypatch):
    """The fused kernel: the ring kernel up to m = 8 and on layers with a sparse part, the first kernel
    above m = 8 on dense-only layers; LPQ_LUT_VARIANT forces one and an unknown name is an error that
    lists the known ones. The ring kernel runs 8 warps; the first
    kernel 4 on many short tiles."""
    monkeypatch.delenv("LPQ_LUT_VARIANT", raising=False)
    monkeypatch.delenv("LPQ_LUT_WARPS", raising=False)
    assert [squeezellm_cuda.default_variant(m) for m in (1, 8, 9, 16)] == [0, 0, 1, 1]
    assert [squeezellm_cuda.default_variant(m, sparse=True) for m in (1, 8, 9, 16)] == [0, 0, 0, 0]
    assert squeezellm_cuda.VARIANTS == {"ring": 0, "first": 1}
    monkeypatch.setenv("LPQ_LUT_VARIANT", "first")
    assert squeezellm_cuda.default_variant(1) == 1
    monkeypatch.setenv("LPQ_LUT_VARIANT", "ring")
    assert squeezellm_cuda.default_variant(16) == 0
    monkeypatch.setenv("LPQ_LUT_VARIANT", "fast")
    with pytest.raises(LpqError, match="LPQ_LUT_VARIANT='fast' is not known: choose ring, first"):
        squeezellm_cuda.default_variant()
    many = {"k": 4096, "n_tiles": 1792}
    assert squeezellm_cuda.default_warps(many, 1, 0) == 8
    assert squeezellm_cuda.default_warps(many, 1, 1) == 4
    assert squeezellm_cuda.default_warps({"k": 4096, "n_tiles": 256}, 1, 1) == 8
    # the ring kernel at m = 1: 4 warps on dense layers with <= 512 tiles and K <= 64 chunks (8192x8192, 4096x4096)
    square = {"k": 8192, "n_tiles": 512, "sp_ptr": None}
    assert squeezellm_cuda.default_warps(square, 1, 0) == 4
    assert squeezellm_cuda.default_warps({**square, "k": 4096, "n_tiles": 256}, 1, 0) == 4
    assert squeezellm_cuda.default_warps(square, 4, 0) == 8  # measured at m = 1 only
    assert squeezellm_cuda.default_warps({**square, "sp_ptr": torch.zeros(1)}, 1, 0) == 8  # a sparse part
    assert squeezellm_cuda.default_warps({**square, "k": 11008, "n_tiles": 256}, 1, 0) == 8  # long K
    assert squeezellm_cuda.default_warps({**square, "k": 4096, "n_tiles": 688}, 1, 0) == 8  # many tiles
    monkeypatch.setenv("LPQ_LUT_WARPS", "2")
    assert squeezellm_cuda.default_warps(many, 1, 0) == 2


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(40, 320), (16, 128), (3, 96)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_repack_decodes_to_canonical(bits, shape, dtype):
    """repack -> the kernels' decoder (emulated) gives lut[n, idx[n, k]] exactly at every position."""
    n, k = shape
    qw = random_squeezellm(n, k, bits, gen=torch.Generator().manual_seed(bits * 100 + n + k))
    st = squeezellm_cuda.repack(qw.tensors, qw.spec, k, n)
    idx, lut, _ = SQUEEZELLM.unpack(qw.tensors, qw.spec, k, n)
    want = torch.gather(qw.tensors["lut"].to(dtype), 1, idx)
    got = emulate_dense(st, dtype)
    assert got.shape == (n, k)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("bits", BITS)
def test_pack_row_words_every_index_in_every_position(bits):
    """Each of the 32 positions of a lane's row takes every index value: catches a misplaced bit."""
    c = 1 << bits
    v = (torch.arange(32).view(1, 8, 4) + torch.arange(c).view(c, 1, 1)) % c  # [c, 8, 4]
    words = squeezellm_cuda.pack_row_words(v, bits)  # [c, bits]
    # decode with the identity table (entry i = i) for one row, lane words = this row's words
    tab = squeezellm_cuda.pack_tables(torch.arange(c, dtype=torch.float16).view(1, c), torch.float16, 1)
    tb = [_u32(tab[0, i]) for i in range(tab.shape[1])]
    w = [words[:, i] for i in range(bits)]
    x3 = ((w[0] >> 3) & 0x11111111) | ((w[1] >> 2) & 0x22222222) | ((w[2] >> 1) & 0x44444444) if bits == 3 else None
    for jj in range(8):
        u0, u1 = decode_jj(bits, jj, w, 0, x3, tb)
        vals = torch.stack([u0 & 0xFFFF, u0 >> 16, u1 & 0xFFFF, u1 >> 16], -1).to(torch.int32).to(torch.int16)
        assert torch.equal(vals.view(torch.float16).long(), v[:, jj, :])


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sparse_corrections_reconstruct_the_reference(bits, dtype):
    """Dense part (every position) + the corrections = the format's dequantize: exact at dense positions,
    and at sparse ones within the fp16 rounding of the correction (2**-11 of |exact - codebook value|)."""
    n, k = 45, 256
    qw = random_squeezellm(n, k, bits, density=0.03, gen=torch.Generator().manual_seed(bits), dense_row=True)
    st = squeezellm_cuda.repack(qw.tensors, qw.spec, k, n)
    ref = SQUEEZELLM.dequantize(qw.tensors, qw.spec, k, n)
    got = emulate_full(st, dtype)
    mask = torch.zeros(n, k, dtype=torch.bool)
    mask[st["sp_rows"], st["sp_cols"]] = True
    # dense positions: the codebook value in dtype
    torch.testing.assert_close(got[~mask], ref.to(dtype).float()[~mask], rtol=0, atol=0)
    # sparse positions: codebook value + the correction rounded to fp16
    dense = emulate_dense(st, dtype).float()
    delta = (ref - dense)[mask]
    err = (got[mask] - ref[mask]).abs()
    assert bool((err <= delta.abs() * 2.0**-11 + 1e-7).all()), float((err - delta.abs() * 2.0**-11).max())
    assert float(delta.abs().max()) > 0.1  # the test layer has real outliers (dense_row), not just tiny corrections
    assert int(st["sp_ptr"][-1]) == int(mask.sum()) == st["sp_e"][dtype].numel()
    # sp_ptr holds a pointer per row: the entries of row r are sp_ptr[r] .. sp_ptr[r + 1] (row-major), and an
    # entry's low 16 bits are its column
    ptr, cols = st["sp_ptr"].long(), st["sp_e"][dtype].long() & 0xFFFF
    assert ptr.numel() == st["n_tiles"] * 16 + 1
    for r in range(st["n_tiles"] * 16):
        assert int(ptr[r + 1] - ptr[r]) == int(mask[r].sum()) if r < n else int(ptr[r + 1] - ptr[r]) == 0
        if r < n:
            assert torch.equal(cols[int(ptr[r]):int(ptr[r + 1])], mask[r].nonzero().flatten()), r


def test_duplicate_sparse_positions_are_summed():
    """A CSR that names one position twice: the reference accumulates both; so must the kernels' state."""
    n, k, bits = 20, 64, 4
    qw = random_squeezellm(n, k, bits, gen=torch.Generator().manual_seed(3))
    t = dict(qw.tensors)
    rows = torch.tensor([2, 2, 2, 17])
    cols = torch.tensor([5, 5, 9, 63], dtype=torch.int32)
    vals = torch.tensor([0.5, 0.25, -1.0, 2.0], dtype=torch.float16)
    rowptr = torch.zeros(n + 1, dtype=torch.int64)
    rowptr[1:] = torch.cumsum(torch.bincount(rows, minlength=n), 0)
    t.update(sp_rowptr=rowptr.to(torch.int32), sp_col=cols, sp_val=vals)
    spec = qw.spec.replace(options={**qw.spec.options, "nnz": 4})
    ref = SQUEEZELLM.dequantize(t, spec, k, n)
    st = squeezellm_cuda.repack(t, spec, k, n)
    assert st["sp_e"][torch.float16].numel() == 3
    # within the fp16 rounding of the corrections (the values here are at most 2)
    torch.testing.assert_close(emulate_full(st, torch.float16), ref, rtol=0, atol=2.0 * 2**-11)
    assert abs(float(ref[2, 5]) - 0.75) < 1e-6


def test_sparse_entries_pack_and_wide_layers():
    """An entry: column in the low 16 bits, the fp16 correction in the high 16. A layer wider than 65536
    inputs with a sparse part keeps only its CSR part (dequantize path): the fused kernel says why it
    cannot run it; without a sparse part the fused kernel takes any width."""
    cols = torch.tensor([0, 5, 65535])
    vals = torch.tensor([1.0, -2.5, 0.125])
    dense = torch.tensor([0.25, 0.5, 0.125])
    e = squeezellm_cuda.pack_sparse_entries(cols, vals, dense).long() & 0xFFFFFFFF
    assert torch.equal(e & 0xFFFF, cols)
    assert torch.equal(_fp16_from_bits(e >> 16), (vals - dense).half().float())
    with pytest.raises(LpqError, match="overflows float16"):
        squeezellm_cuda.pack_sparse_entries(cols[:1], torch.tensor([60000.0]), torch.tensor([-60000.0]))
    gen = torch.Generator().manual_seed(4)
    for density, problem in ((0.0, False), (0.001, True)):
        qw = random_squeezellm(16, 65536 + 128, 4, density, gen=gen)
        st = squeezellm_cuda.repack(qw.tensors, qw.spec, 65536 + 128, 16)
        assert (squeezellm_cuda.fused_problem(st) is not None) == problem
        if problem:
            assert st["sp_e"] == {} and st["sp_rows"] is not None
            assert "below 65536" in squeezellm_cuda.fused_problem(st)


# --------------------------------------------------------------------------------------------- GPU


def poison_cache(numel: int, dtype) -> None:
    """Fill freshly freed allocator memory with NaN so that outputs a kernel leaves unwritten show."""
    torch.empty(numel, dtype=dtype, device="cuda").fill_(float("nan"))


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


TOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}  # bf16: codebooks rounded to bf16, output rounding 2**-9


def run_layer(layer, x, kernel_name, monkeypatch):
    monkeypatch.setenv("LPQ_KERNEL", kernel_name)
    layer._kernel = None
    poison_cache(x.shape[0] * layer.out_features * 4 + (1 << 16), x.dtype)
    y = layer(x)
    torch.cuda.synchronize()
    assert layer.kernel.name == kernel_name
    return y


def check_layer(qw, dtype, m_values, kernels, monkeypatch, bias=False, gen=None):
    n, k = qw.out_features, qw.in_features
    w_ref = SQUEEZELLM.dequantize(qw.tensors, qw.spec, k, n).float()
    # dequantize + cuBLAS rounds the weights to the activation dtype by design: judged on those weights
    w_rounded = w_ref.to(dtype).float()
    b = (torch.randn(n, generator=gen) * 0.1).to(dtype).cuda() if bias else None
    layer = QuantizedLinear.from_quantized(qw, b, dtype)
    for m in m_values:
        x = torch.randn((m, k), generator=gen).to(dtype).cuda()
        refs = {key: x.float() @ w.t() + (b.float() if b is not None else 0)
                for key, w in (("fused", w_ref), ("dequant", w_rounded))}
        for name in kernels:
            dq = name == "squeezellm_cuda_dequant" or (name == "squeezellm_cuda" and m > squeezellm_cuda._fused_max_m())
            y = run_layer(layer, x, name, monkeypatch)
            assert y.shape == (m, n) and y.dtype == dtype
            assert torch.isfinite(y).all(), f"{name} m={m}: unwritten (NaN) outputs"
            err = rel_err(y, refs["dequant" if dq else "fused"])
            assert err < TOL[dtype], f"{name} m={m} b={qw.spec.bits} {n}x{k} {dtype}: rel err {err:.2e}"


VARIANTS = ["ring", "first"]  # the fused kernels (LPQ_LUT_VARIANT)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("density", [0.0, 0.0045, 0.05])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", BITS)
def test_kernels_match_reference(bits, dtype, density, variant, monkeypatch):
    """Every kernel, every m, on a shape that hits tile edges (N=200: 12.5 tiles of 16; K=320: 2.5 chunks,
    so the ring kernel's last stage has no second chunk)."""
    monkeypatch.setenv("LPQ_LUT_VARIANT", variant)
    gen = torch.Generator().manual_seed(hash((bits, str(dtype), density)) % 2**31)
    qw = random_squeezellm(200, 320, bits, density, device="cuda", gen=gen, dense_row=density > 0.01)
    check_layer(qw, dtype, M_VALUES, KERNELS, monkeypatch, gen=gen)


EDGE_SHAPES = [(1, 128), (16, 128), (17, 160), (33, 576), (100, 1000), (4100, 256), (48, 4104), (576, 1536)]


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", EDGE_SHAPES)
@pytest.mark.parametrize("bits", BITS)
def test_tile_edges(bits, shape, variant, monkeypatch):
    monkeypatch.setenv("LPQ_LUT_VARIANT", variant)
    n, k = shape
    per = {2: 16, 3: 32, 4: 8}[bits]
    k = -(-k // per) * per
    gen = torch.Generator().manual_seed(n * 7 + k + bits)
    for density in (0.0, 0.01):
        qw = random_squeezellm(n, k, bits, density, device="cuda", gen=gen)
        check_layer(qw, torch.float16, (1, 5, 16, 40), ["squeezellm_cuda_fused", "squeezellm_cuda_dequant"],
                    monkeypatch, bias=True, gen=gen)


@needs_cuda
@pytest.mark.cuda
def test_large_shape_and_warps(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    for bits, density in ((3, 0.0), (3, 0.0045), (4, 0.0)):
        qw = random_squeezellm(11008, 4096, bits, density, device="cuda", gen=gen)
        check_layer(qw, torch.float16, (1, 16), ["squeezellm_cuda"], monkeypatch, gen=gen)
    # every warp count gives the same result (the warps split K; the reduction must cover them all). The
    # ring kernel holds 4 sparse entries a thread in registers and reads the rest after its loop: 245
    # entries a tile at 1 % (more than 1 warp holds), 7400 at 30 % (more than 8 warps hold)
    for n, k, density in ((96, 1536, 0.01), (40, 1536, 0.3)):
        qw = random_squeezellm(n, k, 3, density, device="cuda", gen=gen)
        st = squeezellm_cuda.repack(qw.tensors, qw.spec, k, n)
        ref_w = SQUEEZELLM.dequantize(qw.tensors, qw.spec, k, n).t()
        for m in (1, 3, 12):
            x = torch.randn(m, k, generator=gen).half().cuda()
            ref = x.float() @ ref_w
            for variant in (0, 1, 0 | squeezellm_cuda.PDL_FLAG, 0 | squeezellm_cuda.PDL_FLAG | squeezellm_cuda.EARLY_FLAG):
                for warps in (1, 2, 3, 4, 8):
                    poison_cache(1 << 16, torch.float16)
                    err = rel_err(squeezellm_cuda.gemm(st, x, None, warps, variant), ref)
                    assert err < 1e-3, (n, density, m, variant, warps, err)


def test_default_pdl_rule(monkeypatch):
    """Programmatic dependent launch when it is on (uniform_cuda.PDL, the one switch LPQ_PDL sets for every lpq
    kernel): the ring kernel at m = 1, and up to m = 8 on dense-only layers; never the first kernel; none with it
    off."""
    from lpq.kernels import uniform_cuda
    ring, first, flag = squeezellm_cuda.VARIANTS["ring"], squeezellm_cuda.VARIANTS["first"], squeezellm_cuda.PDL_FLAG
    early = squeezellm_cuda.EARLY_FLAG
    monkeypatch.setattr(uniform_cuda, "PDL", True)
    monkeypatch.setattr(uniform_cuda, "PDL_EARLY", frozenset())
    assert [squeezellm_cuda.with_default_pdl(ring, m, bits=3) for m in (1, 8, 9, 16)] == [ring | flag] * 2 + [ring] * 2
    assert [squeezellm_cuda.with_default_pdl(ring, m, sparse=True) for m in (1, 2, 8)] == [ring | flag] + [ring] * 2
    assert squeezellm_cuda.with_default_pdl(first, 1) == first
    # the early trigger: at m = 1 only, for the code widths its keys name
    monkeypatch.setattr(uniform_cuda, "PDL_EARLY", uniform_cuda.early_kernels("w4,s3"))
    assert squeezellm_cuda.with_default_pdl(ring, 1, bits=3) == ring | flag | early
    assert squeezellm_cuda.with_default_pdl(ring, 1, sparse=True, bits=3) == ring | flag | early
    assert squeezellm_cuda.with_default_pdl(ring, 1, bits=4) == ring | flag
    assert squeezellm_cuda.with_default_pdl(ring, 2, bits=3) == ring | flag
    assert squeezellm_cuda.with_default_pdl(first, 1, bits=3) == first
    assert all(v in squeezellm_cuda.GEMM_CODES for v in (ring | flag | early, ring | flag, ring, first))
    monkeypatch.setattr(uniform_cuda, "PDL", False)
    assert squeezellm_cuda.with_default_pdl(ring, 1, bits=3) == ring


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("density", [0.0, 0.0045])
@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("early", [False, True])
def test_pdl_chain_in_cuda_graph(density, m, early):
    """The ring kernel launched with programmatic dependent launch starts while the previous kernel finishes and
    must wait for it before reading x (its sparse gathers included). A chain of layers, each reading the output of
    the one before (directly, or through a torch kernel in between), captured in a CUDA graph and replayed on new
    inputs, equals the same chain launched plainly, bit for bit, at every replay: a kernel that read its input too
    early would see the previous replay's values. With the early trigger the next kernel is let in right after each
    block's own wait, so it is resident for longer before the kernel it waits on ends."""
    assert cuda_build.load_lut(), cuda_build.lut_failure_reason()
    gen = torch.Generator().manual_seed(80 + m + int(density > 0))
    k = 1024
    sts = []
    for _ in range(6):
        qw = random_squeezellm(k, k, 3, density, device="cuda", gen=gen)
        sts.append(squeezellm_cuda.repack(qw.tensors, qw.spec, k, k))
    ring = squeezellm_cuda.VARIANTS["ring"]
    pdl = ring | squeezellm_cuda.PDL_FLAG | (squeezellm_cuda.EARLY_FLAG if early else 0)
    assert_pdl_chain_matches_plain(sts, m, k, gen,
                                   lambda st, h: squeezellm_cuda.gemm(st, h, None, variant=pdl),
                                   lambda st, h: squeezellm_cuda.gemm(st, h, None, variant=ring))


@needs_cuda
@pytest.mark.cuda
def test_selection_and_readable_errors(monkeypatch):
    monkeypatch.delenv("LPQ_KERNEL", raising=False)
    qw = random_squeezellm(32, 64, 4, 0.02, device="cuda")
    layer = QuantizedLinear.from_quantized(qw, None, torch.float16)
    x = torch.randn(2, 64, device="cuda", dtype=torch.float16)
    layer(x)
    assert layer.kernel.name == "squeezellm_cuda"
    monkeypatch.setenv("LPQ_KERNEL", "reference")
    layer._kernel = None
    layer(x)
    assert layer.kernel.name == "reference"
    # float32 activations: forcing the kernel says why; auto picks the reference
    layer32 = QuantizedLinear.from_quantized(qw, None, torch.float32)
    monkeypatch.setenv("LPQ_KERNEL", "squeezellm_cuda")
    with pytest.raises(LpqError, match="float16 or bfloat16"):
        layer32(torch.randn(1, 64, device="cuda"))
    # a wrong input width, and wrong arguments to the op wrappers, are readable errors
    layer._kernel = None
    with pytest.raises(LpqError, match="input has 72 features"):
        layer(torch.randn(1, 72, device="cuda", dtype=torch.float16))
    st = squeezellm_cuda.repack(qw.tensors, qw.spec, 64, 32)
    with pytest.raises(ValueError, match=r"must be \[m, 64\]"):
        squeezellm_cuda.gemm(st, torch.randn(1, 72, device="cuda", dtype=torch.float16), None)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        squeezellm_cuda.gemm(st, torch.randn(1, 64, device="cuda"), None)
    with pytest.raises(ValueError, match="warps"):
        squeezellm_cuda.gemm(st, torch.randn(1, 64, device="cuda", dtype=torch.float16), None, warps=9)
    with pytest.raises(ValueError, match="variant"):
        squeezellm_cuda.gemm(st, torch.randn(1, 64, device="cuda", dtype=torch.float16), None, variant=2)
    monkeypatch.setenv("LPQ_LUT_VARIANT", "fast")
    with pytest.raises(LpqError, match="LPQ_LUT_VARIANT='fast' is not known"):
        squeezellm_cuda.gemm(st, torch.randn(1, 64, device="cuda", dtype=torch.float16), None)
    monkeypatch.delenv("LPQ_LUT_VARIANT")
    # wider than 65536 inputs with a sparse part: the auto kernel dequantizes (right result at m = 1); the
    # fused one is refused with the reason
    k = 65536 + 128
    wide = random_squeezellm(16, k, 4, 0.001, device="cuda", gen=torch.Generator().manual_seed(9))
    layer = QuantizedLinear.from_quantized(wide, None, torch.float16)
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    monkeypatch.delenv("LPQ_KERNEL", raising=False)
    y = layer(x)
    assert layer.kernel.name == "squeezellm_cuda"
    ref = x.float() @ SQUEEZELLM.dequantize(wide.tensors, wide.spec, k, 16).float().t()
    assert rel_err(y, ref) < 1e-3
    monkeypatch.setenv("LPQ_KERNEL", "squeezellm_cuda_fused")
    layer._kernel = None
    with pytest.raises(LpqError, match="65536"):
        layer(x)


@needs_cuda
@pytest.mark.cuda
def test_cuda_graph_and_compile(monkeypatch):
    monkeypatch.delenv("LPQ_KERNEL", raising=False)
    gen = torch.Generator().manual_seed(11)
    qw = random_squeezellm(256, 512, 3, 0.0045, device="cuda", gen=gen)
    layer = QuantizedLinear.from_quantized(qw, None, torch.float16)
    x = torch.randn(1, 512, generator=gen).to(torch.float16).cuda()
    layer(x)
    assert layer.kernel.name == "squeezellm_cuda"
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
    w = SQUEEZELLM.dequantize(qw.tensors, qw.spec, 512, 256)
    assert rel_err(y, x.float() @ w.t()) < 1e-3
    # one graph: the forward reads no data_ptr() (the op copies an unaligned x itself)
    compiled = torch.compile(lambda t: layer(t) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x) * 2)
    # an offset slice (not 16-byte aligned) and a strided view give the same result as a fresh copy
    wide = torch.randn(2, 520, generator=gen).to(torch.float16).cuda()
    for view in (wide[:1, 1:513], wide.t().contiguous().t()[:1, 3:515]):
        assert view.data_ptr() % 16 or not view.is_contiguous()
        torch.testing.assert_close(layer(view), layer(view.contiguous().clone()))
