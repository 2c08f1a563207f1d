"""Mixed precision: the allocator against brute force, Hutchinson against exact traces, budgets,
recipes, and a tiny model end to end through the CLI."""

import itertools
import json
import random

import pytest
import torch

from lpq.errors import SpecError
from lpq.mixed import allocate, make_budget, parse_size, solve
from lpq.mixed.allocate import tie_units
from lpq.mixed.cost import LayerCosts, CostTable, parse_candidates, spec_bytes
from lpq.mixed.plan import MixedPlan, allocate_plan, plan_from_recipe, tie_groups, write_plan_recipe
from lpq.mixed.sensitivity import Sensitivity, hutchinson_probes, settle_counts, spearman
from lpq.spec import QuantSpec

from conftest import make_model
from test_cli import assert_one_line_error, run


# ---- allocator --------------------------------------------------------------------------------------


def brute_force(units, budget):
    best = None
    for pick in itertools.product(*[range(len(u)) for u in units]):
        b = sum(units[i][k][0] for i, k in enumerate(pick))
        c = sum(units[i][k][1] for i, k in enumerate(pick))
        if b <= budget and (best is None or c < best[0] - 1e-12):
            best = (c, b)
    return best


def random_problem(rng, max_units=6, max_bytes=60):
    units = []
    for _ in range(rng.randint(1, max_units)):
        units.append([(rng.randint(0, max_bytes), rng.uniform(0, 10)) for _ in range(rng.randint(1, 4))])
    floor = sum(min(o[0] for o in u) for u in units)
    top = sum(max(o[0] for o in u) for u in units)
    return units, rng.randint(floor, top)


def test_allocator_equals_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        units, budget = random_problem(rng)
        alloc = allocate(units, budget)
        best_cost, _ = brute_force(units, budget)
        assert alloc.exact
        assert alloc.bytes <= budget
        assert alloc.bytes == sum(units[i][k][0] for i, k in enumerate(alloc.choice))
        assert alloc.objective == pytest.approx(sum(units[i][k][1] for i, k in enumerate(alloc.choice)))
        assert alloc.objective == pytest.approx(best_cost, abs=1e-9)


def test_allocator_discretised_is_feasible_and_bounded():
    # few cells: the extras are rounded up (feasible) and a rounded-down DP bounds the optimum from below
    rng = random.Random(1)
    for _ in range(200):
        units, budget = random_problem(rng, max_units=5, max_bytes=997)
        alloc = allocate(units, budget, max_cells=7)
        best_cost, _ = brute_force(units, budget)
        assert alloc.bytes <= budget
        assert alloc.lower_bound <= best_cost + 1e-9 <= alloc.objective + 2e-9


def test_allocator_uses_the_budget_to_the_byte():
    # cost falls with bytes; the budget is exactly one combination's size: the optimum must hit it
    units = [[(10, 5.0), (17, 1.0)], [(10, 4.0), (23, 0.5)], [(5, 3.0), (11, 0.1)]]
    alloc = allocate(units, 17 + 10 + 11)
    assert alloc.bytes == 38 and alloc.choice == [1, 0, 1]
    assert allocate(units, 37).bytes <= 37


def test_allocator_refuses_below_floor():
    with pytest.raises(SpecError):
        allocate([[(10, 1.0), (20, 0.0)], [(5, 1.0)]], 14)


