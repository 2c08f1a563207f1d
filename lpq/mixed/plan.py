"""From a budget to per-layer widths: sensitivity, costs, allocation, and the plan as a recipe.

The budget counts the *quantized linears only*: every byte the packed format stores for them (codes,
scales, zeros, g_idx, codebooks, sparse parts), not their biases, not the unquantized tensors
(embeddings, norms, lm_head, linears left out with --ignore). That is exactly what ``lpq inspect``
reports as ``quantized_bytes`` and, divided by the quantized weights, as ``bpw``:

  --bits B          Σ bytes_i ≤ floor(B · Σ n_i / 8)   (n_i = weights of linear i): inspect's bpw ≤ B
  --target-size S   Σ bytes_i ≤ S, with S in bytes: 1.2GB = 1.2e9, 300MB, 512MiB = 512·2^20, 1000000

The perturbation each layer's Ω multiplies is chosen by ``cost`` (``--mixed-cost``): ``weight``,
Δ = ||ΔW||², or ``output``, Δ_out = K tr(ΔW A ΔWᵀ)/tr(A) with A the layer's input moment (cost.py has
the derivation: the same second-order model with a Kronecker-factored Hessian).

The plan is written as a recipe whose ``overrides`` name every quantized linear with its width, so
``--recipe plan.yaml`` re-runs it without measuring anything; ``mixed_plan`` keeps the record (budget,
cost model, each layer's sensitivity, Δ, Δ_out and bytes) for the reader.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import SpecError
from ..spec import QuantSpec
from .allocate import solve
from .cost import CostTable, check_cost, cost_words, measure_costs, parse_candidates
from .sensitivity import Sensitivity, check_kind, fisher, from_input_energy, hutchinson

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int | float) -> int:
    """'1.2GB' -> 1200000000 bytes (kB/MB/GB/TB are powers of 10; KiB/MiB/GiB/TiB powers of 2)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise SpecError(f"--target-size {text!r} is not a size: write e.g. 1.2GB, 300MB, 512MiB or a byte count")
        value, unit = float(m.group(1)), m.group(2).lower()
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise SpecError(f"--target-size {text!r} must be positive")
    return size


@dataclass(frozen=True)
class Budget:
    bytes: int
    label: str  # in words, for messages and the recipe


def make_budget(bits: float | None, target_size: str | int | None, weights: int) -> Budget:
    """The byte budget of the quantized linears (``weights`` of them in all) from --bits or --target-size."""
    if target_size is not None:
        size = parse_size(target_size)
        return Budget(size, f"{target_size} of quantized linears ({size} bytes)")
    if bits is None:
        raise SpecError("mixed precision needs a budget: give --bits (average, e.g. 2.5) or --target-size")
    try:
        b = float(bits)
    except (TypeError, ValueError):
        raise SpecError(f"--bits {bits!r} is not a number") from None
    if not math.isfinite(b) or b <= 0:
        raise SpecError(f"--bits {bits} must be a positive number of bits per weight")
    return Budget(int(b * weights / 8), f"{b:g} bits per weight ({int(b * weights / 8)} bytes)")


def tie_groups(names: list[str], ties: list[str] | tuple[str, ...]) -> list[list[str]]:
    """Each tie spec is a comma list of layer-name endings ('q_proj,k_proj,v_proj'); the layers under one
    parent module (e.g. model.layers.3.self_attn) whose last name is in the list share one width."""
    groups: list[list[str]] = []
    for spec in ties:
        members = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
        if len(members) < 2:
            raise SpecError(f"--tie {spec!r} names fewer than two layers: give e.g. q_proj,k_proj,v_proj")
        by_parent: dict[str, list[str]] = {}
        for n in names:
            parent, _, last = n.rpartition(".")
            if last in members:
                by_parent.setdefault(parent, []).append(n)
        found = [g for g in by_parent.values() if len(g) > 1]
        if not found:
            raise SpecError(f"--tie {spec!r} matches no two quantized layers under one parent module")
        groups.extend(found)
    return groups


