"""QuantizedLinear with a kernel that holds its own copy of the weights (as the CUDA kernels do): the
canonical buffers move to host memory, and tensors(), state_dict(), moves and load_state_dict stay right.
CPU-only: a test kernel stands in for the CUDA one, and the host-memory move is enabled for the CPU."""

from __future__ import annotations

import pytest
import torch

import lpq.kernels as K
import lpq.nn as lpq_nn
from lpq.methods.rtn import rtn_quantize
from lpq.nn import QuantizedLinear
from lpq.spec import QuantSpec


class HoldingKernel(K.Kernel):
    """Dequantizes once at prepare and then reads only that copy."""
    name = "test_holding"
    formats = ("uniform",)
    priority = 1000
    holds_weights = True

    def prepare(self, layer) -> None:
        layer.kernel_state["w"] = layer.dequantize()  # [N, K] float32, from tensors()

    def forward(self, layer, x):
        return x @ layer.kernel_state["w"].to(x.dtype).t()


@pytest.fixture
def holding(monkeypatch):
    monkeypatch.setattr(K, "_KERNELS", [HoldingKernel()] + list(K._KERNELS))
    monkeypatch.setattr(lpq_nn, "_host_copy_helps", lambda device: True)
    monkeypatch.delenv("LPQ_KERNEL", raising=False)
    monkeypatch.delenv("LPQ_KEEP_CANONICAL", raising=False)


def make_layer(seed: int, n: int = 48, k: int = 64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    qw = rtn_quantize(w, QuantSpec(bits=4, group_size=32))
    return qw, QuantizedLinear.from_quantized(qw, None, torch.float32)


def test_canonical_buffers_released_and_still_seen(holding):
    qw, layer = make_layer(0)
    x = torch.randn(5, 64)
    y = layer(x)
    assert layer.kernel.name == "test_holding"
    assert layer.canonical_home == x.device
    torch.testing.assert_close(y, x @ qw.dequantize().t())
    for name, t in layer.tensors().items():
        assert torch.equal(t, qw.tensors[name])
    sd = layer.state_dict()
    assert set(sd) == set(qw.tensors) and all(torch.equal(sd[n], qw.tensors[n]) for n in qw.tensors)


def test_moving_the_layer_restores_the_canonical_buffers_first(holding):
    qw, layer = make_layer(1)
    x = torch.randn(2, 64)
    layer(x)
    layer.to(torch.float64)
    assert layer.canonical_home is None and layer.kernel_state == {}
    torch.testing.assert_close(layer(x.double()), x.double() @ qw.dequantize().double().t())


def test_load_state_dict_replaces_the_kernel_copy(holding):
    _, layer = make_layer(2)
    other, _ = make_layer(3)
    x = torch.randn(4, 64)
    layer(x)
    layer.load_state_dict(other.tensors)
    # without the post-load hook the kernel would keep computing with the first weights
    torch.testing.assert_close(layer(x), x @ other.dequantize().t())


def test_keep_canonical_env(holding, monkeypatch):
    monkeypatch.setenv("LPQ_KEEP_CANONICAL", "1")
    _, layer = make_layer(4)
    layer(torch.randn(1, 64))
    assert layer.canonical_home is None


def test_no_release_for_kernels_that_read_the_canonical_buffers(monkeypatch):
    monkeypatch.setattr(lpq_nn, "_host_copy_helps", lambda device: True)
    monkeypatch.setenv("LPQ_KERNEL", "reference")
    _, layer = make_layer(5)
    layer(torch.randn(1, 64))
    assert layer.canonical_home is None