def test_tie_groups_respected():
    rng = random.Random(2)
    keys = ["w2", "w3", "w4", "w8"]
    for _ in range(60):
        names = [f"l{i}.{p}" for i in range(2) for p in ("q", "k", "v", "o")]
        options = {n: {k: (rng.randint(1, 40), rng.uniform(0, 5)) for k in keys} for n in names}
        ties = [[f"l{i}.q", f"l{i}.k", f"l{i}.v"] for i in range(2)]
        floor = sum(min(o[0] for o in v.values()) for v in options.values())
        budget = floor + rng.randint(0, 100)
        try:
            chosen, alloc = solve(options, budget, ties)
        except SpecError:
            continue  # tied layers' smallest common width can exceed the per-layer floor
        for group in ties:
            assert len({chosen[n] for n in group}) == 1
        assert sum(options[n][chosen[n]][0] for n in names) <= budget
        # brute force over tie-consistent assignments
        units = tie_units(names, ties)
        best = None
        for pick in itertools.product(keys, repeat=len(units)):
            b = sum(options[m][k][0] for u, k in zip(units, pick) for m in u)
            c = sum(options[m][k][1] for u, k in zip(units, pick) for m in u)
            if b <= budget and (best is None or c < best):
                best = c
        assert alloc.objective == pytest.approx(best, abs=1e-9)


def test_tie_groups_from_layer_endings():
    names = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"]
    groups = tie_groups(names, ["q_proj,k_proj,v_proj"])
    assert groups == [[f"model.layers.{i}.self_attn.{p}_proj" for p in "qkv"] for i in range(2)]
    with pytest.raises(SpecError):
        tie_groups(names, ["gate_proj,up_proj"])


# ---- sensitivity ------------------------------------------------------------------------------------


def _quadratic(seed=0, diagonal=False):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    if diagonal:
        A = torch.diag(torch.rand(17, generator=g, dtype=torch.float64) * 3)
    else:
        m = torch.randn(17, 17, generator=g, dtype=torch.float64)
        A = m @ m.t() + torch.diag(torch.linspace(-2.0, 4.0, 17, dtype=torch.float64))  # indefinite is fine
    z = torch.cat([a.reshape(-1), b])
    loss = 0.5 * z @ A @ z + (z**3).sum() * 0.0
    return [a, b], loss, A


def test_hutchinson_matches_exact_trace_of_a_quadratic():
    params, loss, A = _quadratic()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    gen = torch.Generator().manual_seed(0)
    est = hutchinson_probes(list(grads), params, 4000, gen).mean(0)
    exact = torch.tensor([A[:12, :12].trace(), A[12:, 12:].trace()])
    # standard error of the mean: ~ sqrt(2 Σ_{i≠j} A_ij² / 4000); the off-diagonal blocks add to the variance only
    assert torch.allclose(est, exact, rtol=0.06, atol=0.5), (est, exact)
    # a wrong estimator (e.g. the whole trace for both parameters) would be far off
    assert abs(float(est[0] - A.trace())) > 5


def test_hutchinson_is_exact_with_one_probe_on_a_diagonal_hessian():
    params, loss, A = _quadratic(diagonal=True)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    est = hutchinson_probes(list(grads), params, 1, torch.Generator().manual_seed(3))[0]
    assert est[0] == pytest.approx(float(A[:12, :12].trace()), rel=1e-12)
    assert est[1] == pytest.approx(float(A[12:, 12:].trace()), rel=1e-12)


def test_settle_counts_and_spearman():
    s = torch.tensor([[10.0, 1.0], [0.0, 1.0], [2.0, 1.0], [4.0, 1.0]])  # running means 10, 5, 4, 4 | 1, 1, 1, 1
    assert settle_counts(s, rtol=0.1) == [3, 1]
    assert spearman(torch.tensor([1.0, 2, 3]), torch.tensor([10.0, 20, 30])) == pytest.approx(1.0)
    assert spearman(torch.tensor([1.0, 2, 3]), torch.tensor([3.0, 2, 1])) == pytest.approx(-1.0)


# ---- budgets, costs, plans, recipes --------------------------------------------------------------------


def test_parse_size_and_budget():
    assert parse_size("1.2GB") == 1_200_000_000
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1000") == 1000
    with pytest.raises(SpecError):
        parse_size("twelve")
    assert make_budget(2.5, None, 1000).bytes == 312
    assert make_budget(None, "2kB", 10**9).bytes == 2000
    with pytest.raises(SpecError):
        make_budget(None, None, 1000)


