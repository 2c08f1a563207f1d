"""QAT fine-tuning data-parallel: the same run on 1 and on 2 GPUs (accelerate launch), same global batch.

    python bench/finetune_multi.py                                  # on a machine with 2 GPUs (~5 minutes)
    python bench/finetune_multi.py --device cpu --model DIR --steps 2 --batch 2 --seqlen 128 --windows 1 \
        --nsamples 4 --calib-seqlen 256 --dry-run-dir /tmp/ftm      # CPU dry run (2 gloo processes)

Run it with plain python (not under accelerate launch): it quantizes --model once with GPTQ (act-order +
mse grid, lpq.quantize) in this process, then starts ``python -m accelerate.commands.launch
--num_processes N`` of itself (``--worker``) for each N in --processes, each fine-tuning the same GPTQ
model with ``lpq.finetune.finetune`` for --steps steps of the global batch --batch x --seqlen (each
process takes batch/N windows; DDP averages the gradients), with perplexity on --text before, unmerged
and merged (PROTOCOL §2). Per setting it records global tokens/s and train seconds (the main process's
clock around the training loop), the peak GPU memory of each process (torch.cuda.max_memory_allocated
over training), the final loss, the merged perplexity and the loss curve's largest deviation from the
one-process curve. Writes its section of bench/RESULTS.md and bench/results/<--name>.json
(--dry-run-dir: both into that folder instead).

--fsdp adds, for every process count N > 1, a sharded run (``finetune(fsdp=True)``: FSDP2, each GPU holds
1/N of the model plus the block being computed) beside the data-parallel one (--fsdp-only: the sharded
run alone), same global batch; the table then compares 1 GPU, N GPUs data-parallel and N GPUs sharded:
loss curve against 1 GPU, merged perplexity and the peak memory of each GPU:

    python bench/make_random_model.py /tmp/smol-rand                    # where the real model cannot travel
    python bench/finetune_multi.py --model /tmp/smol-rand --model-label SmolLM2-135M-shaped-random --fsdp
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_io import RESULTS_MD, device_name, versions, write_records, write_section  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2"
SECTION = "QAT fine-tuning: data-parallel on 2 GPUs"
SECTION_FSDP = "QAT fine-tuning: sharded (FSDP) against data-parallel on 2 GPUs"


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="built-in name, GGUF file or model folder")
    ap.add_argument("--model-label", default="SmolLM2-135M-Instruct")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--text", default=str(SHARED / "wiki.test.raw"), help="evaluation text")
    ap.add_argument("--data", default=str(SHARED / "wiki.valid.tokens"), help="fine-tuning text")
    ap.add_argument("--calib", default=str(SHARED / "wiki.valid.tokens"), help="GPTQ calibration text")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=8, help="global batch (windows per step over all processes)")
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--optim", default="adamw", choices=["adamw", "solo"])
    ap.add_argument("--variant", default="l4q", choices=["l4q", "qalora"])
    ap.add_argument("--windows", type=int, default=None, help="evaluation windows of 2048 (default: all)")
    ap.add_argument("--processes", default="1,2", help="process counts to compare (one GPU each)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run over gloo")
    ap.add_argument("--work", default=None, help="folder for the GPTQ model and the outputs (reused: GPTQ runs once)")
    ap.add_argument("--fsdp", action="store_true", help="also run every N > 1 sharded (FSDP2) beside data-parallel")
    ap.add_argument("--fsdp-only", action="store_true", help="with --fsdp: no data-parallel runs for N > 1")
    ap.add_argument("--name", default=None, help="record name (default finetune-multi, with --fsdp finetune-fsdp)")
    ap.add_argument("--section", default=None, help="RESULTS.md section (default by --fsdp)")
    ap.add_argument("--dry-run-dir", default=None, help="write RESULTS.md and the JSON records here, not in bench/")
    ap.add_argument("--timeout", type=int, default=900, help="seconds allowed to each launched fine-tune")
    # worker mode (started by this script under accelerate launch)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--qdir", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--record", help=argparse.SUPPRESS)
    ap.add_argument("--shard", action="store_true", help=argparse.SUPPRESS)  # worker: finetune(fsdp=True)
    args = ap.parse_args()
    if args.fsdp_only:
        args.fsdp = True
    if args.name is None:
        args.name = "finetune-fsdp" if args.fsdp else "finetune-multi"
    if args.section is None:
        args.section = SECTION_FSDP if args.fsdp else SECTION
    return args


# ---------------------------------------------------------------------------------------------------
# worker: one fine-tune, every process of the launch runs this
# ---------------------------------------------------------------------------------------------------
def worker(args: argparse.Namespace) -> None:
    from accelerate import PartialState

    from lpq.finetune import end_distributed, finetune

    res = finetune(args.qdir, args.data, args.out, steps=args.steps, lora_rank=args.lora_rank, lr=args.lr,
                   batch=args.batch, seqlen=args.seqlen, optim=args.optim, variant=args.variant, device=args.device,
                   eval_text=args.text, eval_windows=args.windows, overwrite=True, fsdp=args.shard)
    state = PartialState()
    peaks = res.peak_memory_gb_per_process  # one entry per process, in rank order
    if res.main_process:
        rec = {"processes": state.num_processes, "fsdp": res.fsdp, "losses": res.losses, "tokens": res.tokens,
               "train_s": res.train_seconds, "tokens_per_s": res.tokens_per_s, "peak_mem_gb_per_gpu": peaks,
               "perplexity": res.perplexity, "state_bytes": res.state_bytes, "trainable_params": res.trainable_params}
        Path(args.record).write_text(json.dumps(rec))
    state.wait_for_everyone()
    end_distributed()


def launch(args: argparse.Namespace, n: int, qdir: Path, out: Path, record: Path, shard: bool = False) -> float:
    """Run the worker under ``accelerate launch`` with n processes; returns the launch's wall seconds."""
    if n > 1:
        mode = ["--multi_gpu"]  # on a CPU dry run too: torchrun processes, gloo (--cpu would start one process)
    else:
        mode = ["--cpu"] if args.device == "cpu" else []
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(n), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(Path(__file__).resolve()), "--worker",
           "--qdir", str(qdir), "--out", str(out), "--record", str(record), "--data", args.data, "--text", args.text,
           "--steps", str(args.steps), "--batch", str(args.batch), "--seqlen", str(args.seqlen), "--lr", str(args.lr),
           "--lora-rank", str(args.lora_rank), "--optim", args.optim, "--variant", args.variant, "--device", args.device]
    if args.windows is not None:
        cmd += ["--windows", str(args.windows)]
    if shard:
        cmd += ["--shard"]
    env = {**os.environ, "LPQ_QUIET": "1"}
    print("$ " + shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, timeout=args.timeout)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------
