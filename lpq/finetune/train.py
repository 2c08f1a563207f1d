"""The QAT fine-tuning loop: data windows, optimizer, checkpoints with exact resume, progress, merge.

Data: the text file tokenized whole (no special tokens), cut into non-overlapping windows of
``seqlen`` tokens (a BOS first where the tokenizer adds one), exactly as perplexity windows are cut.
Step i uses windows i*batch .. (i+1)*batch - 1 of an endless stream of permutations, permutation e
drawn from a generator seeded by (seed, e): the data order is a pure function of the step, so a
resumed run sees the same batches without storing any data state.

Checkpoints (every ``save_every`` steps, in OUT's sibling directory ``.OUT.lpq-finetune``): the
trainable tensors, the optimizer state (SOLO's packed codes and its rounding generator included),
the step, the losses so far and the torch RNG states; ``resume`` continues from the last one and
repeats the uninterrupted run's losses exactly (same device, same settings).

Several GPUs: run under ``accelerate launch``; each process takes its share of every global batch
(data parallel, gradients averaged by DDP), only the main process writes checkpoints and the output.
bf16 autocast on GPUs, fp32 on the CPU.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import progress
from ..checkpoint import check_output
from ..errors import CheckpointError, LpqError
from ..progress import console, info
from .merge import merge_qat, save_merged
from .qat import VARIANTS, prepare_qat, qat_layers, trainable_parameters
from .solo import STATE_BITS, SOLO, adam_state_bytes

OPTIMIZERS = ("adamw", "solo")


@dataclass
class FinetuneConfig:
    steps: int = 200
    lora_rank: int = 16
    lora_alpha: float | None = None
    lr: float = 2e-4
    scale_lr: float | None = None  # learning rate of the log step sizes (default: lr)
    batch: int = 8
    seqlen: int = 1024
    optim: str = "adamw"
    state_bits: int = 3
    variant: str = "l4q"
    learn_scales: bool = True
    warmup: float = 0.05  # share of the steps with a linear warm-up; then cosine down to 10 %
    weight_decay: float = 0.0
    grad_checkpointing: bool = True
    save_every: int = 0
    seed: int = 0

    def check(self) -> None:
        if self.steps < 1:
            raise LpqError(f"--steps {self.steps} must be at least 1")
        if self.batch < 1:
            raise LpqError(f"--batch {self.batch} must be at least 1")
        if self.seqlen < 2:
            raise LpqError(f"--seqlen {self.seqlen} must be at least 2")
        if self.lr <= 0 or (self.scale_lr is not None and self.scale_lr < 0):
            raise LpqError(f"--lr {self.lr} must be positive")
        if self.lora_rank < 1:
            raise LpqError(f"--lora-rank {self.lora_rank} must be at least 1 (e.g. 16)")
        if self.optim not in OPTIMIZERS:
            raise LpqError(f"--optim {self.optim} is not known: choose adamw or solo")
        if self.state_bits not in STATE_BITS:
            raise LpqError(f"--state-bits {self.state_bits} is not supported: choose 2, 3 or 4")
        if self.variant not in VARIANTS:
            raise LpqError(f"--variant {self.variant} is not known: choose {' or '.join(VARIANTS)}")
        if self.save_every < 0:
            raise LpqError(f"--save-every {self.save_every} must be 0 (never) or positive")


@dataclass
class FinetuneResult:
    out: Path | None
    losses: list[float]
    steps: int
    tokens: int
    train_seconds: float
    tokens_per_s: float
    state_bytes: int
    trainable_params: int
    perplexity: dict[str, float] = field(default_factory=dict)
    resumed_from: int = 0
    peak_memory_gb: float = 0.0
    model: Any = None
    main_process: bool = True  # False on the other processes of an ``accelerate launch`` run

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("model")
        d.pop("main_process")
        d["out"] = str(self.out) if self.out is not None else None
        return d


# ---------------------------------------------------------------------------------------------------
# pure helpers
# ---------------------------------------------------------------------------------------------------
def batch_indices(step: int, batch: int, n_windows: int, seed: int) -> torch.Tensor:
    """Window indices [batch] of global step ``step`` (0-based): a pure function of its arguments."""
    out = []
    pos = step * batch
    while len(out) < batch:
        epoch, offset = divmod(pos, n_windows)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n_windows, generator=gen)
        take = min(batch - len(out), n_windows - offset)
        out.extend(perm[offset : offset + take].tolist())
        pos += take
    return torch.tensor(out, dtype=torch.long)


def lr_factor(step: int, steps: int, warmup: float) -> float:
    """Linear warm-up over ``warmup`` of the steps, then cosine from 1 down to 0.1."""
    w = max(1, int(round(warmup * steps))) if warmup > 0 else 0
    if step < w:
        return (step + 1) / w
    t = (step - w) / max(1, steps - w)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def make_optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    adapters, steps = trainable_parameters(model)
    groups = [{"params": adapters, "lr": cfg.lr, "base_lr": cfg.lr}]
    if steps:
        slr = cfg.lr if cfg.scale_lr is None else cfg.scale_lr
        groups.append({"params": steps, "lr": slr, "base_lr": slr})
    if cfg.optim == "solo":
        return SOLO(groups, lr=cfg.lr, bits=cfg.state_bits, weight_decay=cfg.weight_decay, seed=cfg.seed)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8)


def training_windows(tokenizer, text: str, seqlen: int) -> torch.Tensor:
    from ..evaluate import eval_windows

    return eval_windows(tokenizer, text, seqlen)


# ---------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------
def _work_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.lpq-finetune"


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(work: Path, model: nn.Module, optimizer, step: int, losses: list[float]) -> None:
    state = {
        "step": step,
        "losses": list(losses),
        "trainable": _trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    tmp = work / "state.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, work / "state.pt")  # a crash mid-save keeps the previous checkpoint


def load_checkpoint(work: Path, model: nn.Module, optimizer) -> tuple[int, list[float]]:
    try:
        state = torch.load(work / "state.pt", map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"the fine-tuning checkpoint in {work} is damaged ({e}): start over with --overwrite") from None
    params = dict(model.named_parameters())
    for n, v in state["trainable"].items():
        if n not in params or params[n].shape != v.shape:
            raise CheckpointError(f"the fine-tuning checkpoint in {work} does not fit this model: start over with --overwrite")
        with torch.no_grad():
            params[n].copy_(v.to(params[n].device))
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_cpu"])
    if state.get("rng_cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return int(state["step"]), list(state["losses"])


# ---------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------
def _checkpointing(model: nn.Module, on: bool) -> None:
    """Recompute each decoder block's activations in the backward (transformers' own switch, either name)."""
    if on:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        for name in ("activation_checkpointing_disable", "gradient_checkpointing_disable"):
            if hasattr(model, name):
                getattr(model, name)()
                break


def _check_launch(acc) -> None:
    """Refuse accelerate's sharded modes: the loop wraps the model in DDP itself and would ignore them."""
    from accelerate.utils import DistributedType

    kind = getattr(acc, "distributed_type", None)
    if kind in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise LpqError(f"lpq finetune runs data-parallel (DDP) only, not {kind.value}: "
                       "launch with accelerate launch --num_processes N, without --use_fsdp or --use_deepspeed")