def test_spec_bytes_counts_codes_scales_zeros():
    # 576 inputs, 576 outputs, 3 bits, groups of 128 (5 groups, the last short), act-order g_idx
    spec = QuantSpec(bits=3, group_size=128, act_order=True)
    codes = 576 * 3 // 32 * 576 * 4
    scales = 5 * 576 * 2
    zeros = 5 * (576 // 32 * 3) * 4
    gidx = 576 * 4
    assert spec_bytes(spec, 576, 576) == codes + scales + zeros + gidx
    assert parse_candidates("2:64,3,4:128", 32) == [(2, 64), (3, 32), (4, 128)]


def _toy_plan_inputs():
    names = [f"model.layers.{i}.mlp.{p}" for i in range(3) for p in ("up_proj", "down_proj")]
    layers = {}
    for j, n in enumerate(names):
        lc = LayerCosts(64, 64)
        for b in (2, 3, 4, 8):
            lc.options[(b, 32)] = {"bytes": spec_bytes(QuantSpec(bits=b, group_size=32), 64, 64),
                                   "delta": float(4.0 ** -b * (1 + j))}
        layers[n] = lc
    sens = Sensitivity("hutchinson", {n: 1.0 + (3 * i % 5) for i, n in enumerate(names)}, names,
                       torch.rand(8, len(names)))
    return names, CostTable(layers, "rtn", "toy"), sens


def test_plan_floor_is_refused_in_one_line():
    names, costs, sens = _toy_plan_inputs()
    with pytest.raises(SpecError) as e:
        allocate_plan(sens, costs, make_budget(1.5, None, 6 * 64 * 64))
    msg = str(e.value)
    assert "\n" not in msg and "w2 g32 floor" in msg and "--bits" in msg


def test_plan_recipe_round_trip(tmp_path):
    from lpq.recipe import load_recipe

    names, costs, sens = _toy_plan_inputs()
    plan = allocate_plan(sens, costs, make_budget(3.6, None, 6 * 64 * 64))
    assert plan.bytes <= plan.budget_bytes and len(plan.widths()) > 1
    path = tmp_path / "plan.yaml"
    write_plan_recipe(path, {"model": "m", "method": "rtn", "bits": 3.6, "group_size": 32, "mixed": "hessian",
                             "sensitivity": "hutchinson", "overrides": {}}, plan)
    data = load_recipe(path)
    assert "mixed" not in data and "sensitivity" not in data  # the recipe re-runs the plan, it does not re-plan
    again = plan_from_recipe(data)
    assert again == plan
    assert data["overrides"] == plan.overrides()
    assert {n: v["sensitivity"] for n, v in again.layers.items()} == sens.values
    assert (data["bits"], data["group_size"]) == plan.base()


# ---- a tiny model, end to end ---------------------------------------------------------------------


def test_cli_mixed_end_to_end(llama_dir, tmp_path, capsys, text_file):
    out, plan_path = tmp_path / "mixed", tmp_path / "plan.yaml"
    code, stdout, err = run(capsys, "-q", "quantize", str(llama_dir), "--mixed", "hessian", "--bits", "3",
                            "--group-size", "32", "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32",
                            "--sensitivity-samples", "4", "--probes", "2", "--out", str(out),
                            "--save-recipe", str(plan_path), "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["mixed"]["sensitivity"] == "hutchinson"
    code, stdout, _ = run(capsys, "inspect", str(out), "--json")
    report = json.loads(stdout)
    assert report["bpw"] <= 3.0 and report["quantized_bytes"] <= summary["mixed"]["budget_bytes"]
    assert len({layer["bits"] for layer in report["layers"]}) > 1, report["widths"]
    assert all(layer["sensitivity"] is not None for layer in report["layers"])
    # the recipe holds each layer's width and sensitivity; re-running it reproduces the widths
    plan = plan_from_recipe(__import__("yaml").safe_load(plan_path.read_text()))
    assert {layer["name"]: layer["bits"] for layer in report["layers"]} == {n: v["bits"] for n, v in plan.layers.items()}
    assert plan.bytes == report["quantized_bytes"]  # the planned bytes are the stored bytes
    out2 = tmp_path / "again"
    code, _, err = run(capsys, "-q", "quantize", "--recipe", str(plan_path), "--out", str(out2))
    assert code == 0, err
    code, stdout, _ = run(capsys, "inspect", str(out2), "--json")
    again = json.loads(stdout)
    assert [(x["name"], x["bits"], x["group_size"], x["bytes"]) for x in again["layers"]] == \
        [(x["name"], x["bits"], x["group_size"], x["bytes"]) for x in report["layers"]]
    code, stdout, _ = run(capsys, "inspect", str(out))
    assert code == 0 and "widths:" in stdout and "sensitivity" in stdout


def test_cli_mixed_refusals(llama_dir, tmp_path, capsys, text_file):
    code, _, err = run(capsys, "quantize", str(llama_dir), "--bits", "2.5", "--out", str(tmp_path / "a"))
    assert_one_line_error(code, err, "--mixed")
    code, _, err = run(capsys, "quantize", str(llama_dir), "--target-size", "1MB", "--out", str(tmp_path / "b"))
    assert_one_line_error(code, err, "--mixed")
    code, _, err = run(capsys, "-q", "quantize", str(llama_dir), "--mixed", "hessian", "--bits", "1.8",
                       "--group-size", "32", "--sensitivity", "gptq", "--calib", str(text_file), "--nsamples", "2",
                       "--seqlen", "32", "--out", str(tmp_path / "c"))
    assert_one_line_error(code, err, "floor", "--bits")
    assert not (tmp_path / "c").exists()
    assert not (tmp_path / ".c.lpq-partial").exists()  # refused before any work: nothing to resume


@pytest.mark.parametrize("kind,method", [("fisher", "rtn"), ("gptq", "gptq")])
def test_cheap_sensitivities_plan_within_budget(kind, method, tokenizer):
    from lpq.mixed import plan_mixed

    model = make_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.randint(3, 100, (3, 24), generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(bits=2, group_size=32, method=method)
    plan = plan_mixed(model, spec, target_size=28000, sensitivity=kind, tokens=tokens, tie=["q_proj,k_proj,v_proj"])
    assert plan.bytes <= 28000 and plan.sensitivity == kind
    assert all(v["sensitivity"] > 0 for v in plan.layers.values())
    for i in range(2):
        assert len({plan.layers[f"model.layers.{i}.self_attn.{p}_proj"]["bits"] for p in "qkv"}) == 1
    # the model is left exactly as found (dtype, values, no gradients)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) and v.dtype == before[k].dtype
    assert not any(p.requires_grad and p.grad is not None for p in model.parameters())


def test_example_recipes_load():
    from pathlib import Path

    from lpq.recipe import load_recipe

    files = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("mixed-*.yaml"))
    assert files
    for f in files:
        data = load_recipe(f)
        assert data["mixed"] == "hessian" and ("bits" in data or "target_size" in data)
        parse_candidates(data.get("candidates"), data.get("group_size", 128))


def test_plot_command(tmp_path, capsys):
    import importlib.util

    records = [{"series": "uniform gptq", "bits": 2, "bpw": 2.3, "perplexity": 117.0},
               {"series": "uniform gptq", "bits": 3, "bpw": 3.2, "perplexity": 41.0},
               {"series": "mixed hutchinson", "label": "2.5", "bpw": 2.49, "perplexity": 60.0},
               {"series": "unquantized", "bpw": 16.0, "perplexity": 21.8}]
    src = tmp_path / "r.json"
    src.write_text(json.dumps(records))
    png = tmp_path / "p.png"
    code, _, err = run(capsys, "-q", "plot", str(src), "--out", str(png))
    if importlib.util.find_spec("matplotlib") is None:
        assert_one_line_error(code, err, "matplotlib")
    else:
        assert code == 0, err
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _, err = run(capsys, "plot", str(tmp_path / "missing.json"))
    assert_one_line_error(code, err, "not found")
