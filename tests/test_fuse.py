"""lpq.fuse: sibling projections joined into one linear give the model's own outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lpq
from lpq.formats.uniform import UNIFORM, pack_uniform
from lpq.fuse import SharedProjection, SiblingSlice, fuse_siblings, join_linears
from lpq.nn import QuantizedLinear
from lpq.spec import QuantSpec

from conftest import make_model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("bits", [None, 4, 3])
def test_fused_model_gives_the_same_logits(family, bits):
    """fp32 linears and packed uniform layers (3-bit: its zeros are packed along the outputs, so the joined
    layer repacks them), with q/k/v biases (qwen2) and grouped k/v heads narrower than q."""
    model = make_model(family)
    if bits is not None:
        model = lpq.quantize(model, None, method="rtn", bits=bits, group_size=32, device="cpu").model.eval()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    want = logits(model, ids)
    names = fuse_siblings(model)
    assert names == [f"model.layers.{i}.{part}" for i in range(2)
                     for part in ("self_attn.q_proj+k_proj+v_proj", "mlp.gate_proj+up_proj")]
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, SiblingSlice) and isinstance(attn.fused_q_proj_k_proj_v_proj, SharedProjection)
    kind = nn.Linear if bits is None else QuantizedLinear
    assert type(attn.fused_q_proj_k_proj_v_proj.fused) is kind
    assert (attn.q_proj.out_features, attn.k_proj.out_features) == (64, 32)
    got = logits(model, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # between forwards the shared module holds no activations
    assert attn.fused_q_proj_k_proj_v_proj._x is None and attn.fused_q_proj_k_proj_v_proj._y is None
    # the siblings' weights are held once: no parameter or buffer appears twice
    assert len({id(t) for t in model.state_dict().values()}) == len(model.state_dict())


def test_order_other_inputs_and_in_place_changes_recompute():
    """Whatever order the siblings are called in, on whichever tensors, each gets its own product."""
    gen = torch.Generator().manual_seed(1)
    parent = nn.Module()
    for name, width in (("q_proj", 6), ("k_proj", 3), ("v_proj", 3)):
        setattr(parent, name, nn.Linear(5, width, bias=True))
    ref = {n: getattr(parent, n) for n in ("q_proj", "k_proj", "v_proj")}
    ref = {n: (m.weight.detach().clone(), m.bias.detach().clone()) for n, m in ref.items()}
    assert fuse_siblings(parent) == ["q_proj+k_proj+v_proj"]

    def want(n, x):
        w, b = ref[n]
        return x @ w.t() + b

    x, z = torch.randn(4, 5, generator=gen), torch.randn(4, 5, generator=gen)
    for n in ("v_proj", "q_proj", "k_proj"):  # another order than the model's
        torch.testing.assert_close(getattr(parent, n)(x), want(n, x))
    torch.testing.assert_close(parent.q_proj(x), want("q_proj", x))
    torch.testing.assert_close(parent.k_proj(z), want("k_proj", z))  # another input: computed again
    x.mul_(2.0)  # the cached input modified in place: computed again
    torch.testing.assert_close(parent.v_proj(x), want("v_proj", x))


def test_groups_that_cannot_join_stay_apart():
    """Different specs (a mixed-precision plan), or act-order layers with different column orders."""
    gen = torch.Generator().manual_seed(2)

    def layer(spec, k=64, n=32):
        maxq = (1 << spec.bits) - 1
        g = k // spec.group_size
        g_idx = None
        if spec.act_order:
            g_idx = torch.empty(k, dtype=torch.int32)
            g_idx[torch.randperm(k, generator=gen)] = (torch.arange(k) // spec.group_size).to(torch.int32)
        qw = pack_uniform(torch.randint(0, maxq + 1, (n, k), generator=gen), torch.rand(g, n, generator=gen) * 0.1,
                          torch.randint(0, maxq + 1, (g, n), generator=gen), spec, g_idx=g_idx)
        return QuantizedLinear.from_quantized(qw, None, torch.float32)

    s4, s3 = QuantSpec(bits=4, group_size=32), QuantSpec(bits=3, group_size=32)
    assert join_linears([layer(s4), layer(s3)]) is None
    ao = QuantSpec(bits=4, group_size=32, act_order=True)
    assert join_linears([layer(ao), layer(ao)]) is None
    a = layer(ao)
    same = QuantizedLinear.from_quantized(
        pack_uniform(*UNIFORM.unpack(a.tensors(), ao, 64, 32)[:3], ao, g_idx=a.g_idx), None, torch.float32)
    joined = join_linears([a, same])  # one column order shared: joined, and exact
    assert joined is not None
    torch.testing.assert_close(joined.dequantize(), torch.cat([a.dequantize(), same.dequantize()]))
    assert join_linears([nn.Linear(8, 4), nn.Linear(8, 4, bias=False)]) is None
    assert join_linears([nn.Linear(8, 4), nn.Linear(6, 4)]) is None


def test_traces_as_one_graph():
    """torch.compile sees one graph with one joint linear: no graph break, no recompilation on the next call."""
    parent = nn.Module()
    parent.gate_proj, parent.up_proj = nn.Linear(8, 16), nn.Linear(8, 16)
    fuse_siblings(parent)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def mlp(x):
        h = x * 2.0
        return nn.functional.silu(parent.gate_proj(h)) * parent.up_proj(h)

    compiled = torch.compile(mlp, backend=backend, fullgraph=True)
    for seed in (0, 1):
        x = torch.randn(3, 8, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(compiled(x), mlp(x))
    assert len(graphs) == 1
    linears = [n for n in graphs[0].graph.nodes if n.op == "call_function" and "linear" in str(n.target)]
    assert len(linears) == 1


def test_load_fused(qdir):
    """lpq.load(..., fuse=True) on a saved packed model: the same logits as the unfused load."""
    ids = torch.randint(0, 100, (1, 10), generator=torch.Generator().manual_seed(3))
    plain = lpq.load(qdir, device="cpu", dtype=torch.float32)
    fused = lpq.load(qdir, device="cpu", dtype=torch.float32, fuse=True)
    assert any(isinstance(m, SharedProjection) for m in fused.modules())
    assert not any(isinstance(m, SharedProjection) for m in plain.modules())
    torch.testing.assert_close(logits(fused, ids), logits(plain, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none); run on the device")
@pytest.mark.cuda
@pytest.mark.parametrize("bits", [4, 3])
def test_fused_model_on_cuda_kernels(bits):
    """On the GPU the joined layers run lpq's CUDA kernels (other widths, the same packed codes): fp16 logits
    of the fused model equal the unfused model's to fp16 accumulation error, at m = 1 and in a batch."""
    model = make_model("llama")
    model = lpq.quantize(model, None, method="rtn", bits=bits, group_size=32, device="cpu").model.eval()
    model = model.to("cuda", torch.float16)
    inputs = [torch.randint(0, 100, shape, generator=torch.Generator().manual_seed(4)).cuda() for shape in ((1, 1), (2, 9))]
    want = [logits(model, ids).float() for ids in inputs]
    assert len(fuse_siblings(model)) == 4
    for ids, w in zip(inputs, want):
        got = logits(model, ids).float()
        assert ((got - w).norm() / w.norm()).item() < 2e-3
    kernels = {type(m.kernel).__name__ for m in model.modules() if isinstance(m, QuantizedLinear)}
    assert kernels == {"UniformCudaKernel"}, kernels
