"""The Python API; the CLI is a thin layer over these functions."""

from __future__ import annotations

import json
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .calibration import calibration_tokens
from .checkpoint import check_output, load_quantized, make_quant_config, replace_with_quantized, save_quantized
from .driver import QuantizationRun, RunOptions
from .errors import CheckpointError, LpqError, OutOfMemory
from .methods import get_method
from .models.loading import ModelSource, load_model, load_tokenizer, resolve_source
from .nn import QuantizedLinear
from .progress import disable_transformers_progress, info, track
from .spec import QuantSpec

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LpqError("--device cuda was asked for, but no CUDA GPU is available: use --device cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise LpqError(f"--dtype {dtype} is not supported: choose auto, float32, float16 or bfloat16")
    return DTYPES[dtype]


@dataclass
class QuantizeResult:
    model: nn.Module
    out: Path | None
    seconds: dict[str, float] = field(default_factory=dict)
    peak_memory_gb: float = 0.0
    layers: int = 0
    plan: Any = None  # the MixedPlan of a mixed-precision run (lpq.mixed.plan), else None


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def _work_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.lpq-partial"


def _manifest(model_name: str, spec: QuantSpec, method_options: dict, ignore, overrides, calib: dict | None,
              mixed: dict | None = None, rotation: dict | None = None) -> dict:
    m = {"model": model_name, "spec": spec.to_dict(), "method_options": method_options, "ignore": list(ignore),
         "overrides": overrides, "calibration": calib}
    if mixed:
        m["mixed"] = mixed
    if rotation:  # a resumed run must rotate the same way: its finished blocks hold rotated weights
        m["rotation"] = rotation
    return m


def _check_bits(bits, mixed: str | None, target_size) -> None:
    """Without mixed precision, bits is one of the supported integer widths (QuantSpec checks which)."""
    if mixed is None:
        if target_size is not None:
            raise LpqError("--target-size needs --mixed hessian (a size is met by mixing widths)")
        if isinstance(bits, float) and not bits.is_integer():
            raise LpqError(f"--bits {bits:g} is not a whole width: fractional budgets need --mixed hessian")
    elif mixed != "hessian":
        raise LpqError(f"--mixed {mixed} is not known: the choice is hessian")


def pack_model(model: nn.Module, results: dict, dtype: torch.dtype) -> None:
    """Replace each quantized linear with a QuantizedLinear holding its packed tensors."""
    from .models.arch import linear_shape

    for name, qw in track(list(results.items()), "packing"):
        old = model.get_submodule(name)
        bias = old.bias.detach() if getattr(old, "bias", None) is not None else None
        if linear_shape(old) != (qw.in_features, qw.out_features):
            raise RuntimeError(f"shape of {name} changed during quantization")
        new = QuantizedLinear.from_quantized(qw, bias, dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize(
    model: str | nn.Module = "smollm2-135m",
    out: str | Path | None = None,
    *,
    method: str = "rtn",
    bits: int = 4,
    group_size: int = 128,
    sym: bool = False,
    act_order: bool = False,
    method_options: dict[str, Any] | None = None,
    ignore: list[str] | tuple[str, ...] = (),
    overrides: dict[str, dict[str, Any]] | None = None,
    tokenizer=None,
    calib: str | torch.Tensor | None = None,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    calib_batch_size: int = 1,
    device: str = "auto",
    dtype: str | torch.dtype | None = "auto",
    resume: bool = False,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
    trust_remote_code: bool = False,
    save_format: str = "lpq",
    mixed: str | None = None,
    sensitivity: str = "hutchinson",
    target_size: str | int | None = None,
    candidates: str | list | None = None,
    tie: list[str] | tuple[str, ...] = (),
    probes: int = 4,
    sensitivity_samples: int = 8,
    mixed_cost: str = "output",
    rotate: bool = False,
    rotate_seed: int = 0,
    rotate_heads: bool = False,
) -> QuantizeResult:
    """Quantize a causal LM and (if ``out`` is given) save it packed.

    ``model`` is a built-in name (smollm2-135m), a local directory, a .gguf file, a hub id, or an
    already-loaded transformers model (then pass ``tokenizer`` to save one alongside).
    ``calib`` is a text file, 'wikitext2', 'self' (sampled from the model; the default when the
    method needs data and none is given) or a tensor of token ids [nsamples, seqlen].
    ``save_format`` is 'lpq' (lpq's own directory) or 'gptq' (a GPTQ v1 checkpoint that other tools
    read). Returns the packed model, timings and peak memory.

    Mixed precision (``mixed="hessian"``): ``bits`` is then an average budget in bits per weight (2.5)
    or ``target_size`` a size ('1.2GB'), both counting every stored byte of the quantized linears
    (lpq.mixed.plan). Each layer gets a width from ``candidates`` (default 2, 3, 4, 8 bits at
    ``group_size``; or '2:64,3:128,4:128,8:128') that minimises Σ sensitivity × weight perturbation
    within the budget. ``sensitivity`` is 'hutchinson' (Hessian trace, ``probes`` probe vectors per
    window), 'fisher' or 'gptq', measured on the first ``sensitivity_samples`` calibration windows;
    ``tie`` lists layer endings that share a width ('q_proj,k_proj,v_proj'). ``mixed_cost`` is the weight
    perturbation the sensitivity multiplies: 'weight' (||ΔW||²) or 'output' (K tr(ΔW A ΔWᵀ)/tr(A), A the
    layer's input second moment; lpq.mixed.cost; the default: on SmolLM2 it gave the better model in 4 of 5
    GPU comparisons, bench/RESULTS.md). The plan is returned in
    ``result.plan`` and recorded in the saved config.

    ``rotate=True`` first rotates the residual stream of the full-precision model by a randomized
    Hadamard-type orthogonal matrix (seed ``rotate_seed``; lpq.transforms.rotate): an exact
    re-parametrisation of pre-RMSNorm decoders (Llama, Mistral, Qwen2, Gemma; others are refused) that
    spreads outlier channels. It helps GPTQ at 3 bits (SmolLM2 w3 g128 act-order+mse: 47.1 -> 40.0) but
    can hurt RTN. Norm scales are folded into the linears and a tied lm_head is untied; the saved model
    holds the rotated weights, so loading needs nothing new. ``rotate_heads=True`` (only with
    ``rotate=True``) also rotates each attention block's value heads and o_proj's matching input
    columns by per-kv-head Hadamard-type matrices, another exact re-parametrisation (same families).
    """
    disable_transformers_progress()
    if rotate_heads and not rotate:
        raise LpqError("--rotate-heads rotates the attention heads on top of the residual rotation: add --rotate")
    dev = resolve_device(device)
    _check_bits(bits, mixed, target_size)
    budget_bits = bits
    if mixed is not None:
        from .mixed.cost import check_cost, parse_candidates
        from .mixed.sensitivity import check_kind

        check_kind(sensitivity)
        check_cost(mixed_cost)
        cands = parse_candidates(candidates, group_size)
        if sensitivity_samples < 1:
            raise LpqError(f"--sensitivity-samples {sensitivity_samples}: need at least one calibration window")
        bits, group_size = min(b for b, _ in cands), cands[0][1]  # placeholders until the plan is made
    else:
        bits = int(bits)
    spec = QuantSpec(bits=bits, group_size=group_size, sym=sym, method=method, act_order=act_order,
                     options=dict(method_options or {}))
    method_plugin = get_method(method, **(method_options or {}))
    if mixed is None:
        method_plugin.check_spec(spec)
        for changes in (overrides or {}).values():  # glob -> spec changes
            method_plugin.check_spec(spec.replace(**{k: v for k, v in changes.items() if k in ("bits", "group_size")}))
    out_path = check_output(out, overwrite or resume) if out is not None else None
    if resume and out_path is None:
        raise LpqError("--resume needs --out (the partial work is kept beside the output directory)")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    start = time.perf_counter()
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    if isinstance(model, nn.Module):
        model_name = getattr(model.config, "_name_or_path", type(model).__name__)
        loaded = model
    else:
        source: ModelSource = resolve_source(model)
        if source.quantized:
            raise LpqError(f"{model} is already quantized: quantize the original model instead")
        model_name = model
        work_dtype = resolve_dtype(dtype, dev)
        loaded = load_model(source, work_dtype, trust_remote_code)
        if tokenizer is None:
            tokenizer = load_tokenizer(source, trust_remote_code)
    seconds["load"] = time.perf_counter() - t0
    model_dtype = next(loaded.parameters()).dtype

    if mixed is not None:  # a budget below the floor is refused now, not after minutes of calibration
        from .mixed.plan import precheck_budget

        precheck_budget(loaded, spec, bits=budget_bits, target_size=target_size, candidates=candidates,
                        ignore=ignore, overrides=overrides)

    calib_record = None
    tokens = None
    work_dir = _work_dir(out_path) if out_path is not None else None
    if save_format not in ("lpq", "gptq"):
        raise LpqError(f"--format {save_format} is not known: choose lpq or gptq")
    rotation_record = {"kind": "hadamard", "seed": int(rotate_seed)} if rotate else None
    if rotate and rotate_heads:  # the key only when on: records of residual-only runs stay as they were
        rotation_record["heads"] = True
    if rotate:  # before calibration (and before the work directory exists: a refused model leaves nothing)
        from .transforms.rotate import rotate_model

        t0 = time.perf_counter()
        try:
            rotate_model(loaded, seed=rotate_seed, device=dev, heads=rotate_heads)
        except torch.OutOfMemoryError:
            raise OutOfMemory(f"out of memory on {dev} while rotating the model: use --device cpu") from None
        seconds["rotate"] = time.perf_counter() - t0
    needs_data = method_plugin.needs_calibration or mixed is not None
    if needs_data:
        if isinstance(calib, torch.Tensor):
            nsamples, seqlen = calib.shape
            calib_record = {"source": "tokens", "nsamples": nsamples, "seqlen": seqlen, "seed": None}
        else:
            calib = calib or "self"
            calib_record = {"source": calib, "nsamples": nsamples, "seqlen": seqlen, "seed": seed}
    mixed_record = None if mixed is None else {
        "mixed": mixed, "bits": budget_bits, "target_size": target_size, "sensitivity": sensitivity,
        "candidates": candidates if candidates is None or isinstance(candidates, str) else [list(c) if isinstance(c, (list, tuple)) else c for c in candidates],
        "tie": list(tie), "probes": probes, "sensitivity_samples": sensitivity_samples, "mixed_cost": mixed_cost}
    manifest = _manifest(model_name, spec, method_options or {}, ignore, overrides or {}, calib_record, mixed_record,
                         rotation_record)
    if work_dir is not None:
        if work_dir.exists() and resume:
            saved = json.loads((work_dir / "manifest.json").read_text()) if (work_dir / "manifest.json").is_file() else None
            if saved != json.loads(json.dumps(manifest)):
                raise LpqError(f"the partial run in {work_dir} used other settings: start over with --overwrite")
            info(f"resuming the partial run in {work_dir}")
        elif work_dir.exists() and not overwrite:
            raise LpqError(f"an interrupted run left {work_dir}: continue it with --resume or start over with --overwrite")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
            work_dir.mkdir(parents=True)
            (work_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if needs_data:
        t0 = time.perf_counter()
        cached = work_dir / "calibration.pt" if work_dir is not None else None
        if cached is not None and cached.is_file():
            tokens = torch.load(cached, weights_only=True)
        else:
            if tokenizer is None and not isinstance(calib, torch.Tensor) and calib != "self":
                raise LpqError("calibration from text needs a tokenizer: pass tokenizer=... or token ids as calib")
            tokens = calibration_tokens(calib, loaded, tokenizer, nsamples, seqlen, seed, dev)
            if cached is not None:
                torch.save(tokens, cached)
        seconds["calib_data"] = time.perf_counter() - t0

    plan = None
    if mixed is not None:
        plan, spec, overrides = _mixed_plan(loaded, spec, tokens, dev, work_dir, resume, seconds,
                                            bits=budget_bits, target_size=target_size, sensitivity=sensitivity,
                                            candidates=candidates, tie=tie, method_options=method_options,
                                            ignore=ignore, overrides=overrides, probes=probes,
                                            samples=sensitivity_samples, batch_size=calib_batch_size, seed=seed,
                                            cost=mixed_cost)
        if not method_plugin.needs_calibration:
            tokens = None  # the method itself does not read them

    try:
        run = QuantizationRun(
            loaded,
            RunOptions(method=method_plugin, spec=spec, ignore=list(ignore), overrides=dict(overrides or {}),
                       device=str(dev), calib_batch_size=calib_batch_size, work_dir=work_dir, resume=resume),
            calib_tokens=tokens,
            tokenizer=tokenizer,
        )
        results = run.run()
    except torch.OutOfMemoryError:
        raise OutOfMemory(
            f"out of memory on {dev} while quantizing: lower --nsamples or --calib-batch-size, or use --device cpu"
        ) from None
    seconds.update({k: v for k, v in run.timer.seconds.items()})

    t0 = time.perf_counter()
    pack_model(loaded, results, model_dtype)
    seconds["pack"] = seconds.get("pack", 0.0) + time.perf_counter() - t0  # bit packing + module swap
    qconfig = make_quant_config(spec, run.specs, calib_record, method_options, rotation=rotation_record)
    if plan is not None:
        qconfig["mixed"] = {k: v for k, v in plan.to_record().items() if k != "layers"}
        qconfig["mixed"]["sensitivities"] = {n: v["sensitivity"] for n, v in plan.layers.items()}
    loaded.config.quantization_config = qconfig
    if out_path is not None:
        t0 = time.perf_counter()
        info(f"saving to {out_path}")
        save_quantized(loaded, tokenizer, out_path, qconfig, overwrite=overwrite or resume, max_shard_size=max_shard_size,
                       save_format=save_format)
        seconds["save"] = time.perf_counter() - t0
        if work_dir is not None:
            shutil.rmtree(work_dir, ignore_errors=True)
    seconds["total"] = time.perf_counter() - start
    return QuantizeResult(loaded, out_path, seconds, _peak_memory_gb(dev), len(results), plan)


def _mixed_plan(model, spec: QuantSpec, tokens, dev, work_dir, resume, seconds, *, bits, target_size, sensitivity,
                candidates, tie, method_options, ignore, overrides, probes, samples, batch_size, seed, cost):
    """Plan the widths (or read the plan a resumed run saved) -> (plan, default spec, overrides for the driver)."""
    from .mixed.plan import MixedPlan, plan_mixed

    t0 = time.perf_counter()
    saved = work_dir / "plan.json" if work_dir is not None else None
    if saved is not None and resume and saved.is_file():
        plan = MixedPlan.from_record(json.loads(saved.read_text()))
    else:
        plan = plan_mixed(model, spec, bits=bits, target_size=target_size, sensitivity=sensitivity,
                          candidates=candidates, tie=tie, method_options=method_options, ignore=ignore,
                          overrides=overrides, tokens=tokens[:samples], device=str(dev), probes=probes,
                          batch_size=batch_size, seed=seed, cost=cost)
        if saved is not None:
            saved.write_text(json.dumps(plan.to_record()))
    info("mixed precision: " + plan.summary())
    seconds["mixed_plan"] = time.perf_counter() - t0
    base_bits, base_group = plan.base()
    spec = spec.replace(bits=base_bits, group_size=base_group)
    return plan, spec, {**dict(overrides or {}), **plan.overrides()}


def load(path: str | Path, device: str = "auto", dtype: str | torch.dtype | None = "auto", fuse: bool | str = False):
    """Load a packed lpq (or GPTQ) directory as a transformers model that runs ``generate()``.

    fuse: True joins each block's q/k/v and gate/up projections into one linear each (:func:`lpq.fuse_siblings`):
    fewer, wider kernel calls per token, the same outputs. "decode" also computes a gated MLP's silu(gate) * up in
    its joint linear (:func:`lpq.fuse_for_decode`). For running the model, not for saving it."""
    if fuse not in (False, True, "decode"):
        raise LpqError(f"fuse={fuse!r}: choose False, True or 'decode'")
    disable_transformers_progress()
    dev = resolve_device(device)
    model = load_quantized(path, dev, resolve_dtype(dtype, dev))
    if fuse == "decode":
        from .fuse import fuse_for_decode

        fuse_for_decode(model)
    elif fuse:
        from .fuse import fuse_siblings

        fuse_siblings(model)
    return model


def load_any(name: str, device: str = "auto", dtype: str | torch.dtype | None = "auto", trust_remote_code: bool = False):
    """(model, tokenizer) for a quantized directory or any unquantized model lpq can read."""
    disable_transformers_progress()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    source = resolve_source(name)
    tokenizer = load_tokenizer(source, trust_remote_code)
    if source.quantized:
        model = load_quantized(source.path, dev, dt)
    else:
        model = load_model(source, dt, trust_remote_code).to(dev)
    return model, tokenizer
