"""lpq's decode attention kernel against the plain-torch reference, on fresh random inputs (needs a GPU).

Every case: head sizes 64/128/256, float16/bfloat16, grouped and plain heads, cache lengths from 1 key to
more than one run of the kernel holds, no mask / bool / all-false rows / additive masks, automatic and
forced numbers of runs. The output buffer is poisoned first (a freed NaN block the allocator hands back),
so an element the kernel does not write is caught. Then: the counters are left at zero, repeated calls
give identical bits, the op runs under torch.compile and CUDA graphs inside a transformers model, and bad
direct calls raise.
"""

from __future__ import annotations

import pytest
import torch

import lpq
from lpq.kernels import attention_cuda

from conftest import (assert_step_compiles_whole_and_replays, counted_calls, decode_bench, decode_inputs,
                      forced_step_logits, tiny_cuda_llama)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module", autouse=True)
def built():
    assert attention_cuda.load(), attention_cuda.failure_reason()


def poison(numel: int, dtype) -> None:
    """Leave a NaN-filled block in the allocator's cache, where the next allocation of this size lands."""
    t = torch.full((numel,), float("nan"), dtype=dtype, device="cuda")
    del t


def make(b, h, hkv, length, d, dtype, mask_kind, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, h, 1, d, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(b, hkv, length, d, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(b, hkv, length, d, device="cuda", dtype=dtype, generator=g)
    mask = None
    if mask_kind == "bool":  # a static cache's mask: the first keys attended, the rest not yet written
        keep = torch.randint(1, length + 1, (b,), device="cuda", generator=g)
        mask = (torch.arange(length, device="cuda")[None, :] < keep[:, None]).view(b, 1, 1, length)
    elif mask_kind == "bool-empty":  # a batch row with no key at all: zeros
        mask = torch.rand(b, 1, 1, length, device="cuda", generator=g) > 0.5
        mask[0] = False
    elif mask_kind == "additive":
        mask = torch.randn(b, h, 1, length, device="cuda", generator=g).to(dtype)
    elif mask_kind == "additive-f32":
        mask = torch.randn(b, 1, 1, length, device="cuda", generator=g) * 3
        mask[..., length // 2:] = torch.finfo(torch.float32).min
    return q, k, v, mask


def check(q, k, v, mask, splits=0):
    b, h, _, d = q.shape
    poison(b * h * d, q.dtype)
    got = attention_cuda.decode_attention(q, k, v, mask, splits=splits)
    want = attention_cuda.reference(q, k, v, mask)
    assert got.shape == want.shape == (b, 1, h, d)
    assert torch.isfinite(got).all(), "unwritten or non-finite outputs"
    tol = 2e-3 if q.dtype == torch.float16 else 1.6e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    return got


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("length", [1, 7, 33, 384, 1000])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "bool-empty", "additive", "additive-f32"])
def test_kernel_matches_reference(dtype, d, length, mask_kind):
    shapes = [(1, 32, 32), (2, 8, 2), (3, 4, 1)]
    b, h, hkv = shapes[(d + length) % 3]
    q, k, v, mask = make(b, h, hkv, length, d, dtype, mask_kind, seed=length * 7 + d)
    got = check(q, k, v, mask)
    if mask_kind == "bool-empty":
        assert torch.equal(got[0].float(), torch.zeros_like(got[0].float()))


@pytest.mark.parametrize("splits", [1, 2, 3, 7, 64])
@pytest.mark.parametrize("d", [64, 128])
def test_forced_splits(splits, d):
    q, k, v, mask = make(2, 8, 4, 777, d, torch.float16, "bool", seed=splits)
    n, kps = attention_cuda.plan(16, 777, d, splits)
    assert n * kps >= 777 and (n - 1) * kps < 777  # every key in exactly one run, no empty run
    check(q, k, v, mask, splits=splits)


def test_one_run_of_many_rounds():
    """5000 keys in one forced run: the loop's running softmax over 157 rounds, no merge of runs."""
    n, kps = attention_cuda.plan(4, 5000, 128, 1)
    assert n == 1 and kps >= 5000
    q, k, v, mask = make(1, 4, 4, 5000, 128, torch.float16, "additive-f32", seed=1)
    check(q, k, v, mask, splits=1)


def test_runs_capped():
    """A long cache over few heads asks for more runs than the merge holds (256): the plan caps them."""
    n, kps = attention_cuda.plan(1, 20000, 64, 1000)
    assert n <= 256 and n * kps >= 20000 and (n - 1) * kps < 20000
    q, k, v, mask = make(1, 1, 1, 20000, 64, torch.float16, "bool", seed=2)
    check(q, k, v, mask, splits=1000)


def test_views_counters_and_determinism():
    # q as transformers makes it: [B, 1, H, D] transposed to [B, H, 1, D] (not contiguous in that order);
    # k and v: the first 300 positions of a longer static cache
    b, h, d = 2, 8, 128
    q = torch.randn(b, 1, h, d, device="cuda", dtype=torch.float16).transpose(1, 2)
    cache_k = torch.randn(b, h, 512, d, device="cuda", dtype=torch.float16)
    cache_v = torch.randn(b, h, 512, d, device="cuda", dtype=torch.float16)
    k, v = cache_k[:, :, :300], cache_v[:, :, :300]
    assert attention_cuda.problem(q, k, v, None) is None
    first = check(q, k, v, None)
    for _ in range(5):
        assert torch.equal(attention_cuda.decode_attention(q, k, v, None), first)
    assert int(attention_cuda.counters(q.device).abs().sum()) == 0


def test_problem_refuses_what_the_kernel_cannot_take():
    q, k, v, _ = make(1, 4, 4, 16, 64, torch.float16, "none", 0)
    assert "query tokens" in attention_cuda.problem(q.expand(1, 4, 2, 64), k, v, None)
    assert "head size" in attention_cuda.problem(q[..., :48], k[..., :48], v[..., :48], None)
    assert "dtypes" in attention_cuda.problem(q.float(), k.float(), v.float(), None)
    odd = torch.randn(4 * 64 + 1, device="cuda", dtype=torch.float16)[1:].view(1, 4, 1, 64)
    assert "aligned" in attention_cuda.problem(odd, k, v, None)
    assert "mask" in attention_cuda.problem(q, k, v, torch.ones(1, 1, 1, 15, dtype=torch.bool, device="cuda"))


def test_direct_bad_calls_raise():
    q, k, v, _ = make(1, 4, 4, 16, 64, torch.float16, "none", 0)
    c = attention_cuda.counters(q.device)
    with pytest.raises(RuntimeError, match="head size"):
        torch.ops.lpq_attn.decode_attention(q[..., :48].contiguous(), k[..., :48].contiguous(), v[..., :48].contiguous(),
                                            None, c, 1.0, 0)
    with pytest.raises(RuntimeError, match="one query token"):
        torch.ops.lpq_attn.decode_attention(q.expand(1, 4, 2, 64).contiguous(), k, v, None, c, 1.0, 0)
    with pytest.raises(RuntimeError, match="mask"):
        torch.ops.lpq_attn.decode_attention(q, k, v, torch.ones(1, 1, 1, 9, dtype=torch.bool, device="cuda"), c, 1.0, 0)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_model_decode_matches_sdpa_eager_compiled_and_graphed(kv_heads):
    """A tiny Llama (head size 64) decoding through a static cache: attention "lpq" gives SDPA's logits at
    every step (the prefill goes to SDPA, each one-token step to the kernel); compiled, the step is one graph,
    and replayed from a CUDA graph it gives the same greedy tokens as the step called from Python."""
    decode = decode_bench()
    model = tiny_cuda_llama(kv_heads)
    prompt, forced = decode_inputs()

    def forced_logits(dec):
        return forced_step_logits(dec, forced)

    with torch.no_grad():
        want = forced_logits(decode.Decoder(model, prompt, 10, "eager"))
        assert "lpq decode kernel" in lpq.attention.enable(model)
        with counted_calls(attention_cuda, "decode_attention") as calls:
            got = forced_logits(decode.Decoder(model, prompt, 10, "eager"))
        # every decode step of both blocks went to the kernel; a grouped-query model stays on SDPA
        assert len(calls) == (8 * 2 if kv_heads == 4 else 0)
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
        assert_step_compiles_whole_and_replays(decode, model, prompt)
    torch._dynamo.reset()
    model.set_attn_implementation("sdpa")
