"""What each choice of width costs a layer: its weight perturbation Δ and its exact bytes.

For a layer with weight W [N, K] and a candidate spec c (bits, group size), ΔW = Q_c(W) - W with Q_c
the chosen method's quantizer (RTN: the grid; GPTQ: the column sweep with error feedback, on the input
Hessian of the unquantized model; SqueezeLLM: the Fisher-weighted codebooks and sparse part), and
  Δ(c)     = ||ΔW||²_F                                   ("weight" cost, key ``delta``)
  Δ_out(c) = K · tr(ΔW A ΔWᵀ) / tr(A)                   ("output" cost, key ``delta_out``)
  bytes(c) = every byte the packed format stores for the layer (codes, scales, zeros, g_idx,
             codebooks, sparse parts; not the bias), from the format's ``tensor_shapes``: the same
             count ``lpq inspect`` reads from the saved file.
with A [K, K] the second moment of the layer's inputs (GPTQ's H = 2/n Σ x xᵀ; its scale cancels).

Why Δ_out (the allocator minimises Σ_i Ω_i Δ_i with Ω_i = tr(H_loss,i) / (N_i K_i)): in the
Kronecker-factored approximation the loss Hessian of a linear's weights is H_loss ≈ A ⊗ G, A on the
input index and G [N, N] the second moment of the loss gradient at the layer's output. Taking G
isotropic, G = γ I, gives tr(H_loss) = γ N tr(A), so γ = Ω K / tr(A), and the second-order loss change

  ½ vec(ΔW)ᵀ H_loss vec(ΔW) = ½ γ tr(ΔW A ΔWᵀ) = ½ Ω · K tr(ΔW A ΔWᵀ) / tr(A) = ½ Ω · Δ_out.

The weight cost Δ is the further approximation A ∝ I, where Δ_out = Δ exactly, so Ω means the same in
both. The difference matters for GPTQ, which moves error into input directions of little energy on
purpose: ||ΔW||² counts that error in full, Δ_out at what it costs the layer's output. A is measured on
the same windows GPTQ's Δ is computed with, so for GPTQ Δ_out is an in-sample estimate (on few windows
it flatters GPTQ a little).

Methods without a perturbation function here fall back to the RTN grid's Δ (the message says so).
The pass over calibration data that GPTQ's Δ (and any Δ_out) needs streams the model block by block
through the work device (like the quantization driver, but without quantizing), and on the way also
collects each layer's input energy, the cheap ``gptq`` sensitivity proxy. Whenever that pass collects
A (always for GPTQ; for other methods when the output cost is asked), both Δ and Δ_out are recorded.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import FormatError, SpecError
from ..formats import get_format
from ..quant import dequantize_codes
from ..spec import QuantSpec

log = logging.getLogger("lpq.mixed")

DEFAULT_WIDTHS = (2, 3, 4, 8)
COSTS = ("weight", "output")  # the allocator's perturbation: ||ΔW||² or the output-weighted Δ_out
_COST_KEY = {"weight": "delta", "output": "delta_out"}


def check_cost(cost: str) -> str:
    if cost not in COSTS:
        raise SpecError(f"--mixed-cost {cost} is not known: choose {' or '.join(COSTS)}")
    return cost


def cost_key(cost: str) -> str:
    """The option record's key that holds the perturbation of cost model ``cost``."""
    return _COST_KEY[check_cost(cost)]


def parse_candidates(text: str | list | tuple | None, group_size: int) -> list[tuple[int, int]]:
    """Candidate (bits, group_size) pairs: None -> {2, 3, 4, 8} at ``group_size``; "2:64,3:128,4" or a list
    of "b:g" strings / (b, g) pairs / bare widths (at ``group_size``)."""
    if text is None:
        return [(b, group_size) for b in DEFAULT_WIDTHS]
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[tuple[int, int]] = []
    for item in items:
        try:
            if isinstance(item, (tuple, list)):
                b, g = int(item[0]), int(item[1])
            elif isinstance(item, int):
                b, g = item, group_size
            else:
                parts = str(item).strip().split(":")
                b = int(parts[0])
                g = int(parts[1]) if len(parts) > 1 else group_size
        except (ValueError, IndexError, TypeError):
            raise SpecError(f"--candidates {item!r} is not BITS or BITS:GROUP (e.g. 2:64,3:128,4:128,8:128)") from None
        QuantSpec(bits=b, group_size=g)  # validates both
        if (b, g) not in out:
            out.append((b, g))
    if not out:
        raise SpecError("--candidates is empty: give at least one BITS:GROUP")
    return out


