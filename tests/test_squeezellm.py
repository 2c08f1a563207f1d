"""SqueezeLLM: weighted k-means, dense-and-sparse split, the squeezellm format and the method end to end."""

from __future__ import annotations

import pytest
import torch

from lpq.errors import LpqError, SpecError
from lpq.formats import get_format
from lpq.formats.squeezellm import pack_squeezellm
from lpq.methods import get_method
from lpq.methods.squeezellm import (lut_gptq_sweep, outlier_scores, split_dense_sparse, squeezellm_gptq_quantize,
                                    squeezellm_quantize, weighted_kmeans_rows,
                                    weighted_objective)
from lpq.spec import QuantSpec

from conftest import make_model, make_tokenizer


def _layer(n=48, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[torch.rand(n, k, generator=g) < 0.01] *= 8  # a few heavy outliers
    fisher = torch.rand(n, k, generator=g) ** 3
    return w, fisher


def _rtn_rows(w, bits):
    """Per-row min-max uniform grid with 2**bits levels (RTN per output channel)."""
    lo, hi = w.min(dim=1, keepdim=True).values, w.max(dim=1, keepdim=True).values
    scale = (hi - lo).clamp(min=1e-12) / ((1 << bits) - 1)
    return torch.round((w - lo) / scale) * scale + lo


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_weighted_kmeans_beats_uniform_grid(bits):
    w, fisher = _layer()
    c, a = weighted_kmeans_rows(w, fisher, 1 << bits, iters=50)
    assert c.shape == (w.shape[0], 1 << bits) and a.shape == w.shape
    assert bool((c[:, 1:] >= c[:, :-1]).all())  # sorted codebooks
    km = (fisher * (w - torch.gather(c, 1, a)) ** 2).sum()
    rtn = (fisher * (w - _rtn_rows(w, bits)) ** 2).sum()
    assert km < 0.7 * rtn
    # the assignment is each weight's nearest centroid
    nearest = (w[:, :, None] - c[:, None, :]).abs().min(dim=2).values
    assert torch.allclose((w - torch.gather(c, 1, a)).abs(), nearest)


def test_kmeans_more_iterations_never_worse_and_deterministic():
    w, fisher = _layer(seed=1)
    objs = []
    for it in range(0, 12):
        c, a = weighted_kmeans_rows(w, fisher, 8, iters=it)
        objs.append(weighted_objective(w, fisher, c, a))  # per row
    for before, after in zip(objs, objs[1:]):
        assert bool((after <= before * (1 + 1e-6) + 1e-12).all())
    c1, a1 = weighted_kmeans_rows(w, fisher, 8, iters=20)
    c2, a2 = weighted_kmeans_rows(w, fisher, 8, iters=20)
    assert torch.equal(c1, c2) and torch.equal(a1, a2)
    # the weights matter: the unweighted fit is worse in the weighted objective
    cu, au = weighted_kmeans_rows(w, None, 8, iters=20)
    assert weighted_objective(w, fisher, cu, au).sum() > weighted_objective(w, fisher, c1, a1).sum()


def test_kmeans_zero_weight_rows_and_tol():
    w, fisher = _layer(n=4, k=64)
    fisher[0] = 0  # a row no gradient reached: clustered unweighted
    c, a = weighted_kmeans_rows(w, fisher, 4, iters=30, tol=1e-3)
    assert torch.isfinite(c).all()
    cu, _ = weighted_kmeans_rows(w[:1], None, 4, iters=30, tol=1e-3)
    assert torch.allclose(c[:1], cu)


def test_split_dense_sparse_counts():
    w, fisher = _layer()
    numel = w.numel()
    assert not split_dense_sparse(w, fisher, 0, 0).any()
    mask = split_dense_sparse(w, fisher, 0.5, 0)
    assert int(mask.sum()) == round(0.005 * numel)
    scores = outlier_scores(w)
    assert scores[mask].min() >= scores[~mask].max()  # the farthest out relative to their row
    both = split_dense_sparse(w, fisher, 0.5, 1.0)
    assert int(both.sum()) == round(0.005 * numel) + round(0.01 * numel)
    assert bool(both[mask].all())
    extra = both & ~mask
    assert fisher[extra].min() >= fisher[~both].max()  # then the most sensitive of the rest


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_dense_plus_sparse_reconstructs_outliers_and_round_trips(bits):
    w, fisher = _layer(n=40, k=128)
    idx, lut, mask, fake = squeezellm_quantize(w, fisher, bits, outliers=0.4, sensitive=0.5, iters=20)
    assert mask.any()
    assert torch.equal(fake[mask], w[mask].half().float())  # the chosen weights are kept exactly (fp16)
    spec = QuantSpec(bits=bits, group_size=-1, method="squeezellm", format="squeezellm")
    qw = pack_squeezellm(idx, lut, mask, w, spec)
    assert qw.spec.format == "squeezellm" and qw.spec.options["nnz"] == int(mask.sum())
    fmt = get_format("squeezellm")
    shapes = fmt.tensor_shapes(128, 40, qw.spec)
    assert {k: (tuple(v.shape), v.dtype) for k, v in qw.tensors.items()} == {k: (tuple(s), d) for k, (s, d) in shapes.items()}
    deq = qw.dequantize()
    assert torch.equal(deq, fake)
    # dense part alone: the codebook entries, the sparse part alone: exactly the chosen weights
    dense = torch.gather(lut.float(), 1, idx)
    assert torch.equal(deq[~mask], dense[~mask])
    assert torch.equal(deq[mask], w[mask].half().float())
    # through an empty module's buffers (what loading does)
    empty = fmt.empty(128, 40, qw.spec)
    for k in empty:
        empty[k].copy_(qw.tensors[k])
    assert torch.equal(fmt.dequantize(empty, qw.spec, 128, 40), fake)


def test_dense_only_has_no_sparse_tensors():
    w, _ = _layer(n=16, k=64)
    idx, lut, mask, fake = squeezellm_quantize(w, None, 3, outliers=0, sensitive=0, iters=10)
    qw = pack_squeezellm(idx, lut, mask, w, QuantSpec(bits=3, group_size=-1, format="squeezellm"))
    assert set(qw.tensors) == {"qweight", "lut"} and qw.spec.options["nnz"] == 0
    assert torch.equal(qw.dequantize(), fake)
    assert len(torch.unique(fake[0])) <= 8


def test_bad_options_rejected():
    for bad in ({"outliers": -0.1}, {"outliers": 100}, {"sensitive": 150}, {"sensitive": "x"}, {"iters": -1},
                {"fisher": False, "sensitive": 0.1}, {"gptq": "maybe"}, {"gptq": True, "damp": -1}):
        with pytest.raises(SpecError):
            get_method("squeezellm", **bad)
    with pytest.raises(SpecError, match="does not take"):
        get_method("squeezellm", block_size=64)
    assert get_method("squeezellm", fisher=False).needs_calibration  # the default GPTQ assignment reads inputs
    m = get_method("squeezellm", fisher=False, gptq=False)
    assert m.sensitive == 0 and not m.needs_calibration
    w = torch.randn(8, 64)
    with pytest.raises(SpecError, match="choose 2, 3 or 4"):
        m.quantize_layer("x", w, None, QuantSpec(bits=8, group_size=-1))
    with pytest.raises(LpqError):
        get_format("squeezellm").tensor_shapes(64, 8, QuantSpec(bits=8, group_size=-1, format="squeezellm"))


def test_bits8_rejected_through_api():
    import lpq.api

    with pytest.raises(SpecError, match="choose 2, 3 or 4"):
        lpq.api.quantize(make_model("llama"), None, method="squeezellm", bits=8, group_size=-1,
                         method_options={"fisher": False}, device="cpu")


def test_end_to_end_llama(tmp_path, text_file):
    import importlib

    import lpq.api
    from lpq.models.arch import find_linears, linear_weight, set_linear_weight

    model = make_model("llama")
    tok = make_tokenizer()
    out = tmp_path / "sq3"
    res = lpq.api.quantize(model, out, method="squeezellm", bits=3, group_size=-1, tokenizer=tok,
                           calib=str(text_file), nsamples=4, seqlen=64, device="cpu", dtype=torch.float32,
                           method_options={"outliers": 0.4, "sensitive": 0.5, "iters": 20, "gptq": False})
    loaded = lpq.api.load(out, device="cpu", dtype=torch.float32)  # the paper's assignment (gptq: its own test)

    # the reference: the original architecture with every quantized linear's dequantized weight
    ref = make_model("llama")
    ref_keys = set(ref.state_dict())
    ref.load_state_dict({k: v for k, v in loaded.state_dict().items() if k in ref_keys}, strict=False)  # fp16-stored
    total_nnz = 0
    for name, module in loaded.named_modules():
        if type(module).__name__ == "QuantizedLinear":
            assert module.spec.format == "squeezellm" and module.spec.bits == 3
            total_nnz += module.spec.options["nnz"]
            set_linear_weight(ref.get_submodule(name), module.dequantize())
    assert total_nnz > 0
    ids = torch.randint(3, 100, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
        want = ref(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    # the quantized model stays close to the original
    orig = make_model("llama")
    with torch.no_grad():
        assert (want - orig(input_ids=ids).logits).abs().mean() < 0.5 * orig(input_ids=ids).logits.abs().mean()

    report = importlib.import_module("lpq.inspect").inspect(out)  # lpq.inspect is also a function
    nbytes = weights = 0
    for name, module in loaded.named_modules():
        if type(module).__name__ == "QuantizedLinear":
            ts = module.tensors()
            assert set(ts) == {"qweight", "lut", "sp_rowptr", "sp_col", "sp_val"}
            nbytes += (ts["qweight"].numel() * 4 + ts["lut"].numel() * 2 + ts["sp_rowptr"].numel() * 4
                       + ts["sp_col"].numel() * 4 + ts["sp_val"].numel() * 2)
            weights += module.in_features * module.out_features
    assert report["bpw"] == pytest.approx(8 * nbytes / weights)
    assert report["bpw"] > 3  # tiny rows: each 8-entry fp16 codebook adds 128 bits per row of 64 or 128


def test_dense_only_unweighted_end_to_end(tmp_path):
    import lpq.api

    out = tmp_path / "sq4"
    lpq.api.quantize(make_model("llama"), out, method="squeezellm", bits=4, group_size=-1, tokenizer=make_tokenizer(),
                     device="cpu", dtype=torch.float32,
                     method_options={"outliers": 0, "sensitive": 0, "fisher": False, "iters": 10})
    loaded = lpq.api.load(out, device="cpu", dtype=torch.float32)
    layers = [m for m in loaded.modules() if type(m).__name__ == "QuantizedLinear"]
    assert layers and all(set(m.tensors()) == {"qweight", "lut"} for m in layers)
    assert all(len(torch.unique(m.dequantize()[0])) <= 16 for m in layers)


def test_fisher_diagonal_shapes_and_restores_model():
    from lpq.methods.squeezellm import fisher_diagonal
    from lpq.models.arch import find_linears, linear_weight

    model = make_model("gpt2")  # Conv1D weights are stored [in, out]: the Fisher comes back [out, in]
    names = [f"transformer.h.0.{n}" for n in find_linears(model.transformer.h[0])]
    tokens = torch.randint(3, 100, (3, 16), generator=torch.Generator().manual_seed(0))
    fisher = fisher_diagonal(model, tokens, names, "cpu", batch_size=2)
    for n in names:
        w = linear_weight(model.get_submodule(n))
        assert fisher[n].shape == w.shape and fisher[n].dtype == torch.float32
        assert (fisher[n] >= 0).all() and fisher[n].sum() > 0
    assert not model.training and not any(p.requires_grad and p.grad is not None for p in model.parameters())


def test_resume_keeps_the_saved_blocks_data_dependent_specs(tmp_path, monkeypatch):
    """nnz depends on each layer's weights: a resumed run must load the saved blocks with their own nnz
    and end with the same checkpoint as an uninterrupted run."""
    import lpq
    from conftest import make_model
    from lpq.methods.squeezellm import SqueezeLLM

    kwargs = dict(method="squeezellm", bits=3, device="cpu", method_options={"fisher": False, "outliers": 2.0,
                                                                              "sensitive": 0.0, "gptq": False})
    whole = lpq.quantize(make_model("llama"), tmp_path / "whole", **kwargs)
    calls = {"n": 0}
    original = SqueezeLLM.quantize_block

    def interrupted(self, ctx):
        if calls["n"] == 1:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(self, ctx)

    monkeypatch.setattr(SqueezeLLM, "quantize_block", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lpq.quantize(make_model("llama"), tmp_path / "resumed", **kwargs)
    monkeypatch.setattr(SqueezeLLM, "quantize_block", original)
    resumed = lpq.quantize(make_model("llama"), tmp_path / "resumed", resume=True, **kwargs)
    a = {n: m for n, m in whole.model.named_modules() if hasattr(m, "quantized_weight")}
    b = {n: m for n, m in resumed.model.named_modules() if hasattr(m, "quantized_weight")}
    assert a.keys() == b.keys() and len(a) == 14
    for name in a:
        assert a[name].spec.options["nnz"] == b[name].spec.options["nnz"], name
        assert torch.equal(a[name].dequantize(), b[name].dequantize()), name
    x = torch.randint(3, 100, (1, 16))  # both saved checkpoints load and give the same logits
    logits = [lpq.load(tmp_path / d, device="cpu")(x).logits for d in ("whole", "resumed")]
    assert torch.equal(logits[0], logits[1])


def _correlated_inputs(n_tokens=512, k=64, seed=0):
    """X [T, K] with strongly correlated columns (a few shared factors plus noise): where error
    feedback matters."""
    g = torch.Generator().manual_seed(seed)
    factors = torch.randn(n_tokens, 6, generator=g)
    return factors @ torch.randn(6, k, generator=g) + 0.2 * torch.randn(n_tokens, k, generator=g)


def _sorted_lut(w, bits):
    centroids, _ = weighted_kmeans_rows(w, None, 1 << bits, 30)
    return torch.cummax(centroids.half().float(), dim=1).values


@pytest.mark.parametrize("bits", [2, 3])
def test_lut_gptq_sweep_lowers_the_output_error(bits):
    """Same codebooks, same weights: assigning with error feedback on the input Hessian leaves a smaller
    layer-output error ||X (W - Q)ᵀ||² than nearest-centroid assignment (and every value is still a
    centroid of its row)."""
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(48, 64, generator=g)
    x = _correlated_inputs()
    h = 2.0 / x.shape[0] * x.t() @ x
    lut = _sorted_lut(w, bits)
    idx, fake, info = lut_gptq_sweep(w, h, lut)
    nearest = torch.gather(lut, 1, torch.searchsorted(((lut[:, 1:] + lut[:, :-1]) / 2).contiguous(), w))
    assert torch.equal(fake, torch.gather(lut, 1, idx))
    out_err = lambda q: float((x @ (w - q).t()).square().sum())  # noqa: E731
    assert out_err(fake) < 0.8 * out_err(nearest)
    assert info["loss"] > 0


def test_lut_gptq_sweep_without_correlation_is_nearest_assignment():
    """H = c·I: no column's error can be absorbed by another, so the sweep is plain nearest-centroid
    assignment (the error feedback of GPTQ vanishes with U's off-diagonal)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 40, generator=g)
    lut = _sorted_lut(w, 3)
    idx, fake, _ = lut_gptq_sweep(w, 3.0 * torch.eye(40), lut)
    mid = ((lut[:, 1:] + lut[:, :-1]) / 2).contiguous()
    assert torch.equal(idx, torch.searchsorted(mid, w))


def test_lut_gptq_keeps_sparse_positions_exactly_and_round_trips():
    """Positions in the sparse mask keep their (swept) value in fp16, index the centroid nearest 0
    (as the format stores them), and the packed layer dequantizes to exactly the returned weight."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 64, generator=g)
    w[3, 7] = 9.0  # an outlier
    fisher = torch.rand(32, 64, generator=g)
    x = _correlated_inputs(seed=3)
    h = 2.0 / x.shape[0] * x.t() @ x
    idx, lut, mask, fake = squeezellm_gptq_quantize(w, h, fisher, 3, outliers=2.0, sensitive=1.0, iters=20)
    assert bool(mask[3, 7]) and int(mask.sum()) > 0
    assert torch.equal(fake[mask], fake[mask].half().float())
    nz = lut.float().abs().argmin(dim=1, keepdim=True).expand_as(idx)
    assert torch.equal(idx[mask], nz[mask])
    assert torch.equal(fake[~mask], torch.gather(lut.float(), 1, idx)[~mask])
    spec = QuantSpec(bits=3, group_size=-1, method="squeezellm", format="squeezellm")
    qw = pack_squeezellm(idx, lut, mask, fake, spec)
    back = get_format("squeezellm").dequantize(qw.tensors, qw.spec, 64, 32).float()
    torch.testing.assert_close(back, fake, rtol=0, atol=0)


def test_gptq_option_end_to_end(tmp_path, text_file):
    """--option gptq=true: quantized stage by stage on input Hessians, recorded in the config, loads to
    the same logits as the reference architecture with the dequantized weights; bad damp refused."""
    import lpq.api
    from lpq.models.arch import set_linear_weight

    out = tmp_path / "sq3g"
    lpq.api.quantize(make_model("llama"), out, method="squeezellm", bits=3, group_size=-1, tokenizer=make_tokenizer(),
                     calib=str(text_file), nsamples=4, seqlen=64, device="cpu", dtype=torch.float32,
                     method_options={"outliers": 0.4, "sensitive": 0.05, "iters": 20, "gptq": True})
    loaded = lpq.api.load(out, device="cpu", dtype=torch.float32)
    ref = make_model("llama")
    ref_keys = set(ref.state_dict())
    ref.load_state_dict({k: v for k, v in loaded.state_dict().items() if k in ref_keys}, strict=False)
    layers = 0
    for name, module in loaded.named_modules():
        if type(module).__name__ == "QuantizedLinear":
            assert module.spec.options.get("gptq") is True and module.spec.options.get("damp") == 0.01
            set_linear_weight(ref.get_submodule(name), module.dequantize())
            layers += 1
    assert layers > 0
    ids = torch.randint(3, 100, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(SpecError, match="damp"):
        get_method("squeezellm", gptq=True, damp=0)


def _random_squeezellm(n: int, k: int, bits: int, density: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 1 << bits, (n, k), generator=g)
    lut = torch.sort(torch.randn(n, 1 << bits, generator=g) * 0.05, dim=1).values
    mask = torch.rand(n, k, generator=g) < density if density else None
    weight = torch.randn(n, k, generator=g) * 0.3 if density else None
    return pack_squeezellm(idx, lut, mask, weight, QuantSpec(bits=bits, method="squeezellm"))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_concat_outputs_joins_rows_with_their_sparse_parts(bits):
    """q/k/v-style siblings (one dense-only among them) joined: the joint weight is the row-wise concatenation of
    the parts' weights, sparse entries included, and its nnz is theirs summed."""
    fmt = get_format("squeezellm")
    parts = [_random_squeezellm(24, 64, bits, 0.05, 1), _random_squeezellm(8, 64, bits, 0.0, 2),
             _random_squeezellm(16, 64, bits, 0.1, 3)]
    joined = fmt.concat_outputs(parts)
    assert joined.out_features == 48 and joined.in_features == 64
    assert joined.spec.options["nnz"] == sum(p.spec.options["nnz"] for p in parts) > 0
    torch.testing.assert_close(joined.dequantize(), torch.cat([p.dequantize() for p in parts]), rtol=0, atol=0)
    dense = fmt.concat_outputs([parts[1], _random_squeezellm(8, 64, bits, 0.0, 4)])
    assert "sp_val" not in dense.tensors and dense.spec.options["nnz"] == 0
    # other widths or bits do not join
    assert fmt.concat_outputs([parts[0], _random_squeezellm(8, 32, bits, 0.0, 5)]) is None
    assert fmt.concat_outputs([parts[0], _random_squeezellm(8, 64, 2 if bits != 2 else 3, 0.0, 6)]) is None


def test_permute_outputs_moves_rows_with_their_codebooks_and_sparse_entries():
    fmt = get_format("squeezellm")
    qw = _random_squeezellm(40, 64, 3, 0.08, 7)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(8))
    moved = fmt.permute_outputs(qw, order)
    torch.testing.assert_close(moved.dequantize(), qw.dequantize()[order], rtol=0, atol=0)
    assert moved.spec.options["nnz"] == qw.spec.options["nnz"]
    with pytest.raises(ValueError, match="permutation"):
        fmt.permute_outputs(qw, torch.zeros(40, dtype=torch.long))


def test_fused_squeezellm_model_gives_the_same_logits(tmp_path):
    """A squeezellm model with its q/k/v and gate/up joined (lpq.fuse_for_decode without the attention wrappers)
    computes what the unfused model does, on the reference kernel."""
    import lpq.api
    from lpq.fuse import fuse_for_decode

    out = tmp_path / "sq3"
    lpq.api.quantize(make_model("llama"), out, method="squeezellm", bits=3, group_size=-1, tokenizer=make_tokenizer(),
                     device="cpu", dtype=torch.float32,
                     method_options={"outliers": 0.5, "sensitive": 0, "fisher": False, "gptq": False, "iters": 5})
    model = lpq.api.load(out, device="cpu", dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = model(ids).logits
        report = fuse_for_decode(model, attention=False, blocks=False)
        assert report["siblings"] and report["gated_mlp"]
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
