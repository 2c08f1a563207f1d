"""QAT fine-tuning of GPTQ-quantized SmolLM2: perplexity recovered, SOLO vs AdamW states, tokens/s.

    python bench/finetune.py --device cuda                      # the H100 run (about 8 minutes)
    python bench/finetune.py --device cuda --widths 2:64 --distill smollm2-135m --work /tmp/ftwork --resume   # + KD, alpha 0.5
    python bench/finetune.py --device cpu --widths 3:128 --optims adamw --steps 4 --batch 2 --seqlen 256 \
        --nsamples 4 --calib-seqlen 512 --windows 2 --section "QAT fine-tuning: SmolLM2-135M (CPU, indicative)"

For each width BITS:GROUP in --widths: GPTQ (act-order + mse grid, calibrated on --calib) with
lpq.quantize, then for each optimizer in --optims one ``lpq.finetune.finetune`` run on --data (train)
with perplexity on --text (test, PROTOCOL §2) before fine-tuning, after it with the adapters unmerged
(fp32 master weights, bf16 autocast on a GPU) and after merging (the saved packed model reloaded by
lpq.load: fp16 with lpq's kernels on a GPU). "recovered" = (before - merged) / (before - fp): the share
of the gap to the unquantized model won back by the fully quantized model. SOLO's final perplexity
is compared with AdamW's on the same width, with the bytes of the optimizer states of each.
--distill MODEL (normally the unquantized --model) trains on (1 - a) * CE + a * KL(teacher || student)
with a = --distill-alpha; its records carry the teacher and alpha, and are compared with the run of the
same width and optimizer without distillation when one is in the table (--resume keeps both apart).
Writes its section of bench/RESULTS.md and bench/results/<--name>.json.
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
from lpq.finetune import DISTILL_ALPHA, finetune  # noqa: E402
from lpq.inspect import inspect as inspect_dir  # noqa: E402
from results_io import BENCH, device_name, versions, write_records, write_section  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--model-label", default="SmolLM2-135M-Instruct")
    ap.add_argument("--widths", default="3:128,2:64", help="BITS:GROUP list, GPTQ act-order + mse")
    ap.add_argument("--optims", default="adamw,solo", help="adamw and/or solo")
    ap.add_argument("--state-bits", type=int, default=3)
    ap.add_argument("--variant", default="l4q", choices=["l4q", "qalora"])
    ap.add_argument("--text", default=str(SHARED / "wiki.test.raw"), help="evaluation text")
    ap.add_argument("--data", default=str(SHARED / "wiki.valid.tokens"), help="fine-tuning text")
    ap.add_argument("--calib", default=str(SHARED / "wiki.valid.tokens"), help="GPTQ calibration text")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--distill", default=None, metavar="MODEL",
                    help="distil from this teacher (normally the unquantized --model); default: plain CE")
    ap.add_argument("--distill-alpha", type=float, default=None,
                    help=f"weight of the KL term, loss = (1-a) CE + a KL (default {DISTILL_ALPHA} with --distill)")
    ap.add_argument("--windows", type=int, default=None, help="evaluation windows of 2048 (default: all)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--work", default=None,
                    help="folder for the GPTQ models and fine-tune outputs (kept: a later run reuses the GPTQ models)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the records an earlier run of the same --name saved; run only what is missing")
    ap.add_argument("--name", default="finetune-smollm2")
    ap.add_argument("--section", default="QAT fine-tuning: SmolLM2-135M, GPTQ w3/w2 + LoRA-QAT")
    args = ap.parse_args()
    if args.distill_alpha is not None and args.distill is None:
        ap.error("--distill-alpha needs --distill MODEL")
    if args.distill is not None and args.distill_alpha is None:
        args.distill_alpha = DISTILL_ALPHA

    dev = api.resolve_device(args.device)
    date = datetime.date.today().isoformat()
    gpu = device_name(str(dev))
    text = evaluate.load_eval_text(args.text)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="lpq-ft-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    old = BENCH / "results" / f"{args.name}.json"
    kept = json.loads(old.read_text()) if args.resume and old.is_file() else []
    t_all = time.perf_counter()

    fp_model, tokenizer = api.load_any(args.model, str(dev))
    fp_ppl = evaluate.perplexity(fp_model, tokenizer, text, 2048, args.windows).perplexity
    del fp_model
    print(json.dumps({"fp_perplexity": fp_ppl}), flush=True)
    n_windows = evaluate.eval_windows(tokenizer, text, 2048, args.windows).shape[0]
    kept = [r for r in kept if r["windows"] == n_windows and r["data"] == Path(args.data).name]

    records = []
    for width in args.widths.split(","):
        bits, group = (int(v) for v in width.split(":"))
        todo = []
        for optim in args.optims.split(","):
            key = _key(bits, group, optim, args)
            prev = [r for r in kept if _key(r["bits"], r["group_size"], r["optim"], None, r) == key]
            if prev:
                records.append(prev[-1])
            else:
                todo.append(optim)
        if not todo:
            continue
        qdir = work / f"gptq-w{bits}-g{group}"
        t0 = time.perf_counter()
        if not (qdir / "config.json").is_file():
            api.quantize(args.model, qdir, method="gptq", bits=bits, group_size=group, act_order=True,
                         method_options={"mse": True}, calib=args.calib, nsamples=args.nsamples,
                         seqlen=args.calib_seqlen, device=str(dev))
            quant_s = time.perf_counter() - t0
        else:
            quant_s = None  # made by an earlier run of this script (--work)
        for optim in todo:
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            out = work / f"ft-w{bits}-g{group}-{optim}{_kd_suffix(args.distill, args.distill_alpha)}"
            res = finetune(qdir, args.data, out, steps=args.steps, lora_rank=args.lora_rank, lr=args.lr,
                           batch=args.batch, seqlen=args.seqlen, optim=optim, state_bits=args.state_bits,
                           variant=args.variant, device=str(dev), eval_text=args.text, eval_windows=args.windows,
                           overwrite=True, distill=args.distill, distill_alpha=args.distill_alpha)
            p = res.perplexity
            gap = p["before"] - fp_ppl
            rec = {
                "model": args.model_label, "method": "gptq+qat", "bits": bits, "group_size": group,
                "options": f"act-order,mse,{args.variant},rank{args.lora_rank}", "optim": optim,
                "state_bits": args.state_bits if optim == "solo" else 32,
                "bpw": inspect_dir(out)["bpw"], "bpw_before": inspect_dir(qdir)["bpw"],
                "fp_perplexity": fp_ppl, "perplexity_before": p["before"], "perplexity_unmerged": p["unmerged"],
                "perplexity": p["merged"], "recovered": (p["before"] - p["merged"]) / gap if gap > 0 else None,
                "windows": n_windows, "seqlen": 2048,
                "steps": args.steps, "batch": args.batch, "train_seqlen": args.seqlen, "lr": args.lr,
                "train_tokens": res.tokens, "train_s": res.train_seconds, "tokens_per_s": res.tokens_per_s,
                "state_bytes": res.state_bytes, "trainable_params": res.trainable_params,
                "peak_mem_gb": res.peak_memory_gb, "quantize_s": quant_s, "final_loss": res.losses[-1],
                "distill": args.distill, "distill_alpha": args.distill_alpha,
                "final_ce_loss": res.ce_losses[-1] if res.ce_losses else res.losses[-1],
                "final_kd_loss": res.kd_losses[-1] if res.kd_losses else None,
                "calib": f"wikitext2-valid {args.nsamples}x{args.calib_seqlen}", "data": Path(args.data).name,
                "kl": None, "device": gpu, "date": date,
            }
            records.append(rec)
            print(json.dumps(rec), flush=True)
            write_records(args.name, records + [r for r in kept if r not in records])  # a cut run keeps what it did
    total_s = time.perf_counter() - t_all
    records += [r for r in kept if r not in records]  # earlier runs of other widths/optimizers stay in the table
    records.sort(key=sort_key)
    write_records(args.name, records)
    header = (f"{gpu}; {versions()}; date {date}; this run of the script {total_s:.0f} s"
              + (" (records of earlier runs kept by --resume)." if kept else ".")
              + f"\nCommand: `python bench/{Path(sys.argv[0]).name} {shlex.join(sys.argv[1:])}`.")
    lines = render(records, fp_ppl, header, args)
    write_section(args.section, "\n".join(lines))


def sort_key(r: dict) -> tuple:
    return (-r["bits"], r["group_size"], r["steps"], r["lr"], r.get("distill") is not None,
            r.get("distill_alpha") or 0, r["optim"] != "adamw")


def _run_key(r: dict) -> tuple:
    """Two records are the same recipe apart from the optimizer: width, steps, lr, batch, teacher."""
    return (r["bits"], r["group_size"], r["steps"], r["lr"], r["batch"], r.get("distill"), r.get("distill_alpha"))


def render(records: list[dict], fp_ppl: float, header: str, args) -> list[str]:
    """The RESULTS.md section: one row per record; 'vs AdamW' against the AdamW run of the same recipe
    (width, steps, lr, batch, teacher), 'vs no KD' against the same recipe and optimizer without a teacher."""
    adam = {_run_key(r): r for r in records if r["optim"] == "adamw"}
    plain = {(*_run_key(r)[:5], r["optim"], r["state_bits"]): r for r in records if r.get("distill") is None}
    teachers = sorted({r["distill"] for r in records if r.get("distill") is not None})
    kd_note = ("" if not teachers else
               f" KD: the loss is (1 - α) * CE + α * KL(teacher || student) per token, temperature 1, teacher "
               f"{', '.join(f'`{t}`' for t in teachers)} (fp32 weights, same bf16 autocast); 'vs no KD' compares the "
               "merged perplexity with the same width, steps, lr and optimizer trained on CE alone.")
    lines = [
        header,
        f"GPTQ (act-order + mse grid, {args.nsamples}x{args.calib_seqlen} windows of wiki.valid), then LoRA-QAT "
        f"({args.variant}: LoRA rank {args.lora_rank} + learned fp16 step sizes on frozen codes) for the steps of "
        f"{args.batch}x{args.seqlen} tokens of `{Path(args.data).name}` and the peak lr of each row (warm-up, then "
        "cosine decay), then merged into the same packed width. Perplexity on `wiki.test.raw`, "
        f"{records[0]['windows'] if records else '-'} windows of 2048 "
        f"(PROTOCOL §2): unquantized {fp_ppl:.2f}. 'unmerged' is the fp32 training model (bf16 autocast on a GPU); "
        "'merged' is the saved packed model reloaded by lpq.load (fp16, lpq's kernels on a GPU). "
        "recovered = (before - merged) / (before - unquantized). State memory: bytes of the optimizer's moment "
        "states (AdamW fp32; SOLO packed codes + block scales)." + kd_note,
        "",
        "| width | optimizer | steps | lr | KD α | bpw | before | unmerged | merged | recovered | vs AdamW | vs no KD | "
        "state MB | tokens/s | train s | peak GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        kd = r.get("distill") is not None
        base = adam.get(_run_key(r))
        vs = f"{(r['perplexity'] / base['perplexity'] - 1) * 100:+.1f} %" if base and base is not r else "-"
        ce_run = plain.get((*_run_key(r)[:5], r["optim"], r["state_bits"])) if kd else None
        vs_ce = f"{(r['perplexity'] / ce_run['perplexity'] - 1) * 100:+.1f} %" if ce_run else "-"
        opt = "AdamW fp32" if r["optim"] == "adamw" else f"SOLO {r['state_bits']}-bit"
        rec = "-" if r["recovered"] is None else f"{r['recovered'] * 100:.0f} %"
        lines.append(
            f"| w{r['bits']} g{r['group_size']} | {opt} | {r['steps']} | {r['lr']:g} | "
            f"{r['distill_alpha'] if kd else '-'} | {r['bpw']:.3f} | "
            f"{r['perplexity_before']:.2f} | {r['perplexity_unmerged']:.2f} | {r['perplexity']:.2f} | {rec} | {vs} | "
            f"{vs_ce} | {r['state_bytes'] / 1e6:.2f} | "
            f"{r['tokens_per_s']:,.0f} | {r['train_s']:.0f} | {r['peak_mem_gb']:.1f} |"
        )
    return lines


def _key(bits, group, optim, args, rec=None):
    """What makes two records the same run: width, optimizer (SOLO's state bits), variant, steps, rank,
    batch, lr and the distillation teacher and weight (records older than --distill have neither)."""
    if rec is not None:
        return (bits, group, optim, rec["state_bits"] if optim == "solo" else 32, rec["options"].split(",")[2],
                rec["steps"], rec["options"].split(",")[3], rec["batch"], rec["train_seqlen"], rec["lr"],
                rec.get("distill"), rec.get("distill_alpha"))
    return (bits, group, optim, args.state_bits if optim == "solo" else 32, args.variant, args.steps,
            f"rank{args.lora_rank}", args.batch, args.seqlen, args.lr, args.distill, args.distill_alpha)


def _kd_suffix(teacher: str | None, alpha: float | None) -> str:
    """Output-folder suffix of a distilled run, so that it never reuses a plain run's folder."""
    if teacher is None:
        return ""
    label = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(teacher).name)[:40]
    return f"-kd{alpha:g}-{label}"


if __name__ == "__main__":
    main()