def spec_bytes(spec: QuantSpec, in_features: int, out_features: int) -> int:
    """Exact stored bytes of one quantized linear (bias excluded), from its format's tensor shapes."""
    total = 0
    for shape, dtype in get_format(spec.format).tensor_shapes(in_features, out_features, spec).values():
        n = 1
        for s in shape:
            n *= int(s)
        total += n * torch.empty((), dtype=dtype).element_size()
    return total


def fits(spec: QuantSpec, in_features: int, out_features: int) -> bool:
    try:
        get_format(spec.format).check_shape(in_features, out_features, spec)
        return True
    except FormatError:
        return False


# ---- perturbations: pure functions of (weight, statistics, spec) ------------------------------------


def weight_error(dw: torch.Tensor) -> float:
    """Δ = ||ΔW||²_F; dw [N, K]."""
    return float(dw.float().square().sum())


def output_error(dw: torch.Tensor, inputs: torch.Tensor) -> float:
    """Δ_out = K · tr(ΔW A ΔWᵀ) / tr(A); dw [N, K], inputs A [K, K] (symmetric PSD, any scale).

    tr(ΔW A ΔWᵀ) = Σ_nk (ΔW A)_nk ΔW_nk: one [N, K] x [K, K] product, no [N, N] matrix. A layer whose
    inputs were all zero (tr A = 0) loses nothing to any perturbation: 0.
    """
    dw = dw.float()
    a = inputs.to(device=dw.device, dtype=torch.float32)
    k = dw.shape[1]
    if a.shape != (k, k):
        raise ValueError(f"input moment of shape {tuple(a.shape)} does not match the perturbation {tuple(dw.shape)}")
    tr_a = float(a.diagonal().double().sum())
    if tr_a <= 0:
        return 0.0
    quad = float(((dw @ a) * dw).double().sum())
    return k * max(quad, 0.0) / tr_a  # A is PSD: a tiny negative sum is float rounding


def errors(dw: torch.Tensor, inputs: torch.Tensor | None) -> dict[str, float]:
    """{"delta": Δ, and "delta_out": Δ_out when the input moment A [K, K] is known} for one option."""
    rec = {"delta": weight_error(dw)}
    if inputs is not None:
        rec["delta_out"] = output_error(dw, inputs)
    return rec


def rtn_perturbation(weight: torch.Tensor, spec: QuantSpec, mse: bool = False) -> torch.Tensor:
    """RTN(W) - W [N, K] on the spec's grid (what rtn_quantize stores, without packing it); weight [N, K]."""
    from ..quant import fit_groups, group_index, quantize_codes

    w = weight.float()
    scales, zeros = fit_groups(w, spec.bits, spec.group_size, spec.sym, mse)  # [G, N]
    g_idx = group_index(w.shape[1], spec.group_size, device=w.device)  # RTN has no column order
    codes = quantize_codes(w, scales, zeros, g_idx, spec.bits)
    return dequantize_codes(codes, scales, zeros, g_idx) - w


def gptq_perturbation(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec,
                      options: dict[str, Any]) -> torch.Tensor:
    """GPTQ(W) - W [N, K] with the input Hessian [K, K] of the unquantized model; weight [N, K]."""
    from ..methods.gptq import gptq_quantize

    def opt(key, default):
        v = options.get(key)
        return default if v is None else v

    codes, scales, zeros, g_idx, _ = gptq_quantize(
        weight, hessian, spec, damp=float(opt("damp", 0.01)), block_size=int(opt("block_size", 128)),
        static_groups=bool(opt("static_groups", False)), mse=bool(opt("mse", False)))
    return dequantize_codes(codes, scales, zeros, g_idx) - weight.float()


def squeezellm_perturbation(weight: torch.Tensor, fisher: torch.Tensor | None, spec: QuantSpec,
                            options: dict[str, Any]) -> tuple[torch.Tensor, QuantSpec]:
    """SqueezeLLM(W) - W [N, K] and the spec with its sparse count (which sets the bytes); weight [N, K]."""
    from ..formats.squeezellm import spec_nnz  # noqa: F401  (the format reads nnz from the spec)
    from ..methods.squeezellm import SqueezeLLM, squeezellm_quantize

    m = SqueezeLLM(**options)
    _, _, mask, fake = squeezellm_quantize(weight.float(), fisher, spec.bits, m.outliers, m.sensitive, m.iters)
    stored = spec.replace(format="squeezellm", group_size=-1, act_order=False,
                          options={**(spec.options or {}), "nnz": int(mask.sum())})
    return fake - weight.float(), stored


def rtn_delta(weight: torch.Tensor, spec: QuantSpec, mse: bool = False) -> float:
    """||RTN(W) - W||²; weight [N, K]."""
    return weight_error(rtn_perturbation(weight, spec, mse))


