"""Mixed precision, the output-weighted cost Δ_out = K tr(ΔW A ΔWᵀ)/tr(A): the formula, GPTQ against RTN
under it, the tables that carry it, the allocator's choice of cost model, recipes and the CLI."""

import json

import pytest
import torch

from lpq.errors import SpecError
from lpq.mixed.cost import (CostTable, LayerCosts, check_cost, gptq_perturbation, measure_costs, output_error,
                            rtn_perturbation, spec_bytes, weight_error)
from lpq.mixed.plan import MixedPlan, allocate_plan, make_budget, plan_from_recipe, plan_mixed, write_plan_recipe
from lpq.mixed.sensitivity import Sensitivity
from lpq.spec import QuantSpec

from conftest import make_model
from test_cli import run


def _psd(k, gen, rank=None, noise=0.0):
    m = torch.randn(k, rank or k, generator=gen, dtype=torch.float64)
    return m @ m.t() + noise * torch.eye(k, dtype=torch.float64)


# ---- the formula ------------------------------------------------------------------------------------


@pytest.mark.parametrize("c", [1.0, 0.37, 250.0])
def test_output_error_is_the_weight_error_for_isotropic_inputs(c):
    gen = torch.Generator().manual_seed(0)
    dw = torch.randn(24, 40, generator=gen)
    A = c * torch.eye(40)
    assert output_error(dw, A) == pytest.approx(weight_error(dw), rel=1e-5)
    assert weight_error(dw) == pytest.approx(float(dw.double().square().sum()), rel=1e-6)


def test_output_error_equals_the_trace_formula():
    gen = torch.Generator().manual_seed(1)
    for n, k, rank in ((7, 13, None), (32, 48, 5), (3, 64, 64)):
        dw = torch.randn(n, k, generator=gen, dtype=torch.float64)
        A = _psd(k, gen, rank)
        direct = k * torch.trace(dw @ A @ dw.t()) / torch.trace(A)
        assert output_error(dw.float(), A.float()) == pytest.approx(float(direct), rel=1e-4)
        # A's scale cancels (GPTQ's 2/n factor does not matter)
        assert output_error(dw.float(), 9.0 * A.float()) == pytest.approx(float(direct), rel=1e-4)
        # and correlated inputs do change it: it is not ||ΔW||² in disguise
        assert abs(float(direct) - weight_error(dw)) > 0.05 * weight_error(dw)
    # a layer that never saw input loses nothing
    assert output_error(torch.ones(2, 3), torch.zeros(3, 3)) == 0.0
    with pytest.raises(ValueError):
        output_error(torch.ones(2, 3), torch.eye(4))


def _correlated_inputs(gen, k=128, rank=8, rows=1024):
    b = torch.randn(k, rank, generator=gen)
    x = torch.randn(rows, rank, generator=gen) @ b.t() + 0.05 * torch.randn(rows, k, generator=gen)
    return 2.0 / rows * x.t() @ x  # GPTQ's H [K, K]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_moves_error_where_the_inputs_are_quiet(bits):
    # GPTQ minimises the output error on the inputs it is given: its Δ_out is far below RTN's on strongly
    # correlated inputs, although its plain ||ΔW||² is larger (the error it moves into quiet directions)
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        W = 0.1 * torch.randn(48, 128, generator=gen)
        H = _correlated_inputs(gen)
        spec = QuantSpec(bits=bits, group_size=32, method="gptq")
        d_rtn, d_gptq = rtn_perturbation(W, spec), gptq_perturbation(W, H, spec, {})
        assert output_error(d_gptq, H) < 0.5 * output_error(d_rtn, H)
        assert weight_error(d_gptq) > weight_error(d_rtn)


# ---- tables -------------------------------------------------------------------------------------------