def _data_parallel(model: nn.Module, dev: torch.device) -> nn.Module:
    """DDP over the trainable adapters and steps (the only parameters that need gradients).

    The frozen buffers (codes [N, K] uint8, scales0/zeros [G, N], g_idx) are the same on every process
    and are broadcast once when DDP is built; DDP's default would broadcast them again before every
    forward, about one byte per weight per step.
    """
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # torch >= 2.13 names the switch forward_sync_buffers (and deprecates broadcast_buffers)
    names = inspect.signature(DistributedDataParallel.__init__).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in names else {"broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None, **no_sync)


class _Progress:
    """A rich bar with the step, loss and tokens per second (silent when quiet or not the main process)."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.bar = None
        if enabled and not progress._quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("fine-tuning"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
                                TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task("fine-tuning", total=total, completed=start, loss=float("nan"), tps=0.0)

    def update(self, step: int, loss: float, tps: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=loss, tps=tps)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def train_qat(model: nn.Module, windows: torch.Tensor, cfg: FinetuneConfig, accelerator=None,
              work: Path | None = None, resume: bool = False) -> dict:
    """Train the QAT layers of ``model`` (already prepared) on token windows [W, L].

    Returns {"losses", "tokens", "seconds", "state_bytes", "resumed_from", "optimizer"}. Losses are
    the global mean of each step's loss over all processes.
    """
    from accelerate import Accelerator

    acc = accelerator or Accelerator(cpu=next(model.parameters()).device.type == "cpu")
    dev = acc.device
    world, rank = acc.num_processes, acc.process_index
    _check_launch(acc)
    if cfg.batch % world:
        raise LpqError(f"--batch {cfg.batch} must be a multiple of the {world} processes")
    optimizer = make_optimizer(model, cfg)
    start, losses = 0, []
    if resume and work is not None and (work / "state.pt").is_file():
        start, losses = load_checkpoint(work, model, optimizer)
        losses = losses[:start]
        if acc.is_main_process:
            info(f"resuming the fine-tune from step {start} ({work})")
    if cfg.grad_checkpointing:
        _checkpointing(model, True)
    if hasattr(model, "config"):
        model.config.use_cache = False
    model.train()
    ddp_model = _data_parallel(model, dev) if world > 1 else model
    autocast = dev.type == "cuda"
    bar = _Progress(cfg.steps, start, acc.is_main_process)
    tokens = 0
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    try:
        for step in range(start, cfg.steps):
            idx = batch_indices(step, cfg.batch, windows.shape[0], cfg.seed)[rank::world]
            ids = windows[idx].to(dev)
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * lr_factor(step, cfg.steps, cfg.warmup)
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=autocast):
                loss = ddp_model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            mean = loss.detach().float()
            if world > 1:
                mean = acc.reduce(mean, reduction="mean")
            losses.append(float(mean))
            tokens += cfg.batch * windows.shape[1]
            done = step + 1
            if not math.isfinite(losses[-1]):
                raise LpqError(f"the loss became {losses[-1]} at step {done}: lower --lr")
            bar.update(done, losses[-1], tokens / max(time.perf_counter() - t0, 1e-9))
            if work is not None and cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
                acc.wait_for_everyone()
                if acc.is_main_process:
                    save_checkpoint(work, model, optimizer, done, losses)
    finally:
        bar.close()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    del ddp_model
    model.eval()
    if cfg.grad_checkpointing:
        _checkpointing(model, False)
    return {"losses": losses, "tokens": tokens, "seconds": seconds, "state_bytes": adam_state_bytes(optimizer),
            "resumed_from": start, "optimizer": optimizer}


def _manifest(quant_dir: str, data: str, cfg: FinetuneConfig) -> dict:
    d = asdict(cfg)
    d.pop("save_every")
    return {"model": str(quant_dir), "data": str(Path(data).resolve()), "config": d}


def _eval_ppl(model, tokenizer, text: str, seqlen: int, windows: int | None, dev: torch.device,
              autocast: bool = False) -> float:
    """Perplexity (PROTOCOL §2); ``autocast``: bf16 autocast on a GPU (for the fp32 QAT model)."""
    from ..evaluate import perplexity

    with torch.no_grad(), torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=autocast and dev.type == "cuda"):
        return perplexity(model, tokenizer, text, seqlen, windows).perplexity


def finetune(quant_dir: str | Path, data: str | Path, out: str | Path | None = None, *, qat: bool = True,
             steps: int = 200, lora_rank: int = 16, lr: float = 2e-4, batch: int = 8, seqlen: int = 1024,
             optim: str = "adamw", state_bits: int = 3, variant: str = "l4q", save_every: int = 0,
             resume: bool = False, overwrite: bool = False, device: str = "auto", seed: int = 0,
             save_format: str = "lpq", eval_text: str | Path | None = None, eval_windows: int | None = None,
             eval_seqlen: int = 2048, **options) -> FinetuneResult:
    """QAT fine-tune a packed model made by ``lpq quantize`` and save it merged, fully quantized.

    ``quant_dir`` is an lpq (or GPTQ) directory with uniform integer layers; ``data`` a text file.
    Every packed linear gets frozen codes, a LoRA adapter of rank ``lora_rank`` and (``variant`` l4q)
    learned step sizes; after ``steps`` steps the adapters are merged back into codes/scales/zeros and
    the model is written to ``out`` (``save_format`` lpq or gptq), loadable by ``lpq.load``.
    ``optim`` adamw (fp32 states) or solo (``state_bits``-bit states). With ``eval_text``, perplexity
    is measured before, after training with the adapters unmerged, and after merging (reloaded
    from ``out``). Other keyword options go to :class:`FinetuneConfig` (lora_alpha, scale_lr, warmup,
    weight_decay, grad_checkpointing, learn_scales).
    """
    from accelerate import Accelerator

    from ..api import load_any, resolve_device
    from ..calibration import read_text
    from ..models.loading import resolve_source

    if not qat:
        raise LpqError("only quantization-aware fine-tuning exists: pass --qat")
    unknown = set(options) - set(FinetuneConfig.__dataclass_fields__)
    if unknown:
        raise LpqError(f"unknown fine-tuning option {sorted(unknown)[0]!r}")
    cfg = FinetuneConfig(steps=steps, lora_rank=lora_rank, lr=lr, batch=batch, seqlen=seqlen, optim=optim,
                         state_bits=state_bits, variant=variant, save_every=save_every, seed=seed, **options)
    cfg.check()
    if save_format not in ("lpq", "gptq"):
        raise LpqError(f"--format {save_format} is not known: choose lpq or gptq")
    qpath = Path(quant_dir)
    if not (qpath / "config.json").is_file():
        raise LpqError(f"{quant_dir} is not a quantized lpq directory (no config.json): run lpq quantize first")
    source = resolve_source(str(qpath))
    if not source.quantized:
        raise LpqError(f"{quant_dir} is not quantized: run lpq quantize on it first, then fine-tune the result")
    text = read_text(data)
    out_path = check_output(out, overwrite or resume) if out is not None else None
    work = _work_dir(out_path) if out_path is not None else None
    dev = resolve_device(device)
    acc = Accelerator(cpu=dev.type == "cpu")
    _check_launch(acc)
    if acc.num_processes > 1:
        dev = acc.device  # one GPU per process under accelerate launch
    manifest = _manifest(str(quant_dir), str(data), cfg)
    if work is not None and acc.is_main_process:
        if work.exists() and resume:
            saved = json.loads((work / "manifest.json").read_text()) if (work / "manifest.json").is_file() else None
            if saved != json.loads(json.dumps(manifest)):
                raise LpqError(f"the interrupted fine-tune in {work} used other settings: start over with --overwrite")
        elif work.exists() and not overwrite:
            raise LpqError(f"an interrupted fine-tune left {work}: continue it with --resume or start over with --overwrite")
        else:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            (work / "manifest.json").write_text(json.dumps(manifest, indent=1))
    acc.wait_for_everyone()

    model, tokenizer = load_any(str(qpath), str(dev), torch.float32)
    windows = training_windows(tokenizer, text, cfg.seqlen)
    ppl: dict[str, float] = {}
    eval_body = None
    if eval_text is not None:
        from ..evaluate import load_eval_text

        from ..api import load

        eval_body = load_eval_text(str(eval_text))
        before = load(qpath, str(dev))  # fp16 on a GPU, fp32 on the CPU, as the merged model below
        ppl["before"] = _eval_ppl(before, tokenizer, eval_body, eval_seqlen, eval_windows, dev)
        del before
    torch.manual_seed(cfg.seed)  # the LoRA initialisation
    prepare_qat(model, rank=cfg.lora_rank, variant=cfg.variant, alpha=cfg.lora_alpha, learn_scales=cfg.learn_scales)
    model.to(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    try:
        run = train_qat(model, windows, cfg, acc, work, resume)
    except torch.OutOfMemoryError:
        raise LpqError("out of memory while fine-tuning: lower --batch or --seqlen") from None
    peak = torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else 0.0
    if eval_body is not None:
        ppl["unmerged"] = _eval_ppl(model, tokenizer, eval_body, eval_seqlen, eval_windows, dev, autocast=True)
    record = {"steps": cfg.steps, "optim": cfg.optim, "state_bits": cfg.state_bits if cfg.optim == "solo" else None,
              "lr": cfg.lr, "batch": cfg.batch, "seqlen": cfg.seqlen, "data": Path(data).name}
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    merge_qat(model, record)
    if out_path is not None and acc.is_main_process:
        save_merged(model, tokenizer, out_path, overwrite=True, save_format=save_format)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    acc.wait_for_everyone()
    if eval_body is not None:
        if out_path is not None:
            from ..api import load

            merged = load(out_path, str(dev))
        else:
            merged = model
        ppl["merged"] = _eval_ppl(merged, tokenizer, eval_body, eval_seqlen, eval_windows, dev)
    return FinetuneResult(out_path, run["losses"], cfg.steps, run["tokens"], run["seconds"],
                          run["tokens"] / max(run["seconds"], 1e-9), run["state_bytes"], n_trainable, ppl,
                          run["resumed_from"], peak, model, acc.is_main_process)
