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

Distillation (``distill``, a teacher model: normally the unquantized model the packed one was made
from): the loss of each step is (1 - alpha) * CE + alpha * KL(teacher || student), both means over the
same next-token positions, temperature 1. The teacher is loaded once per process on the training device
(fp32 weights under the same bf16 autocast as the student on a GPU), frozen, never wrapped by DDP; its
logits [B, L, V] are computed per batch under no_grad and freed after the KL, which is computed in
slices of tokens (:func:`distill_loss`) so that no [B, L, V] fp32 copy of either side is made.

Several GPUs: run under ``accelerate launch``; each process takes its share of every global batch
(data parallel, gradients averaged by DDP), only the main process writes checkpoints and the output.
bf16 autocast on GPUs, fp32 on the CPU.

Sharded (``fsdp=True``, ``--fsdp``, for a base that does not fit one GPU; needs ``accelerate launch``
with 2 or more processes, not accelerate's own ``--use_fsdp``): every process loads the packed model on
the CPU, makes it trainable there, and FSDP2 (``torch.distributed.fsdp.fully_shard``) shards each decoder
block and then the rest over the processes, onto each one's device. Codes, scales and zeros become
frozen parameters so that they are sharded too (:meth:`QATLinear.freeze_as_parameters`); a GPU holds
1/N of every tensor plus the block being computed (gathered for its forward and again, recomputed, for
its backward). Same data split and same averaged gradients as data parallel; AdamW and SOLO update each
process's shards. Checkpoints are per process (``state-STEP.rankR.pt`` and ``sharded.json`` in the
work folder; a resume needs the same number of processes). At the end the trained adapters and steps
are gathered to the main process, which re-reads the packed base on the CPU (codes, scales and zeros are
frozen: the same bytes), loads them into it, merges and saves; that process's CPU holds one whole model.
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
import torch.nn.functional as F
from torch import nn

from .. import progress
from ..checkpoint import check_output
from ..errors import CheckpointError, LpqError
from ..models.arch import find_blocks
from ..progress import console, info, warn
from .merge import merge_qat, save_merged
from .qat import VARIANTS, prepare_qat, qat_layers, trainable_parameters
from .solo import STATE_BITS, SOLO, adam_state_bytes

OPTIMIZERS = ("adamw", "solo")
# Weight of the distillation term when --distill is given without --distill-alpha: an even mix. The
# teacher's full next-token distribution says more per token than the one observed token, but the CE on
# the user's text carries what the teacher does not know (the text's own style and formatting), and
# that is what the fine-tune is judged on. Measured on SmolLM2 GPTQ w2 g64, 200 AdamW steps on
# WikiText-2 valid, perplexity on WikiText-2 test (bench/finetune.py, H100): CE alone 79.6, alpha 0.2
# 79.4, 0.5 79.0, 1.0 (KD alone) 82.4.
DISTILL_ALPHA = 0.5
KD_CHUNK = 1024  # tokens per slice of the KL: its temporaries are [1024, V] fp32 (200 MB each at V = 49152)


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
    distill: str | None = None  # teacher model (built-in name, directory, .gguf, hub id); None: plain CE
    distill_alpha: float = DISTILL_ALPHA  # loss = (1 - alpha) * CE + alpha * KL(teacher || student)
    fsdp: bool = False  # shard the model over the processes of accelerate launch (FSDP2) instead of DDP

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
        if self.distill is not None and (not isinstance(self.distill, str) or not self.distill.strip()):
            raise LpqError(f"--distill {self.distill!r} is not a model: give the unquantized model (name, directory or .gguf)")
        try:
            alpha = float(self.distill_alpha)
        except (TypeError, ValueError):
            alpha = float("nan")
        if not 0.0 <= alpha <= 1.0:  # also refuses nan
            raise LpqError(f"--distill-alpha {self.distill_alpha} must be between 0 and 1 "
                           "(the weight of the distillation term; 1 = distillation only)")
        if self.fsdp and self.distill is not None:
            raise LpqError("--distill does not combine with --fsdp (the teacher would be whole on every GPU): "
                           "drop one of them")


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
    distill: str | None = None  # the teacher, as given; None without distillation
    distill_alpha: float | None = None
    ce_losses: list[float] = field(default_factory=list)  # with distillation: each step's CE and KL terms
    kd_losses: list[float] = field(default_factory=list)
    fsdp: bool = False  # sharded over the processes (FSDP2) rather than data parallel
    processes: int = 1
    peak_memory_gb_per_process: list[float] = field(default_factory=list)  # GPU peak of each process, rank order

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


