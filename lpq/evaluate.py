"""Perplexity and KL divergence, measured exactly as the project's protocol describes.

Perplexity: the text tokenized whole without special tokens, cut into non-overlapping windows of
``seqlen`` tokens (the short tail dropped); if the tokenizer adds a BOS by default, each window is
that BOS followed by seqlen-1 text tokens. PPL = exp(mean NLL over every predicted token).
KL: on the same windows, mean over predicted tokens of KL(P_reference || Q_model) in nats, and the
share of tokens whose top-1 prediction differs.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .calibration import read_text, tokenize_text, tokenizer_adds_bos
from .errors import LpqError
from .progress import track


def eval_windows(tokenizer, text: str, seqlen: int = 2048, max_windows: int | None = None) -> torch.Tensor:
    """[W, seqlen] token windows of the text (BOS first where the tokenizer adds one)."""
    if seqlen < 2:
        raise LpqError("--seqlen must be at least 2")
    tokens = tokenize_text(tokenizer, text)
    bos = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None
    body = seqlen - (1 if bos is not None else 0)
    n = tokens.numel() // body
    if n == 0:
        raise LpqError(f"the text has {tokens.numel()} tokens, fewer than one window of {seqlen}: use a smaller --seqlen")
    if max_windows is not None:
        n = min(n, max_windows)
    windows = tokens[: n * body].view(n, body)
    if bos is not None:
        windows = torch.cat([torch.full((n, 1), bos, dtype=torch.long), windows], dim=1)
    return windows


def load_eval_text(text: str) -> str:
    """A path to a text file, or 'wikitext2' (the test split from the hub through datasets)."""
    if text == "wikitext2":
        try:
            import datasets

            data = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
        except Exception as e:
            raise LpqError(
                f"could not load wikitext2 from the hub ({type(e).__name__}): pass --text FILE (e.g. wiki.test.raw)"
            ) from None
        return "\n\n".join(data["text"])
    return read_text(text)


@contextmanager
def dense_weights(model):
    """On the CPU, dequantize every packed layer once for the duration of an evaluation.

    The reference kernel otherwise unpacks each layer on every forward pass; evaluation runs many
    passes over the same weights. Only on the CPU: on a GPU the packed kernels are the point.
    """
    from .nn import QuantizedLinear

    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear) and m.qweight.device.type == "cpu"]
    dtype = next(model.parameters()).dtype
    try:
        for m in layers:
            m.kernel_state["dense"] = m.dequantize().to(dtype)
        yield model
    finally:
        for m in layers:
            m.kernel_state.pop("dense", None)


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float
    windows: int
    tokens: int
    seqlen: int

    def to_dict(self):
        return asdict(self)


@torch.no_grad()
def _logits(model, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch.to(_device_of(model)), use_cache=False).logits


@torch.no_grad()
def perplexity(model, tokenizer, text: str, seqlen: int = 2048, max_windows: int | None = None, batch_size: int = 1) -> PerplexityResult:
    windows = eval_windows(tokenizer, text, seqlen, max_windows)
    total_nll = 0.0
    count = 0
    batches = list(windows.split(batch_size))
    with dense_weights(model):
        for batch in track(batches, f"perplexity ({windows.shape[0]} windows of {seqlen})"):
            logits = _logits(model, batch)[:, :-1].float()  # [B, L-1, V]
            target = batch[:, 1:].to(logits.device)
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
            total_nll += nll.item()
            count += target.numel()
    mean = total_nll / count
    return PerplexityResult(math.exp(mean), mean, windows.shape[0], count, seqlen)


@dataclass
class KLResult:
    kl: float
    top1_changed: float
    windows: int
    tokens: int
    seqlen: int

    def to_dict(self):
        return asdict(self)


@torch.no_grad()
def kl_divergence(model, reference, tokenizer, text: str, seqlen: int = 2048, max_windows: int | None = None,
                  batch_size: int = 1) -> KLResult:
    windows = eval_windows(tokenizer, text, seqlen, max_windows)
    total_kl = 0.0
    changed = 0
    count = 0
    with dense_weights(model), dense_weights(reference):
        for batch in track(list(windows.split(batch_size)), f"KL divergence ({windows.shape[0]} windows)"):
            logp = F.log_softmax(_logits(reference, batch)[:, :-1].float(), dim=-1)
            logq = F.log_softmax(_logits(model, batch)[:, :-1].float().to(logp.device), dim=-1)
            if logp.shape[-1] != logq.shape[-1]:
                raise LpqError("the model and the reference have different vocabularies: compare a model with its own original")
            total_kl += (logp.exp() * (logp - logq)).sum().item()
            changed += (logp.argmax(-1) != logq.argmax(-1)).sum().item()
            count += logp.shape[0] * logp.shape[1]
    return KLResult(total_kl / count, changed / count, windows.shape[0], count, seqlen)
