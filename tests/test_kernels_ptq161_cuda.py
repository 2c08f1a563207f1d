"""The ptq161 CUDA GEMV against the format's own dequantize (the reference), on fresh random layers.

CUDA tests skip without a GPU; the state preparation and the fallback are tested everywhere.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lpq.kernels as K
from lpq.formats.ptq161 import PTQ161, pack_ptq161
from conftest import assert_pdl_chain_matches_plain
from lpq.kernels import ptq161_cuda, uniform_cuda
from lpq.nn import QuantizedLinear
from lpq.spec import QuantSpec

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_layer(n: int, k: int, s: int, device="cpu", seed: int = 0):
    """A random ptq161 layer with s salient channels scattered over k inputs."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(k, dtype=torch.bool)
    mask[torch.randperm(k, generator=g)[:s]] = True
    b = k - s
    signs = torch.randint(0, 2, (n, b), generator=g).float() * 2 - 1
    codes = torch.randint(0, 16, (n, s), generator=g, dtype=torch.int32)
    sscales = torch.rand(n, generator=g) * 0.02 + 0.001
    szeros = torch.randint(0, 16, (n,), generator=g).float()
    bscale = torch.rand(n, generator=g) * 0.05 + 0.01
    colscale = torch.rand(b, generator=g) + 0.5
    mu = torch.randn(n, generator=g) * 0.01
    qw = pack_ptq161(mask, signs, codes, sscales, szeros, bscale, colscale, mu, QuantSpec(bits=4, group_size=-1))
    return qw.to(device)


def test_prepare_state_indices_and_vectors():
    qw = random_layer(24, 96, 32)
    st = ptq161_cuda.prepare_state(qw.tensors, qw.spec, 96, 24)
    mask = torch.zeros(96, dtype=torch.bool)
    mask[st["sal_idx"].long()] = True
    assert st["sal_idx"].numel() == 32 and st["bin_idx"].numel() == 64
    assert torch.equal(torch.sort(torch.cat([st["sal_idx"], st["bin_idx"]])).values, torch.arange(96, dtype=torch.int32))
    assert bool((st["sal_idx"].diff() > 0).all()) and bool((st["bin_idx"].diff() > 0).all())  # increasing order
    # the salient channels are exactly where the dequantized weight is on the 4-bit grid of each row
    w = qw.dequantize()
    sal_cols = w[:, st["sal_idx"].long()]
    codes = sal_cols / st["rowvec"][0][:, None] + st["rowvec"][1][:, None]
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-3)
    assert st["rowvec"].shape == (4, 24) and st["rowvec"].dtype == torch.float32
    # the streaming kernel's counters: two token tiles of the smallest (256-row) row block, zeroed
    assert st["counters"].dtype == torch.int32 and st["counters"].numel() == 2 and not st["counters"].any()
    qw513 = random_layer(513, 64, 32)
    assert ptq161_cuda.prepare_state(qw513.tensors, qw513.spec, 64, 513)["counters"].numel() == 6


def test_kernel_selection_traces_as_one_graph():
    """Selection skips the CUDA kernels here, with a debug log line each: that must not break the dynamo
    graph (logging calls cannot be traced), or a compiled forward selecting its kernel breaks in two."""
    qw = random_layer(16, 64, 32)
    layer = QuantizedLinear.from_quantized(qw, None, torch.float32)
    torch._dynamo.reset()

    def pick(t):
        return t * 2 if K.select_kernel(layer, t).name == "reference" else t

    x = torch.randn(2, 64)
    torch.testing.assert_close(torch.compile(pick, fullgraph=True, backend="eager")(x), x * 2)


def test_unknown_variant_is_rejected(monkeypatch):
    qw = random_layer(16, 64, 32)
    st = ptq161_cuda.prepare_state(qw.tensors, qw.spec, 64, 16)
    x = torch.randn(1, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="variant"):
        ptq161_cuda.gemv(st, x, None, variant="fastest")
    monkeypatch.setenv("LPQ_PTQ161_VARIANT", "fastest")
    with pytest.raises(ValueError, match="LPQ_PTQ161_VARIANT"):
        ptq161_cuda._variant_from_env()