class _ChunkedKL(torch.autograd.Function):
    """sum_n weight[n] * KL(softmax(teacher[n]) || softmax(student[n])) over rows n of [N, V] logits.

    The forward walks the rows in slices of ``chunk`` and writes d loss / d student = weight[n] *
    (softmax(student[n]) - softmax(teacher[n])) into one tensor of the student's shape and dtype; that
    is all the backward needs, so the teacher's logits are not kept (the caller may free them at once)
    and no [N, V] fp32 copy of either side is made. The teacher gets no gradient.
    """

    @staticmethod
    def forward(ctx, student, teacher, weight, chunk):
        n = student.shape[0]
        grad = torch.empty_like(student) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for r0 in range(0, n, chunk):
            r1 = min(n, r0 + chunk)
            w = weight[r0:r1, None]  # [n, 1]
            log_s = F.log_softmax(student[r0:r1].float(), dim=-1)  # [n, V]
            log_t = F.log_softmax(teacher[r0:r1].float(), dim=-1)
            p_t = log_t.exp()
            # p log(p / q) with 0 log 0 = 0 (a teacher logit of -inf must not give nan)
            kl = torch.where(p_t > 0, p_t * (log_t - log_s), 0.0)
            total += (kl * w).sum()
            if grad is not None:
                grad[r0:r1] = ((log_s.exp() - p_t) * w).to(grad.dtype)
            del log_s, log_t, p_t, kl
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        if grad is None:
            return None, None, None, None
        return grad * grad_out.to(grad.dtype), None, None, None


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
                 chunk: int = KD_CHUNK) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) at temperature 1, a scalar fp32 tensor.

    ``student_logits`` and ``teacher_logits`` [..., V] (e.g. [B, L, V], any float dtype, computed in
    fp32 ``chunk`` tokens at a time); ``mask`` [...] bool, the tokens that count (None: all). The
    gradient flows to the student only: d/d z_student = (softmax(z_student) - softmax(z_teacher)) / n.
    """
    if student_logits.shape != teacher_logits.shape:
        raise LpqError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                       f"{tuple(teacher_logits.shape)} differ: the teacher must share the student's vocabulary")
    v = student_logits.shape[-1]
    s = student_logits.reshape(-1, v)  # a view for contiguous logits: no copy
    t = teacher_logits.detach().reshape(-1, v)
    if mask is None:
        weight = torch.full((s.shape[0],), 1.0 / max(1, s.shape[0]), device=s.device)
    else:
        m = mask.reshape(-1).to(device=s.device, dtype=torch.float32)
        if m.shape[0] != s.shape[0]:
            raise LpqError(f"mask {tuple(mask.shape)} does not fit logits {tuple(student_logits.shape)}")
        weight = m / m.sum().clamp_min(1.0)
    return _ChunkedKL.apply(s, t, weight, max(1, int(chunk)))


def next_token_mask(ids: torch.Tensor) -> torch.Tensor:
    """bool [B, L]: positions that predict a next token in their window (all but the last), as CE uses."""
    mask = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    mask[:, -1] = False
    return mask


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor, chunk: int = KD_CHUNK) -> torch.Tensor:
    """Mean CE of logits [B, L, V] predicting ids[:, 1:], without gradient, ``chunk`` tokens at a time
    (the CE term's value where its weight is 0 and the model was not asked for it)."""
    b, length, _ = logits.shape
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    with torch.no_grad():
        for i in range(b):
            for l0 in range(0, length - 1, chunk):
                l1 = min(length - 1, l0 + chunk)
                total += F.cross_entropy(logits[i, l0:l1].float(), ids[i, l0 + 1:l1 + 1], reduction="sum")
    return total / max(1, b * (length - 1))


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
# the teacher
# ---------------------------------------------------------------------------------------------------
def vocab_size(model: nn.Module) -> int | None:
    """Rows of the model's output layer (the logits' last dimension), else its config's vocab_size."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(out, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return getattr(cfg, "vocab_size", None)


def config_vocab_size(path: str) -> int | None:
    """vocab_size in the config of a model directory (no weights loaded)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return getattr(cfg, "vocab_size", None)


def check_teacher_vocab(teacher: str, teacher_vocab: int | None, student_vocab: int | None) -> None:
    if teacher_vocab is not None and student_vocab is not None and teacher_vocab != student_vocab:
        raise LpqError(f"--distill {teacher}: the teacher's vocabulary has {teacher_vocab} tokens and the "
                       f"student's {student_vocab}: distill from a model with the student's tokenizer "
                       "(the unquantized model it was made from)")


def load_teacher(name: str, device: torch.device | str) -> tuple[nn.Module, Any]:
    """(teacher, tokenizer): any model lpq loads, in fp32 on ``device``, eval mode, frozen, no KV cache."""
    from ..api import load_any

    try:
        teacher, tokenizer = load_any(name, str(device), torch.float32)
    except LpqError as e:
        raise type(e)(f"--distill {name}: {e}") from None
    teacher.eval()
    teacher.requires_grad_(False)
    if hasattr(teacher, "config"):
        teacher.config.use_cache = False
    return teacher, tokenizer


# ---------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------
def _work_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.lpq-finetune"


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


SHARDED = "sharded.json"  # the sharded checkpoint's pointer: {"world", "step"}


def _local(t):
    """A DTensor's local shard (FSDP), else the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def _is_dtensor(t) -> bool:
    return hasattr(t, "to_local") and hasattr(t, "placements")


def _shard_file(step: int, rank: int) -> str:
    return f"state-{step}.rank{rank}.pt"


def check_sharded_resume(work: Path, world: int, fsdp: bool) -> None:
    """Refuse to resume a sharded checkpoint with another number of processes, or without --fsdp."""
    meta = work / SHARDED
    if not meta.is_file():
        return
    try:
        saved = int(json.loads(meta.read_text())["world"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"the fine-tuning checkpoint in {work} is damaged ({e}): start over with --overwrite") from None
    if not fsdp:
        raise LpqError(f"the interrupted fine-tune in {work} was sharded over {saved} processes: resume it with "
                       f"accelerate launch --num_processes {saved} and --fsdp, or start over with --overwrite")
    if saved != world:
        raise LpqError(f"the interrupted fine-tune in {work} was sharded over {saved} processes, this run has {world}: "
                       f"resume it with accelerate launch --num_processes {saved}, or start over with --overwrite")


def save_sharded_checkpoint(work: Path, model: nn.Module, optimizer, step: int, losses: list[float],
                            curves: dict[str, list[float]] | None, rank: int, world: int, barrier) -> None:
    """Every process writes its own shards (trainable tensors, optimizer state, RNG) to
    ``state-STEP.rankR.pt``; once all have, the main process points ``sharded.json`` at STEP; then each
    removes its older files. Each write goes through a temporary file, so a crash at any point leaves
    ``sharded.json`` naming a complete set."""
    opt = optimizer.state_dict()
    opt_state = {i: {k: ({"local": _local(v).detach().cpu().clone()} if _is_dtensor(v) else v) for k, v in st.items()}
                 for i, st in opt["state"].items()}
    state = {
        "step": step, "rank": rank, "world": world,
        "losses": list(losses),
        "curves": {k: list(v) for k, v in (curves or {}).items()},
        "trainable": {n: _local(p).detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": {**opt, "state": opt_state},
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    name = _shard_file(step, rank)
    torch.save(state, work / (name + ".tmp"))
    os.replace(work / (name + ".tmp"), work / name)
    barrier()
    if rank == 0:
        (work / (SHARDED + ".tmp")).write_text(json.dumps({"world": world, "step": step}))
        os.replace(work / (SHARDED + ".tmp"), work / SHARDED)
    barrier()
    for old in work.glob(f"state-*.rank{rank}.pt"):
        if old.name != name:
            old.unlink(missing_ok=True)


def load_sharded_checkpoint(work: Path, model: nn.Module, optimizer, rank: int,
                            world: int) -> tuple[int, list[float], dict[str, list[float]]]:
    """This process's part of the checkpoint that ``sharded.json`` names (same processes, same model)."""
    from torch.distributed.tensor import DTensor

    check_sharded_resume(work, world, True)
    step = int(json.loads((work / SHARDED).read_text())["step"])
    try:
        state = torch.load(work / _shard_file(step, rank), map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"the fine-tuning checkpoint in {work} is damaged ({e}): start over with --overwrite") from None
    if state.get("step") != step or state.get("rank") != rank or state.get("world") != world:
        raise CheckpointError(f"the fine-tuning checkpoint in {work} is damaged (process {rank}'s file is not of step "
                              f"{step}): start over with --overwrite")
    params = dict(model.named_parameters())
    for n, v in state["trainable"].items():
        if n not in params or _local(params[n]).shape != v.shape:
            raise CheckpointError(f"the fine-tuning checkpoint in {work} does not fit this model: start over with --overwrite")
        with torch.no_grad():
            _local(params[n]).copy_(v)
    # optimizer states that were DTensors (AdamW's moments) come back as DTensors laid like their parameter
    ordered = [p for g in optimizer.param_groups for p in g["params"]]
    opt = state["optimizer"]
    ids = [i for g in opt["param_groups"] for i in g["params"]]
    by_id = dict(zip(ids, ordered))
    restored = {}
    for i, st in opt["state"].items():
        p = by_id[i]
        restored[i] = {k: (DTensor.from_local(v["local"].to(_local(p).device), p.device_mesh, p.placements,
                                              run_check=False, shape=p.shape, stride=p.stride())
                           if isinstance(v, dict) and set(v) == {"local"} else v) for k, v in st.items()}
    optimizer.load_state_dict({**opt, "state": restored})
    torch.set_rng_state(state["rng_cpu"])
    if state.get("rng_cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return step, list(state["losses"]), {k: list(v) for k, v in state.get("curves", {}).items()}


def save_checkpoint(work: Path, model: nn.Module, optimizer, step: int, losses: list[float],
                    curves: dict[str, list[float]] | None = None) -> None:
    state = {
        "step": step,
        "losses": list(losses),
        "curves": {k: list(v) for k, v in (curves or {}).items()},  # with distillation: the CE and KL terms
        "trainable": _trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    tmp = work / "state.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, work / "state.pt")  # a crash mid-save keeps the previous checkpoint


def load_checkpoint(work: Path, model: nn.Module, optimizer) -> tuple[int, list[float], dict[str, list[float]]]:
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
    return int(state["step"]), list(state["losses"]), {k: list(v) for k, v in state.get("curves", {}).items()}


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


def _check_launch(acc, fsdp: bool = False) -> None:
    """Refuse accelerate's own sharded modes (the loop wraps the model itself: DDP, or FSDP2 with --fsdp,
    and would ignore their settings); --fsdp needs several processes."""
    from accelerate.utils import DistributedType

    kind = getattr(acc, "distributed_type", None)
    if kind in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise LpqError(f"lpq finetune does not run under accelerate's {kind.value} mode: launch with accelerate launch "
                       "--num_processes N without --use_fsdp or --use_deepspeed (data-parallel), and add --fsdp to "
                       "lpq finetune to shard the model over the processes")
    if fsdp and acc.num_processes < 2:
        raise LpqError("--fsdp shards the model over several processes: start it with accelerate launch "
                       "--num_processes N (N >= 2, one GPU each), or drop --fsdp on one GPU")


def shard_model(model: nn.Module, blocks, dev: torch.device) -> None:
    """FSDP2 over all processes: every decoder block of ``blocks`` (found before prepare_qat), then the rest.

    ``model`` is prepared for QAT and still on the CPU; its QAT layers' codes, scales0 and zeros become
    frozen parameters first (FSDP shards parameters, buffers stay whole). fully_shard moves each process's
    1/N of every parameter (dim 0, the last shard shorter or empty) and the small buffers (g_idx, biases)
    to ``dev``. Parameters stay fp32 (the forward's bf16 autocast on GPUs is unchanged), so the all-gather
    of a block moves its uint8 codes and fp32 scales, zeros, adapters and steps as they are.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    for layer in qat_layers(model).values():
        layer.freeze_as_parameters()
    mesh = init_device_mesh(dev.type, (dist.get_world_size(),))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def gather_trainable(model: nn.Module, main: bool) -> dict[str, torch.Tensor] | None:
    """Full trainable tensors of a sharded model on the main process's CPU (None elsewhere), one tensor
    at a time (each process must call it: every gather is a collective)."""
    out = {} if main else None
    with torch.no_grad():
        for n, p in model.named_parameters():
            if not p.requires_grad:
                continue
            full = p.full_tensor() if _is_dtensor(p) else p
            if main:
                out[n] = full.detach().cpu().clone()
            del full
    return out


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

    def __init__(self, total: int, start: int, enabled: bool, teacher: str | None = None) -> None:
        self.bar = None
        if enabled and not progress._quiet:
            from rich.markup import escape
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            label = "fine-tuning" if teacher is None else f"fine-tuning, teacher {escape(teacher)}"
            loss = "loss {task.fields[loss]:.4f}" + ("" if teacher is None else " (ce {task.fields[ce]:.3f}, kl {task.fields[kd]:.3f})")
            self.bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn(loss),
                                TextColumn("{task.fields[tps]:,.0f} tok/s"),
                                TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True)
            self.bar.start()
            nan = float("nan")
            self.task = self.bar.add_task("fine-tuning", total=total, completed=start, loss=nan, ce=nan, kd=nan, tps=0.0)

    def update(self, step: int, loss: float, tps: float, ce: float = float("nan"), kd: float = float("nan")) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=loss, tps=tps, ce=ce, kd=kd)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def train_qat(model: nn.Module, windows: torch.Tensor, cfg: FinetuneConfig, accelerator=None,
              work: Path | None = None, resume: bool = False, teacher: nn.Module | None = None) -> dict:
    """Train the QAT layers of ``model`` (already prepared) on token windows [W, L].

    With ``cfg.distill`` the loss is (1 - alpha) * CE + alpha * KL(teacher || student); ``teacher`` is
    that model already loaded (else it is loaded here with :func:`load_teacher`), on this process's
    device, frozen. Returns {"losses", "tokens", "seconds", "state_bytes", "resumed_from", "optimizer",
    "ce_losses", "kd_losses"}. Losses are the global mean of each step's loss over all processes
    (ce_losses and kd_losses: the two terms, with distillation only). With ``cfg.fsdp`` the model is
    already sharded (:func:`shard_model`); every process then saves and loads its own checkpoint file.
    """
    from accelerate import Accelerator

    acc = accelerator or Accelerator(cpu=next(model.parameters()).device.type == "cpu")
    dev = acc.device
    world, rank = acc.num_processes, acc.process_index
    _check_launch(acc, cfg.fsdp)
    if cfg.batch % world:
        raise LpqError(f"--batch {cfg.batch} must be a multiple of the {world} processes")
    alpha = float(cfg.distill_alpha)
    if cfg.distill is not None:
        if teacher is None:
            teacher, _ = load_teacher(cfg.distill, dev)
        check_teacher_vocab(cfg.distill, vocab_size(teacher), vocab_size(model))
        teacher.eval()
        teacher.requires_grad_(False)
    else:
        teacher = None
    optimizer = make_optimizer(model, cfg)
    start, losses, curves = 0, [], {}
    if resume and work is not None and cfg.fsdp:
        check_sharded_resume(work, world, True)
    if resume and work is not None and cfg.fsdp and (work / SHARDED).is_file():
        start, losses, curves = load_sharded_checkpoint(work, model, optimizer, rank, world)
        losses = losses[:start]
        if acc.is_main_process:
            info(f"resuming the sharded fine-tune from step {start} ({work})")
    elif resume and work is not None and not cfg.fsdp and (work / "state.pt").is_file():
        start, losses, curves = load_checkpoint(work, model, optimizer)
        losses = losses[:start]
        if acc.is_main_process:
            info(f"resuming the fine-tune from step {start} ({work})")
    ce_losses = list(curves.get("ce", []))[:start] if teacher is not None else []
    kd_losses = list(curves.get("kd", []))[:start] if teacher is not None else []
    if cfg.grad_checkpointing:
        _checkpointing(model, True)
    if hasattr(model, "config"):
        model.config.use_cache = False
    model.train()
    ddp_model = _data_parallel(model, dev) if world > 1 and not cfg.fsdp else model  # FSDP: sharded already
    autocast = dev.type == "cuda"
    bar = _Progress(cfg.steps, start, acc.is_main_process, cfg.distill if teacher is not None else None)
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
            if teacher is None:
                with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=autocast):
                    loss = ddp_model(input_ids=ids, labels=ids, use_cache=False).loss
            else:
                loss, ce, kd = _distill_step(ddp_model, teacher, ids, alpha, dev, autocast)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if teacher is None:
                mean = loss.detach().float()
                if world > 1:
                    mean = acc.reduce(mean, reduction="mean")
                losses.append(float(mean))
            else:
                means = torch.stack([loss.detach().float(), ce.detach().float(), kd.detach().float()])
                if world > 1:
                    means = acc.reduce(means, reduction="mean")
                losses.append(float(means[0]))
                ce_losses.append(float(means[1]))
                kd_losses.append(float(means[2]))
            tokens += cfg.batch * windows.shape[1]
            done = step + 1
            if not math.isfinite(losses[-1]):
                raise LpqError(f"the loss became {losses[-1]} at step {done}: lower --lr")
            bar.update(done, losses[-1], tokens / max(time.perf_counter() - t0, 1e-9),
                       *((ce_losses[-1], kd_losses[-1]) if teacher is not None else ()))
            if work is not None and cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
                acc.wait_for_everyone()
                if cfg.fsdp:
                    save_sharded_checkpoint(work, model, optimizer, done, losses,
                                            {"ce": ce_losses, "kd": kd_losses} if teacher is not None else None,
                                            rank, world, acc.wait_for_everyone)
                elif acc.is_main_process:
                    save_checkpoint(work, model, optimizer, done, losses,
                                    {"ce": ce_losses, "kd": kd_losses} if teacher is not None else None)
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
            "resumed_from": start, "optimizer": optimizer, "ce_losses": ce_losses, "kd_losses": kd_losses}


def _distill_step(ddp_model: nn.Module, teacher: nn.Module, ids: torch.Tensor, alpha: float, dev: torch.device,
                  autocast: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce, kl) of one batch ids [B, L]: loss = (1 - alpha) * ce + alpha * kl, graphs to the student.

    The teacher's logits [B, L, V] (bf16 under autocast) live from its forward to the end of the KL
    forward only; the KL keeps its gradient in the student logits' shape and dtype, nothing of the
    teacher. With alpha = 1 the student is not given labels (no fp32 CE copy of its logits) and the
    CE is measured without gradient for the record; with alpha = 0 the loss and its gradient are the
    plain CE run's exactly (1 * ce + 0 * kl, and a zero gradient added to the CE's).
    """
    with torch.no_grad(), torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=autocast):
        t_logits = teacher(input_ids=ids, use_cache=False).logits
    with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=autocast):
        out = ddp_model(input_ids=ids, labels=ids if alpha < 1 else None, use_cache=False)
    kd = distill_loss(out.logits, t_logits, next_token_mask(ids))
    del t_logits
    if alpha >= 1:
        ce = next_token_ce(out.logits.detach(), ids)
        return kd, ce, kd
    ce = out.loss
    return ce * (1.0 - alpha) + kd * alpha, ce, kd


def _manifest(quant_dir: str, data: str, cfg: FinetuneConfig) -> dict:
    d = asdict(cfg)
    d.pop("save_every")
    if not cfg.fsdp:  # a data-parallel run keeps the manifest it always had
        d.pop("fsdp")
    if cfg.distill is None:  # a run without a teacher keeps the manifest it always had
        d.pop("distill")
        d.pop("distill_alpha")
    else:
        local = Path(cfg.distill).expanduser()
        d["distill"] = str(local.resolve()) if local.exists() else cfg.distill
        d["distill_alpha"] = float(cfg.distill_alpha)
    return {"model": str(quant_dir), "data": str(Path(data).resolve()), "config": d}


def _eval_ppl(model, tokenizer, text: str, seqlen: int, windows: int | None, dev: torch.device,
              autocast: bool = False) -> float:
    """Perplexity (PROTOCOL §2); ``autocast``: bf16 autocast on a GPU (for the fp32 QAT model)."""
    from ..evaluate import perplexity

    with torch.no_grad(), torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=autocast and dev.type == "cuda"):
        return perplexity(model, tokenizer, text, seqlen, windows).perplexity


