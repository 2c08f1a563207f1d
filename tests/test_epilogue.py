"""lpq.epilogue and the decode fusions built on it (lpq.fuse.fuse_gated_mlp, fold_norms): the maths, the generic
path every layer runs, and whole models giving their own logits (CPU; the CUDA kernel's epilogues are tested
against these in tests/test_epilogue_cuda.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lpq
from lpq.epilogue import apply_rms, generic_forward, linear_forward, rms_scale, swiglu_interleaved, swiglu_row_order
from lpq.errors import LpqError
from lpq.formats.uniform import UNIFORM, pack_uniform
from lpq.fuse import BLOCK_NORMS, DeferredRMSNorm, GatedMLP, fold_norms, fuse_for_decode, fuse_gated_mlp, permute_outputs
from lpq.nn import QuantizedLinear
from lpq.spec import QuantSpec

from conftest import compile_recording_graphs, make_model


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def hf_rms_norm(h: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm, written out."""
    hf = h.float()
    return w * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)


def test_swiglu_row_order_interleaves_tiles():
    order = swiglu_row_order(16)
    assert order.tolist() == list(range(0, 8)) + list(range(16, 24)) + list(range(8, 16)) + list(range(24, 32))
    assert torch.equal(torch.sort(swiglu_row_order(64)).values, torch.arange(128))
    with pytest.raises(ValueError, match="multiple of 8"):
        swiglu_row_order(12)


def test_swiglu_of_interleaved_rows_equals_silu_gate_times_up():
    gate, up = torch.randn(3, 5, 24, generator=gen(0)), torch.randn(3, 5, 24, generator=gen(1))
    joint = torch.cat([gate, up], dim=-1)[..., swiglu_row_order(24)]
    torch.testing.assert_close(swiglu_interleaved(joint), F.silu(gate) * up)
    # a wrong interleave (plain concatenation) gives something else
    assert not torch.allclose(swiglu_interleaved(torch.cat([gate, up], dim=-1)), F.silu(gate) * up)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_folded_rms_norm_equals_norm_then_linear(dtype):
    """r * (W (w * h)) = W RMSNorm(h): the generic path, on hidden states with a wide range."""
    k, n, eps = 48, 20, 1e-5
    h = (torch.randn(2, 7, k, generator=gen(2)) * torch.logspace(-1, 2, k)).to(dtype)
    w = (torch.rand(k, generator=gen(3)) + 0.5).to(dtype)
    lin = nn.Linear(k, n).to(dtype)
    want = lin(hf_rms_norm(h, w, eps)).float()
    got = generic_forward(lin, (w * h).to(dtype), norm_of=h, norm_eps=eps).float()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert ((got - want).norm() / want.norm()).item() < tol
    assert rms_scale(h, eps).shape == (2, 7, 1) and rms_scale(h, eps).dtype == torch.float32
    assert apply_rms(h, h, eps).dtype == dtype


def uniform_layer(k: int, n: int, bits: int = 4, group: int = 32, bias: bool = False, seed: int = 0) -> QuantizedLinear:
    g = gen(seed)
    spec = QuantSpec(bits=bits, group_size=group)
    groups = k // group
    codes = torch.randint(0, 2 ** bits, (n, k), generator=g)
    scales = torch.rand(groups, n, generator=g) * 0.02 + 0.01
    zeros = torch.randint(0, 2 ** bits, (groups, n), generator=g)
    qw = pack_uniform(codes, scales, zeros, spec)
    b = torch.randn(n, generator=g) if bias else None
    return QuantizedLinear.from_quantized(qw, b, torch.float32)


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_uniform_permute_outputs_moves_whole_rows(bits):
    layer = uniform_layer(64, 40, bits=bits)
    order = torch.randperm(40, generator=gen(4))
    moved = UNIFORM.permute_outputs(layer.quantized_weight(), order)
    torch.testing.assert_close(moved.dequantize(), layer.dequantize()[order], rtol=0, atol=0)
    with pytest.raises(ValueError, match="permutation"):
        UNIFORM.permute_outputs(layer.quantized_weight(), torch.zeros(40, dtype=torch.long))


@pytest.mark.parametrize("kind", ["linear", "uniform"])
def test_permute_outputs_of_a_layer_keeps_its_bias(kind):
    layer = nn.Linear(32, 24) if kind == "linear" else uniform_layer(32, 24, bias=True)
    order = torch.randperm(24, generator=gen(5))
    x = torch.randn(3, 32, generator=gen(6))
    moved = permute_outputs(layer, order)
    with torch.no_grad():
        torch.testing.assert_close(moved(x), layer(x)[:, order])