def test_default_pdl_rule(monkeypatch):
    """Programmatic dependent launch for every variant that may run the ring kernel when it is on (uniform_cuda.PDL,
    the one switch LPQ_PDL sets for every lpq kernel); never for the streaming or first kernels; none with it off."""
    flag, early = ptq161_cuda.PDL_FLAG, ptq161_cuda.EARLY_FLAG
    rings = ("auto", "ring", "ring3", "ring2", "ring2w8", "ring3w8", "ring4w8")
    monkeypatch.setattr(uniform_cuda, "PDL", True)
    monkeypatch.setattr(uniform_cuda, "PDL_EARLY", frozenset())
    assert {v: ptq161_cuda.with_default_pdl(v) & (flag | early) for v in ptq161_cuda.VARIANTS} == {
        v: flag if v in rings else 0 for v in ptq161_cuda.VARIANTS}
    assert ptq161_cuda.with_default_pdl("ring2") == ptq161_cuda.VARIANTS["ring2"] | flag
    # the early trigger with PDL, at m = 1, where LPQ_PDL_EARLY names p161
    monkeypatch.setattr(uniform_cuda, "PDL_EARLY", uniform_cuda.early_kernels("p161"))
    assert {v: ptq161_cuda.with_default_pdl(v, 1) & (flag | early) for v in ptq161_cuda.VARIANTS} == {
        v: flag | early if v in rings else 0 for v in ptq161_cuda.VARIANTS}
    assert ptq161_cuda.with_default_pdl("auto", 2) == flag
    monkeypatch.setattr(uniform_cuda, "PDL", False)
    assert all(ptq161_cuda.with_default_pdl(v) == code for v, code in ptq161_cuda.VARIANTS.items())


def test_without_cuda_the_reference_runs():
    qw = random_layer(16, 64, 32)
    layer = QuantizedLinear.from_quantized(qw, None, torch.float32)
    x = torch.randn(2, 64)
    assert K.select_kernel(layer, x).name == "reference"
    assert ptq161_cuda.PTQ161_CUDA.why_not(layer, x) is not None
    torch.testing.assert_close(layer(x), x @ qw.dequantize().t(), rtol=1e-5, atol=1e-5)


def poison_cache(numel: int, dtype) -> None:
    """Fill freed allocator memory with NaN, so that an output element the kernel never writes shows."""
    torch.empty(numel, dtype=dtype, device="cuda").fill_(float("nan"))


# (N, K, S): tile edges of both kernels. First kernel: 256 rows a block, 512 binarized and 128 salient
# channels a tile. Streaming kernel: 256 rows a block (512 when N is even and >= 8192: 8200, 8192), a
# table stage of 64 / MT sign words, a salient stage of 256 / MT code words (K = 4096 with one split
# runs two stages at m = 1), runs with no salient (S = 0) or no binarized channel (S = K).
SHAPES = [(1, 40, 8), (200, 320, 64), (257, 1064, 136), (300, 576, 0), (64, 128, 128), (4100, 2048, 416),
          (33, 1608, 328), (8200, 576, 64), (8192, 4096, 800)]


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("n,k,s", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", ["auto", "ring", "ring3", "ring2", "ring2w8", "ring3w8", "ring4w8", "stream", "stream-ffma",
                                     "stream-1row", "first"])