def gptq_delta(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, options: dict[str, Any]) -> float:
    """||GPTQ(W) - W||² with the input Hessian [K, K] of the unquantized model; weight [N, K]."""
    return weight_error(gptq_perturbation(weight, hessian, spec, options))


def squeezellm_delta(weight: torch.Tensor, fisher: torch.Tensor | None, spec: QuantSpec,
                     options: dict[str, Any]) -> tuple[float, QuantSpec]:
    """||SqueezeLLM(W) - W||² and the spec with its sparse count; weight [N, K]."""
    dw, stored = squeezellm_perturbation(weight, fisher, spec, options)
    return weight_error(dw), stored


# ---- the table of every layer's choices ----------------------------------------------------------------


@dataclass
class LayerCosts:
    """One layer's options: key (bits, group_size) -> {"bytes": int, "delta": float, and "delta_out": float
    when the costs were measured with the layer's input moment (tables without it stay valid)}."""

    in_features: int
    out_features: int
    options: dict[tuple[int, int], dict[str, float]] = field(default_factory=dict)

    @property
    def weights(self) -> int:
        return self.in_features * self.out_features


@dataclass
class CostTable:
    layers: dict[str, LayerCosts]
    method: str
    how: str  # which perturbation was measured, in words
    input_energy: dict[str, float] = field(default_factory=dict)  # tr(H_x)/K per layer, when data was streamed
    seconds: float = 0.0

    def has(self, cost: str) -> bool:
        """Whether every option of every layer carries the perturbation of cost model ``cost``."""
        key = cost_key(cost)
        return all(key in o for lc in self.layers.values() for o in lc.options.values())

    def require(self, cost: str) -> str:
        """The option key of ``cost``; one readable error when this table lacks it (an older table, or
        costs measured without streaming calibration data)."""
        key = cost_key(cost)
        if not self.has(cost):
            raise SpecError(f"the cost table has no {cost} costs ({key}; it was measured without the layers' "
                            f"input moments, or by an older lpq): re-measure the costs with calibration data")
        return key


def candidate_spec(base: QuantSpec, bits: int, group_size: int) -> QuantSpec:
    spec = base.replace(bits=bits, group_size=group_size)
    if spec.method == "squeezellm":
        spec = spec.replace(format="squeezellm", group_size=-1, act_order=False)
    return spec


def _stream_inputs(model, tokens: torch.Tensor, names: list[str], device: torch.device, batch_size: int,
                   per_block: Callable[[dict[str, "_InputStats"], dict[str, torch.nn.Module]], None],
                   want_hessian: bool) -> None:
    """Run the calibration tokens through the unquantized model one block at a time on ``device``;
    after each block, call ``per_block(stats, modules)`` with each named linear's input statistics."""
    from ..driver import _block_output, capture_block_inputs
    from ..models.arch import find_blocks, find_linears
    from ..progress import track

    blocks_name, blocks = find_blocks(model)
    wanted = set(names)
    inputs = capture_block_inputs(model, blocks, tokens, batch_size, device)
    for i in track(range(len(blocks)), "mixed precision: layer costs"):
        block = blocks[i]
        block.to(device)
        modules = {f"{blocks_name}.{i}.{n}": m for n, m in find_linears(block).items()
                   if f"{blocks_name}.{i}.{n}" in wanted}
        stats = {q: _InputStats(_in_features(m), device, want_hessian) for q, m in modules.items()}
        handles = [m.register_forward_hook(lambda mod, args, out, s=stats[q]: s.update(args[0]))
                   for q, m in modules.items()]
        outs = []
        try:
            with torch.no_grad():
                for h, a, kw in zip(inputs.hidden, inputs.args, inputs.kwargs):
                    outs.append(_block_output(block(h, *a, **kw)))
        finally:
            for hd in handles:
                hd.remove()
        inputs.hidden = outs  # the next block sees the unquantized outputs
        per_block(stats, modules)
        block.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _in_features(module) -> int:
    from ..models.arch import linear_shape

    return linear_shape(module)[0]


class _InputStats:
    """Σ x xᵀ (optional) and Σ ||x||² over the input rows of one linear, in float32."""

    def __init__(self, k: int, device, hessian: bool):
        self.k = k
        self.n = 0
        self.energy = 0.0
        self.H = torch.zeros(k, k, dtype=torch.float32, device=device) if hessian else None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.k).float()
        self.n += x.shape[0]
        self.energy += float(x.square().sum())
        if self.H is not None:
            self.H.addmm_(x.t(), x)

    def hessian(self) -> torch.Tensor:
        """GPTQ's H = 2/n Σ x xᵀ, [K, K]."""
        return self.H * (2.0 / max(self.n, 1))

    def trace_per_input(self) -> float:
        """tr(H)/K = 2/(n K) Σ ||x||²: the mean input-Hessian diagonal."""
        return 2.0 * self.energy / (max(self.n, 1) * self.k)