# driver: GPTQ once, one launch per process count, the table
# ---------------------------------------------------------------------------------------------------
def main() -> None:
    args = parse()
    if args.worker:
        worker(args)
        return
    counts = [int(v) for v in args.processes.split(",")]
    if args.device == "cuda":
        have = torch.cuda.device_count()
        if have < max(counts):
            sys.exit(f"error: --processes {args.processes} needs {max(counts)} GPUs, this machine has {have}")
    for n in counts:
        if args.batch % n:
            sys.exit(f"error: --batch {args.batch} must be a multiple of every process count in --processes")

    from transformers import AutoTokenizer

    from lpq import api, evaluate
    from lpq.inspect import inspect as inspect_dir

    date = datetime.date.today().isoformat()
    gpu = device_name(args.device)
    t_all = time.perf_counter()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="lpq-ftm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    qdir = work / f"gptq-w{args.bits}-g{args.group_size}"
    quant_s = None
    if not (qdir / "config.json").is_file():
        t0 = time.perf_counter()
        api.quantize(args.model, qdir, method="gptq", bits=args.bits, group_size=args.group_size, act_order=True,
                     method_options={"mse": True}, calib=args.calib, nsamples=args.nsamples, seqlen=args.calib_seqlen,
                     device=args.device)
        quant_s = time.perf_counter() - t0
    if args.device == "cuda":
        from lpq.kernels import cuda_build

        torch.cuda.empty_cache()
        cuda_build.load()  # build lpq's CUDA kernels here once, not inside the first launch (both evaluate)
    tokenizer = AutoTokenizer.from_pretrained(qdir)
    n_windows = evaluate.eval_windows(tokenizer, evaluate.load_eval_text(args.text), 2048, args.windows).shape[0]

    settings = []  # (processes, mode): one GPU, then data-parallel and/or sharded for every N > 1
    for n in counts:
        if n == 1:
            settings.append((1, "1 GPU"))
            continue
        if not args.fsdp_only:
            settings.append((n, "data-parallel"))
        if args.fsdp:
            settings.append((n, "FSDP"))
    runs = {}
    for n, mode in settings:
        tag = f"{n}proc" + ("-fsdp" if mode == "FSDP" else "")
        out, record = work / f"ft-{tag}", work / f"record-{tag}.json"
        record.unlink(missing_ok=True)
        wall = launch(args, n, qdir, out, record, shard=mode == "FSDP")
        runs[(n, mode)] = {**json.loads(record.read_text()), "launch_s": wall, "bpw": inspect_dir(out)["bpw"]}
        print(json.dumps({k: v for k, v in runs[(n, mode)].items() if k != "losses"}), flush=True)
    total_s = time.perf_counter() - t_all

    base = runs.get((1, "1 GPU")) or runs[min(runs)]
    records = []
    for (n, mode), r in runs.items():
        dev = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], base["losses"]))
        p = r["perplexity"]
        records.append({
            "model": args.model_label, "method": "gptq+qat", "bits": args.bits, "group_size": args.group_size,
            "options": f"act-order,mse,{args.variant},rank{args.lora_rank}", "optim": args.optim,
            "processes": n, "mode": mode, "fsdp": mode == "FSDP", "per_process_batch": args.batch // n, "batch": args.batch, "train_seqlen": args.seqlen,
            "steps": args.steps, "lr": args.lr, "train_tokens": r["tokens"], "train_s": r["train_s"],
            "tokens_per_s": r["tokens_per_s"], "speedup": r["tokens_per_s"] / base["tokens_per_s"],
            "peak_mem_gb": max(r["peak_mem_gb_per_gpu"]), "peak_mem_gb_per_gpu": r["peak_mem_gb_per_gpu"],
            "final_loss": r["losses"][-1], "max_loss_deviation_vs_1proc": dev, "losses": r["losses"],
            "perplexity_before": p["before"], "perplexity_unmerged": p["unmerged"], "perplexity": p["merged"],
            "bpw": r["bpw"], "windows": n_windows, "seqlen": 2048, "kl": None, "launch_s": r["launch_s"],
            "quantize_s": quant_s, "calib": f"wikitext2-valid {args.nsamples}x{args.calib_seqlen}",
            "data": Path(args.data).name, "device": gpu, "date": date,
        })

    if args.dry_run_dir:
        folder = Path(args.dry_run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{args.name}.json").write_text(json.dumps(records, indent=1) + "\n")
        md = folder / "RESULTS.md"
    else:
        write_records(args.name, records)
        md = RESULTS_MD
    qtxt = f"{quant_s:.0f} s" if quant_s is not None else "reused from --work"
    compute = "bf16 autocast" if args.device == "cuda" else "fp32"
    lines = [
        f"{gpu} x{max(counts)}; {versions()}; date {date}; whole script {total_s:.0f} s (GPTQ {qtxt}).",
        f"Command: `python bench/{Path(sys.argv[0]).name} {shlex.join(sys.argv[1:])}`.",
        f"GPTQ w{args.bits} g{args.group_size} (act-order + mse grid, {args.nsamples}x{args.calib_seqlen} windows of "
        f"wiki.valid) of {args.model_label}, then LoRA-QAT ({args.variant}, rank {args.lora_rank}, {args.optim}) for "
        f"{args.steps} steps of the same global batch {args.batch}x{args.seqlen} tokens of `{Path(args.data).name}`, "
        f"peak lr {args.lr}, started by `accelerate launch --num_processes N` (one GPU per process, each takes "
        f"{args.batch}/N windows of every batch, DDP averages the gradients; {compute}). "
        + ("FSDP: `finetune(fsdp=True)` (`--fsdp`), FSDP2 shards of every decoder block and of the rest, each GPU "
           "holds 1/N of the model (codes, scales, adapters, optimizer states) plus the block being computed; "
           "the same data split and averaged gradients. " if args.fsdp else "")
        + "tokens/s: global tokens "
        "over the main process's training-loop seconds; peak GB: torch.cuda.max_memory_allocated of each process "
        "over training. Perplexity on `wiki.test.raw`, "
        f"{n_windows} windows of 2048 (PROTOCOL §2), 'merged' = the saved packed model reloaded by lpq.load. "
        "'loss dev.' = the largest relative difference of a step's loss from the 1-process curve "
        "(other orders of sums, bf16, and l4q step sizes that turn rounding noise into small steps: close, not bit for bit).",
        "",
        "| processes | mode | batch per GPU | tokens/s | speed-up | train s | peak GB per GPU | final loss | loss dev. | "
        "before | unmerged | merged |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        peaks = " / ".join(f"{v:.2f}" for v in r["peak_mem_gb_per_gpu"])
        lines.append(
            f"| {r['processes']} | {r['mode']} | {r['per_process_batch']}x{r['train_seqlen']} | {r['tokens_per_s']:,.0f} | "
            f"{r['speedup']:.2f}x | {r['train_s']:.1f} | {peaks} | {r['final_loss']:.4f} | "
            f"{r['max_loss_deviation_vs_1proc']:.1e} | {r['perplexity_before']:.2f} | {r['perplexity_unmerged']:.2f} | "
            f"{r['perplexity']:.2f} |"
        )
    write_section(args.section, "\n".join(lines), path=md)
    print(f"wrote {md} and {args.name}.json in {total_s:.0f} s", flush=True)


if __name__ == "__main__":
    main()