def test_gemv_matches_reference(n, k, s, dtype, variant):
    qw = random_layer(n, k, s, device="cuda", seed=n + k)
    w = qw.dequantize()  # fp32 reference weight
    st = ptq161_cuda.prepare_state(qw.tensors, qw.spec, k, n)
    bias = torch.randn(n, device="cuda", dtype=dtype) * 0.1
    # the kernel's own plan, then forced splits: one (multi-stage ranges; the ring raises it to what its
    # table needs), a few, the most of each kernel
    ksplits = (0,) if variant == "first" else (0, 1, 3, 16, 32) if variant.startswith("ring") else (0, 1, 3, 16)
    for m in (1, 2, 3, 7, 16, 17, 64):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        ref = F.linear(x.float(), w, bias.float())
        for ksplit in ksplits:
            poison_cache(3 * m * n + (1 << 16), torch.float32)
            y = ptq161_cuda.gemv(st, x, bias, variant=variant, ksplit=ksplit)
            assert torch.isfinite(y).all(), f"unwritten or NaN outputs at m={m}, ksplit={ksplit}"
            err = (y.float() - ref).norm() / ref.norm()
            tol = 1e-3 if dtype == torch.float16 else 8e-3
            assert err < tol, f"m={m}, ksplit={ksplit}: relative error {err:.2e}"
    assert not st["counters"].any(), "the streaming kernel left a split-K counter non-zero"


@cuda
@pytest.mark.cuda
def test_plan_picks_the_ring_kernel_where_it_applies():
    """The ring kernel runs m <= 4 on N a multiple of 4 with a table of at most 64 token-words a block; the
    streaming kernel runs the rest. (The correctness tests above cover both through every variant.)"""
    qw = random_layer(8192, 4096, 800, device="cuda", seed=5)
    st = ptq161_cuda.prepare_state(qw.tensors, qw.spec, 4096, 8192)
    nbw = (4096 - 800) // 32
    for m in (1, 2, 3, 4):
        p = ptq161_cuda.plan(st, m)
        assert p["kernel"] == "ring" and p["rows_per_thread"] == 2 and (p["stages"], p["words"]) == (2, 8), (m, p)
        assert ptq161_cuda.plan(st, m, variant="ring")["stages"] == 4
        mt = 1 if m == 1 else 2 if m == 2 else 4
        assert -(-nbw // p["ksplit"]) * mt <= 64, (m, p)  # the table of a block fits its 32 KB
        assert ptq161_cuda.plan(st, m, variant="ring3")["stages"] == 3
        assert ptq161_cuda.plan(st, m, variant="ring2")["stages"] == 2
        assert ptq161_cuda.plan(st, m, variant="ring2w8")["words"] == 8
        # 3 and 4 stages of 8 words: built for m = 1; other m take 2 stages of 8
        for name, stages in (("ring3w8", 3), ("ring4w8", 4)):
            deep = ptq161_cuda.plan(st, m, variant=name)
            assert (deep["stages"], deep["words"]) == (stages if m == 1 else 2, 8), (m, name, deep)
        assert ptq161_cuda.plan(st, m, variant="stream")["kernel"] == "stream"
    for m in (5, 8, 16):
        assert ptq161_cuda.plan(st, m)["kernel"] == "stream"
    assert ptq161_cuda.plan(st, 1, ksplit=5)["ksplit"] == 5
    assert ptq161_cuda.plan(st, 1, ksplit=1)["ksplit"] == 2  # raised: 103 words need two tables
    # 4096 x 11008 at m = 4: the table needs 18 splits; the automatic choice leaves it to the streaming kernel
    wide = random_layer(4096, 11008, 2208, device="cuda", seed=6)
    st_wide = ptq161_cuda.prepare_state(wide.tensors, wide.spec, 11008, 4096)  # 275 sign words
    assert ptq161_cuda.plan(st_wide, 4)["kernel"] == "stream"
    forced = ptq161_cuda.plan(st_wide, 4, variant="ring2w8")
    assert forced["kernel"] == "ring" and forced["ksplit"] == 18
    assert ptq161_cuda.plan(st_wide, 1)["kernel"] == "ring"
    # m = 1 on a large layer: a third stage of 8 words where a warp's share of a 2-stage split is >= 80 words of
    # 32 rows (here (45 + 48) x 2); never at m > 1
    big = random_layer(8192, 28672, 5728, device="cuda", seed=7)
    st_big = ptq161_cuda.prepare_state(big.tensors, big.spec, 28672, 8192)
    p1 = ptq161_cuda.plan(st_big, 1)
    assert p1["kernel"] == "ring" and (p1["stages"], p1["words"]) == (3, 8), p1
    assert ptq161_cuda.plan(st_big, 2)["kernel"] == "stream"  # m = 2: its table needs more than 16 splits
    p2 = ptq161_cuda.plan(st_big, 2, variant="ring3w8")  # forced onto the ring: 2 stages of 8 at m = 2
    assert p2["kernel"] == "ring" and (p2["stages"], p2["words"]) == (2, 8), p2
    assert (ptq161_cuda.plan(st_big, 1, variant="ring2w8")["stages"]) == 2  # a named variant is kept
    del big, st_big
    odd = random_layer(258, 576, 64, device="cuda")  # N = 258: not a multiple of 4
    st_odd = ptq161_cuda.prepare_state(odd.tensors, odd.spec, 576, 258)
    assert ptq161_cuda.plan(st_odd, 1)["kernel"] == "stream"
    with pytest.raises(ValueError, match="variant"):
        ptq161_cuda.plan(st, 1, variant="first")


@cuda
@pytest.mark.cuda
def test_unaligned_words_run_without_the_ring_copies():
    """The ring kernel copies 16-byte chunks: word tensors that start off a 16-byte boundary (views into a
    larger buffer) must take the streaming kernel and still give the right result."""
    qw = random_layer(1024, 1024, 192, device="cuda", seed=7)
    st = ptq161_cuda.prepare_state(qw.tensors, qw.spec, 1024, 1024)
    for name in ("qw", "sw"):
        t = st[name]
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device="cuda")
        buf[1:].copy_(t.flatten())
        st[name] = buf[1:].view_as(t)  # 4 bytes past an aligned allocation
    assert st["qw"].data_ptr() % 16 != 0
    x = torch.randn(1, 1024, device="cuda", dtype=torch.float16)
    ref = x.float() @ qw.dequantize().t()
    y = ptq161_cuda.gemv(st, x, None, variant="ring")
    assert (y.float() - ref).norm() / ref.norm() < 1e-3


