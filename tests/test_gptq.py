"""GPTQ: the maths (lpq.methods.gptq), the plugin, and GPTQ-checkpoint interoperability
(lpq.formats.gptq_compat). Small shapes: the whole file runs in seconds on 2 cores (plus the import
of the independent implementation, when installed)."""

from __future__ import annotations

import logging

import pytest
import torch

from lpq.formats import QuantizedWeight
from lpq.formats.gptq_compat import from_gptq, gptq_quantization_config, load_gptq_state, to_gptq
from lpq.formats.packing import chunk_shape, unpack_cols
from lpq.formats.uniform import UNIFORM, pack_uniform
from lpq.methods import get_method
from lpq.methods.gptq import GPTQ, HessianObserver, gptq_quantize
from lpq.quant import dequantize_codes, fake_quantize, fit_groups, group_index, num_groups
from lpq.spec import QuantSpec


def correlated_inputs(k: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """Inputs with strongly correlated features and uneven scales, like a transformer's activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    scale = torch.exp(0.5 * torch.randn(k, generator=g))  # uneven feature scales
    return (torch.randn(tokens, k, generator=g) @ mix + 0.05 * torch.randn(tokens, k, generator=g)) * scale


def hessian(x: torch.Tensor) -> torch.Tensor:
    return 2.0 * x.t() @ x / x.shape[0]


def weight(n: int, k: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def output_error(w: torch.Tensor, wq: torch.Tensor, x: torch.Tensor) -> float:
    return float(((w - wq) @ x.t()).norm())


def gptq_dequant(w, h, spec, **kw):
    codes, scales, zeros, g_idx, info = gptq_quantize(w, h, spec, **kw)
    return dequantize_codes(codes, scales, zeros, g_idx), (codes, scales, zeros, g_idx, info)


# ---- the maths -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=4, group_size=64),
        QuantSpec(bits=3, group_size=-1, sym=True),
        QuantSpec(bits=2, group_size=32),
        QuantSpec(bits=4, group_size=64, act_order=True),
        QuantSpec(bits=2, group_size=32, sym=True, act_order=True),
        QuantSpec(bits=8, group_size=128),
    ],
    ids=lambda s: s.label().replace(" ", "-"),
)
def test_layer_output_error_below_rtn_on_correlated_inputs(spec):
    x = correlated_inputs(256, 1024)
    w = weight(64, 256)
    wq, (codes, scales, zeros, g_idx, info) = gptq_dequant(w, hessian(x), spec)
    rtn = fake_quantize(w, spec.bits, spec.group_size, spec.sym)
    e_gptq, e_rtn = output_error(w, wq, x), output_error(w, rtn, x)
    assert e_gptq < 0.9 * e_rtn, (e_gptq, e_rtn)
    assert codes.dtype == torch.int32 and int(codes.min()) >= 0 and int(codes.max()) <= spec.maxq
    assert scales.shape == zeros.shape == (num_groups(256, spec.group_size), 64)
    assert torch.equal(scales, scales.half().float())  # scales are exactly what fp16 storage keeps
    assert info["damp_increases"] == 0 and not info["fallback"]


def test_identity_hessian_is_round_to_nearest():
    """No correlation to exploit: GPTQ must reduce to RTN on the same grid, exactly."""
    w = weight(32, 128)
    spec = QuantSpec(bits=4, group_size=32)
    wq, _ = gptq_dequant(w, torch.eye(128), spec)
    assert torch.equal(wq, fake_quantize(w, 4, 32, False))


@pytest.mark.parametrize("gs,block", [(32, 128), (64, 16), (32, 48), (128, 128), (-1, 32)])
def test_lazy_batch_updates_do_not_change_the_result(gs, block):
    """The blocked sweep is an exact reorganisation: any block size gives the same quantization as
    one block over all columns, up to float rounding. A rounding flip of one code feeds its error to the
    later columns and can flip a few more (0.76 % of the codes at gs 64, block 16 on one CPU, identical
    on another), while a broken batch update (no update of the later blocks) changes 27-64 % of them."""
    x = correlated_inputs(256, 512)
    w, h = weight(48, 256), hessian(x)
    spec = QuantSpec(bits=3, group_size=gs)
    a, (_, _, _, _, ia) = gptq_dequant(w, h, spec, block_size=256)
    b, (_, _, _, _, ib) = gptq_dequant(w, h, spec, block_size=block)
    same = (a == b).float().mean().item()
    assert same > 0.98, same
    assert abs(ia["loss"] - ib["loss"]) <= 0.01 * ia["loss"]


def test_short_last_group():
    """K = 576 with group size 128: five groups, the last one 64 columns wide."""
    x = correlated_inputs(576, 1024)
    w = weight(32, 576)
    for act_order in (False, True):
        spec = QuantSpec(bits=4, group_size=128, act_order=act_order)
        wq, (codes, scales, zeros, g_idx, _) = gptq_dequant(w, hessian(x), spec)
        assert scales.shape == (5, 32)
        assert torch.bincount(g_idx.long()).tolist() == [128, 128, 128, 128, 64]
        assert output_error(w, wq, x) < output_error(w, fake_quantize(w, 4, 128, False), x)
        qw = pack_uniform(codes, scales, zeros, spec, g_idx=g_idx)
        assert torch.equal(qw.dequantize(), wq)


@pytest.mark.parametrize("act_order", [False, True])
def test_dead_columns(act_order):
    """Columns whose input is always zero (H_kk = 0) are quantized to exact zeros, without NaN."""
    x = correlated_inputs(128, 512)
    dead = torch.tensor([0, 5, 77, 127])
    x[:, dead] = 0
    w = weight(32, 128)
    spec = QuantSpec(bits=4, group_size=32, act_order=act_order)
    wq, (*_, info) = gptq_dequant(w, hessian(x), spec)
    assert info["dead_columns"] == 4
    assert torch.isfinite(wq).all()
    assert torch.equal(wq[:, dead], torch.zeros(32, 4))
    rtn = fake_quantize(w, 4, 32, False)
    assert output_error(w, wq, x) < output_error(w, rtn, x)


def test_hessian_not_positive_definite_is_recovered_by_dampening(caplog):
    """An indefinite Hessian (negative eigenvalues): dampening is raised until Cholesky succeeds, the
    log says so, and the result is finite and on the grid."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(64, 64, generator=g)
    h = a + a.t()  # symmetric, eigenvalues of both signs
    h.diagonal().abs_()  # positive diagonal (so no column is "dead"), still indefinite
    assert torch.linalg.eigvalsh(h).min() < 0
    w = weight(16, 64)
    spec = QuantSpec(bits=4, group_size=32)
    with caplog.at_level(logging.WARNING, logger="lpq.gptq"):
        wq, (codes, *_, info) = gptq_dequant(w, h, spec)
    assert info["damp_increases"] > 0 and not info["fallback"] and info["damp"] > 0.01
    assert torch.isfinite(wq).all()
    assert int(codes.min()) >= 0 and int(codes.max()) <= 15
    assert any("damp" in r.getMessage() for r in caplog.records)
    # the quantized weight is still a sensible one: no worse than twice RTN's plain weight error
    assert (w - wq).norm() < 2 * (w - fake_quantize(w, 4, 32, False)).norm()


def test_singular_and_non_finite_hessians_never_crash():
    w = weight(16, 64)
    spec = QuantSpec(bits=3, group_size=-1)
    x = correlated_inputs(64, 8)  # 8 tokens: rank 8, singular
    wq, (*_, info) = gptq_dequant(w, hessian(x), spec, damp=0.0)
    assert torch.isfinite(wq).all()
    h = hessian(correlated_inputs(64, 256))
    h[3, 4] = float("nan")
    wq, (*_, info) = gptq_dequant(w, h, spec)
    assert info["fallback"] and torch.equal(wq, fake_quantize(w, 3, -1, False))


def test_static_groups_fix_the_grids_before_the_permutation():
    x = correlated_inputs(256, 1024)
    w, h = weight(32, 256), hessian(x)
    spec = QuantSpec(bits=4, group_size=64, act_order=True)
    wq, (codes, scales, zeros, g_idx, _) = gptq_dequant(w, h, spec, static_groups=True)
    s0, z0 = fit_groups(w, 4, 64, False)
    assert torch.equal(scales, s0) and torch.equal(zeros, z0)
    assert torch.equal(g_idx, group_index(256, 64))  # no reordering needed at inference
    assert output_error(w, wq, x) < output_error(w, fake_quantize(w, 4, 64, False), x)


def test_act_order_g_idx_follows_decreasing_hessian_diagonal():
    x = correlated_inputs(128, 512)
    w, h = weight(16, 128), hessian(x)
    _, (_, _, _, g_idx, _) = gptq_dequant(w, h, QuantSpec(bits=4, group_size=32, act_order=True))
    order = torch.argsort(h.diagonal(), descending=True, stable=True)
    assert torch.equal(g_idx[order], torch.arange(128, dtype=torch.int32) // 32)


@pytest.mark.parametrize("static_groups", [False, True])
@pytest.mark.parametrize("bits,gs,sym", [(4, 32, False), (3, -1, True), (2, 64, False), (8, 128, True)])
def test_act_order_and_static_groups_survive_the_saved_format(tmp_path, bits, gs, sym, static_groups):
    """GPTQ's result -> uniform format -> safetensors on disk -> back, and -> GPTQ format -> back: the
    dequantized weight is bit-identical everywhere."""
    from safetensors.torch import load_file, save_file

    x = correlated_inputs(128, 256)
    w = weight(64, 128)
    spec = QuantSpec(bits=bits, group_size=gs, sym=sym, method="gptq", act_order=True)
    method = GPTQ(static_groups=static_groups)
    obs = method.make_observer("l", 128, spec, torch.device("cpu"))
    obs.update(x.reshape(4, 64, 128))
    qw = method.quantize_layer("l", w, obs, spec)
    expect, _ = gptq_dequant(w, obs.H, spec, static_groups=static_groups)
    assert "g_idx" in qw.tensors
    assert torch.equal(qw.dequantize(), expect)

    save_file(qw.tensors, tmp_path / "l.safetensors")
    back = QuantizedWeight(spec, 128, 64, load_file(tmp_path / "l.safetensors"))
    assert torch.equal(back.dequantize(), expect)

    spec2, tensors2 = from_gptq(to_gptq(qw.tensors, spec, 128, 64), bits, gs, sym, desc_act=True)
    assert torch.equal(QuantizedWeight(spec2, 128, 64, tensors2).dequantize(), expect)


# ---- the observer and the plugin -----------------------------------------------------------------


def test_hessian_observer_running_mean():
    x = correlated_inputs(96, 300)
    obs = HessianObserver(96, "cpu")
    for chunk in (x[:7], x[7:100], x[100:].reshape(8, 25, 96)):
        obs.update(chunk)
    assert obs.n == 300 and obs.H.dtype == torch.float32
    torch.testing.assert_close(obs.H, hessian(x), rtol=1e-4, atol=1e-4)
    obs.update(x[:0])  # an empty batch changes nothing
    assert obs.n == 300
    half = HessianObserver(96)
    half.update(x.half())
    assert half.H.dtype == torch.float32


def test_plugin_options_and_registration():
    m = get_method("gptq", damp=None, static_groups=None, true_sequential=None)
    assert isinstance(m, GPTQ) and m.needs_calibration and m.sequential and m.damp == 0.01
    assert not get_method("gptq", true_sequential=False).sequential
    assert get_method("gptq", damp=0.1, static_groups=True).static_groups


def test_plugin_without_calibration_inputs_rounds_to_nearest(caplog):
    w = weight(32, 64)
    spec = QuantSpec(bits=4, group_size=32, method="gptq")
    m = get_method("gptq")
    with caplog.at_level(logging.WARNING, logger="lpq.gptq"):
        qw = m.quantize_layer("model.x", w, m.make_observer("model.x", 64, spec, "cpu"), spec)
    assert torch.equal(qw.dequantize(), fake_quantize(w, 4, 32, False))
    assert "model.x" in caplog.text


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    x = correlated_inputs(256, 512)
    w, spec = weight(64, 256), QuantSpec(bits=4, group_size=64, act_order=True)
    obs = HessianObserver(256, "cuda")
    obs.update(x.cuda())
    a, _ = gptq_dequant(w.cuda(), obs.H, spec)
    b, _ = gptq_dequant(w, hessian(x), spec)
    assert a.device.type == "cuda"
    assert (a.cpu() == b).float().mean() > 0.99


# ---- GPTQ checkpoint interoperability ------------------------------------------------------------


def random_layer(bits, gs, sym, act_order, n=64, k=256, seed=0, zero_min=0):
    """Random codes and grid, packed in lpq's uniform format. Zero points cover 0 and maxq too."""
    g = torch.Generator().manual_seed(seed)
    maxq = (1 << bits) - 1
    n_groups = num_groups(k, gs)
    codes = torch.randint(0, maxq + 1, (n, k), generator=g, dtype=torch.int32)
    scales = (torch.rand(n_groups, n, generator=g) * 0.1 + 1e-3).half().float()
    if sym:
        zeros = torch.full((n_groups, n), float((maxq + 1) // 2))
    else:
        zeros = torch.randint(zero_min, maxq + 1, (n_groups, n), generator=g).float()
        zeros[0, : min(n, 2)] = float(zero_min)
        zeros[-1, :1] = float(maxq)
    g_idx = None
    if act_order:
        g_idx = group_index(k, gs)[torch.randperm(k, generator=g)]
    spec = QuantSpec(bits=bits, group_size=gs, sym=sym, method="gptq", act_order=act_order)
    return spec, pack_uniform(codes, scales, zeros, spec, g_idx=g_idx), (codes, scales, zeros, g_idx)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("gs", [-1, 32, 128])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_gptq_export_import_is_exact(bits, gs, act_order, sym):
    n, k = 72, 256  # N not a multiple of 32: qzeros is padded along N
    spec, qw, (codes, scales, zeros, _) = random_layer(bits, gs, sym, act_order, n=n, k=k)
    g = to_gptq(qw.tensors, spec, k, n)
    assert set(g) == {"qweight", "qzeros", "scales", "g_idx"}
    assert g["qweight"].dtype == g["qzeros"].dtype == g["g_idx"].dtype == torch.int32
    assert g["scales"].dtype == torch.float16
    assert torch.equal(g["qweight"], qw.tensors["qweight"])  # same bit layout as lpq's own
    if bits == 3:  # v1: zero - 1, field by field (fields past N stay 0)
        assert torch.equal(unpack_cols(g["qzeros"], bits, n), (zeros.int() - 1) & 7)
    else:  # v1: zero - 1 on whole words, as GPTQModel writes it; lpq pads N with zero points of 0
        padded = torch.nn.functional.pad(zeros, (0, -n % chunk_shape(bits)[0]))
        assert torch.equal(g["qzeros"], reference_v1_qzeros(padded, bits))
    if not act_order:
        assert torch.equal(g["g_idx"], group_index(k, gs))
    spec2, back = from_gptq(g, bits, gs, sym, desc_act=act_order)
    assert spec2.bits == bits and spec2.sym == sym and spec2.act_order == act_order
    assert set(back) == set(qw.tensors)
    for key in qw.tensors:
        assert torch.equal(back[key], qw.tensors[key]), key
    deq = QuantizedWeight(spec2, k, n, back).dequantize()
    assert torch.equal(deq, qw.dequantize())


def test_gptq_v2_import_and_passthrough():
    spec, qw, (_, _, zeros, _) = random_layer(4, 64, False, False)
    v2 = {**qw.tensors, "bias": torch.arange(64.0), "g_idx": group_index(256, 64)}
    spec2, back = from_gptq(v2, 4, 64, False, desc_act=False, checkpoint_format="gptq_v2")
    assert not spec2.act_order and "g_idx" not in back  # a trivial g_idx is dropped
    assert torch.equal(back["qzeros"], qw.tensors["qzeros"]) and torch.equal(back["bias"], v2["bias"])
    g = to_gptq({**qw.tensors, "bias": v2["bias"]}, spec, 256, 64)
    assert torch.equal(g["bias"], v2["bias"])


def test_gptq_import_rejects_mismatched_shapes():
    from lpq.errors import FormatError

    spec, qw, _ = random_layer(4, 64, False, False)
    g = to_gptq(qw.tensors, spec, 256, 64)
    with pytest.raises(FormatError, match="scales"):
        from_gptq(g, 4, 32, False, False)  # wrong group size: 8 groups expected, 4 stored
    with pytest.raises(FormatError, match="checkpoint_format"):
        from_gptq(g, 4, 64, False, False, checkpoint_format="marlin")


def test_load_gptq_state_of_a_whole_checkpoint(tmp_path):
    """A checkpoint as GPTQ tools write it (one v1 layer with act-order, one 8-bit layer via GPTQModel's
    per-module `dynamic` override, plain tensors alongside) -> lpq specs and uniform tensors."""
    from safetensors.torch import load_file, save_file

    spec_a, qa, _ = random_layer(4, 64, False, True, seed=1)
    spec_b, qb, _ = random_layer(8, 32, True, False, seed=2)
    raw = {"model.embed.weight": torch.randn(8, 4), "model.l0.q.bias": torch.randn(64)}
    raw.update({f"model.l0.q.{k}": t for k, t in to_gptq(qa.tensors, spec_a, 256, 64).items()})
    raw.update({f"model.l0.down.{k}": t for k, t in to_gptq(qb.tensors, spec_b, 256, 64).items()})
    save_file(raw, tmp_path / "model.safetensors")
    qconfig = {**gptq_quantization_config(spec_a), "dynamic": {r"+:.*\.down": {"bits": 8, "group_size": 32, "sym": True}}}
    qconfig["desc_act"] = False  # the act-order layer is recognised by its non-trivial g_idx
    specs, state = load_gptq_state(tmp_path, qconfig, [tmp_path / "model.safetensors"],
                                   lambda files: {k: v for f in files for k, v in load_file(f).items()})
    assert set(specs) == {"model.l0.q", "model.l0.down"}
    assert specs["model.l0.q"].act_order and specs["model.l0.down"].bits == 8 and not specs["model.l0.down"].act_order
    for name, qw in (("model.l0.q", qa), ("model.l0.down", qb)):
        tensors = {k: state[f"{name}.{k}"] for k in qw.tensors}
        assert torch.equal(QuantizedWeight(specs[name], 256, 64, tensors).dequantize(), qw.dequantize())
    assert "model.l0.down.g_idx" not in state and torch.equal(state["model.l0.q.bias"], raw["model.l0.q.bias"])
    assert "model.embed.weight" in state


def test_gptq_quantization_config():
    spec = QuantSpec(bits=3, group_size=128, sym=True, method="gptq", act_order=True,
                     options={"damp": 0.05, "static_groups": True, "true_sequential": False})
    cfg = gptq_quantization_config(spec)
    assert cfg == {
        "quant_method": "gptq", "bits": 3, "group_size": 128, "desc_act": True, "sym": True,
        "checkpoint_format": "gptq", "true_sequential": False, "damp_percent": 0.05, "static_groups": True,
    }
    cfg = gptq_quantization_config(QuantSpec(bits=4, group_size=-1))
    assert cfg["group_size"] == -1 and cfg["damp_percent"] == 0.01 and cfg["true_sequential"] is True


def reference_pack_along_k(codes_kn: list[list[int]], bits: int) -> torch.Tensor:
    """GPTQ's documented layout written out with Python integers, independently of lpq.formats.packing:
    the codes of each output column form one little-endian bit stream along K, cut into uint32 words
    stored as int32 (so for 3 bits, code 10 has its two low bits at the top of word 0 and its high bit
    at the bottom of word 1, and code 21 one bit at the top of word 1 and two at the bottom of word 2)."""
    k, n = len(codes_kn), len(codes_kn[0])
    words = k * bits // 32
    out = []
    for r in range(words):
        row = []
        for c in range(n):
            stream = sum(codes_kn[j][c] << (bits * j) for j in range(k))
            v = (stream >> (32 * r)) & 0xFFFFFFFF
            row.append(v - (1 << 32) if v >= 1 << 31 else v)
        out.append(row)
    return torch.tensor(out, dtype=torch.int32)


def reference_v1_qzeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ v1 qzeros [G, N*b/32] for zero points [G, N] as GPTQModel writes them, with Python integers:
    at 3 bits each field holds (zero - 1) mod 8; at 2, 4 and 8 bits each packed int32 word of the zero
    points minus a one in every field, modulo 2**32 (so a zero point of 0 borrows from the field above)."""
    z = zeros.int().tolist()  # [G][N], packed along N
    if bits == 3:
        return reference_pack_along_k([list(r) for r in zip(*[[(v - 1) & 7 for v in row] for row in z])], 3).t()
    v2 = reference_pack_along_k([list(r) for r in zip(*z)], bits).t().tolist()
    ones = sum(1 << shift for shift in range(0, 32, bits))
    words = [[((w & 0xFFFFFFFF) - ones) % (1 << 32) for w in row] for row in v2]
    return torch.tensor([[w - (1 << 32) if w >= 1 << 31 else w for w in row] for row in words], dtype=torch.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_layout_matches_the_documented_gptq_layout(bits):
    """Hand-constructed check of the GPTQ layout (works without any third-party package)."""
    spec, qw, (codes, scales, zeros, _) = random_layer(bits, 32, False, False, n=32, k=64, seed=bits)
    g = to_gptq(qw.tensors, spec, 64, 32)
    assert torch.equal(g["qweight"], reference_pack_along_k(codes.t().tolist(), bits))
    assert torch.equal(g["qzeros"], reference_v1_qzeros(zeros, bits))
    if bits != 3:  # the zero points of 0 in this layer borrow from the field above them
        assert not torch.equal(unpack_cols(g["qzeros"], bits, 32), (zeros.int() - 1) & ((1 << bits) - 1))
    if bits == 3:
        w0, w1 = int(g["qweight"][0, 0]) & 0xFFFFFFFF, int(g["qweight"][1, 0]) & 0xFFFFFFFF
        c10 = int(codes[0, 10])
        assert (w0 >> 30) == c10 & 3 and (w1 & 1) == c10 >> 2


# ---- cross-check with an independent implementation ----------------------------------------------
# The independent implementation is Intel's auto-round (PyPI "auto-round", 0.16.1 here; a pure Python
# wheel): its GPTQ exporter packs with auto_round_extension.torch.qlinear_torch_zp.QuantLinear, a
# pure-torch (CPU) QuantLinear whose pack() writes the v1 layout (qzeros = zero - 1) and whose forward()
# dequantizes it, including g_idx. It is NOT a dependency of lpq; install it by hand to run these tests
# (`pip install --no-deps auto-round && pip install datasets`; its package __init__ needs datasets).
# Its packer clamps zero - 1 at 0 instead of wrapping and its forward adds one without masking, so
# these tests use zero points >= 1 (see lpq/formats/gptq_compat.py for the zero-point-0 caveat).


@pytest.fixture(scope="module")
def autoround_quantlinear():
    try:
        from auto_round_extension.torch.qlinear_torch_zp import QuantLinear
    except Exception as e:  # noqa: BLE001 - any import failure means "not available here"
        pytest.skip(
            "auto-round (the independent GPTQ packer; optional, not an lpq dependency) is not importable "
            f"({e}): `pip install --no-deps auto-round && pip install datasets` to run this cross-check"
        )
    return QuantLinear


@pytest.mark.parametrize("bits,gs,sym", [(2, 32, False), (3, 64, False), (4, 32, False), (4, -1, True), (8, 128, False), (3, -1, True)])
def test_cross_check_packing_against_auto_round(autoround_quantlinear, bits, gs, sym):
    """Their packer, fed the weight our grid represents, writes exactly our to_gptq tensors; and our
    from_gptq reads theirs back to the same weight."""
    n, k = 64, 256
    spec, qw, (codes, scales, zeros, _) = random_layer(bits, gs, sym, False, n=n, k=k, seed=bits, zero_min=1)
    w = qw.dequantize()
    linear = torch.nn.Linear(k, n, bias=False)
    linear.weight.data = w.clone()
    ql = autoround_quantlinear(bits, gs, k, n, bias=False, g_idx=True)
    ql.pack(linear, scales.t().contiguous(), zeros.t().contiguous(), g_idx=group_index(k, gs), device="cpu")
    ours = to_gptq(qw.tensors, spec, k, n)
    assert torch.equal(ql.qweight, ours["qweight"])
    assert torch.equal(ql.qzeros, ours["qzeros"])
    assert torch.equal(ql.scales, ours["scales"])
    spec2, back = from_gptq({"qweight": ql.qweight, "qzeros": ql.qzeros, "scales": ql.scales,
                             "g_idx": ql.g_idx}, bits, gs, sym, desc_act=False)
    assert torch.equal(QuantizedWeight(spec2, k, n, back).dequantize(), w)


@pytest.mark.parametrize("bits,gs", [(2, 32), (3, 32), (4, 64), (8, 128), (4, -1)])
def test_cross_check_act_order_dequantization_against_auto_round(autoround_quantlinear, bits, gs):
    """Our act-order export (permuted g_idx) loaded into their QuantLinear: their forward() on the
    identity returns our dequantized weight (in fp16, the dtype of their dequantization)."""
    n, k = 64, 256
    spec, qw, _ = random_layer(bits, gs, False, True, n=n, k=k, seed=10 + bits, zero_min=1)
    ours = to_gptq(qw.tensors, spec, k, n)
    ql = autoround_quantlinear(bits, gs, k, n, bias=False, g_idx=True)
    for key in ("qweight", "qzeros", "scales", "g_idx"):
        assert getattr(ql, key).shape == ours[key].shape, key
        setattr(ql, key, ours[key].clone())
    with torch.no_grad():
        theirs = ql(torch.eye(k)).t()  # [N, K]
    assert torch.equal(theirs, qw.dequantize().half().float())


def test_chunk_shapes_match_gptq_word_counts():
    for bits in (2, 3, 4, 8):
        per_chunk, words = chunk_shape(bits)
        assert per_chunk * bits == words * 32
    assert UNIFORM.tensor_shapes(256, 64, QuantSpec(bits=3, group_size=64))["qweight"][0] == (24, 64)  # 256 * 3 / 32 words


# ---- full-precision targets (option fp_targets) ---------------------------------------------------------


def test_paired_observer_accumulates_h_and_the_cross_term():
    from lpq.methods.gptq import PairedHessianObserver

    x = correlated_inputs(48, 200)
    xf = x + 0.1 * correlated_inputs(48, 200, seed=5)  # the same tokens' full-precision inputs
    obs = PairedHessianObserver(48)
    for a, b in ((0, 13), (13, 120), (120, 200)):
        obs.update(x[a:b], xf[a:b])
    torch.testing.assert_close(obs.H, hessian(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(obs.D, 2.0 * (xf - x).t() @ x / 200, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        obs.update(x[:5], xf[:4])


def test_fp_target_weight_is_the_least_squares_solution():
    from lpq.methods.gptq import fp_target_weight

    x = correlated_inputs(32, 400)
    xf = x + 0.2 * correlated_inputs(32, 400, seed=3)
    w = weight(16, 32)
    h, d = hessian(x), 2.0 * (xf - x).t() @ x / 400
    v = fp_target_weight(w, h, d, damp=0.0)
    lstsq = torch.linalg.lstsq(x.double(), (xf @ w.t()).double()).solution.t().float()  # argmin ||X Vᵀ - X̃ Wᵀ||
    torch.testing.assert_close(v, lstsq, rtol=1e-3, atol=1e-3)
    # it reproduces the full-precision outputs better than W itself does, and alpha = 0 is plain GPTQ
    assert output_error_to(v, x, xf @ w.t()) < output_error_to(w, x, xf @ w.t())
    assert fp_target_weight(w, h, d, alpha=0.0) is w
    # the objective GPTQ minimises on V is the full-precision one up to a constant (Pythagoras):
    # ||X Qᵀ - X̃ Wᵀ||² = ||X (Q - V)ᵀ||² + ||X Vᵀ - X̃ Wᵀ||² for any Q
    q, _ = gptq_dequant(v, h, QuantSpec(bits=3, group_size=16))
    lhs = output_error_to(q, x, xf @ w.t()) ** 2
    rhs = output_error_to(q, x, x @ v.t()) ** 2 + output_error_to(v, x, xf @ w.t()) ** 2
    assert abs(lhs - rhs) < 1e-3 * lhs


def output_error_to(wq: torch.Tensor, x: torch.Tensor, target: torch.Tensor) -> float:
    return float((x @ wq.t() - target).norm())


def test_fp_targets_option_through_the_driver(tokenizer):
    import lpq
    from conftest import make_model
    from lpq.nn import QuantizedLinear

    calib = torch.randint(3, 100, (8, 32), generator=torch.Generator().manual_seed(0))
    runs = {}
    for alpha in (0.0, 1.0):
        res = lpq.quantize(make_model("llama"), method="gptq", bits=3, group_size=32, calib=calib, device="cpu",
                           method_options={"fp_targets": alpha})
        runs[alpha] = {n: m.dequantize() for n, m in res.model.named_modules() if isinstance(m, QuantizedLinear)}
    # the very first stage sees identical inputs in both models (D = 0): the same result ...
    first = "model.layers.0.self_attn.q_proj"
    assert torch.equal(runs[0.0][first], runs[1.0][first])
    # ... later layers are fitted to other targets
    last = "model.layers.1.mlp.down_proj"
    assert not torch.equal(runs[0.0][last], runs[1.0][last])
    with pytest.raises(lpq.errors.SpecError):
        get_method("gptq", fp_targets=2.0)