def _layer_inputs(model, name, tokens):
    """X [rows, K]: the inputs of linear ``name`` in a plain forward of the unquantized model."""
    seen = []
    h = model.get_submodule(name).register_forward_hook(lambda m, a, o: seen.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    try:
        with torch.no_grad():
            for row in tokens:
                model(row[None])
    finally:
        h.remove()
    return torch.cat(seen)


def _tiny_layers(model, method, bits=2):
    from lpq.mixed.plan import quantized_layers

    specs, shapes, _ = quantized_layers(model, QuantSpec(bits=bits, group_size=32, method=method))
    return specs, shapes


def test_measure_costs_records_delta_out_with_the_layers_inputs():
    model = make_model("llama")
    tokens = torch.randint(3, 100, (3, 24), generator=torch.Generator().manual_seed(0))
    specs, shapes = _tiny_layers(model, "rtn")
    cands = [(2, 32), (4, 32)]
    plain = measure_costs(model, specs, shapes, cands, "rtn")
    assert not plain.has("output") and plain.has("weight")
    out = measure_costs(model, specs, shapes, cands, "rtn", tokens=tokens, want_output=True)
    assert out.has("output")
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        # Δ_out of the table from the A of a plain forward of the same windows
        x = _layer_inputs(model, name, tokens).double()
        A = x.t() @ x
        W = model.get_submodule(name).weight.detach()
        for (b, g), rec in out.layers[name].options.items():
            dw = rtn_perturbation(W, QuantSpec(bits=b, group_size=g))
            assert rec["delta"] == pytest.approx(plain.layers[name].options[(b, g)]["delta"], rel=1e-6)
            assert rec["delta_out"] == pytest.approx(output_error(dw, A.float()), rel=1e-3)
            assert rec["bytes"] == plain.layers[name].options[(b, g)]["bytes"]
    # GPTQ's pass streams A anyway: both costs, without asking
    gptq = measure_costs(model, *_tiny_layers(model, "gptq"), cands, "gptq", {"mse": True}, tokens=tokens)
    assert gptq.has("weight") and gptq.has("output")
    with pytest.raises(SpecError, match="--calib"):
        measure_costs(model, specs, shapes, cands, "rtn", want_output=True)


def test_squeezellm_costs_carry_delta_out_only_when_inputs_were_streamed():
    model = make_model("llama")
    tokens = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    specs, shapes = _tiny_layers(model, "squeezellm", bits=3)
    some = dict(list(specs.items())[:2])
    opts = {"outliers": 0.0, "sensitive": 0.0}
    plain = measure_costs(model, some, shapes, [(3, 32)], "squeezellm", opts)
    assert not plain.has("output")
    streamed = measure_costs(model, some, shapes, [(3, 32)], "squeezellm", opts, tokens=tokens, want_output=True)
    assert streamed.has("output")
    for name in some:
        rec = streamed.layers[name].options[(3, 32)]
        assert rec["delta"] == pytest.approx(plain.layers[name].options[(3, 32)]["delta"], rel=1e-5)
        assert rec["delta_out"] > 0


# ---- the allocator's cost model --------------------------------------------------------------------------


def _two_layer_table(with_output=True):
    """Two 64x64 layers, each at w2 or w4; the budget pays for one w4. Layer a has the larger ||ΔW||²
    but its error sits where its inputs are quiet; layer b the other way round."""
    w2 = spec_bytes(QuantSpec(bits=2, group_size=32), 64, 64)
    w4 = spec_bytes(QuantSpec(bits=4, group_size=32), 64, 64)
    numbers = {"a": {2: (10.0, 1.0), 4: (1.0, 0.1)}, "b": {2: (4.0, 8.0), 4: (0.4, 0.8)}}
    layers = {}
    for name, opts in numbers.items():
        lc = LayerCosts(64, 64)
        for b, (d, d_out) in opts.items():
            lc.options[(b, 32)] = {"bytes": w2 if b == 2 else w4, "delta": d, **({"delta_out": d_out} if with_output else {})}
        layers[f"model.layers.0.mlp.{name}"] = lc
    names = list(layers)
    sens = Sensitivity("hutchinson", {n: 2.0 for n in names}, names, torch.rand(4, 2))
    budget = make_budget(None, w2 + w4, 2 * 64 * 64)
    return names, CostTable(layers, "gptq", "toy"), sens, budget


def test_allocator_follows_the_cost_model():
    (a, b), costs, sens, budget = _two_layer_table()
    weight = allocate_plan(sens, costs, budget, cost="weight")
    output = allocate_plan(sens, costs, budget, cost="output")
    assert (weight.layers[a]["bits"], weight.layers[b]["bits"]) == (4, 2)
    assert (output.layers[a]["bits"], output.layers[b]["bits"]) == (2, 4)
    assert weight.cost == "weight" and output.cost == "output"
    assert weight.objective == pytest.approx(2.0 * (1.0 + 4.0))
    assert output.objective == pytest.approx(2.0 * (1.0 + 0.8))
    # both perturbations of each choice are kept in the plan
    assert output.layers[b]["delta"] == 0.4 and output.layers[b]["delta_out"] == 0.8
    assert "tr(A)" in output.cost_model and "tr(A)" not in weight.cost_model
    assert "output cost" in output.summary()
    # the default stays the weight cost
    assert allocate_plan(sens, costs, budget).layers == weight.layers


def test_output_cost_on_a_table_without_it_is_one_readable_error():
    _, costs, sens, budget = _two_layer_table(with_output=False)
    assert allocate_plan(sens, costs, budget, cost="weight").cost == "weight"  # old tables still plan
    with pytest.raises(SpecError) as e:
        allocate_plan(sens, costs, budget, cost="output")
    msg = str(e.value)
    assert "\n" not in msg and "delta_out" in msg and "re-measure" in msg
    with pytest.raises(SpecError, match="weight or output"):
        check_cost("hessian")


def test_plan_records_round_trip_with_the_cost_model(tmp_path):
    from lpq.recipe import load_recipe

    _, costs, sens, budget = _two_layer_table()
    plan = allocate_plan(sens, costs, budget, cost="output")
    rec = json.loads(json.dumps(plan.to_record()))
    assert rec["cost"] == "output" and MixedPlan.from_record(rec) == plan
    path = tmp_path / "plan.yaml"
    write_plan_recipe(path, {"model": "m", "method": "gptq", "bits": 3.0, "group_size": 32, "mixed": "hessian",
                             "sensitivity": "hutchinson", "mixed_cost": "output", "overrides": {}}, plan)
    data = load_recipe(path)
    assert "mixed_cost" not in data  # a plan recipe re-runs the plan; the cost model is in its record
    again = plan_from_recipe(data)
    assert again == plan and again.cost == "output" and data["mixed_plan"]["cost"] == "output"
    assert data["overrides"] == plan.overrides()
    # a plan record from before the cost choice reads as the weight cost; a bad one is refused
    old = {k: v for k, v in rec.items() if k != "cost"}
    assert MixedPlan.from_record(old).cost == "weight"
    with pytest.raises(SpecError):
        MixedPlan.from_record({**rec, "cost": "loss"})


def test_plan_mixed_output_cost_streams_data_for_rtn():
    model = make_model("llama")
    tokens = torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(2))
    spec = QuantSpec(bits=2, group_size=32, method="rtn")
    plan = plan_mixed(model, spec, bits=3.0, sensitivity="fisher", candidates="2:32,4:32", tokens=tokens, cost="output")
    assert plan.cost == "output" and plan.bytes <= plan.budget_bytes
    assert all("delta_out" in v for v in plan.layers.values())
    with pytest.raises(SpecError, match="--calib"):
        plan_mixed(model, spec, bits=3.0, sensitivity="fisher", candidates="2:32,4:32", tokens=None, cost="output")


