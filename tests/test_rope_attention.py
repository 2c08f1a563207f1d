"""The fused decode attention (rotary, cache write and attention in one call; lpq.fuse.DecodeAttention) on the CPU:
its plain-torch reference against transformers' own rotary + StaticLayer.update + SDPA, and the module's glue (which
calls it takes, the cache it writes, the length it moves on) in a real generate loop with the reference standing in
for the CUDA kernel. The kernel itself against the reference: tests/test_attention_cuda.py (CUDA only)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lpq
import lpq.attention
from lpq.fuse import DecodeAttention, fuse_attention, fuse_for_decode, fuse_siblings
from lpq.kernels import attention_cuda

from conftest import VOCAB, make_model


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pos", [0, 5, 11])
def test_rope_reference_equals_transformers_rotary_cache_update_and_sdpa(dtype, pos):
    from transformers.cache_utils import StaticLayer
    from transformers.models.llama.modeling_llama import LlamaConfig, LlamaRotaryEmbedding, apply_rotary_pos_emb

    heads, d, length = 4, 16, 12
    cfg = LlamaConfig(hidden_size=heads * d, num_attention_heads=heads, max_position_embeddings=64)
    x = torch.zeros(1, 1, heads * d, dtype=dtype)
    cos, sin = LlamaRotaryEmbedding(cfg)(x, torch.tensor([[pos]]))  # [1, 1, D] each
    qkv = torch.randn(1, 1, 3 * heads * d, generator=gen(pos)).to(dtype)
    prefix = torch.randn(2, 1, heads, pos, d, generator=gen(100 + pos)).to(dtype)  # keys/values already cached

    layer = StaticLayer(max_cache_len=length)
    layer.update(prefix[0], prefix[1]) if pos else layer.lazy_initialization(prefix[0], prefix[1])
    q, k, v = qkv.view(1, 1, 3, heads, d).unbind(2)
    q, k = apply_rotary_pos_emb(q.transpose(1, 2).float(), k.transpose(1, 2).float(), cos.float(), sin.float())
    k_all, v_all = layer.update(k.to(dtype), v.transpose(1, 2), )
    mask = torch.arange(length).view(1, 1, 1, length) <= pos
    want = F.scaled_dot_product_attention(q.to(dtype).float(), k_all.float(), v_all.float(), attn_mask=mask)
    want = want.transpose(1, 2).to(dtype)

    k_cache = torch.zeros(1, heads, length, d, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    k_cache[:, :, :pos], v_cache[:, :, :pos] = prefix[0], prefix[1]
    position = torch.tensor(pos)
    got = attention_cuda.rope_reference(qkv, cos, sin, k_cache, v_cache, position, mask, heads)
    assert torch.equal(k_cache, layer.keys) and torch.equal(v_cache, layer.values)
    assert int(position) == pos + 1 == int(layer.cumulative_length)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def llama_without_grouped_heads(seed: int = 0):
    """The tiny test Llama with as many key/value heads as query heads (the fused path's case)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=256, vocab_size=VOCAB, bos_token_id=1,
                      eos_token_id=2)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model.eval()


def test_fused_decode_steps_write_the_cache_and_give_the_same_tokens(monkeypatch):
    """generate with a static cache: prefill by the original forward, then every decode step through the fused call
    (the reference standing in for the kernel) -> the unfused model's tokens, the same cache, one call a layer a step."""
    ids = torch.randint(3, VOCAB, (1, 7), generator=gen(1))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static", return_dict_in_generate=True)
    lpq.attention.register()
    model = llama_without_grouped_heads()
    model.set_attn_implementation(lpq.attention.NAME)
    with torch.no_grad():
        want = model.generate(ids, **kw)

    calls = []

    def stand_in(qkv, cos, sin, k_cache, v_cache, position, mask, heads, scale=None, splits=0):
        calls.append((int(position), tuple(mask.shape) if mask is not None else None))
        return attention_cuda.rope_reference(qkv, cos, sin, k_cache, v_cache, position, mask, heads, scale)

    monkeypatch.setattr(DecodeAttention, "_kernel_ready", staticmethod(lambda h: True))
    monkeypatch.setattr(attention_cuda, "rope_problem", lambda *a: None)
    monkeypatch.setattr(attention_cuda, "rope_cache_attention", stand_in)
    report = fuse_for_decode(model)
    assert report["attention"] == [f"model.layers.{i}.self_attn" for i in range(2)]
    with torch.no_grad():
        got = model.generate(ids, **kw)
    assert torch.equal(got.sequences, want.sequences)
    # 5 decode steps (the first new token comes from the prefill) x 2 layers, at positions 7..11, with a mask
    assert [c[0] for c in calls] == [p for p in range(7, 12) for _ in range(2)]
    assert all(c[1] is not None for c in calls)
    def cache_of(out):  # the output's field is ``cache`` from transformers 5.24, ``past_key_values`` before
        return getattr(out, "cache", None) or out.past_key_values

    for mine, theirs in zip(cache_of(got).layers, cache_of(want).layers):
        torch.testing.assert_close(mine.keys, theirs.keys, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mine.values, theirs.values, rtol=1e-5, atol=1e-6)
        assert int(mine.cumulative_length) == int(theirs.cumulative_length) == 12


def test_other_calls_run_the_original_attention(monkeypatch):
    """Without the lpq implementation, with a dynamic cache, or with grouped heads, the fused module never calls
    the kernel and gives the original logits."""
    monkeypatch.setattr(DecodeAttention, "_kernel_ready", staticmethod(lambda h: True))
    monkeypatch.setattr(attention_cuda, "rope_problem", lambda *a: None)

    def refuse(*a, **k):
        raise AssertionError("the fused kernel was called")

    monkeypatch.setattr(attention_cuda, "rope_cache_attention", refuse)
    ids = torch.randint(3, VOCAB, (1, 5), generator=gen(2))
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    for model, static, attn in ((llama_without_grouped_heads(), True, "sdpa"),
                                (llama_without_grouped_heads(), False, lpq.attention.NAME),
                                (make_model("llama"), True, lpq.attention.NAME)):  # 4 heads over 2
        lpq.attention.register()
        model.set_attn_implementation(attn)
        extra = dict(cache_implementation="static") if static else {}
        with torch.no_grad():
            want = model.generate(ids, **kw, **extra)
            fuse_for_decode(model)
            assert isinstance(model.model.layers[0].self_attn, DecodeAttention)
            got = model.generate(ids, **kw, **extra)
        assert torch.equal(got, want)


def test_only_known_attentions_with_fused_projections_are_wrapped():
    gemma = make_model("gemma")
    fuse_siblings(gemma)
    assert fuse_attention(gemma) == []  # GemmaAttention: not a known forward
    plain = make_model("llama")
    assert fuse_attention(plain) == []  # q/k/v not fused
    mistral = make_model("mistral")
    fuse_siblings(mistral)
    assert fuse_attention(mistral) == [f"model.layers.{i}.self_attn" for i in range(2)]
    wrapped = mistral.model.layers[0].self_attn
    assert not wrapped._sliding_window()
    wrapped.attn.config.sliding_window = 8
    assert wrapped._sliding_window()  # left to the original forward
    assert fuse_for_decode(make_model("llama"), attention=False)["attention"] == []