def test_quantized_linear_epilogues_match_the_generic_path():
    """QuantizedLinear(x, norm_of=, swiglu=) on the reference kernel: the same as the epilogues written out."""
    layer = uniform_layer(64, 48, bias=True)
    h = torch.randn(5, 64, generator=gen(7)) * 3
    w = torch.rand(64, generator=gen(8)) + 0.5
    with torch.no_grad():
        want = swiglu_interleaved(layer(hf_rms_norm(h, w, 1e-6)))
        got = linear_forward(layer, w * h, norm_of=h, norm_eps=1e-6, swiglu=True)
    assert got.shape == (5, 24)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def randomize_norms(model, seed: int = 9) -> None:
    """RMSNorm weights away from 1, so that a lost or doubled norm weight shows in the logits."""
    g = gen(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("bits", [None, 4])
def test_fuse_for_decode_gives_the_same_logits(family, bits):
    model = make_model(family)
    randomize_norms(model)
    if bits is not None:
        model = lpq.quantize(model, None, method="rtn", bits=bits, group_size=32, device="cpu").model.eval()
    ids = torch.randint(0, 100, (2, 11), generator=gen(10))
    want = logits(model, ids)
    report = fuse_for_decode(model, norms=BLOCK_NORMS)
    assert report["gated_mlp"] == [f"model.layers.{i}.mlp" for i in range(2)]
    assert report["siblings"] == [f"model.layers.{i}.self_attn.q_proj+k_proj+v_proj" for i in range(2)]
    assert report["norms"] == [f"model.layers.{i}.{n}" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")]
    block = model.model.layers[0]
    assert isinstance(block.mlp, GatedMLP) and isinstance(block.input_layernorm, DeferredRMSNorm)
    assert type(block.mlp.gate_up) is (nn.Linear if bits is None else QuantizedLinear)
    got = logits(model, ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # nothing is held between forwards, and every tensor is stored once
    assert block.input_layernorm._x is None and block.post_attention_layernorm._h is None
    state = model.state_dict()
    assert len({id(t) for t in state.values()}) == len(state)
    assert not any("gate_proj" in k or "up_proj" in k for k in state)
    assert any(k.startswith("model.layers.0.mlp.gate_up.") for k in state)
    assert "model.layers.1.post_attention_layernorm.weight" in state


def test_decode_steps_with_a_cache_match():
    """Greedy generation with the KV cache (prefill, then one token a step) gives the same tokens."""
    model = make_model("llama")
    randomize_norms(model)
    ids = torch.randint(3, 100, (1, 6), generator=gen(11))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(ids, **kw)
        fuse_for_decode(model, norms=BLOCK_NORMS)
        got = model.generate(ids, **kw)
    assert torch.equal(got, want)


def test_unknown_blocks_and_mlps_are_left_alone():
    model = make_model("gemma")  # GeGLU MLP and (1 + w) RMSNorm: neither is in the known lists
    report = fuse_for_decode(model, norms=BLOCK_NORMS)
    assert report["gated_mlp"] == [] and report["norms"] == []
    mlp = make_model("llama").model.layers[0].mlp
    mlp.act_fn = nn.GELU()
    parent = nn.Module()
    parent.mlp = mlp
    assert fuse_gated_mlp(parent) == []


def test_norms_fold_only_into_fused_projections():
    """Without fused q/k/v (fuse_siblings not run), input_layernorm is not folded; the MLP's norm is (GatedMLP)."""
    model = make_model("llama")
    fuse_gated_mlp(model)
    assert fold_norms(model) == [f"model.layers.{i}.post_attention_layernorm" for i in range(2)]


def test_a_folded_norm_read_through_another_tensor_is_an_error():
    rms = make_model("llama").model.layers[0].input_layernorm
    norm = DeferredRMSNorm(rms)
    x = norm(torch.randn(2, 64))
    with pytest.raises(LpqError, match="another tensor"):
        norm.take(x.clone())
    assert norm.take(x) is not None
    with pytest.raises(LpqError):
        norm.take(x)  # taken once only


def test_folded_block_traces_as_one_graph():
    """torch.compile of a fused, folded model: one graph, no break, and the same logits."""
    model = make_model("llama")
    randomize_norms(model)
    ids = torch.randint(0, 100, (1, 5), generator=gen(12))
    want = logits(model, ids)
    fuse_for_decode(model, norms=BLOCK_NORMS)
    compiled, graphs = compile_recording_graphs(model)
    with torch.no_grad():
        got = compiled(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert len(graphs) == 1


def test_fuse_for_decode_folds_no_norm_by_default():
    """The default (measured no faster on the H100 with norms folded): gated MLPs and q/k/v only; the MLP's norm
    alone can be asked for."""
    model = make_model("llama")
    report = fuse_for_decode(model, blocks=False)
    assert report["norms"] == [] and len(report["gated_mlp"]) == 2
    assert not any(isinstance(m, DeferredRMSNorm) for m in model.modules())
    assert fold_norms(model, ("post_attention_layernorm",)) == [f"model.layers.{i}.post_attention_layernorm" for i in range(2)]
    fused_blocks = make_model("llama")
    assert len(fuse_for_decode(fused_blocks)["blocks"]) == 2  # the default fuses the blocks, whose norms stay
    assert fold_norms(fused_blocks) == []


def test_load_fused_for_decode(qdir):
    """lpq.load(..., fuse="decode"): GatedMLPs, the unfused load's logits; a bad fuse value is refused."""
    ids = torch.randint(0, 100, (1, 10), generator=gen(13))
    plain = lpq.load(qdir, device="cpu", dtype=torch.float32)
    fast = lpq.load(qdir, device="cpu", dtype=torch.float32, fuse="decode")
    assert isinstance(fast.model.layers[0].mlp, GatedMLP)
    torch.testing.assert_close(logits(fast, ids), logits(plain, ids), rtol=1e-5, atol=1e-5)
    with pytest.raises(LpqError, match="fuse="):
        lpq.load(qdir, device="cpu", fuse="everything")