def measure_costs(
    model,
    layers: dict[str, QuantSpec],
    shapes: dict[str, tuple[int, int]],
    candidates: list[tuple[int, int]] | dict[str, list[tuple[int, int]]],
    method: str,
    method_options: dict[str, Any] | None = None,
    tokens: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 1,
    fisher: dict[str, torch.Tensor] | None = None,
    want_input_energy: bool = False,
    want_output: bool = False,
) -> CostTable:
    """Δ (and Δ_out when the pass collects input moments) and bytes of every candidate for every layer.

    layers: qualified name -> the layer's base spec (method, sym, act_order, format of the run);
    shapes: name -> (in_features, out_features); candidates: (bits, group_size) pairs, for all layers or
    per layer (a layer whose width the user pinned has one); tokens [S, L]: calibration windows (GPTQ's Δ,
    the output cost and the input energy need them). want_output: collect every layer's input moment A
    so that each option gets ``delta_out`` too, whatever the method (GPTQ's pass has A anyway).
    Candidates a layer's shape cannot store are left out for that layer.
    """
    from ..models.arch import linear_weight

    t0 = time.perf_counter()
    options = dict(method_options or {})
    dev = torch.device(device)
    table: dict[str, LayerCosts] = {}
    for name, base in layers.items():
        k, n = shapes[name]
        lc = LayerCosts(k, n)
        for b, g in (candidates[name] if isinstance(candidates, dict) else candidates):
            spec = candidate_spec(base, b, g)
            if fits(spec, k, n):
                lc.options[(b, g)] = {"bytes": 0, "delta": float("nan")}
        if not lc.options:
            raise SpecError(f"layer {name} ({n} x {k}) fits none of the candidate widths: exclude it with --ignore")
        table[name] = lc

    def weight(name: str) -> torch.Tensor:
        return linear_weight(model.get_submodule(name)).detach().to(dev, torch.float32)

    def fill(name: str, w: torch.Tensor, hessian: torch.Tensor | None) -> None:
        """hessian: the layer's input moment A [K, K] when streamed (GPTQ's H; Δ_out's A), else None."""
        lc = table[name]
        for (b, g), rec in lc.options.items():
            spec = candidate_spec(layers[name], b, g)
            if method == "gptq":
                dw = gptq_perturbation(w, hessian, spec, options)
            elif method == "squeezellm":
                f = None if fisher is None else fisher[name].to(w.device)
                dw, spec = squeezellm_perturbation(w, f, spec, options)
            else:
                dw = rtn_perturbation(w, spec, mse=bool(options.get("mse")))
            rec.update(errors(dw, hessian))
            rec["bytes"] = spec_bytes(spec, lc.in_features, lc.out_features)

    energy: dict[str, float] = {}
    needs_h = method == "gptq" or want_output
    if method == "gptq" and tokens is None:
        raise SpecError("GPTQ's costs need calibration data: give --calib")
    if want_output and tokens is None:
        raise SpecError("the output cost (--mixed-cost output) needs the layers' inputs: give --calib")
    if tokens is not None and (needs_h or want_input_energy):
        def per_block(stats, modules):
            for q, s in stats.items():
                energy[q] = s.trace_per_input()
                if q in table:
                    w = linear_weight(modules[q]).detach().to(dev, torch.float32)
                    fill(q, w, s.hessian() if needs_h else None)
            stats.clear()

        _stream_inputs(model, tokens, list(table), dev, batch_size, per_block, needs_h)
    else:
        from ..progress import track

        for name in track(list(table), "mixed precision: layer costs"):
            fill(name, weight(name), None)
    if method == "gptq":
        how = "||GPTQ(W) - W||^2, input Hessians of the unquantized model"
    elif method == "squeezellm":
        how = "||SqueezeLLM(W) - W||^2"
    else:
        how = "||RTN(W) - W||^2"
        if method != "rtn":
            log.warning("mixed precision: no perturbation model for method %s; using the RTN grid's error", method)
            how += f" (stand-in for {method})"
    return CostTable(table, method, how, energy, time.perf_counter() - t0)


def cost_words(costs: CostTable, cost: str) -> str:
    """The perturbation the allocator used, in words (the plan's ``cost_model``)."""
    if check_cost(cost) == "weight":
        return costs.how
    return f"K tr(dW A dW^T) / tr(A), A the input moment, dW as in {costs.how}"
