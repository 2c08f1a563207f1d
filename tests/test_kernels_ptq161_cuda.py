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


# (N, K, S): tile edges of the kernel: 256 rows a block, 512 binarized and 128 salient channels a tile
SHAPES = [(1, 40, 8), (200, 320, 64), (257, 1064, 136), (300, 576, 0), (64, 128, 128), (4100, 2048, 416),
          (33, 1608, 328)]


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("n,k,s", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemv_matches_reference(n, k, s, dtype):
    qw = random_layer(n, k, s, device="cuda", seed=n + k)
    w = qw.dequantize()  # fp32 reference weight
    st = ptq161_cuda.prepare_state(qw.tensors, qw.spec, k, n)
    bias = torch.randn(n, device="cuda", dtype=dtype) * 0.1
    for m in (1, 2, 3, 7, 16, 17, 64):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        poison_cache(3 * m * n + (1 << 16), torch.float32)
        y = ptq161_cuda.gemv(st, x, bias)
        ref = F.linear(x.float(), w, bias.float())
        assert torch.isfinite(y).all(), f"unwritten or NaN outputs at m={m}"
        err = (y.float() - ref).norm() / ref.norm()
        tol = 1e-3 if dtype == torch.float16 else 8e-3
        assert err < tol, f"m={m}: relative error {err:.2e}"


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
