"""lpq's attention implementation: the reference against torch's SDPA, and the transformers integration.

The CUDA kernel against the reference is in test_attention_cuda.py (skips without a GPU). Here, on the CPU:
the reference computes attention (GQA, bool and additive masks) as SDPA does, the model with attention
"lpq" gives the same logits and tokens as with SDPA (on the CPU every call goes to SDPA), and the checks
that route a call to the kernel name what they refuse.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lpq
from lpq.kernels import attention_cuda


def sdpa(q, k, v, mask):
    rep = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(rep, 1),
                                         v.float().repeat_interleave(rep, 1),
                                         attn_mask=None if mask is None else (mask if mask.dtype == torch.bool else mask.float()))
    return out.transpose(1, 2)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_reference_matches_sdpa(heads, kv_heads, mask_kind):
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    b, length, d, nq = 2, 37, 64, 3
    q = torch.randn(b, heads, nq, d, generator=g)
    k = torch.randn(b, kv_heads, length, d, generator=g)
    v = torch.randn(b, kv_heads, length, d, generator=g)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(b, 1, nq, length, generator=g) > 0.4
        mask[..., 0] = True  # every query keeps a key: SDPA is finite there
    elif mask_kind == "additive":
        mask = torch.randn(b, heads, nq, length, generator=g)
    got = attention_cuda.reference(q, k, v, mask)
    assert got.shape == (b, nq, heads, d)
    torch.testing.assert_close(got, sdpa(q, k, v, mask), rtol=1e-4, atol=1e-5)
    # a different scale changes the result (the argument is used)
    assert not torch.allclose(attention_cuda.reference(q, k, v, mask, scale=0.5), got, atol=1e-3)


def test_reference_fully_masked_query_gives_zeros():
    q, k, v = torch.randn(1, 2, 1, 64), torch.randn(1, 2, 5, 64), torch.randn(1, 2, 5, 64)
    mask = torch.ones(1, 2, 1, 5, dtype=torch.bool)
    mask[0, 1] = False
    out = attention_cuda.reference(q, k, v, mask)
    assert torch.equal(out[0, 0, 1], torch.zeros(64))
    assert out[0, 0, 0].abs().sum() > 0


def test_problem_names_what_it_refuses():
    q, k, v = torch.randn(1, 4, 1, 64), torch.randn(1, 4, 9, 64), torch.randn(1, 4, 9, 64)
    assert "CUDA" in attention_cuda.problem(q, k, v, None)


def tiny_llama(seed=0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=120, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_enable_on_cpu_keeps_the_model_s_outputs():
    model = tiny_llama()
    ids = torch.randint(0, 120, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(ids).logits
        tokens_before = model.generate(ids[:1], max_new_tokens=6, min_new_tokens=6, do_sample=False)
    line = lpq.attention.enable(model)
    assert "SDPA" in line and "CUDA" in line
    assert model.config._attn_implementation == "lpq"
    with torch.no_grad():
        after = model(ids).logits
        tokens_after = model.generate(ids[:1], max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(before, after)
    assert torch.equal(tokens_before, tokens_after)
    model.set_attn_implementation("sdpa")  # undone as the docstring says
    assert model.config._attn_implementation == "sdpa"
