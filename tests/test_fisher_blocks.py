"""The block-by-block Fisher equals the whole-model one, leaves the model as found, and auto picks it
when the whole model would not fit on the device.

Tolerance: both ways run the same float32 operations on the same inputs (the block-wise backward is the
whole backward cut at the block boundaries), so the only possible difference is the order in which the
autograd engine sums gradient contributions (residual branches): a few float32 ulps (1.2e-7 each) per
operation over two blocks, far below 1e-5 of each layer's largest value. On the CPU the results are in
fact bit-identical; a wrong gradient (a block skipped, the final norm or loss missed, a stale state) is
off by tens of percent.
"""

from __future__ import annotations

import pytest
import torch

import lpq.methods.fisher as F
from lpq.errors import LpqError, SpecError
from lpq.methods import get_method
from lpq.models.arch import find_blocks, find_linears

from conftest import FAMILIES, make_model

HAS_CUDA = torch.cuda.is_available()


def _names(model, blocks_wanted=None):
    blocks_name, blocks = find_blocks(model)
    return [f"{blocks_name}.{i}.{n}" for i, b in enumerate(blocks) if blocks_wanted is None or i in blocks_wanted
            for n in find_linears(b)]


def _tokens(s=3, l=16, seed=0):
    return torch.randint(3, 100, (s, l), generator=torch.Generator().manual_seed(seed))


def _assert_same_fisher(a, b, names):
    assert set(a) == set(b) == set(names)
    for n in names:
        assert a[n].dtype == b[n].dtype == torch.float32 and a[n].device.type == "cpu"
        assert a[n].shape == b[n].shape
        scale = float(a[n].abs().max())
        assert scale > 0, n  # every layer got a gradient
        torch.testing.assert_close(b[n], a[n], rtol=1e-5, atol=1e-5 * scale, msg=n)


def _state(model):
    return ({n: p.detach().clone() for n, p in model.named_parameters()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            {n: p.device for n, p in model.named_parameters()},
            {n: m.training for n, m in model.named_modules()})


def _assert_state(model, before):
    values, requires, devices, training = before
    after_values, after_requires, after_devices, after_training = _state(model)
    assert after_requires == requires and after_devices == devices and after_training == training
    for n, v in values.items():
        assert torch.equal(after_values[n], v), n
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_equal_whole(family):
    model = make_model(family)
    names = _names(model)
    tokens = _tokens()  # 3 windows in batches of 2: the last batch is smaller
    # an unusual state to be restored: training mode, a mixed pattern of requires_grad
    model.train()
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i % 3 != 0)
    before = _state(model)
    whole = F.fisher_whole(model, tokens, names, "cpu", batch_size=2)
    _assert_state(model, before)
    blocks = F.fisher_blocks(model, tokens, names, "cpu", batch_size=2)
    _assert_state(model, before)
    _assert_same_fisher(whole, blocks, names)


def test_whole_is_deterministic_with_dropout_layers():
    """OPT applies dropout through functional calls in training mode: the Fisher must be taken in eval mode."""
    model = make_model("opt")
    names = _names(model)
    a = F.fisher_whole(model, _tokens(), names)
    b = F.fisher_whole(model.train(), _tokens(), names)
    for n in names:
        assert torch.equal(a[n], b[n]), n


@pytest.mark.parametrize("wanted", [{0}, {1}])
def test_blocks_with_a_subset_of_layers(wanted):
    """Only some blocks' linears named: the backward stops at the first of them (block 1: never enters block 0)."""
    model = make_model("llama")
    names = _names(model, wanted)
    tokens = _tokens(s=2, l=12, seed=1)
    _assert_same_fisher(F.fisher_whole(model, tokens, names), F.fisher_blocks(model, tokens, names), names)


def test_blocks_refuses_layers_outside_the_blocks():
    model = make_model("llama")
    with pytest.raises(LpqError, match="fisher_mode=whole"):
        F.fisher_blocks(model, _tokens(), ["lm_head"])
    assert F.fisher_blocks(model, _tokens(), []) == {}


