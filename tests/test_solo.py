"""SOLO: low-bit state quantization round-trips within its bounds; the optimizer trains and resumes."""

import copy

import pytest
import torch

from lpq.errors import LpqError
from lpq.finetune.solo import (SOLO, dequantize_log, dequantize_signed, log_ratio_bound, pack_codes, quantize_log,
                               quantize_signed, signed_error_bound, unpack_codes)

BLOCK = 64


def _heavy_tailed(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * torch.exp(2 * torch.randn(n, generator=g))  # spans orders of magnitude


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("stochastic", [False, True])
def test_signed_roundtrip_within_bound(bits, stochastic):
    x = _heavy_tailed(1000)  # not a multiple of the block: the tail is padded
    codes, absmax = quantize_signed(x, bits, BLOCK, stochastic, torch.Generator().manual_seed(1))
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2 ** bits - 2
    deq = dequantize_signed(codes, absmax, bits, BLOCK, x.numel())
    bound = signed_error_bound(absmax, bits, stochastic).repeat_interleave(BLOCK)[: x.numel()]
    err = (x - deq).abs()
    assert (err <= bound * (1 + 1e-5) + 1e-12).all()
    # each block's largest entry is exact (it sets the scale)
    blocks = torch.cat([x, x.new_zeros(-x.numel() % BLOCK)]).view(-1, BLOCK)
    top = blocks.abs().argmax(dim=1) + torch.arange(blocks.shape[0]) * BLOCK
    top = top[top < x.numel()]
    torch.testing.assert_close(deq[top], x[top])
    if not stochastic:  # a grid point is its own code
        again = dequantize_signed(*quantize_signed(deq, bits, BLOCK), bits, BLOCK, x.numel())
        torch.testing.assert_close(again, deq)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_log_roundtrip_within_relative_bound(bits):
    x = _heavy_tailed(1000).square()  # second moments: positive, many orders of magnitude
    codes, lo, hi = quantize_log(x, bits, BLOCK, stochastic=False)
    assert int(codes.max()) <= 2 ** bits - 1
    deq = dequantize_log(codes, lo, hi, bits, BLOCK, x.numel())
    rho = log_ratio_bound(lo, hi, bits).repeat_interleave(BLOCK)[: x.numel()]
    ratio = deq / x
    assert (ratio <= rho.sqrt() * (1 + 1e-4)).all() and (ratio >= rho.rsqrt() * (1 - 1e-4)).all()
    # block extremes are exact, and small entries keep their size (a linear grid with the same
    # levels would map everything below block max / (2 * (2**bits - 1)) to zero)
    assert torch.isclose(deq.max(), x.max(), rtol=1e-5)
    block_max = hi.repeat_interleave(BLOCK)[: x.numel()]
    small = x < block_max / (2 * (2 ** bits - 1))
    assert small.sum() > 100 and (deq[small] > 0).all()


def test_log_stochastic_is_unbiased():
    x = torch.tensor([1e-6, 3e-6, 7e-5, 2e-4, 9e-4, 1e-3] * 8)
    gen = torch.Generator().manual_seed(0)
    acc = torch.zeros_like(x)
    n = 4000
    for _ in range(n):
        acc += dequantize_log(*quantize_log(x, 3, 48, stochastic=True, generator=gen), 3, 48, x.numel())
    torch.testing.assert_close(acc / n, x, rtol=0.05, atol=0)


def test_all_zero_block():
    x = torch.zeros(64)
    deq = dequantize_log(*quantize_log(x, 3, 32), 3, 32, 64)
    assert torch.equal(deq, x)
    deq = dequantize_signed(*quantize_signed(x, 3, 32), 3, 32, 64)
    assert torch.equal(deq, x)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_roundtrip(bits):
    codes = torch.randint(0, 2 ** bits, (256,), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32 and packed.numel() * 32 == 256 * bits
    assert torch.equal(unpack_codes(packed, bits), codes)


def _tiny_problem(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
    x = torch.randn(256, 32)
    y = torch.randn(256, 4)
    return model, x, y


def _loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_steps_lower_the_loss(bits):
    model, x, y = _tiny_problem()
    opt = SOLO(model.parameters(), lr=3e-3, bits=bits, min_quant_numel=0, block_size=32)
    first = _loss(model, x, y).item()
    for _ in range(30):
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
    assert _loss(model, x, y).item() < 0.8 * first
    # every state is held packed and low-bit
    for state in opt.state.values():
        assert state["m_codes"].dtype == torch.int32 and "m" not in state


def test_on_a_tiny_language_model():
    from conftest import make_model

    model = make_model("llama")
    model.train()
    ids = torch.randint(3, 100, (4, 32), generator=torch.Generator().manual_seed(0))
    opt = SOLO(model.parameters(), lr=1e-3, bits=3)
    first = model(input_ids=ids, labels=ids).loss.item()
    for _ in range(5):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    assert model(input_ids=ids, labels=ids).loss.item() < first - 0.05


def test_state_memory_is_a_fraction_of_adamw():
    model, x, y = _tiny_problem()
    adam_model = copy.deepcopy(model)
    solo = SOLO(model.parameters(), lr=1e-3, bits=3, min_quant_numel=0, block_size=32)
    adam = torch.optim.AdamW(adam_model.parameters(), lr=1e-3)
    for m, o in ((model, solo), (adam_model, adam)):
        o.zero_grad()
        _loss(m, x, y).backward()
        o.step()
    adam_bytes = sum(v.numel() * v.element_size() for s in adam.state.values() for k, v in s.items() if k != "step")
    # 3-bit codes for m and v (6 bits) plus fp32 block scales (32/32 + 64/32 bits) per 64 fp32 bits
    assert solo.state_bytes() < 0.16 * adam_bytes


def test_state_dict_resume_is_exact():
    model, x, y = _tiny_problem()
    twin = copy.deepcopy(model)
    opt = SOLO(model.parameters(), lr=3e-3, bits=3, min_quant_numel=0, block_size=32, stochastic=True)
    for _ in range(3):
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    twin.load_state_dict(model.state_dict())
    opt2 = SOLO(twin.parameters(), lr=3e-3, bits=3, min_quant_numel=0, block_size=32, stochastic=True, seed=123)
    opt2.load_state_dict(saved)
    for state in opt2.state.values():
        assert state["m_codes"].dtype == torch.int32  # not cast to float by torch's loader
    for m, o in ((model, opt), (twin, opt2)):
        for _ in range(3):
            o.zero_grad()
            _loss(m, x, y).backward()
            o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_bad_bits():
    with pytest.raises(LpqError, match="state-bits 5"):
        SOLO([torch.nn.Parameter(torch.zeros(4))], bits=5)


@pytest.mark.parametrize("bits", [2, 4])
def test_one_flat_group_equals_an_optimizer_per_tensor(bits):
    """The group's tensors share one flat state, padded per tensor to whole blocks: every tensor must
    move exactly as under its own SOLO, including a tensor without a gradient in some steps (it keeps
    its states and its step count) and a tensor small enough for fp32 states."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(7, 50), (64,), (3, 3), (40, 33)]  # 350, 64, 9 (fp32 states), 1320 entries
    together = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    alone = [torch.nn.Parameter(t.detach().clone()) for t in together]
    kw = dict(lr=1e-2, bits=bits, min_quant_numel=32, block_size=64, weight_decay=0.1)
    opt = SOLO(together, **kw)
    single = [SOLO([p], **kw) for p in alone]
    for step in range(6):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for i, (a, b) in enumerate(zip(together, alone)):
            skip = i == 1 and step in (2, 3)
            a.grad = None if skip else grads[i].clone()
            b.grad = None if skip else grads[i].clone()
        opt.step()
        for o, b in zip(single, alone):
            if b.grad is not None:
                o.step()
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
