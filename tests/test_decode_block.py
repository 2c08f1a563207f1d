"""The residual epilogue and the fused decoder block (lpq.epilogue.residual_epilogue, ``norm_sq``;
lpq.fuse.DecodeBlock) on the CPU: the maths against RMSNorm and the block's own adds, and the block's glue in a real
generate loop (the attention kernel's reference standing in for the CUDA kernel; every linear through the generic
epilogues, as nn.Linear and as QuantizedLinear on its reference kernel). The CUDA kernel's epilogue against these:
tests/test_epilogue_cuda.py."""

from __future__ import annotations

import pytest
import torch

import lpq
import lpq.attention
import lpq.fuse
from lpq.epilogue import generic_forward, linear_forward, linear_residual, residual_epilogue, rms_scale
from lpq.fuse import DecodeAttention, DecodeBlock, fuse_blocks, fuse_for_decode
from lpq.kernels import attention_cuda

from conftest import make_model
from test_epilogue import hf_rms_norm, randomize_norms, uniform_layer
from test_rope_attention import llama_without_grouped_heads


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_residual_epilogue_is_the_blocks_add_then_the_norms_input(dtype):
    y = torch.randn(3, 1, 40, generator=gen(1)).to(dtype)
    r = torch.randn(3, 1, 40, generator=gen(2)).to(dtype)
    w = (torch.rand(40, generator=gen(3)) + 0.5).to(dtype)
    h, x, sq = residual_epilogue(y, r, w)
    assert h.dtype == x.dtype == dtype and sq.dtype == torch.float32 and sq.shape == (3, 1, 1)
    assert torch.equal(h, y + r)  # rounded as the block's own add
    assert torch.equal(x, w * h)
    torch.testing.assert_close(sq, h.float().pow(2).sum(-1, keepdim=True))


def test_norm_from_sums_of_squares_equals_the_norm_of_h():
    """norm_sq: any split of sum(h^2) into slots gives the scale of RMSNorm(h) (= norm_of=h)."""
    layer = torch.nn.Linear(64, 24, bias=False)
    h = torch.randn(5, 64, generator=gen(4)) * 3
    w = torch.rand(64, generator=gen(5)) + 0.5
    slots = h.pow(2).view(5, 8, 8).sum(-1)  # [5, 8]: eight partial sums a row
    with torch.no_grad():
        want = layer(hf_rms_norm(h, w, 1e-6))
        assert torch.allclose(generic_forward(layer, w * h, norm_of=h, norm_eps=1e-6), want, atol=1e-5)
        got = generic_forward(layer, w * h, norm_sq=slots, norm_eps=1e-6)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(generic_forward(layer, w * h, norm_sq=slots[:, :4], norm_eps=1e-6), want, atol=1e-3)
    torch.testing.assert_close(torch.rsqrt(slots.sum(-1, keepdim=True) / 64 + 1e-6), rms_scale(h, 1e-6))


def test_quantized_linear_residual_matches_the_generic_path():
    layer = uniform_layer(64, 64, bias=True)
    x = torch.randn(2, 3, 64, generator=gen(6))
    r = torch.randn(2, 3, 64, generator=gen(7))
    w = torch.rand(64, generator=gen(8)) + 0.5
    with torch.no_grad():
        h, xn, sq = linear_residual(layer, x, r, w)
        want_h = layer(x) + r
        torch.testing.assert_close(h, want_h)
        torch.testing.assert_close(xn, w * want_h)
        torch.testing.assert_close(sq.sum(-1), want_h.pow(2).sum(-1))
        # the consumer side on the same layer kind
        y = linear_forward(uniform_layer(64, 32), xn, norm_sq=sq, norm_eps=1e-5)
        assert y.shape == (2, 3, 32)


def stand_in_attention(monkeypatch):
    """The CUDA-only attention kernel replaced by its reference, as if the extension were built."""
    monkeypatch.setattr(DecodeAttention, "_kernel_ready", staticmethod(lambda h: True))
    monkeypatch.setattr(attention_cuda, "rope_problem", lambda *a: None)
    monkeypatch.setattr(attention_cuda, "rope_cache_attention",
                        lambda qkv, cos, sin, kc, vc, pos, mask, heads, scale=None, splits=0:
                        attention_cuda.rope_reference(qkv, cos, sin, kc, vc, pos, mask, heads, scale))


def spy_epilogues(monkeypatch) -> dict:
    """Record what the fused blocks hand to the projections: the outputs of every residual epilogue, and the
    norm_sq of every consumer."""
    seen = {"residual_out": [], "norm_sq": []}
    real_residual, real_forward = lpq.fuse.linear_residual, lpq.fuse.linear_forward

    def residual(layer, x, r, w):
        out = real_residual(layer, x, r, w)
        seen["residual_out"].append(out)
        return out

    def forward(layer, x, norm_of=None, norm_eps=0.0, swiglu=False, norm_sq=None):
        if norm_sq is not None:
            seen["norm_sq"].append(norm_sq)
        return real_forward(layer, x, norm_of=norm_of, norm_eps=norm_eps, swiglu=swiglu, norm_sq=norm_sq)

    monkeypatch.setattr(lpq.fuse, "linear_residual", residual)
    monkeypatch.setattr(lpq.fuse, "linear_forward", forward)
    return seen


