"""What PTQ1.61's restorative LoRA preprocess hands to the block-wise pass, measured.

    python bench/ptq161_preprocess_probe.py --model smollm2-135m --nsamples 16 --windows 16

``--preprocess`` (lpq.methods.ptq161.restorative_lora) replaces every target linear by its closed-form
PTQ1.61 quantization Q(W), trains LoRA adapters on that model with the language-model loss, and merges
them: W' = Q(W) + s B A. The block-wise pass then treats W' as the full-precision model: its targets are
the outputs of the merged model, so the final model can only be as good as W' allows. This script
measures the perplexity of the three models involved, on the same windows:

  fp         the unquantized model;
  closed     every target linear at Q(W) (closed-form PTQ1.61: mask, 4-bit salient part, alpha from
             the mean absolute deviation, no block optimisation);
  merged     closed + the trained adapters, merged: what the block-wise pass starts from.

and the loss of each preprocess epoch. Same calibration sampler and salient statistic as
``lpq quantize --method ptq161 --preprocess``. Writes the section "Quality: PTQ1.61 preprocess probe"
of bench/RESULTS.md and bench/results/ptq161-preprocess-probe.json (--no-write: neither).
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lpq import api, evaluate  # noqa: E402
from lpq.calibration import calibration_tokens  # noqa: E402
from lpq.methods.ptq161 import activation_stats, closed_form_quantize, restorative_lora  # noqa: E402
from lpq.models.arch import find_blocks, find_linears, linear_weight, set_linear_weight  # noqa: E402
from results_io import device_name, versions, write_records, write_section  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2"
SECTION = "Quality: PTQ1.61 preprocess probe"


def target_linears(model) -> list[str]:
    """Names (model-level) of the linears lpq quantizes: every linear of every decoder block."""
    prefix, blocks = find_blocks(model)
    return [f"{prefix}.{i}.{name}" for i, block in enumerate(blocks) for name in find_linears(block)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default=str(SHARED / "wiki.valid.tokens"))
    ap.add_argument("--text", default=str(SHARED / "wiki.test.raw"))
    ap.add_argument("--nsamples", type=int, default=16, help="calibration windows (the preprocess trains on them)")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=16, help="evaluation windows of 2048 (None: all)")
    ap.add_argument("--epochs", type=int, nargs="+", default=[1], help="preprocess epochs; one merged model each")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--salient-ratio", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    dev = api.resolve_device(args.device)
    dtype = torch.float32 if dev.type == "cpu" else torch.float16
    model, tok = api.load_any(args.model, str(dev), dtype)
    text = evaluate.load_eval_text(args.text)
    ids = calibration_tokens(args.calib, model, tok, args.nsamples, args.seqlen, args.seed, dev).cpu()
    names = target_linears(model)
    original = {n: linear_weight(model.get_submodule(n)).detach().clone() for n in names}

    def ppl() -> float:
        return evaluate.perplexity(model, tok, text, max_windows=args.windows).perplexity

    rows = [{"model": "fp", "perplexity": ppl()}]
    print(rows[-1], flush=True)
    stats = activation_stats(model, names, ids, dev, "max")
    for n in names:
        m = model.get_submodule(n)
        set_linear_weight(m, closed_form_quantize(original[n].float(), stats[n], args.salient_ratio).to(dtype))
    rows.append({"model": "closed", "perplexity": ppl()})
    print(rows[-1], flush=True)
    for epochs in args.epochs:
        for n in names:  # restorative_lora starts from the unquantized weights and quantizes them itself
            set_linear_weight(model.get_submodule(n), original[n])
        t0 = time.perf_counter()
        losses = restorative_lora(model, names, ids, dev, args.salient_ratio, "max", rank=args.rank, lr=args.lr,
                                  epochs=epochs, seed=args.seed)
        rows.append({"model": f"merged ({epochs} epoch{'s' if epochs > 1 else ''})", "perplexity": ppl(),
                     "epoch_losses": losses, "train_s": round(time.perf_counter() - t0, 1)})
        print(rows[-1], flush=True)

    date = datetime.date.today().isoformat()
    windows = "all" if args.windows is None else str(args.windows)
    lines = [f"{device_name(str(dev))} {str(dtype).replace('torch.', '')}; {versions()}; date {date}.",
             f"Command: `python bench/ptq161_preprocess_probe.py {shlex.join(sys.argv[1:])}`. Calibration "
             f"{args.nsamples} x {args.seqlen} windows of wiki.valid.tokens (seed {args.seed}); perplexity on the "
             f"first {windows} windows of 2048 of wiki.test.raw. Preprocess: rank {args.rank}, lr {args.lr:g}, "
             f"salient ratio {args.salient_ratio:g}.",
             "",
             "| model | perplexity | preprocess loss per epoch | train s |",
             "|---|---|---|---|"]
    for r in rows:
        losses = ", ".join(f"{v:.3f}" for v in r.get("epoch_losses", [])) or "-"
        lines.append(f"| {r['model']} | {r['perplexity']:.2f} | {losses} | {r.get('train_s', '-')} |")
    print("\n".join(lines))
    if not args.no_write:
        records = [{**r, "device": device_name(str(dev)), "date": date, "nsamples": args.nsamples,
                    "windows": args.windows, "rank": args.rank, "lr": args.lr} for r in rows]
        write_records("ptq161-preprocess-probe", records)
        write_section(SECTION, "\n".join(lines))


if __name__ == "__main__":
    main()
