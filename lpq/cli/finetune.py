"""``lpq finetune``: a thin layer over :func:`lpq.finetune.finetune`."""

from __future__ import annotations

import json

import click

from ..errors import LpqError
from ..progress import info

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class UserError(click.ClickException):
    """An LpqError shown as lpq shows them everywhere: one line ``error: ...``, the error's exit code."""

    def __init__(self, error: LpqError) -> None:
        super().__init__(str(error))
        self.exit_code = error.exit_code

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", err=True)


@click.command(context_settings=CONTEXT)
@click.argument("quant_dir")
@click.option("--qat", is_flag=True, help="Quantization-aware fine-tuning (LoRA + learned scales), merged into a packed model.")
@click.option("--data", required=True, metavar="FILE", help="Training text (a UTF-8 text file).")
@click.option("--steps", type=int, default=200, show_default=True)
@click.option("--lora-rank", type=int, default=16, show_default=True)
@click.option("--lr", type=float, default=2e-4, show_default=True, help="Peak learning rate (warm-up, then cosine to 10 %).")
@click.option("--batch", type=int, default=8, show_default=True, help="Windows per step (over all GPUs).")
@click.option("--seqlen", type=int, default=1024, show_default=True, help="Tokens per training window.")
@click.option("--optim", type=click.Choice(["adamw", "solo"]), default="adamw", show_default=True,
              help="AdamW with fp32 states, or SOLO with --state-bits states.")
@click.option("--state-bits", type=int, default=3, show_default=True, help="SOLO state precision: 2, 3 or 4.")
@click.option("--variant", type=click.Choice(["l4q", "qalora"]), default="l4q", show_default=True,
              help="l4q: LoRA + learned step sizes, re-quantized at the merge; qalora: group-pooled adapter folded into the zeros.")
@click.option("--distill", default=None, metavar="MODEL",
              help="Distil from this teacher (the unquantized model: built-in name, directory, .gguf or hub id): "
                   "the student learns its next-token distributions.")
@click.option("--distill-alpha", type=float, default=None, metavar="A",
              help="Weight of the distillation term: loss = (1-A) * CE + A * KL(teacher || student). [default: 0.5]")
@click.option("--fsdp", is_flag=True,
              help="Shard the model over the processes of accelerate launch --num_processes N (FSDP2: each GPU holds "
                   "1/N of it plus the block being computed), for a base that does not fit one GPU. Launch without "
                   "accelerate's --use_fsdp (refused); without --fsdp several processes run data-parallel.")
@click.option("--save-every", type=int, default=0, show_default=True, help="Checkpoint every N steps (0: never).")
@click.option("--resume", is_flag=True, help="Continue an interrupted fine-tune from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--out", required=True, help="Output directory of the merged, fully quantized model.")
@click.option("--format", "save_format", type=click.Choice(["lpq", "gptq"]), default="lpq", show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--eval-text", default=None, metavar="FILE", help="Measure perplexity before, unmerged and merged on this text.")
@click.option("--eval-windows", type=int, default=None, help="Evaluate only the first N windows of 2048 tokens.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def finetune(quant_dir, qat, data, steps, lora_rank, lr, batch, seqlen, optim, state_bits, variant, distill, distill_alpha,
             fsdp, save_every, resume, overwrite, out, save_format, device, seed, eval_text, eval_windows, as_json):
    """Fine-tune the packed model in QUANT_DIR (made by lpq quantize) and save it merged, fully quantized."""
    from ..finetune import end_distributed
    from ..finetune import finetune as run_finetune

    try:
        res = run_finetune(quant_dir, data, out, qat=qat, steps=steps, lora_rank=lora_rank, lr=lr, batch=batch,
                           seqlen=seqlen, optim=optim, state_bits=state_bits, variant=variant, save_every=save_every,
                           resume=resume, overwrite=overwrite, device=device, seed=seed, save_format=save_format,
                           eval_text=eval_text, eval_windows=eval_windows, distill=distill, distill_alpha=distill_alpha,
                           fsdp=fsdp)
    except LpqError as e:
        raise UserError(e) from None
    finally:
        end_distributed()
    if not res.main_process:  # under accelerate launch, one summary for the whole run
        return
    summary = res.to_dict()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    ppl = "".join(f", perplexity {k} {v:.3f}" for k, v in res.perplexity.items())
    kd = ""
    if res.distill is not None:
        kd = (f", distilled from {res.distill} (alpha {res.distill_alpha:g}; final ce {res.ce_losses[-1]:.4f}, "
              f"kl {res.kd_losses[-1]:.4f})")
    procs = ""
    if res.processes > 1:
        mode = "sharded (FSDP)" if res.fsdp else "data-parallel"
        peaks = " / ".join(f"{v:.2f}" for v in res.peak_memory_gb_per_process)
        procs = f", {res.processes} processes {mode}" + (f", peak GPU memory {peaks} GB" if any(res.peak_memory_gb_per_process) else "")
    elif res.peak_memory_gb:
        procs = f", peak GPU memory {res.peak_memory_gb:.2f} GB"
    info(f"wrote {res.out}: {res.steps} steps, final loss {res.losses[-1]:.4f}{kd}, {res.tokens_per_s:,.0f} tokens/s, "
         f"optimizer states {res.state_bytes / 1e6:.2f} MB{procs}{ppl}")