@dataclass
class MixedPlan:
    """The chosen width of every quantized linear, and why.

    layers: name -> {bits, group_size, sensitivity (Ω as measured), weights, bytes, delta (||ΔW||² of the
    choice), delta_out (Δ_out of the choice, when measured)}. cost: the perturbation the allocator used,
    "weight" (delta) or "output" (delta_out); cost_model says the same in words. objective = Σ Ω·Δ of the
    choices in that cost (Ω as in :func:`usable_sensitivity`); lower_bound ≤ the true optimum (equal
    when the allocation was exact in bytes).
    """

    budget_bytes: int
    budget_label: str
    sensitivity: str
    method: str
    layers: dict[str, dict[str, Any]]
    objective: float = 0.0
    lower_bound: float = 0.0
    exact: bool = True
    cell_bytes: int = 1
    ties: list[list[str]] = field(default_factory=list)
    stability: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    cost_model: str = ""
    cost: str = "weight"

    @property
    def bytes(self) -> int:
        return sum(int(v["bytes"]) for v in self.layers.values())

    @property
    def weights(self) -> int:
        return sum(int(v["weights"]) for v in self.layers.values())

    @property
    def bpw(self) -> float:
        return 8 * self.bytes / self.weights

    def widths(self) -> dict[str, int]:
        """'w3 g128' -> number of layers."""
        return dict(sorted(Counter(_label(v["bits"], v["group_size"]) for v in self.layers.values()).items()))

    def base(self) -> tuple[int, int]:
        """The most common (bits, group_size): the run's default spec; the others are overrides."""
        return Counter((v["bits"], v["group_size"]) for v in self.layers.values()).most_common(1)[0][0]

    def overrides(self) -> dict[str, dict[str, int]]:
        return {n: {"bits": int(v["bits"]), "group_size": int(v["group_size"])} for n, v in self.layers.items()}

    def to_record(self) -> dict[str, Any]:
        return {
            "budget": self.budget_label, "budget_bytes": self.budget_bytes, "bytes": self.bytes,
            "bpw": self.bpw, "sensitivity": self.sensitivity, "method": self.method, "cost": self.cost,
            "cost_model": self.cost_model,
            "objective": self.objective, "lower_bound": self.lower_bound, "exact": self.exact,
            "cell_bytes": self.cell_bytes, "ties": [list(t) for t in self.ties], "stability": dict(self.stability),
            "seconds": dict(self.seconds), "widths": self.widths(),
            "layers": {n: dict(v) for n, v in self.layers.items()},
        }

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> "MixedPlan":
        try:
            return cls(int(rec["budget_bytes"]), str(rec["budget"]), str(rec["sensitivity"]), str(rec["method"]),
                       {n: dict(v) for n, v in rec["layers"].items()}, float(rec.get("objective", 0.0)),
                       float(rec.get("lower_bound", 0.0)), bool(rec.get("exact", True)), int(rec.get("cell_bytes", 1)),
                       [list(t) for t in rec.get("ties", [])], dict(rec.get("stability", {})),
                       dict(rec.get("seconds", {})), str(rec.get("cost_model", "")),
                       check_cost(str(rec.get("cost", "weight"))))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise SpecError(f"the mixed_plan record is malformed ({e}): re-create it with --save-recipe") from None

    def summary(self) -> str:
        widths = ", ".join(f"{k}: {v}" for k, v in self.widths().items())
        return (f"{self.sensitivity} sensitivity, {self.cost} cost, {self.bpw:.3f} bits per weight, {self.bytes} of "
                f"{self.budget_bytes} bytes budgeted; {widths}")


def _label(bits: int, group_size: int) -> str:
    return f"w{bits} {'pc' if group_size == -1 else f'g{group_size}'}"


# ---- the pieces --------------------------------------------------------------------------------------


def quantized_layers(model, spec: QuantSpec, ignore=(), overrides: dict | None = None):
    """(name -> base spec, name -> (in_features, out_features), names whose bits/group size the user's
    overrides pin) for every linear a run with these settings would quantize."""
    from ..driver import QuantizationRun, RunOptions
    from ..methods import get_method
    from ..models.arch import linear_shape

    run = QuantizationRun(model, RunOptions(method=get_method("rtn"), spec=spec, ignore=list(ignore),
                                            overrides=dict(overrides or {})))
    shapes = {n: linear_shape(model.get_submodule(n)) for n in run.specs}
    pinned = {n for n in run.specs for pat, ch in (overrides or {}).items()
              if fnmatch.fnmatchcase(n, pat) and ({"bits", "group_size"} & set(ch or {}))}
    return dict(run.specs), shapes, pinned


def measure_sensitivity(kind: str, model, tokens: torch.Tensor | None, names: list[str], device="cpu",
                        probes: int = 4, batch_size: int = 1, seed: int = 0,
                        costs: CostTable | None = None) -> Sensitivity:
    """Ω per layer by ``kind`` (hutchinson, fisher, gptq: the last reads the input energies of ``costs``)."""
    check_kind(kind)
    if tokens is None:
        raise SpecError(f"the {kind} sensitivity needs calibration data: give --calib")
    if kind == "hutchinson":
        return hutchinson(model, tokens, names, device, probes=probes, batch_size=batch_size, seed=seed)
    if kind == "fisher":
        return fisher(model, tokens, names, device, batch_size=batch_size)
    if costs is None or not costs.input_energy:
        raise RuntimeError("the gptq sensitivity reads the input energies of a cost pass with data")
    return from_input_energy(costs.input_energy, names, costs.seconds)