def end_distributed() -> None:
    """Tear down the process group that ``accelerate launch`` gave this process, if any.

    Call it once, when the process is done with every collective (the CLI does, after ``finetune``).
    A gloo or NCCL group left to interpreter shutdown is destroyed in no fixed order with the objects it
    uses; its worker threads can then abort the process (``terminate called without an active
    exception``) after all the work was done. Local to this process: no barrier, so it is also safe on
    the error path of one process.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def finetune(quant_dir: str | Path, data: str | Path, out: str | Path | None = None, *, qat: bool = True,
             steps: int = 200, lora_rank: int = 16, lr: float = 2e-4, batch: int = 8, seqlen: int = 1024,
             optim: str = "adamw", state_bits: int = 3, variant: str = "l4q", save_every: int = 0,
             resume: bool = False, overwrite: bool = False, device: str = "auto", seed: int = 0,
             save_format: str = "lpq", eval_text: str | Path | None = None, eval_windows: int | None = None,
             eval_seqlen: int = 2048, distill: str | Path | None = None, distill_alpha: float | None = None,
             fsdp: bool = False, **options) -> FinetuneResult:
    """QAT fine-tune a packed model made by ``lpq quantize`` and save it merged, fully quantized.

    ``quant_dir`` is an lpq (or GPTQ) directory with uniform integer layers; ``data`` a text file.
    Every packed linear gets frozen codes, a LoRA adapter of rank ``lora_rank`` and (``variant`` l4q)
    learned step sizes; after ``steps`` steps the adapters are merged back into codes/scales/zeros and
    the model is written to ``out`` (``save_format`` lpq or gptq), loadable by ``lpq.load``.
    ``optim`` adamw (fp32 states) or solo (``state_bits``-bit states). With ``eval_text``, perplexity
    is measured before, after training with the adapters unmerged, and after merging (reloaded
    from ``out``). ``distill``: a teacher (normally the unquantized model: built-in name, directory,
    .gguf or hub id) whose next-token distributions the student learns, loss (1 - ``distill_alpha``) *
    CE + ``distill_alpha`` * KL(teacher || student) (default alpha 0.5). ``fsdp``: under ``accelerate
    launch`` with N >= 2 processes, shard the model over them (FSDP2, see the module docstring) instead of
    holding it whole on every GPU (data parallel); same losses, 1/N of the model per GPU. Other keyword options go to
    :class:`FinetuneConfig` (lora_alpha, scale_lr, warmup, weight_decay, grad_checkpointing, learn_scales).
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
    if distill is None and distill_alpha is not None:
        raise LpqError("--distill-alpha needs --distill MODEL (the unquantized teacher)")
    kd = {} if distill is None else {"distill": str(distill),
                                     "distill_alpha": DISTILL_ALPHA if distill_alpha is None else distill_alpha}
    cfg = FinetuneConfig(steps=steps, lora_rank=lora_rank, lr=lr, batch=batch, seqlen=seqlen, optim=optim,
                         state_bits=state_bits, variant=variant, save_every=save_every, seed=seed, fsdp=bool(fsdp),
                         **kd, **options)
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
    if cfg.distill is not None:  # refuse a teacher of another vocabulary before anything is written or loaded
        try:
            teacher_src = resolve_source(cfg.distill)
            teacher_vocab = config_vocab_size(teacher_src.path)
        except LpqError as e:
            raise type(e)(f"--distill {cfg.distill}: {e}") from None
        except (OSError, ValueError) as e:
            raise LpqError(f"--distill {cfg.distill}: cannot read the teacher's config ({str(e).strip().splitlines()[0]})") from None
        check_teacher_vocab(cfg.distill, teacher_vocab, config_vocab_size(str(qpath)))
    out_path = check_output(out, overwrite or resume) if out is not None else None
    work = _work_dir(out_path) if out_path is not None else None
    dev = resolve_device(device)
    acc = Accelerator(cpu=dev.type == "cpu")
    _check_launch(acc)
    if resume and work is not None and work.exists():  # the number of processes first: it is what to fix
        check_sharded_resume(work, acc.num_processes, cfg.fsdp)
    _check_launch(acc, cfg.fsdp)
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

    # sharded: each process loads the model on the CPU and keeps only its shards on its device
    model, tokenizer = load_any(str(qpath), "cpu" if cfg.fsdp else str(dev), torch.float32)
    windows = training_windows(tokenizer, text, cfg.seqlen)
    teacher = None
    if cfg.distill is not None:
        teacher, teacher_tok = load_teacher(cfg.distill, dev)  # each process its own, never wrapped by DDP
        check_teacher_vocab(cfg.distill, vocab_size(teacher), vocab_size(model))
        if acc.is_main_process:
            from rich.markup import escape

            if teacher_tok.get_vocab() != tokenizer.get_vocab():
                warn(f"the teacher {escape(cfg.distill)} maps tokens to other ids than the student's tokenizer: "
                     "its soft targets will not mean the same tokens")
            info(f"distilling from {escape(cfg.distill)}: loss = {1 - cfg.distill_alpha:g} * CE + "
                 f"{cfg.distill_alpha:g} * KL(teacher || student)")
    ppl: dict[str, float] = {}
    eval_body = None
    if eval_text is not None:
        from ..evaluate import load_eval_text

        from ..api import load

        eval_body = load_eval_text(str(eval_text))
        before = load(qpath, str(dev))  # fp16 on a GPU, fp32 on the CPU, as the merged model below
        ppl["before"] = _eval_ppl(before, tokenizer, eval_body, eval_seqlen, eval_windows, dev)
        del before
    blocks = find_blocks(model)[1] if cfg.fsdp else None  # found among packed layers, before they become QAT ones
    torch.manual_seed(cfg.seed)  # the LoRA initialisation (the same on every process: each keeps its shard)
    prepare_qat(model, rank=cfg.lora_rank, variant=cfg.variant, alpha=cfg.lora_alpha, learn_scales=cfg.learn_scales)
    if cfg.fsdp:
        shard_model(model, blocks, dev)
    else:
        model.to(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    try:
        run = train_qat(model, windows, cfg, acc, work, resume, teacher=teacher)
    except torch.OutOfMemoryError:
        raise LpqError("out of memory while fine-tuning: lower --batch or --seqlen") from None
    peak = torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else 0.0
    peaks = [peak]
    if acc.num_processes > 1:
        from accelerate.utils import gather_object

        peaks = [float(v) for v in gather_object([peak])]  # rank order
    del teacher
    if eval_body is not None:  # sharded: every process runs the same windows in step (each forward gathers)
        ppl["unmerged"] = _eval_ppl(model, tokenizer, eval_body, eval_seqlen, eval_windows, dev, autocast=True)
    record = {"steps": cfg.steps, "optim": cfg.optim, "state_bits": cfg.state_bits if cfg.optim == "solo" else None,
              "lr": cfg.lr, "batch": cfg.batch, "seqlen": cfg.seqlen, "data": Path(data).name}
    if cfg.distill is not None:
        record.update(distill=cfg.distill, distill_alpha=float(cfg.distill_alpha))
    if cfg.fsdp:
        record["fsdp"] = acc.num_processes
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # DTensors count their whole tensor
    if cfg.fsdp:
        # the trained tensors, whole, to the main process's CPU; it merges into the packed base read again there
        full = gather_trainable(model, acc.is_main_process)
        run.pop("optimizer", None)
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        model = None
        if acc.is_main_process:
            model = _unsharded_qat(qpath, cfg, full)
    if model is not None:
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
        else:  # sharded and not saved: the merged model is on the main process only
            merged = model.to(dev) if model is not None else None
        if merged is not None:
            ppl["merged"] = _eval_ppl(merged, tokenizer, eval_body, eval_seqlen, eval_windows, dev)
    return FinetuneResult(out_path, run["losses"], cfg.steps, run["tokens"], run["seconds"],
                          run["tokens"] / max(run["seconds"], 1e-9), run["state_bytes"], n_trainable, ppl,
                          run["resumed_from"], peak, model, acc.is_main_process, distill=cfg.distill,
                          distill_alpha=float(cfg.distill_alpha) if cfg.distill is not None else None,
                          ce_losses=run["ce_losses"], kd_losses=run["kd_losses"], fsdp=cfg.fsdp,
                          processes=acc.num_processes, peak_memory_gb_per_process=peaks)


def _unsharded_qat(qpath: Path, cfg: FinetuneConfig, trained: dict[str, torch.Tensor]) -> nn.Module:
    """The packed base read again on the CPU, made trainable as before, with the gathered ``trained``
    tensors (adapters and steps, full) loaded: the whole QAT model of a sharded run, ready to merge."""
    from ..api import load_any

    model, _ = load_any(str(qpath), "cpu", torch.float32)
    prepare_qat(model, rank=cfg.lora_rank, variant=cfg.variant, alpha=cfg.lora_alpha, learn_scales=cfg.learn_scales)
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in trained]
    if missing or any(n not in params or params[n].shape != v.shape for n, v in trained.items()):
        raise LpqError(f"the gathered fine-tuned tensors do not fit the model (e.g. {(missing or list(trained))[0]})")
    with torch.no_grad():
        for n, v in trained.items():
            params[n].copy_(v)
    return model