@cuda
@pytest.mark.cuda
def test_stream_kernel_is_deterministic_and_splits_agree():
    """The last block adds the partials in split order: the same call twice is bit-equal, and every split
    count gives the same result up to fp32 summation order."""
    qw = random_layer(8192, 4096, 800, device="cuda", seed=3)
    st = ptq161_cuda.prepare_state(qw.tensors, qw.spec, 4096, 8192)
    x = torch.randn(4, 4096, device="cuda", dtype=torch.float16)
    for variant in ("stream", "ring"):
        for ksplit in (0, 2, 5, 16):
            a = ptq161_cuda.gemv(st, x, None, variant=variant, ksplit=ksplit)
            b = ptq161_cuda.gemv(st, x, None, variant=variant, ksplit=ksplit)
            assert torch.equal(a, b), f"{variant}, ksplit={ksplit}: two calls differ"
    one = ptq161_cuda.gemv(st, x, None, variant="stream", ksplit=1).float()
    for variant in ("stream", "ring"):
        for ksplit in (2, 5, 16):
            other = ptq161_cuda.gemv(st, x, None, variant=variant, ksplit=ksplit).float()
            assert (other - one).norm() / one.norm() < 1e-3


@cuda
@pytest.mark.cuda
def test_selected_by_quantized_linear_and_forced_off(monkeypatch):
    qw = random_layer(512, 1024, 192, device="cuda")
    layer = QuantizedLinear.from_quantized(qw, None, torch.float16).cuda()
    x = torch.randn(4, 1024, device="cuda", dtype=torch.float16)
    assert K.select_kernel(layer, x).name == "ptq161_cuda"
    y = layer(x)
    ref = x.float() @ qw.dequantize().t()
    assert (y.float() - ref).norm() / ref.norm() < 1e-3
    x_big = torch.randn(40, 1024, device="cuda", dtype=torch.float16)  # prefill: dequantize + cuBLAS
    ref_big = x_big.float() @ qw.dequantize().t()
    assert (layer(x_big).float() - ref_big).norm() / ref_big.norm() < 2e-3
    monkeypatch.setenv("LPQ_KERNEL", "reference")
    assert K.select_kernel(layer, x).name == "reference"