def usable_sensitivity(values: dict[str, float], floor: float = 1e-6) -> dict[str, float]:
    """Ω as the allocator uses it: estimates ≤ 0 (an indefinite or noisy Hessian block) are raised to
    ``floor`` x the largest Ω, so that such layers still take spare bytes in proportion to their Δ
    rather than leaving the budget unused; a layer's measured value stays in the plan as it was."""
    top = max([v for v in values.values() if v > 0], default=1.0)
    return {n: max(v, floor * top) for n, v in values.items()}


def _below_floor(budget: Budget, floor: int, weights: int, smallest: list[str]) -> SpecError:
    return SpecError(
        f"a budget of {budget.label} is below the {', '.join(smallest)} floor (every layer at its smallest "
        f"width: {8 * floor / weights:.3f} bits per weight, {floor} bytes, scales and zeros counted): "
        f"raise --bits to at least {math.ceil(1000 * 8 * floor / weights) / 1000:.3f} or --target-size to {floor}"
    )


def check_floor(specs: dict[str, QuantSpec], shapes: dict[str, tuple[int, int]],
                per_layer: dict[str, list[tuple[int, int]]], budget: Budget) -> None:
    """Refuse a budget below the floor before any costly pass: the bytes of each candidate follow from its
    shape alone (a data-dependent sparse part only adds bytes, so this floor is a lower bound)."""
    from .cost import candidate_spec, fits, spec_bytes

    floor, smallest = 0, set()
    for n, spec in specs.items():
        k, o = shapes[n]
        sizes = [(spec_bytes(candidate_spec(spec, b, g), k, o), (b, g)) for b, g in per_layer[n]
                 if fits(candidate_spec(spec, b, g), k, o)]
        if sizes:
            size, key = min(sizes)
            floor += size
            smallest.add(_label(*key))
    if floor > budget.bytes:
        raise _below_floor(budget, floor, sum(k * o for k, o in shapes.values()), sorted(smallest))


def allocate_plan(sens: Sensitivity, costs: CostTable, budget: Budget, ties: list[list[str]] = (),
                  max_cells: int = 200_000, cost: str = "weight") -> MixedPlan:
    """Solve min Σ Ω_i·Δ_i(c_i) (Ω from :func:`usable_sensitivity`; Δ the ``cost`` model's perturbation:
    ``weight`` reads each option's ``delta``, ``output`` its ``delta_out``) s.t. Σ bytes_i(c_i) ≤ budget;
    refuse a budget below the floor, and the output cost on a table that lacks it."""
    key = costs.require(cost)
    names = list(costs.layers)
    floor = sum(min(int(o["bytes"]) for o in costs.layers[n].options.values()) for n in names)
    weights = sum(costs.layers[n].weights for n in names)
    if floor > budget.bytes:
        smallest = sorted({_label(*min(costs.layers[n].options, key=lambda k: costs.layers[n].options[k]["bytes"]))
                           for n in names})
        raise _below_floor(budget, floor, weights, smallest)
    omega = usable_sensitivity(sens.values)
    options = {n: {k: (int(o["bytes"]), omega[n] * float(o[key]))
                   for k, o in costs.layers[n].options.items()} for n in names}
    chosen, alloc = solve(options, budget.bytes, ties, max_cells)
    layers = {}
    for n in names:
        b, g = chosen[n]
        o = costs.layers[n].options[(b, g)]
        layers[n] = {"bits": int(b), "group_size": int(g), "sensitivity": float(sens.values[n]),
                     "weights": costs.layers[n].weights, "bytes": int(o["bytes"]), "delta": float(o["delta"])}
        if "delta_out" in o:
            layers[n]["delta_out"] = float(o["delta_out"])
    return MixedPlan(budget.bytes, budget.label, sens.kind, costs.method, layers, alloc.objective, alloc.lower_bound,
                     alloc.exact, alloc.cell, [list(t) for t in ties], sens.stability(),
                     {"sensitivity": sens.seconds, "costs": costs.seconds}, cost_words(costs, cost), cost)


