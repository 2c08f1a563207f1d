"""Mixed precision against uniform widths: perplexity vs true bits per weight (PROTOCOL §2, §6).

    python bench/mixed.py --model smollm2-135m --device cuda --act-order --mse \\
        --budgets 2.5,3.0,3.5,4.0 --kinds hutchinson,fisher,gptq --uniform 2:64,3:128,4:128 --costs weight,output

One planning pass on the unquantized model: the per-width costs of the method underneath (GPTQ by
default, on the input Hessians of the first --sens-samples calibration windows), both the weight cost
Δ = ||ΔW||² and the output cost Δ_out = K tr(ΔW A ΔWᵀ)/tr(A) (lpq/mixed/cost.py), and each sensitivity
kind (timed: the sensitivity-pass time). Then, per budget, kind and cost model (--costs), the exact
allocation and a full ``lpq.quantize`` with that plan as per-layer overrides (identical plans are
quantized once), plus the uniform runs and the unquantized model; each is measured by ``lpq.inspect``
(true bpw, overheads counted) and perplexity (+ KL unless --no-kl) on the evaluation text.

Writes the section "--section" of bench/RESULTS.md (or --results-md), <--results-dir>/<--name>.json
(quality records, with ``series``, ``budget``, ``sensitivity`` and ``cost``), <--name>-sensitivity.json
(pass times and how the estimates settle), <--name>-planning.json (the planning pass, for --resume: Δ and
Δ_out of every option and the sensitivities; a cache without Δ_out is re-measured when --costs asks for
the output cost), and <--name>.png when matplotlib is importable (it is not a dependency of lpq: without
it the PNG is skipped; ``lpq plot bench/results/<--name>.json`` draws it later). --results-dir defaults
to bench/results; point it (and --results-md) elsewhere for a trial run that must not touch them.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lpq import api, evaluate  # noqa: E402
from lpq.calibration import calibration_tokens  # noqa: E402
from lpq.errors import SpecError  # noqa: E402
from lpq.inspect import inspect as inspect_dir  # noqa: E402
from lpq.mixed.cost import CostTable, LayerCosts, check_cost, measure_costs, parse_candidates  # noqa: E402
from lpq.mixed.plan import allocate_plan, make_budget, measure_sensitivity, quantized_layers  # noqa: E402
from lpq.mixed.sensitivity import Sensitivity, spearman  # noqa: E402
from lpq.models.loading import load_model, load_tokenizer, resolve_source  # noqa: E402
from lpq.spec import QuantSpec  # noqa: E402
from results_io import BENCH, device_name, versions, write_records, write_section  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--model-label", default="SmolLM2-135M-Instruct")
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--budgets", default="2.5,3.0,3.5,4.0", help="average bits per weight, overheads counted")
    ap.add_argument("--kinds", default="hutchinson,fisher,gptq", help="sensitivity kinds to compare")
    ap.add_argument("--costs", "--cost", dest="costs", default="weight",
                    help="cost models to plan with: weight (||dW||^2), output (K tr(dW A dW^T)/tr(A)) or weight,output")
    ap.add_argument("--compare-at", default=None,
                    help="budgets at which the kinds after the first are run too (default: every budget)")
    ap.add_argument("--uniform", default="2:64,3:128,4:128", help="uniform BITS:GROUP runs for comparison")
    ap.add_argument("--candidates", default="2:64,3:128,4:128,8:128", help="widths the allocator chooses from")
    ap.add_argument("--tie", action="append", default=[], help="layer endings sharing a width, e.g. q_proj,k_proj,v_proj")
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--mse", action="store_true")
    ap.add_argument("--probes", type=int, default=4, help="Hutchinson probes per calibration window")
    ap.add_argument("--sens-samples", type=int, default=8, help="calibration windows for sensitivity and costs")
    ap.add_argument("--text", default=str(SHARED / "wiki.test.raw"))
    ap.add_argument("--calib", default=str(SHARED / "wiki.valid.tokens"))
    ap.add_argument("--calib-label", default="wikitext2-valid")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=None, help="evaluation windows (default: all)")
    ap.add_argument("--eval-seqlen", type=int, default=2048, help="evaluation window length (PROTOCOL §2: 2048)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-kl", action="store_true")
    ap.add_argument("--uniform-from", default=None, metavar="JSON[,JSON]",
                    help="take uniform runs from earlier quality record files (same method and flags) instead of "
                         "running them; uniform runs found in none of them are run")
    ap.add_argument("--resume", action="store_true",
                    help="keep the records (and the planning pass) an earlier run of the same --name saved, also those of runs this "
                         "call does not ask for; measure only what is missing")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="start no new quantization after this many minutes; what is done is written (continue with --resume)")
    ap.add_argument("--results-md", default=None, help="markdown file for the section [default: bench/RESULTS.md]")
    ap.add_argument("--results-dir", default=None,
                    help="folder of the JSON records, planning cache and PNG [default: bench/results]")
    ap.add_argument("--report-only", action="store_true",
                    help="measure nothing: write the section again from the saved records, sensitivities and planning "
                         "cache of --name (e.g. after a call was cut before it wrote its table)")
    ap.add_argument("--versions", default=None, help="with --report-only: the software versions of the machine that "
                    "measured, for records saved before they were recorded")
    ap.add_argument("--name", default="mixed-smollm2")
    ap.add_argument("--section", default="Mixed precision: SmolLM2-135M, GPTQ underneath")
    args = ap.parse_args()
    if args.report_only:
        return report_only(args)

    dev = api.resolve_device(args.device)
    dtype = api.resolve_dtype("auto", dev)
    date = datetime.date.today().isoformat()
    text = evaluate.load_eval_text(args.text)
    options = {k: True for k, on in (("mse", args.mse),) if on}
    budgets = [float(b) for b in args.budgets.split(",") if b]
    kinds = [k for k in args.kinds.split(",") if k]
    try:
        cost_models = [check_cost(c.strip()) for c in args.costs.split(",") if c.strip()]
    except SpecError as e:
        sys.exit(str(e).replace("--mixed-cost", "--costs"))
    if not cost_models:
        sys.exit("--costs is empty: give weight, output or weight,output")
    results_dir = Path(args.results_dir) if args.results_dir else BENCH / "results"
    compare_at = None if args.compare_at is None else {float(b) for b in args.compare_at.split(",") if b}
    cands = parse_candidates(args.candidates, 128)
    calib_label = f"{args.calib_label} {args.nsamples}x{args.seqlen}"
    dev_label = f"{device_name(str(dev))} {str(dtype).replace('torch.', '')}"

    # ---- planning pass on the unquantized model (kept on the CPU; blocks stream through the device) ----
    start = time.perf_counter()
    cache_path = results_dir / f"{args.name}-planning.json"
    cache_key = {k: getattr(args, k) for k in ("model", "method", "candidates", "act_order", "mse", "probes",
                                                "sens_samples", "calib", "nsamples", "seqlen")}
    cache = json.loads(cache_path.read_text()) if args.resume and cache_path.is_file() else None
    if cache is not None and cache.get("key") != json.loads(json.dumps(cache_key)):
        sys.exit(f"{cache_path} was made with other settings: drop --resume or use another --name")
    source = resolve_source(args.model)
    model = load_model(source, dtype, False)
    tokenizer = load_tokenizer(source, False)
    tokens = calibration_tokens(args.calib, model, tokenizer, args.nsamples, args.seqlen, 0, dev)
    sens_tokens = tokens[: args.sens_samples]
    base = QuantSpec(bits=cands[0][0], group_size=cands[0][1], method=args.method, act_order=args.act_order)
    specs, shapes, _ = quantized_layers(model, base)
    names = list(specs)
    weights = sum(k * n for k, n in shapes.values())
    costs = None
    if cache is not None:  # options: {"bytes", "delta"} and, in caches made since the output cost, "delta_out"
        costs = CostTable({n: LayerCosts(v["in"], v["out"], {tuple(json.loads(k)): o for k, o in v["options"].items()})
                           for n, v in cache["costs"].items()}, cache["method"], cache["how"], {}, cache["seconds"])
        missing = [c for c in cost_models if not costs.has(c)]
        if missing:  # an older cache: measure the costs again (the cached sensitivities stay)
            print(f"costs: the cached table has no {','.join(missing)} costs; measuring them again", flush=True)
            costs = None
    if costs is None:
        # Δ_out needs each layer's input moment: GPTQ's pass has it anyway; other methods stream it when asked
        costs = measure_costs(model, specs, shapes, cands, args.method, options, sens_tokens, dev,
                              want_output="output" in cost_models)
    print(f"costs: {costs.how}, {costs.seconds:.1f} s, cost models {','.join(cost_models)}", flush=True)
    sens, sens_records = {}, []
    cached_sens = {r["sensitivity"]: r for r in (cache or {}).get("sensitivity", [])}
    for kind in kinds:
        if kind in cached_sens:
            rec = cached_sens[kind]
            sens[kind] = Sensitivity(kind, rec["values"], names, None, rec["seconds"])
            sens_records.append({k: v for k, v in rec.items() if k != "values"})
            continue
        if kind == "gptq":  # the input energies alone: one forward pass with hooks (RTN costs are negligible)
            t0 = time.perf_counter()
            energy_pass = measure_costs(model, specs, shapes, [cands[0]], "rtn", {}, sens_tokens, dev, want_input_energy=True)
            s = measure_sensitivity("gptq", model, sens_tokens, names, dev, costs=energy_pass)
            s.seconds = time.perf_counter() - t0
        else:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            s = measure_sensitivity(kind, model, sens_tokens, names, dev, args.probes, 1, 0)
        sens[kind] = s
        st = s.stability()
        rec = {"model": args.model_label, "sensitivity": kind, "seconds": s.seconds, "windows": int(sens_tokens.shape[0]),
               "seqlen": int(sens_tokens.shape[1]), "probes_per_window": args.probes if kind == "hutchinson" else None,
               "device": dev_label, "date": date, **{f"stability_{k}": v for k, v in st.items()}}
        sens_records.append(rec)
        print(json.dumps(rec), flush=True)
    results_dir.mkdir(parents=True, exist_ok=True)
    cache_path.write_text(json.dumps({
        "key": cache_key, "method": costs.method, "how": costs.how, "seconds": costs.seconds,
        "costs": {n: {"in": lc.in_features, "out": lc.out_features,
                      "options": {json.dumps(list(k)): o for k, o in lc.options.items()}} for n, lc in costs.layers.items()},
        "sensitivity": [{**r, "values": sens[r["sensitivity"]].values} for r in sens_records]}) + "\n")
    ref_kind = kinds[0]
    for rec in sens_records:
        a = torch.tensor([sens[ref_kind].values[n] for n in names])
        b = torch.tensor([sens[rec["sensitivity"]].values[n] for n in names])
        rec[f"spearman_vs_{ref_kind}"] = spearman(a, b)
    del model
    gc.collect()

    # ---- the runs ----
    runs = []  # (series, budget, kind, bits, group, overrides, plan)
    flags = ",".join(f for f, on in (("act-order", args.act_order), ("mse", args.mse)) if on)
    wanted = parse_candidates(args.uniform, 128) if args.uniform else []
    earlier = uniform_records(args.uniform_from, args.method, flags, wanted)
    for b, g in wanted:
        if (b, g) not in {(r["bits"], r["group_size"]) for r in earlier}:
            runs.append((f"uniform {args.method}", None, None, b, g, None, None))
    seen: dict[str, int] = {}
    for budget in budgets:
        for kind in kinds:
            if kind != kinds[0] and compare_at is not None and budget not in compare_at:
                continue
            for cost in cost_models:
                try:
                    plan = allocate_plan(sens[kind], costs, make_budget(budget, None, weights),
                                         tie_groups_for(names, args.tie), cost=cost)
                except SpecError as e:
                    print(f"budget {budget}: skipped ({e})", flush=True)
                    continue
                runs.append((_series(kind, cost), budget, kind, *plan.base(), plan.overrides(), plan))

    reference, ref_tok = api.load_any(args.model, str(dev), dtype)
    fp = evaluate.perplexity(reference, ref_tok, text, args.eval_seqlen, args.windows, args.batch_size)
    records = [{"model": args.model_label, "series": "unquantized", "method": "fp", "bits": 16, "group_size": None,
                "options": "", "bpw": 16.0, "perplexity": fp.perplexity, "windows": fp.windows, "seqlen": args.eval_seqlen,
                "kl": None, "calib": None, "device": dev_label, "versions": versions(), "date": date}]
    print(json.dumps(records[0]), flush=True)
    measured: dict[str, dict] = {}
    records += earlier
    done = {}
    old_path = results_dir / f"{args.name}.json"
    if args.resume and old_path.is_file():
        done = {_run_key(r): r for r in json.loads(old_path.read_text()) if r.get("series") != "unquantized"}
    left = 0
    for series, budget, kind, bits, group, overrides, plan in runs:
        key = json.dumps([bits, group, overrides], sort_keys=True)
        rkey = _run_key({"series": series, "budget": budget, "sensitivity": kind, "bits": bits, "group_size": group})
        if rkey in done:
            records.append(done[rkey])
            continue
        if args.max_minutes is not None and time.perf_counter() - start > 60 * args.max_minutes and key not in measured:
            left += 1
            continue
        if key not in measured:
            out = Path(tempfile.mkdtemp(prefix="lpq-mixed-")) / "q"
            t0 = time.perf_counter()
            api.quantize(args.model, out, method=args.method, bits=bits, group_size=group, act_order=args.act_order,
                         method_options=options, overrides=overrides, calib=args.calib, nsamples=args.nsamples,
                         seqlen=args.seqlen, device=str(dev))
            wall = time.perf_counter() - t0
            info = inspect_dir(out)
            model = api.load(out, device=str(dev), dtype=dtype)
            ppl = evaluate.perplexity(model, ref_tok, text, args.eval_seqlen, args.windows, args.batch_size)
            kl = None if args.no_kl else evaluate.kl_divergence(model, reference, ref_tok, text, args.eval_seqlen,
                                                               args.windows, args.batch_size)
            measured[key] = {"bpw": info["bpw"], "size_mb": info["total_bytes"] / 1e6, "perplexity": ppl.perplexity,
                             "windows": ppl.windows, "kl": None if kl is None else kl.kl, "quantize_s": wall,
                             "widths": {k: v["layers"] for k, v in info["widths"].items()}}
            del model
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        m = measured[key]
        rec = {"model": args.model_label, "series": series, "method": args.method, "bits": budget if budget else bits,
               "group_size": group if budget is None else None, "options": flags, "budget": budget, "sensitivity": kind,
               "label": width_label(bits, group) if budget is None else f"{budget:g}",
               "bpw": m["bpw"], "size_mb": m["size_mb"], "perplexity": m["perplexity"], "windows": m["windows"],
               "seqlen": args.eval_seqlen, "kl": m["kl"], "widths": m["widths"], "quantize_s": m["quantize_s"],
               "calib": calib_label, "device": dev_label, "date": date}
        if plan is not None:
            rec.update(cost=plan.cost, planned_bpw=plan.bpw, objective=plan.objective, exact=plan.exact)
        records.append(rec)
        print(json.dumps(rec), flush=True)
        _write_records(results_dir, args.name, _with_kept(records, done))  # a call killed later keeps this run

    records = _with_kept(records, done)
    _write_records(results_dir, args.name, records)
    _write_records(results_dir, args.name + "-sensitivity", sens_records)
    if left:
        print(f"PARTIAL: {left} run(s) not started within --max-minutes; run the same command again with --resume",
              flush=True)
    png = _plot(records, results_dir, args)
    body = report(args, records, sens_records, costs, png, calib_label)
    if args.results_md:
        write_section(args.section, body, Path(args.results_md))
    else:
        write_section(args.section, body)


def _plot(records: list[dict], folder: Path, args):
    """The perplexity-vs-bpw PNG, or None (matplotlib missing: the PNG is optional)."""
    try:
        from lpq.mixed.plot import plot_records

        return plot_records(records, folder / f"{args.name}.png",
                            title=f"{args.model_label}: perplexity vs bits per weight", max_bpw=8.5)
    except Exception as e:
        print(f"no PNG: {e}", flush=True)
        return None


def report_only(args) -> None:
    """Write the section from what earlier calls saved (records, sensitivities, planning cache); no model is run."""
    from types import SimpleNamespace

    folder = Path(args.results_dir) if args.results_dir else BENCH / "results"
    paths = [folder / f"{args.name}{end}.json" for end in ("", "-sensitivity", "-planning")]
    missing = [str(q) for q in paths if not q.is_file()]
    if missing:
        sys.exit(f"--report-only needs {', '.join(missing)}: run the measurement first")
    records, sens_records, cache = (json.loads(q.read_text()) for q in paths)
    if not records or records[0].get("series") != "unquantized":
        sys.exit(f"{paths[0]} does not start with the unquantized record: re-run the measurement")
    costs = SimpleNamespace(how=cache["how"], seconds=cache["seconds"])
    if args.versions and not records[0].get("versions"):  # records saved before versions were recorded
        records[0]["versions"] = args.versions
    png = _plot(records, folder, args)
    calib_label = f"{args.calib_label} {args.nsamples}x{args.seqlen}"
    write_section(args.section, report(args, records, sens_records, costs, png, calib_label),
                  *([Path(args.results_md)] if args.results_md else []))


def uniform_records(files: str | None, method: str, flags: str, wanted: list[tuple[int, int]]) -> list[dict]:
    """The uniform runs (bits, group) in ``wanted`` found in earlier quality record files (comma-separated),
    same method and flags; the first file that has a width wins."""
    found: dict[tuple[int, int], dict] = {}
    for name in (files or "").split(","):
        if not name.strip():
            continue
        for r in json.loads(Path(name.strip()).read_text()):
            key = (r.get("bits"), r.get("group_size"))
            if r.get("method") == method and r.get("options", "") == flags and key in wanted and key not in found:
                found[key] = {**r, "series": f"uniform {method}", "label": width_label(*key), "budget": None,
                              "sensitivity": None, "source": Path(name.strip()).name}
    return [found[k] for k in wanted if k in found]


def width_label(bits: int, group: int) -> str:
    return f"w{bits} g{group}" if group and group > 0 else f"w{bits} per-channel"


def _series(kind: str, cost: str) -> str:
    """The series of a mixed run: the weight cost keeps the name records had before the output cost."""
    return f"mixed {kind}" if cost == "weight" else f"mixed {kind} {cost}-cost"


def _cost_of(r: dict) -> str | None:
    """A mixed record's cost model (records from before the output cost used the weight cost)."""
    return None if r.get("budget") is None else r.get("cost") or "weight"


