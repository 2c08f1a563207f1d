"""How much of each linear's GPTQ Hessian a few tokens carry.

    python bench/hessian_tokens.py --model smollm2-135m [--nsamples 2 --seqlen 2048 --top 10]

GPTQ minimises sum_t ||(W - Q) x_t||^2 over the calibration tokens, i.e. it weights each token by
||x_t||^2, and H = sum_t x_t x_t^T has trace sum_t ||x_t||^2. When a handful of tokens carry "massive
activations", they dominate H and GPTQ's error compensation serves them first. This script runs the
unquantized model on calibration windows (the same sampler as ``lpq quantize``), records the inputs
of the chosen linears, and reports per linear the share of trace(H) of the top-k tokens and of the
window-start tokens, and the largest |x| against the median column maximum.

Writes the section "## Calibration: share of the GPTQ Hessian carried by a few tokens" of
bench/RESULTS.md and bench/results/hessian-tokens.json (--no-write: neither).
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lpq import api  # noqa: E402
from lpq.calibration import calibration_tokens  # noqa: E402
from lpq.models.arch import find_blocks, find_linears  # noqa: E402
from results_io import device_name, versions, write_records, write_section  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2"
SECTION = "Calibration: share of the GPTQ Hessian carried by a few tokens"


def token_shares(x: torch.Tensor, seqlen: int, top: int) -> dict:
    """x [T, K] inputs of one linear (windows of seqlen tokens, concatenated) -> the statistics."""
    energy = x.float().pow(2).sum(1)  # [T]: each token's contribution to trace(H)
    total = energy.sum().clamp_min(1e-30)
    starts = energy[::seqlen].sum()
    colmax = x.float().abs().amax(0)
    return {"top_share": float(energy.topk(min(top, energy.numel())).values.sum() / total),
            "start_share": float(starts / total), "max_abs": float(colmax.max()),
            "max_col": int(colmax.argmax()),  # the input column (GPTQ's natural order) of the largest |x|
            "median_col_max": float(colmax.median())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default=str(SHARED / "wiki.valid.tokens"))
    ap.add_argument("--nsamples", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--linears", default="q_proj,down_proj", help="comma list of linear-name suffixes")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    dev = api.resolve_device(args.device)
    model, tok = api.load_any(args.model, str(dev), torch.float32 if dev.type == "cpu" else torch.float16)
    ids = calibration_tokens(args.calib, model, tok, args.nsamples, args.seqlen, args.seed, dev)
    suffixes = tuple(s for s in args.linears.split(",") if s)
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    _, blocks = find_blocks(model)
    for i, block in enumerate(blocks):
        for name, module in find_linears(block).items():
            if name.endswith(suffixes):
                key = f"{i}.{name}"
                handles.append(module.register_forward_hook(
                    lambda m, a, o, key=key: seen.setdefault(key, []).append(a[0].detach().reshape(-1, a[0].shape[-1]).cpu())))
    with torch.no_grad():
        for row in ids:
            model(row.unsqueeze(0).to(dev))
    for h in handles:
        h.remove()
    date = datetime.date.today().isoformat()
    records = [{"model": args.model, "linear": key, "in_features": int(xs[0].shape[-1]),
                **token_shares(torch.cat(xs), args.seqlen, args.top),
                "tokens": int(sum(x.shape[0] for x in xs)), "device": device_name(str(dev)), "date": date}
               for key, xs in seen.items()]
    lines = [f"{device_name(str(dev))}; {versions()}; date {date}.",
             f"Command: `python bench/hessian_tokens.py {shlex.join(sys.argv[1:])}`. Calibration windows as "
             f"`lpq quantize` samples them ({args.nsamples} x {args.seqlen}, seed {args.seed}), unquantized model. "
             f"top-{args.top} share: the {args.top} tokens with the largest ||x||^2 as a share of trace(H) = sum ||x||^2; "
             "window starts: the first token of every window; max |x| against the median over input columns of the "
             "column's largest |x|; its column: where the largest |x| sits among the input columns (GPTQ without "
             "act-order quantizes them in this order).",
             "",
             f"| block.linear | top-{args.top} share | window starts | max abs x | its column | median column max |",
             "|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['linear']} | {r['top_share']:.3f} | {r['start_share']:.3f} | {r['max_abs']:.1f} | "
                     f"{r['max_col']} of {r['in_features']} | {r['median_col_max']:.2f} |")
        print(lines[-1], flush=True)
    if not args.no_write:
        write_records("hessian-tokens", records)
        write_section(SECTION, "\n".join(lines))


if __name__ == "__main__":
    main()