# ---- the CLI, end to end on a tiny model -----------------------------------------------------------


def test_cli_mixed_cost_output_end_to_end(llama_dir, tmp_path, capsys, text_file):
    out, plan_path = tmp_path / "mixed", tmp_path / "plan.yaml"
    code, stdout, err = run(capsys, "-q", "quantize", str(llama_dir), "--method", "gptq", "--mixed", "hessian",
                            "--bits", "3", "--group-size", "32", "--candidates", "2:32,3:32,4:32",
                            "--sensitivity", "fisher", "--mixed-cost", "output", "--calib", str(text_file),
                            "--nsamples", "4", "--seqlen", "32", "--sensitivity-samples", "4", "--out", str(out),
                            "--save-recipe", str(plan_path), "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["mixed"]["cost"] == "output"
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["mixed"]["cost"] == "output"
    code, stdout, _ = run(capsys, "inspect", str(out), "--json")
    report = json.loads(stdout)
    assert report["quantized_bytes"] <= summary["mixed"]["budget_bytes"]
    plan = plan_from_recipe(__import__("yaml").safe_load(plan_path.read_text()))
    assert plan.cost == "output" and all("delta_out" in v for v in plan.layers.values())
    assert {x["name"]: (x["bits"], x["group_size"]) for x in report["layers"]} == \
        {n: (v["bits"], v["group_size"]) for n, v in plan.layers.items()}
    # the recipe re-runs the same plan
    code, _, err = run(capsys, "-q", "quantize", "--recipe", str(plan_path), "--out", str(tmp_path / "again"))
    assert code == 0, err
    code, stdout, _ = run(capsys, "inspect", str(tmp_path / "again"), "--json")
    assert [(x["name"], x["bits"], x["group_size"], x["bytes"]) for x in json.loads(stdout)["layers"]] == \
        [(x["name"], x["bits"], x["group_size"], x["bytes"]) for x in report["layers"]]
    code, _, err = run(capsys, "quantize", str(llama_dir), "--mixed", "hessian", "--bits", "3",
                       "--mixed-cost", "loss", "--out", str(tmp_path / "bad"))
    assert code != 0 and "--mixed-cost" in err


def test_cli_reads_the_cost_model_from_a_recipe(llama_dir, tmp_path, capsys, text_file):
    recipe = tmp_path / "request.yaml"
    recipe.write_text(f"model: {llama_dir}\nmethod: rtn\nmixed: hessian\nbits: 3.5\ngroup_size: 32\n"
                      "sensitivity: fisher\nmixed_cost: output\ncandidates: '2:32,4:32'\nnsamples: 2\nseqlen: 32\n"
                      f"calib: {text_file}\n")
    code, stdout, err = run(capsys, "-q", "quantize", "--recipe", str(recipe), "--out", str(tmp_path / "q"), "--json")
    assert code == 0, err
    assert json.loads(stdout)["mixed"]["cost"] == "output"
    # a flag given on the command line wins over the recipe
    code, stdout, err = run(capsys, "-q", "quantize", "--recipe", str(recipe), "--mixed-cost", "weight",
                            "--out", str(tmp_path / "w"), "--json")
    assert code == 0, err
    assert json.loads(stdout)["mixed"]["cost"] == "weight"