def _write_records(folder: Path, name: str, records: list[dict]) -> None:
    if folder.resolve() == (BENCH / "results").resolve():
        write_records(name, records)
    else:
        (folder / f"{name}.json").write_text(json.dumps(records, indent=1) + "\n")


def _shown(folder: Path) -> str:
    """A results folder as the report names it: relative to the repository when inside it."""
    try:
        return str(folder.resolve().relative_to(BENCH.parent))
    except ValueError:
        return str(folder)


def _with_kept(records: list[dict], done: dict[str, dict]) -> list[dict]:
    """records + the earlier records (--resume) of runs this call did not measure or ask for."""
    have = {_run_key(r) for r in records if r.get("series") != "unquantized"}
    return records + [r for k, r in done.items() if k not in have]


def _run_key(r: dict) -> str:
    """Which run a record is; the series names the sensitivity kind and (for the output cost) the cost."""
    if r.get("budget") is None:
        return json.dumps([r["series"], r["bits"], r["group_size"]])
    return json.dumps([r["series"], float(r["budget"]), r["sensitivity"]])


def tie_groups_for(names, ties):
    from lpq.mixed.plan import tie_groups

    return tie_groups(names, ties) if ties else []


SAME_SIZE_BPW = 0.002  # a mixed run this close to a uniform run's bpw is compared with it as the same size