@cuda
@pytest.mark.cuda
def test_readable_errors():
    qw = random_layer(64, 128, 32, device="cuda")
    st = ptq161_cuda.prepare_state(qw.tensors, qw.spec, 128, 64)
    with pytest.raises(ValueError, match="must be"):
        ptq161_cuda.gemv(st, torch.randn(2, 100, device="cuda", dtype=torch.float16), None)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        ptq161_cuda.gemv(st, torch.randn(2, 128, device="cuda"), None)
    with pytest.raises(ValueError, match="bias"):
        ptq161_cuda.gemv(st, torch.randn(2, 128, device="cuda", dtype=torch.float16), torch.zeros(3, device="cuda"))


@cuda
@pytest.mark.cuda
def test_cuda_graph_capture():
    qw = random_layer(1024, 1024, 192, device="cuda")
    st = ptq161_cuda.prepare_state(qw.tensors, qw.spec, 1024, 1024)
    x = torch.randn(1, 1024, device="cuda", dtype=torch.float16)
    ref = ptq161_cuda.gemv(st, x, None)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ptq161_cuda.gemv(st, x, None)
    graph.replay()
    torch.cuda.synchronize()
    assert (out.float() - ref.float()).abs().max() < 1e-2
    # replays on new inputs: the split-K counters must be back at zero after every replay
    w = qw.dequantize()
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        ref = x.float() @ w.t()
        assert (out.float() - ref).norm() / ref.norm() < 1e-3
    assert not st["counters"].any()


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("early", ["0", "p161"])
def test_pdl_chain_in_cuda_graph(m, early, monkeypatch):
    """The ring kernel launched with programmatic dependent launch starts while the previous kernel finishes and
    must wait for it before reading x or touching its split-K partials and counters. A chain of layers, each
    reading the output of the one before (directly, or through a torch kernel in between), captured in a CUDA graph
    and replayed on new inputs, equals the same chain launched plainly, bit for bit, at every replay (with the early
    trigger too, which lets the next kernel in right after each block's own wait)."""
    monkeypatch.setattr(uniform_cuda, "PDL_EARLY", uniform_cuda.early_kernels(early))
    k = 1024
    sts = []
    for i in range(6):
        qw = random_layer(k, k, 192, device="cuda", seed=90 + i)
        sts.append(ptq161_cuda.prepare_state(qw.tensors, qw.spec, k, k))
    assert ptq161_cuda.plan(sts[0], m)["kernel"] == "ring"

    def call(pdl):
        def run(st, h):
            monkeypatch.setattr(uniform_cuda, "PDL", pdl)
            return ptq161_cuda.gemv(st, h, None, variant="auto")
        return run

    assert_pdl_chain_matches_plain(sts, m, k, torch.Generator().manual_seed(7 + m), call(True), call(False))
    assert not any(st["counters"].any() for st in sts)


@cuda
@pytest.mark.cuda
def test_compiles_as_one_graph():
    qw = random_layer(1024, 1024, 192, device="cuda")
    layer = QuantizedLinear.from_quantized(qw, None, torch.float16).cuda()
    x = torch.randn(1, 1024, device="cuda", dtype=torch.float16)
    ref = x.float() @ qw.dequantize().t()
    layer(x)  # the kernel is selected and prepared on the first call, eagerly (it reads the mask's values)
    assert layer.kernel.name == "ptq161_cuda"
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    y = compiled(x)
    assert (y.float() - ref).norm() / ref.norm() < 1e-3
