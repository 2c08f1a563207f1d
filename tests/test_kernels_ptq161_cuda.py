"""The ptq161 CUDA GEMV against the format's own dequantize (the reference), on fresh random layers.

CUDA tests skip without a GPU; the state preparation and the fallback are tested everywhere.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lpq.kernels as K
from lpq.formats.ptq161 import PTQ161, pack_ptq161
from lpq.kernels import ptq161_cuda
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
@pytest.mark.parametrize("variant", ["stream", "stream-ffma", "stream-1row", "first"])
def test_gemv_matches_reference(n, k, s, dtype, variant):
    qw = random_layer(n, k, s, device="cuda", seed=n + k)
    w = qw.dequantize()  # fp32 reference weight
    st = ptq161_cuda.prepare_state(qw.tensors, qw.spec, k, n)
    bias = torch.randn(n, device="cuda", dtype=dtype) * 0.1
    # the streaming kernel's own plan, then forced splits: one (multi-stage ranges), a few, the most
    ksplits = (0, 1, 3, 16) if variant.startswith("stream") else (0,)
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
def test_stream_kernel_is_deterministic_and_splits_agree():
    """The last block adds the partials in split order: the same call twice is bit-equal, and every split
    count gives the same result up to fp32 summation order."""
    qw = random_layer(8192, 4096, 800, device="cuda", seed=3)
    st = ptq161_cuda.prepare_state(qw.tensors, qw.spec, 4096, 8192)
    x = torch.randn(4, 4096, device="cuda", dtype=torch.float16)
    for ksplit in (0, 2, 5, 16):
        a = ptq161_cuda.gemv(st, x, None, ksplit=ksplit)
        b = ptq161_cuda.gemv(st, x, None, ksplit=ksplit)
        assert torch.equal(a, b), f"ksplit={ksplit}: two calls differ"
    one = ptq161_cuda.gemv(st, x, None, ksplit=1).float()
    for ksplit in (2, 5, 16):
        other = ptq161_cuda.gemv(st, x, None, ksplit=ksplit).float()
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