@pytest.mark.parametrize("bits", [None, 4])
def test_fused_blocks_give_the_same_tokens_and_cache(monkeypatch, bits):
    """generate with a static cache: prefill by the blocks' own forward, then every decode step through the fused
    blocks -> the unfused model's tokens and cache. Each step runs three residual epilogues (o_proj of both blocks,
    down_proj of the first) and four folded norms, the second block's input norm from the first block's sums."""
    ids = torch.randint(3, 100, (1, 7), generator=gen(9))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static",
              return_dict_in_generate=True, output_logits=True)
    lpq.attention.register()
    model = llama_without_grouped_heads()
    randomize_norms(model)
    if bits is not None:
        model = lpq.quantize(model, None, method="rtn", bits=bits, group_size=32, device="cpu").model.eval()
    model.set_attn_implementation(lpq.attention.NAME)
    with torch.no_grad():
        want = model.generate(ids, **kw)

    stand_in_attention(monkeypatch)
    seen = spy_epilogues(monkeypatch)
    report = fuse_for_decode(model, blocks=True)
    assert report["blocks"] == ["model.layers.0", "model.layers.1"]
    first, second = model.model.layers
    assert isinstance(first, DecodeBlock) and first.next_block is second and second.next_block is None
    assert first.mlp is first.block.mlp and first.self_attn is first.block.self_attn  # read through the wrapper
    with torch.no_grad():
        got = model.generate(ids, **kw)
    assert torch.equal(got.sequences, want.sequences)
    for mine, theirs in zip(got.logits, want.logits):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    steps = 5  # the first new token comes from the prefill
    assert len(seen["residual_out"]) == 3 * steps and len(seen["norm_sq"]) == 4 * steps
    for s in range(steps):
        handed = seen["residual_out"][3 * s + 1][2]  # down_proj of the first block: its sums of squares
        assert seen["norm_sq"][4 * s + 2] is handed  # ... are the second block's q/k/v norm
    assert first._carry is None and second._carry is None  # nothing held between steps

    def cache_of(out):
        return getattr(out, "cache", None) or out.past_key_values

    for mine, theirs in zip(cache_of(got).layers, cache_of(want).layers):
        torch.testing.assert_close(mine.keys, theirs.keys, rtol=1e-5, atol=1e-5)
        assert int(mine.cumulative_length) == int(theirs.cumulative_length) == 12


def test_other_calls_run_the_blocks_own_forward(monkeypatch):
    """A dynamic cache, SDPA, or a hook on the block: the fused block never runs its epilogues and gives the
    original tokens."""
    stand_in_attention(monkeypatch)
    seen = spy_epilogues(monkeypatch)
    lpq.attention.register()
    ids = torch.randint(3, 100, (1, 5), generator=gen(10))
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    for static, attn, hooked in ((False, lpq.attention.NAME, False), (True, "sdpa", False),
                                 (True, lpq.attention.NAME, True)):
        model = llama_without_grouped_heads()
        model.set_attn_implementation(attn)
        extra = dict(cache_implementation="static") if static else {}
        with torch.no_grad():
            want = model.generate(ids, **kw, **extra)
            fuse_for_decode(model, blocks=True)
            calls = []
            if hooked:
                model.model.layers[1].block.register_forward_hook(lambda m, a, o: calls.append(1))
            got = model.generate(ids, **kw, **extra)
        assert torch.equal(got, want)
        if hooked:  # the hooked block runs its own forward (its hook sees every call); the first one is fused:
            # o_proj and down_proj in each of the 3 decode steps, the carry left unused
            assert len(calls) == 4 and len(seen["residual_out"]) == 2 * 3
            assert model.model.layers[1]._carry is None
            seen["residual_out"].clear()
        else:
            assert seen["residual_out"] == []


def test_only_blocks_with_fused_attention_gated_mlp_and_plain_norms_are_wrapped():
    assert fuse_blocks(make_model("llama")) == []  # nothing fused under it
    folded = make_model("llama")
    fuse_for_decode(folded, norms=("post_attention_layernorm",))
    assert fuse_blocks(folded) == []  # a folded norm: its projection scales by h itself
    no_attention = make_model("llama")
    assert fuse_for_decode(no_attention, attention=False, blocks=True)["blocks"] == []
    mistral = make_model("mistral")
    assert fuse_for_decode(mistral, blocks=True)["blocks"] == ["model.layers.0", "model.layers.1"]