def _interp(x, p, q):
    (x0, y0), (x1, y1) = p, q
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def report(args, records, sens_records, costs, png, calib_label) -> str:
    fp = records[0]["perplexity"]
    lines = [
        f"{records[0]['device']}; {records[0].get('versions') or versions()}; date {records[0]['date']}.",
        f"Command: `python bench/{Path(sys.argv[0]).name} {shlex.join(a for a in sys.argv[1:] if a != '--report-only')}`.",
        f"Perplexity on `wiki.test.raw` (PROTOCOL §2), {records[0]['windows']} windows of {args.eval_seqlen}. "
        f"{args.method.upper()} underneath ({records[-1]['options'] or 'no flags'}), calibrated on {calib_label}. "
        "bpw is `lpq inspect`'s: every stored byte of the quantized linears (codes, scales, zeros, g_idx) over their "
        f"weights; a mixed run's budget is that same count. Widths chosen from {args.candidates}; per-width costs "
        f"from {costs.how} and the sensitivities measured on the first {args.sens_samples} calibration windows. "
        "Cost model: weight = Ω·||ΔW||², output = Ω·K tr(ΔW A ΔWᵀ)/tr(A) with A the layer's input second moment "
        "(lpq/mixed/cost.py).",
        "",
        "| run | budget | sensitivity | cost | bpw | size MB | perplexity | KL | widths (layers) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        widths = ", ".join(f"{k}: {v}" for k, v in (r.get("widths") or {}).items()) or "-"
        kl = "-" if r.get("kl") is None else f"{r['kl']:.4f}"
        size = "-" if r.get("size_mb") is None else f"{r['size_mb']:.1f}"
        run = r["series"] if r["series"] == "unquantized" else (
            f"{r['series']} {r['label']}" if r.get("budget") is None else "mixed")
        lines.append(f"| {run} | {r.get('budget') or '-'} | {r.get('sensitivity') or '-'} | {_cost_of(r) or '-'} | "
                     f"{r['bpw']:.3f} | {size} | "
                     f"{r['perplexity']:.2f} | {kl} | {widths} |")
    # the targets. Overheads are counted, so no uniform 3-bit model is as small as the 3.0 budget:
    # each mixed 3.0 run is set against every uniform w3 run, with the sizes side by side
    uniforms = sorted((r for r in records if r["series"].startswith("uniform")), key=lambda r: r["bpw"])
    w2s = [u for u in uniforms if u["bits"] == 2]
    w3s = [u for u in uniforms if u["bits"] == 3]
    lines += ["", "Targets (issue 7):", ""]
    for r in records:
        if r.get("budget") == 3.0:
            for w3 in w3s:
                closed = (w3["perplexity"] - r["perplexity"]) / (w3["perplexity"] - fp)
                size = "more" if w3["bpw"] > r["bpw"] else "fewer"
                lines.append(f"- budget 3.0, {r['sensitivity']}, {_cost_of(r)} cost, against uniform {w3['label']} "
                             f"({w3['bpw']:.3f} bpw: {size} bits than the mixed model's {r['bpw']:.3f}): closes "
                             f"{closed:.1%} of its gap to the unquantized model ({w3['perplexity']:.2f} -> "
                             f"{r['perplexity']:.2f}; target ≥ 10 %): {'met' if closed >= 0.10 else 'not met'}")
        if r.get("budget") == 2.5:
            for w2 in w2s:
                for w3 in w3s:
                    line = _interp(r["bpw"], (w2["bpw"], w2["perplexity"]), (w3["bpw"], w3["perplexity"]))
                    lines.append(f"- budget 2.5, {r['sensitivity']}, {_cost_of(r)} cost: {r['perplexity']:.2f} at "
                                 f"{r['bpw']:.3f} bpw against {line:.2f} on the {w2['label']}-{w3['label']} line: "
                                 f"{'met' if r['perplexity'] < line else 'not met'}")
    # mixed runs whose budget is a uniform run's own size: the like-for-like comparison
    same = [(r, u) for r in records if r.get("budget") not in (None, 2.5, 3.0)
            for u in uniforms if abs(r["bpw"] - u["bpw"]) <= SAME_SIZE_BPW]
    if same:
        lines += ["", "At the size of a uniform run (budget = its bpw):", ""]
    for r, u in same:
        closed = (u["perplexity"] - r["perplexity"]) / (u["perplexity"] - fp)
        lines.append(f"- budget {r['budget']:g}, {r['sensitivity']}, {_cost_of(r)} cost: {r['perplexity']:.2f} at "
                     f"{r['bpw']:.3f} bpw against uniform {u['label']} {u['perplexity']:.2f} at {u['bpw']:.3f}: closes "
                     f"{closed:.1%} of its gap to the unquantized model")
    # no target at the other budgets: each mixed run against the straight line between the uniform runs around it
    ladder = uniforms
    paired = {id(r) for r, _ in same}
    others = [r for r in records if r.get("budget") not in (None, 2.5, 3.0) and id(r) not in paired]
    if others and len(ladder) >= 2:
        lines += ["", "Other budgets (no target; against the straight line between the uniform runs around them):", ""]
    for r in others if len(ladder) >= 2 else []:
        lo = max((u for u in ladder if u["bpw"] <= r["bpw"]), key=lambda u: u["bpw"], default=ladder[0])
        hi = min((u for u in ladder if u["bpw"] > r["bpw"]), key=lambda u: u["bpw"], default=ladder[-1])
        if lo is hi:
            lo, hi = ladder[-2], ladder[-1]
        line = _interp(r["bpw"], (lo["bpw"], lo["perplexity"]), (hi["bpw"], hi["perplexity"]))
        lines.append(f"- budget {r['budget']:g}, {r['sensitivity']}, {_cost_of(r)} cost: {r['perplexity']:.2f} at {r['bpw']:.3f} bpw; "
                     f"the {lo['label']}-{hi['label']} line gives {line:.2f} there "
                     f"({'below' if r['perplexity'] < line else 'above'} it)")
    lines += ["", "Sensitivity pass (the time to measure Ω; the per-width costs took "
              f"{costs.seconds:.1f} s more): how the estimates settle — samples (probes for Hutchinson, windows for "
              "Fisher) until each layer's running mean stays within 10 % of its final value, and the rank agreement "
              "of estimates from the first and second half of the samples.", "",
              "| sensitivity | seconds | windows x tokens | samples | settle median / p90 / max | unsettled layers | "
              "split-half Spearman | Spearman vs " + sens_records[0]["sensitivity"] + " |",
              "|---|---|---|---|---|---|---|---|"]
    ref = sens_records[0]["sensitivity"]
    for s in sens_records:
        settle = ("-" if s.get("stability_settle_median") is None else
                  f"{s['stability_settle_median']} / {s['stability_settle_p90']} / {s['stability_settle_max']}")
        rho = s.get("stability_split_half_spearman")
        lines.append(f"| {s['sensitivity']} | {s['seconds']:.1f} | {s['windows']} x {s['seqlen']} | "
                     f"{s.get('stability_samples', '-')} | {settle} | {s.get('stability_unsettled_layers', '-')} | "
                     f"{'-' if rho is None else f'{rho:.3f}'} | {s[f'spearman_vs_{ref}']:.3f} |")
    folder = _shown(Path(args.results_dir) if args.results_dir else BENCH / "results")
    if png is not None:
        lines += ["", f"Plot: `{folder}/{Path(png).name}`."]
    else:
        lines += ["", f"No PNG (matplotlib is not installed; it is optional): `lpq plot {folder}/{args.name}.json` draws it."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
