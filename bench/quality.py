"""Perplexity, KL, bits per weight, size and quantization cost of lpq runs (PROTOCOL §2, §3, §5, §6).

    python bench/quality.py --model smollm2-135m --runs fp,rtn:8:128,rtn:4:128,rtn:4:-1,rtn:3:128,rtn:2:64

A run is ``fp`` (the unquantized model) or ``METHOD:BITS:GROUP[:flag+...]`` with flags ``sym``,
``act-order``, ``static-groups``, ``mse`` and ``KEY=VALUE`` method options (e.g.
``ptq161:4:-1:salient_ratio=0.2+epochs=20+preprocess=1``; ptq161 keeps its salient channels at 4 bits);
``rotate=1`` is not a method option but ``lpq.quantize(rotate=True)``, the residual-stream rotation
(``gptq:3:128:act-order+mse+rotate=1``), and ``rotate=2`` is ``lpq.quantize(rotate=True, rotate_heads=True)``,
the residual rotation plus the value/output head rotation. Each quantized run is a whole ``lpq.quantize`` (timed, peak
memory), then ``lpq.inspect`` (true bits per weight) and perplexity + KL on the evaluation text.
Writes the table into bench/RESULTS.md (section named by --section) and the records into
bench/results/<--name>.json.
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

import lpq  # noqa: E402
from lpq import api, evaluate  # noqa: E402
from lpq.inspect import inspect as inspect_dir  # noqa: E402
from results_io import device_name, versions, write_records, write_section  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2"


def parse_run(run: str) -> dict | None:
    if run == "fp":
        return None
    parts = run.split(":", 3)
    method, bits, group = parts[0], int(parts[1]), int(parts[2])
    flags = set(parts[3].split("+")) if len(parts) > 3 and parts[3] else set()
    options = {}  # KEY=VALUE flags are method options (values read as JSON where they parse)
    for flag in flags:
        if "=" in flag:
            key, value = flag.split("=", 1)
            try:
                options[key.replace("-", "_")] = json.loads(value)
            except json.JSONDecodeError:
                options[key.replace("-", "_")] = value
    # quantize() arguments, not method options: rotate 0 off, 1 residual, 2 + heads; rotate-seed its seed
    rotate = options.pop("rotate", 0)
    if rotate not in (0, 1, 2, False, True):
        raise SystemExit(f"run {run}: rotate={rotate} is not 0, 1 (residual stream) or 2 (residual + heads)")
    rotate_seed = options.pop("rotate_seed", 0)
    if not isinstance(rotate_seed, int) or rotate_seed < 0:
        raise SystemExit(f"run {run}: rotate-seed={rotate_seed} is not a non-negative integer")
    return {"method": method, "bits": bits, "group_size": group, "sym": "sym" in flags,
            "act_order": "act-order" in flags, "static_groups": "static-groups" in flags, "flags": sorted(flags),
            "options": options, "rotate": rotate >= 1, "rotate_heads": rotate == 2, "rotate_seed": rotate_seed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--model-label", default="SmolLM2-135M-Instruct")
    ap.add_argument("--runs", default="fp,rtn:8:128,rtn:4:128,rtn:4:-1,rtn:3:128,rtn:2:64")
    ap.add_argument("--text", default=str(SHARED / "wiki.test.raw"))
    ap.add_argument("--calib", default=str(SHARED / "wiki.valid.tokens"))
    ap.add_argument("--calib-label", default="wikitext2-valid")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=None, help="evaluation windows (default: all)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--name", default="quality-smollm2-rtn")
    ap.add_argument("--section", default="Quality: SmolLM2-135M, RTN (spine)")
    ap.add_argument("--no-kl", action="store_true")
    args = ap.parse_args()

    dev = api.resolve_device(args.device)
    dtype = api.resolve_dtype("auto", dev)
    text = evaluate.load_eval_text(args.text)
    date = datetime.date.today().isoformat()
    reference, tokenizer = api.load_any(args.model, str(dev), dtype)
    records, cost = [], []
    for run in args.runs.split(","):
        cfg = parse_run(run)
        gc.collect()
        if cfg is None:
            model, info, qcost = reference, None, None
        else:
            out = Path(tempfile.mkdtemp(prefix="lpq-bench-")) / "q"
            opts = {"static_groups": True} if cfg["static_groups"] else {}
            if "mse" in cfg["flags"]:
                opts["mse"] = True
            opts.update(cfg["options"])
            calib = args.calib if lpq.methods.get_method(cfg["method"]).needs_calibration else None
            t0 = time.perf_counter()
            res = api.quantize(args.model, out, method=cfg["method"], bits=cfg["bits"], group_size=cfg["group_size"],
                               sym=cfg["sym"], act_order=cfg["act_order"], method_options=opts, calib=calib,
                               nsamples=args.nsamples, seqlen=args.seqlen, device=str(dev), rotate=cfg["rotate"],
                               rotate_heads=cfg["rotate_heads"], rotate_seed=cfg["rotate_seed"])
            wall = time.perf_counter() - t0
            info = inspect_dir(out)
            qcost = {"model": args.model_label, "method": run, "device": device_name(str(dev)), "wall_s": wall,
                     "peak_mem_gb": res.peak_memory_gb, "calib_s": res.seconds.get("calib", 0.0) + res.seconds.get("calib_data", 0.0),
                     "method_s": res.seconds.get("method", 0.0), "pack_s": res.seconds.get("pack", 0.0),
                     "save_s": res.seconds.get("save", 0.0), "load_s": res.seconds.get("load", 0.0), "date": date}
            cost.append(qcost)
            del res
            model = api.load(out, device=str(dev), dtype=dtype)
        ppl = evaluate.perplexity(model, tokenizer, text, args.seqlen, args.windows, args.batch_size)
        kl = None
        if cfg is not None and not args.no_kl:
            kl = evaluate.kl_divergence(model, reference, tokenizer, text, args.seqlen, args.windows, args.batch_size)
        rec = {
            "model": args.model_label, "method": "fp" if cfg is None else cfg["method"],
            "bits": 16 if cfg is None else cfg["bits"], "group_size": None if cfg is None else cfg["group_size"],
            "options": "" if cfg is None else ",".join(cfg["flags"]),
            "bpw": 16.0 if info is None else info["bpw"], "size_mb": None if info is None else info["total_bytes"] / 1e6,
            "perplexity": ppl.perplexity, "windows": ppl.windows, "seqlen": args.seqlen,
            "kl": None if kl is None else kl.kl, "top1_changed": None if kl is None else kl.top1_changed,
            "calib": None if cfg is None or not calib else f"{args.calib_label} {args.nsamples}x{args.seqlen}",
            "device": f"{device_name(str(dev))} {str(dtype).replace('torch.', '')}", "date": date,
        }
        records.append(rec)
        print(json.dumps(rec), flush=True)
        if cfg is not None:
            del model
            if dev.type == "cuda":
                torch.cuda.empty_cache()

    write_records(args.name, records)
    if cost:
        write_records(args.name + "-cost", cost)
    lines = [
        f"{records[0]['device']}; {versions()}; date {date}.",
        f"Command: `python bench/{Path(sys.argv[0]).name} {shlex.join(sys.argv[1:])}`.",
        f"Perplexity on `wiki.test.raw` (PROTOCOL §2), {records[0]['windows']} windows of {args.seqlen}; KL(fp || quantized) "
        "in nats per token and the share of changed top-1 predictions on the same windows (§3). bpw counts every stored "
        "byte of the quantized linears (codes, scales, zeros); size is the whole output (embeddings in 16 bits).",
        "",
        "| run | bits | group | options | bpw | size MB | perplexity | KL | top-1 changed | calibration |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    def fmt(value, spec: str, scale: float = 1.0, suffix: str = "") -> str:
        return "-" if value is None else f"{value * scale:{spec}}{suffix}"

    for r in records:
        g = "-" if r["group_size"] is None else ("per-channel" if r["group_size"] == -1 else str(r["group_size"]))
        lines.append(
            f"| {r['method']} | {r['bits']} | {g} | {r['options'] or '-'} | {r['bpw']:.3f} | {fmt(r['size_mb'], '.1f')} | "
            f"{r['perplexity']:.2f} | {fmt(r['kl'], '.4f')} | {fmt(r['top1_changed'], '.1f', 100, '%')} | "
            f"{r['calib'] or '-'} |"
        )
    if cost:
        lines += ["", "Cost of each `lpq quantize` (PROTOCOL §5): wall time and peak memory "
                  "(GPU: torch.cuda.max_memory_allocated; CPU: peak RSS of the process so far).", "",
                  "| run | wall s | load s | calibration s | method s | pack s | save s | peak memory GB |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in cost:
            lines.append(f"| {c['method']} | {c['wall_s']:.1f} | {c['load_s']:.1f} | {c['calib_s']:.1f} | {c['method_s']:.1f} | "
                         f"{c['pack_s']:.2f} | {c['save_s']:.2f} | {c['peak_mem_gb']:.2f} |")
    write_section(args.section, "\n".join(lines))


if __name__ == "__main__":
    main()
