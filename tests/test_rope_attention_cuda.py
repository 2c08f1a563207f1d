"""lpq's fused decode attention kernel (rotary + cache write + attention + cache length, one launch;
attention_cuda.rope_cache_attention) against its plain-torch reference, on fresh random inputs (needs a GPU).

Every case: head sizes 64/128/256, float16/bfloat16, plain and grouped heads, caches from 1 to 1000 rows, the new
row first, inside, on a run's edge and last, automatic and forced runs, with and without the static cache's mask.
The output is poisoned first (unwritten elements show), the rows of the cache other than the new one must stay
bit-identical, the position must move by one and the counters be left at zero. Then a chain of steps, a CUDA graph
replay, a tiny Llama decoding through lpq.fuse_for_decode under torch.compile, and bad calls.
"""

from __future__ import annotations

import pytest
import torch

import lpq
from lpq.fuse import DecodeAttention, fuse_for_decode
from lpq.kernels import attention_cuda

from conftest import (assert_step_compiles_whole_and_replays, counted_calls, decode_bench, decode_inputs,
                      forced_step_logits, tiny_cuda_llama)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module", autouse=True)
def built():
    assert attention_cuda.load(), attention_cuda.failure_reason()


def rotary(d: int, pos: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    f = pos * inv
    emb = torch.cat((f, f))
    return emb.cos().to(dtype).view(1, 1, d), emb.sin().to(dtype).view(1, 1, d)


def make(h, hkv, length, d, dtype, pos, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(1, 1, (h + 2 * hkv) * d, device="cuda", dtype=dtype, generator=g)
    k_cache = torch.randn(1, hkv, length, d, device="cuda", dtype=dtype, generator=g)
    v_cache = torch.randn(1, hkv, length, d, device="cuda", dtype=dtype, generator=g)
    cos, sin = rotary(d, pos, dtype)
    return qkv, cos, sin, k_cache, v_cache


def run_both(qkv, cos, sin, k_cache, v_cache, pos, mask, h, splits=0):
    """(kernel output, its cache k/v, its position), (the same from the reference), on copies of one cache."""
    d = k_cache.shape[-1]
    kk, kv, kp = k_cache.clone(), v_cache.clone(), torch.tensor(pos, device="cuda")
    rk, rv, rp = k_cache.clone(), v_cache.clone(), torch.tensor(pos, device="cuda")
    t = torch.full((h * d,), float("nan"), dtype=qkv.dtype, device="cuda")  # poison the next output block
    del t
    got = attention_cuda.rope_cache_attention(qkv, cos, sin, kk, kv, kp, mask, h, splits=splits)
    want = attention_cuda.rope_reference(qkv, cos, sin, rk, rv, rp, mask, h)
    return (got, kk, kv, kp), (want, rk, rv, rp)


def assert_step_matches(got, want, k_cache, v_cache, pos):
    (out, kk, kv, kp), (ref, rk, rv, rp) = got, want
    tol = 2e-3 if out.dtype == torch.float16 else 1.6e-2
    assert out.shape == ref.shape and torch.isfinite(out).all(), "unwritten or non-finite outputs"
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    assert int(kp) == int(rp) == pos + 1
    others = torch.ones(k_cache.shape[2], dtype=torch.bool, device="cuda")
    if pos < k_cache.shape[2]:
        others[pos] = False
        # the new row: the rotary embedding in fp32 rounded once (an FMA may round one element the other way)
        torch.testing.assert_close(kk[:, :, pos].float(), rk[:, :, pos].float(), rtol=tol, atol=tol)
        assert torch.equal(kv[:, :, pos], rv[:, :, pos])
    assert torch.equal(kk[:, :, others], k_cache[:, :, others]) and torch.equal(kv[:, :, others], v_cache[:, :, others])
    assert int(attention_cuda.counters(out.device).abs().sum()) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("length", [1, 33, 384, 1000])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("masked", [True, False])
def test_kernel_matches_reference(dtype, d, length, where, masked):
    h, hkv = [(32, 32), (8, 2), (4, 4)][(d + length) % 3]
    pos = {"first": 0, "middle": length // 2, "last": length - 1}[where]
    qkv, cos, sin, k_cache, v_cache = make(h, hkv, length, d, dtype, pos, seed=length + d + pos)
    # the static cache's mask: rows up to the new one attended, the rest not yet written
    mask = (torch.arange(length, device="cuda") <= pos).view(1, 1, 1, length) if masked else None
    got, want = run_both(qkv, cos, sin, k_cache, v_cache, pos, mask, h)
    assert_step_matches(got, want, k_cache, v_cache, pos)


@pytest.mark.parametrize("splits", [1, 2, 3, 7])
def test_new_row_on_the_edges_of_forced_runs(splits):
    """The new row as the first and the last key of a run, and one past it, with the runs forced."""
    h, d, length = 8, 128, 777
    n, kps = attention_cuda.plan(h, length, d, splits)
    for pos in sorted(p for p in {0, kps - 1, kps, 2 * kps, length - 1} if p < length):
        qkv, cos, sin, k_cache, v_cache = make(h, h, length, d, torch.float16, pos, seed=pos + splits)
        mask = (torch.arange(length, device="cuda") <= pos).view(1, 1, 1, length)
        got, want = run_both(qkv, cos, sin, k_cache, v_cache, pos, mask, h, splits=splits)
        assert_step_matches(got, want, k_cache, v_cache, pos)


def test_a_chain_of_steps_and_a_graph_replay():
    """Six steps in a row from one cache (each reads the rows the ones before wrote), then the same step captured in
    a CUDA graph and replayed: the position moves on at every replay and the cache fills row by row."""
    h, d, length = 16, 128, 64
    qkv, cos, sin, k_cache, v_cache = make(h, h, length, d, torch.float16, 0, seed=3)
    kk, kv, kp = k_cache.clone(), v_cache.clone(), torch.tensor(20, device="cuda")
    rk, rv, rp = k_cache.clone(), v_cache.clone(), torch.tensor(20, device="cuda")
    mask = torch.ones(1, 1, 1, length, dtype=torch.bool, device="cuda")
    for step in range(6):
        qkv.normal_()
        got = attention_cuda.rope_cache_attention(qkv, cos, sin, kk, kv, kp, mask, h)
        want = attention_cuda.rope_reference(qkv, cos, sin, rk, rv, rp, mask, h)
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(kk.float(), rk.float(), rtol=2e-3, atol=2e-3)
    assert int(kp) == int(rp) == 26

    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the capture (its step is mirrored in the reference)
        attention_cuda.rope_cache_attention(qkv, cos, sin, kk, kv, kp, mask, h)
    torch.cuda.current_stream().wait_stream(s)
    attention_cuda.rope_reference(qkv, cos, sin, rk, rv, rp, mask, h)
    with torch.cuda.graph(graph):
        out = attention_cuda.rope_cache_attention(qkv, cos, sin, kk, kv, kp, mask, h)
    for step in range(3):
        graph.replay()
        want = attention_cuda.rope_reference(qkv, cos, sin, rk, rv, rp, mask, h)
        torch.testing.assert_close(out.float(), want.float(), rtol=2e-3, atol=2e-3)
    torch.cuda.synchronize()
    assert int(kp) == int(rp) == 30
    torch.testing.assert_close(kk.float(), rk.float(), rtol=2e-3, atol=2e-3)


def test_problem_and_bad_calls():
    h, d = 4, 64
    qkv, cos, sin, k_cache, v_cache = make(h, h, 16, d, torch.float16, 3, seed=4)
    pos = torch.tensor(3, device="cuda")
    assert attention_cuda.rope_problem(cos, sin, k_cache, v_cache, pos, None, h, torch.float16) is None
    assert "head size" in attention_cuda.rope_problem(cos[..., :48], sin[..., :48], k_cache[..., :48], v_cache[..., :48],
                                                      pos, None, h, torch.float16)
    assert "int64" in attention_cuda.rope_problem(cos, sin, k_cache, v_cache, pos.int(), None, h, torch.float16)
    assert "dtypes" in attention_cuda.rope_problem(cos, sin, k_cache, v_cache, pos, None, h, torch.bfloat16)
    assert "query heads" in attention_cuda.rope_problem(cos, sin, k_cache, v_cache, pos, None, 6, torch.float16)
    assert "batch 1" in attention_cuda.rope_problem(cos, sin, k_cache.expand(2, -1, -1, -1), v_cache.expand(2, -1, -1, -1),
                                                    pos, None, h, torch.float16)
    c = attention_cuda.counters(qkv.device)
    with pytest.raises(RuntimeError, match="qkv must be one contiguous row"):
        torch.ops.lpq_attn.rope_cache_attention(qkv[..., :-8], cos, sin, k_cache, v_cache, pos, None, c, 1.0, h, 0)
    with pytest.raises(RuntimeError, match="position must be one int64"):
        torch.ops.lpq_attn.rope_cache_attention(qkv, cos, sin, k_cache, v_cache, pos.int(), None, c, 1.0, h, 0)
    with pytest.raises(RuntimeError, match="rotary factors"):
        torch.ops.lpq_attn.rope_cache_attention(qkv, cos[..., :32], sin[..., :32], k_cache, v_cache, pos, None, c, 1.0, h, 0)


def test_model_decode_fused_matches_unfused_eager_compiled_and_graphed():
    """A tiny Llama (head size 64, no grouped heads) decoding through a static cache under lpq attention, fused for
    decode: every decode step of every block goes through the fused kernel, the logits equal the unfused model's,
    the compiled step is one graph, and the graph's replay gives the step's own tokens."""
    import copy

    decode = decode_bench()
    model = tiny_cuda_llama(4)
    prompt, forced = decode_inputs()

    def forced_logits(dec):
        return forced_step_logits(dec, forced)

    with torch.no_grad():
        want = forced_logits(decode.Decoder(model, prompt, 10, "eager"))
        fused = copy.deepcopy(model)
        assert "lpq decode kernel" in lpq.attention.enable(fused)
        assert len(fuse_for_decode(fused)["attention"]) == 2
        with counted_calls(attention_cuda, "rope_cache_attention") as calls:
            got = forced_logits(decode.Decoder(fused, prompt, 10, "eager"))
        assert len(calls) == 8 * 2
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
        assert_step_compiles_whole_and_replays(decode, fused, prompt)
    assert isinstance(fused.model.layers[0].self_attn, DecodeAttention)
    torch._dynamo.reset()