def _layers_and_budget(model, spec: QuantSpec, bits, target_size, candidates, ignore, overrides):
    """-> (name -> base spec, name -> (in, out), name -> candidate widths, the budget)."""
    cands = parse_candidates(candidates, spec.group_size)
    base = spec.replace(bits=min(b for b, _ in cands), group_size=cands[0][1])
    specs, shapes, pinned = quantized_layers(model, base, ignore, overrides)
    budget = make_budget(bits, target_size, sum(k * n for k, n in shapes.values()))
    per_layer = {n: ([(s.bits, s.group_size)] if n in pinned else cands) for n, s in specs.items()}
    return specs, shapes, per_layer, budget


def precheck_budget(model, spec: QuantSpec, *, bits=None, target_size=None, candidates=None, ignore=(),
                    overrides=None) -> None:
    """Refuse a budget that no plan can meet, in a second, before calibration data or any pass."""
    specs, shapes, per_layer, budget = _layers_and_budget(model, spec, bits, target_size, candidates, ignore, overrides)
    check_floor(specs, shapes, per_layer, budget)


def plan_mixed(
    model,
    spec: QuantSpec,
    *,
    bits: float | None = None,
    target_size: str | int | None = None,
    sensitivity: str = "hutchinson",
    candidates: str | list | None = None,
    tie: list[str] | tuple[str, ...] = (),
    method_options: dict | None = None,
    ignore=(),
    overrides: dict | None = None,
    tokens: torch.Tensor | None = None,
    device: str = "cpu",
    probes: int = 4,
    batch_size: int = 1,
    seed: int = 0,
    cost: str = "weight",
) -> MixedPlan:
    """The whole planning step on an unquantized model (left as found): layers, costs, sensitivity,
    allocation. ``tokens`` [S, L] are the windows the sensitivity, GPTQ's costs and the input moments of
    the output cost (``cost="output"``) are measured on."""
    check_kind(sensitivity)
    check_cost(cost)
    specs, shapes, per_layer, budget = _layers_and_budget(model, spec, bits, target_size, candidates, ignore, overrides)
    check_floor(specs, shapes, per_layer, budget)  # before the passes that take minutes
    fisher_diag = None
    method_options = dict(method_options or {})
    if spec.method == "squeezellm" and method_options.get("fisher", True) not in (False, "false", "0", 0):
        from ..methods.squeezellm import fisher_diagonal

        fisher_diag = fisher_diagonal(model, tokens, list(specs), device, batch_size,
                                      mode=method_options.get("fisher_mode", "auto"))
    costs = measure_costs(model, specs, shapes, per_layer, spec.method, method_options, tokens, device, batch_size,
                          fisher=fisher_diag, want_input_energy=sensitivity == "gptq", want_output=cost == "output")
    sens = measure_sensitivity(sensitivity, model, tokens, list(specs), device, probes, batch_size, seed, costs)
    return allocate_plan(sens, costs, budget, tie_groups(list(specs), tie), cost=cost)


# ---- the plan as a recipe ----------------------------------------------------------------------------


def plan_recipe(options: dict[str, Any], plan: MixedPlan) -> dict[str, Any]:
    """A recipe that re-runs ``plan``: the run's options with the mixed request replaced by the plan's
    default width and one override per layer, plus the ``mixed_plan`` record."""
    bits, group = plan.base()
    drop = {"mixed", "sensitivity", "target_size", "candidates", "tie", "probes", "sensitivity_samples", "mixed_cost"}
    rec = {k: v for k, v in options.items() if k not in drop}
    rec["bits"], rec["group_size"] = int(bits), int(group)
    user = {p: ch for p, ch in (options.get("overrides") or {}).items()}
    rec["overrides"] = {**user, **plan.overrides()}
    rec["mixed_plan"] = plan.to_record()
    return rec


def write_plan_recipe(path: str | Path, options: dict[str, Any], plan: MixedPlan) -> None:
    import yaml

    from ..recipe import RECIPE_KEYS

    rec = {k: v for k, v in plan_recipe(options, plan).items() if k in RECIPE_KEYS and v not in (None, (), [], {})}
    head = (f"# Mixed-precision plan: {plan.summary()}.\n"
            f"# Re-run it with: lpq quantize --recipe {Path(path).name} --out DIR   (edit the overrides to change it;\n"
            f"# mixed_plan is the record of how it was chosen and is not read back).\n")
    Path(path).write_text(head + yaml.safe_dump(rec, sort_keys=False, default_flow_style=None, width=120))


def plan_from_recipe(data: dict[str, Any]) -> MixedPlan | None:
    rec = data.get("mixed_plan")
    return None if rec is None else MixedPlan.from_record(rec)
