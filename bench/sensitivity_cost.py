"""Time and memory of the sensitivity pass of `--mixed hessian` (issue 7), on its own.

    python bench/sensitivity_cost.py --device cpu --windows 1 --seqlen 2048 --probes 2 --kinds hutchinson,fisher

Loads the model, draws --windows calibration windows of --seqlen tokens (seed 0) from --calib and
measures each sensitivity kind over every linear a default run would quantize: Hutchinson's trace
(--probes Rademacher probes per window, double backward) and the Fisher proxy (squared gradients).
(The gptq proxy is a by-product of the per-width cost pass and costs nothing of its own.) Writes the
section "Mixed precision: sensitivity pass time (<device>)" of bench/RESULTS.md and
bench/results/sensitivity-cost-<device>.json.
"""

from __future__ import annotations

import argparse
import datetime
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lpq.api import resolve_device  # noqa: E402
from lpq.calibration import calibration_tokens  # noqa: E402
from lpq.mixed.plan import measure_sensitivity, quantized_layers  # noqa: E402
from lpq.models.loading import load_model, load_tokenizer, resolve_source  # noqa: E402
from lpq.spec import QuantSpec  # noqa: E402
from results_io import device_name, versions, write_records, write_section  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--model-label", default="SmolLM2-135M-Instruct")
    ap.add_argument("--calib", default=str(SHARED / "wiki.valid.tokens"))
    ap.add_argument("--kinds", default="hutchinson,fisher")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--probes", type=int, default=4)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    dev = resolve_device(args.device)
    src = resolve_source(args.model)
    model, tok = load_model(src, torch.float32), load_tokenizer(src)
    tokens = calibration_tokens(args.calib, model, tok, args.windows, args.seqlen, 0, dev)
    names = list(quantized_layers(model, QuantSpec(bits=4, group_size=128))[0])
    records, rows = [], []
    for kind in args.kinds.split(","):
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        s = measure_sensitivity(kind, model, tokens, names, dev, args.probes, 1, 0)
        wall = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)
        rec = {"model": args.model_label, "sensitivity": kind, "device": device_name(str(dev)), "windows": args.windows,
               "seqlen": args.seqlen, "probes_per_window": args.probes if kind == "hutchinson" else None,
               "layers": len(names), "wall_s": wall, "peak_mem_gb": peak, "date": datetime.date.today().isoformat()}
        records.append(rec)
        probes = f"{args.probes}" if kind == "hutchinson" else "-"
        rows.append(f"| {kind} | {args.windows} x {args.seqlen} | {probes} | {len(names)} | {wall:.1f} | {peak:.2f} |")
        print(rec, flush=True)
    tag = dev.type
    mem = "peak GPU memory (torch.cuda.max_memory_allocated)" if tag == "cuda" else "peak RSS of the process so far (so a later row includes the earlier rows)"
    write_section(f"Mixed precision: sensitivity pass time ({tag})", "\n".join([
        f"{device_name(str(dev))}; {versions()}; date {datetime.date.today().isoformat()}.",
        f"Command: `python bench/sensitivity_cost.py --device {args.device} --windows {args.windows} --seqlen "
        f"{args.seqlen} --probes {args.probes} --kinds {args.kinds}`. {args.model_label} in float32, every linear a "
        f"default run quantizes; wall time of the whole pass; {mem}. The time grows linearly with windows x probes. "
        "(On a 24 GB CPU machine one window of 2048 tokens ran out of memory: the double backward keeps every layer's "
        "attention probabilities; shorter windows, or the GPU, are the way there.)",
        "",
        "| sensitivity | windows x tokens | probes per window | layers | seconds | peak GB |",
        "|---|---|---|---|---|---|",
        *rows,
    ]))
    write_records(f"sensitivity-cost-{tag}", records)


if __name__ == "__main__":
    main()