def test_auto_mode_picks_by_memory(monkeypatch):
    model = make_model("llama")
    names = _names(model)
    shape = (4, 64)
    need = F.whole_fisher_bytes(model, names, 1, 64, "cuda")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(model.get_submodule(n).weight.numel() * 4 for n in names)
    assert need > weights + grads  # plus activations and logits
    assert F.whole_fisher_bytes(model, names, 1, 128, "cuda") > need  # longer windows need more
    assert F.whole_fisher_bytes(model, names, 1, 64, "cpu") < need  # the weights are on the CPU already
    assert F.choose_fisher_mode("auto", model, names, shape, 1, "cuda", free_bytes=need // 2) == "blocks"
    assert F.choose_fisher_mode("auto", model, names, shape, 1, "cuda", free_bytes=need * 2) == "whole"
    assert F.choose_fisher_mode("auto", model, names, shape, 1, "cuda", free_bytes=None) == "whole"
    assert F.choose_fisher_mode("blocks", model, names, shape, 1, "cpu") == "blocks"
    assert F.choose_fisher_mode("whole", model, names, shape, 1, "cuda", free_bytes=1) == "whole"
    assert F.choose_fisher_mode("auto", model, names, shape, 1, "cpu") == "whole"  # host memory holds it

    # fisher_diagonal follows the choice; the device's free memory is asked through device_free_bytes
    calls = []
    real_blocks, real_whole = F.fisher_blocks, F.fisher_whole
    monkeypatch.setattr(F, "fisher_blocks", lambda *a, **k: calls.append("blocks") or real_blocks(*a, **k))
    monkeypatch.setattr(F, "fisher_whole", lambda *a, **k: calls.append("whole") or real_whole(*a, **k))
    tokens = _tokens(2, 16)
    F.fisher_diagonal(model, tokens, names, "cpu")
    monkeypatch.setattr(F, "device_free_bytes", lambda device: 1000)  # a device far too small
    F.fisher_diagonal(model, tokens, names, "cpu")
    F.fisher_diagonal(model, tokens, names, "cpu", mode="whole")
    assert calls == ["whole", "blocks", "whole"]


def test_fisher_mode_option():
    assert get_method("squeezellm").fisher_mode == "auto"
    assert get_method("squeezellm", fisher_mode="Blocks").fisher_mode == "blocks"
    with pytest.raises(SpecError, match="auto, whole or blocks"):
        get_method("squeezellm", fisher_mode="fast")


def _packed(result):
    """{layer: (spec without the fisher_mode the run was asked for, packed tensors)}"""
    out = {}
    for n, m in result.model.named_modules():
        if hasattr(m, "quantized_weight"):
            spec = m.spec.to_dict()
            spec["options"].pop("fisher_mode", None)
            out[n] = (spec, {k: v.clone() for k, v in m.tensors().items()})
    return out


def test_squeezellm_same_packed_result_with_blocks(tmp_path, monkeypatch):
    """The whole quantization with the block-wise Fisher (asked for, and chosen by auto on a device too
    small for the whole model) packs exactly what the whole-model Fisher gives."""
    import lpq

    calls = []
    real = F.fisher_blocks
    monkeypatch.setattr(F, "fisher_blocks", lambda *a, **k: calls.append(1) or real(*a, **k))
    tokens = _tokens(4, 32, seed=2)
    kwargs = dict(method="squeezellm", bits=3, group_size=-1, calib=tokens, device="cpu", dtype=torch.float32)
    options = {"outliers": 0.4, "sensitive": 0.5, "iters": 20}
    whole = _packed(lpq.quantize(make_model("gpt2"), tmp_path / "whole",
                                 method_options={**options, "fisher_mode": "whole"}, **kwargs))
    assert calls == []
    blocks = _packed(lpq.quantize(make_model("gpt2"), tmp_path / "blocks",
                                  method_options={**options, "fisher_mode": "blocks"}, **kwargs))
    assert calls == [1]
    monkeypatch.setattr(F, "device_free_bytes", lambda device: 1000)
    auto = _packed(lpq.quantize(make_model("gpt2"), tmp_path / "auto", method_options=options, **kwargs))
    assert calls == [1, 1]
    assert whole.keys() == blocks.keys() == auto.keys() and len(whole) == 8
    assert sum(spec["options"]["nnz"] for spec, _ in whole.values()) > 0
    for name, (spec, tensors) in whole.items():
        for other in (blocks, auto):
            assert other[name][0] == spec, name
            assert other[name][1].keys() == tensors.keys()
            for k, v in tensors.items():
                assert torch.equal(other[name][1][k], v), (name, k)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (CI has none); run on the device")
def test_blocks_on_cuda_match_whole_and_leave_the_model_on_the_cpu():
    model = make_model("llama")
    names = _names(model)
    before = _state(model)
    blocks = F.fisher_blocks(model, _tokens(), names, "cuda", batch_size=2)
    _assert_state(model, before)
    whole = F.fisher_whole(model, _tokens(), names, "cuda", batch_size=2)
    _assert_state(model, before)
    _assert_same_fisher(whole, blocks, names)


def _fp16_setup():
    import copy

    model = make_model("llama")
    with torch.no_grad():  # shrink every gradient into fp16's subnormal range, as long windows do on real models
        model.model.norm.weight.mul_(1e-3)
    names = _names(model)
    tokens = _tokens(4, 64)
    reference = F.fisher_whole(model, tokens, names, "cpu", 2)  # float32
    return copy.deepcopy(model).half(), tokens, names, reference


def _worst_relative_error(fisher, reference, names):
    return max(float((fisher[n] - reference[n]).norm() / reference[n].norm()) for n in names)


def test_fp16_fisher_is_loss_scaled(monkeypatch):
    """An fp16 model's Fisher matches the float32 one within fp16 rounding, both ways, because the loss
    is scaled before the backward pass; without the scale (1.0) a quarter of the signal is lost to
    underflow in this setup, so the setup does exercise it. A starting scale so large that every
    gradient overflows is halved until it fits, with the same result."""
    half, tokens, names, reference = _fp16_setup()
    for start, bound in ((F.FP16_LOSS_SCALE, 2e-2), (2.0**60, 2e-2)):
        monkeypatch.setattr(F, "FP16_LOSS_SCALE", start)
        for fn in (F.fisher_whole, F.fisher_blocks):
            assert _worst_relative_error(fn(half, tokens, names, "cpu", 2), reference, names) < bound, (start, fn)
    monkeypatch.setattr(F, "FP16_LOSS_SCALE", 1.0)
    assert _worst_relative_error(F.fisher_whole(half, tokens, names, "cpu", 2), reference, names) > 0.1
