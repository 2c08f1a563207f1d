"""Calibration token windows: from a text file, from WikiText-2 on the hub, or sampled from the model.

Every source returns a LongTensor [nsamples, seqlen] drawn with a fixed seed. ``self`` asks the
unquantized model itself for sequences (data-free calibration): no data needed at all.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import CalibrationError
from .progress import track


def tokenizer_adds_bos(tokenizer) -> bool:
    """True if the tokenizer puts a BOS token in front by default (Llama-2, Gemma; not SmolLM2)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a").input_ids
    return len(ids) > 0 and ids[0] == bos


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """The whole text in one call, without special tokens -> [T] int64."""
    prev = getattr(tokenizer, "model_max_length", None)
    tokenizer.model_max_length = int(1e12)  # silence the "sequence longer than the model" warning
    try:
        ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False).input_ids
    finally:
        if prev is not None:
            tokenizer.model_max_length = prev
    return torch.tensor(ids, dtype=torch.long)


def read_text(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"text file {path} not found: pass an existing file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CalibrationError(f"{path} is not UTF-8 text: pass a plain text file") from None


def random_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int, bos: int | None) -> torch.Tensor:
    """nsamples windows of seqlen tokens at random offsets (a BOS first if the model expects one)."""
    body = seqlen - (1 if bos is not None else 0)
    if tokens.numel() <= body:
        raise CalibrationError(
            f"the calibration text has {tokens.numel()} tokens, fewer than one window of {seqlen}: "
            "use a longer text or a smaller --seqlen"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - body, (nsamples,), generator=gen)
    windows = torch.stack([tokens[s : s + body] for s in starts.tolist()])
    if bos is not None:
        windows = torch.cat([torch.full((nsamples, 1), bos, dtype=torch.long), windows], dim=1)
    return windows


def _wikitext2_train() -> str:
    try:
        import datasets
    except ImportError:
        raise CalibrationError(
            "--calib wikitext2 needs the datasets package (pip install datasets); or pass --calib FILE"
        ) from None
    try:
        data = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="train")
    except Exception as e:  # offline, hub errors: all mean "not reachable"
        raise CalibrationError(
            f"could not load wikitext2 from the hub ({type(e).__name__}); offline? pass --calib FILE with a text file"
        ) from None
    return "\n\n".join(data["text"])


@torch.no_grad()
def sample_from_model(model, tokenizer, nsamples: int, seqlen: int, seed: int, device, batch_size: int | None = None) -> torch.Tensor:
    """Data-free calibration: sequences sampled (temperature 1) from the model, starting at BOS.

    Generation is one token per step for every sequence at once, so a GPU takes large batches (64).
    """
    if batch_size is None:
        batch_size = 64 if torch.device(device).type == "cuda" else 8
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        start = 0
    gen_device = torch.device(device)
    torch.manual_seed(seed)
    if gen_device.type == "cuda":
        torch.cuda.manual_seed(seed)
    was = next(model.parameters()).device
    model.to(gen_device)
    out = []
    batches = [min(batch_size, nsamples - i) for i in range(0, nsamples, batch_size)]
    try:
        for b in track(batches, "sampling calibration text from the model"):
            prompt = torch.full((b, 1), start, dtype=torch.long, device=gen_device)
            seqs = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=seqlen - 1,
                min_new_tokens=seqlen - 1,
                pad_token_id=start,
            )
            out.append(seqs[:, :seqlen].cpu())
    finally:
        model.to(was)
    return torch.cat(out)


def calibration_tokens(source: "str | torch.Tensor", model, tokenizer, nsamples: int, seqlen: int, seed: int, device) -> torch.Tensor:
    """[nsamples, seqlen] token ids from ``source``: 'self', 'wikitext2' or a path to a text file."""
    if nsamples < 1 or seqlen < 2:
        raise CalibrationError("--nsamples must be at least 1 and --seqlen at least 2")
    if isinstance(source, torch.Tensor):  # token ids given directly (e.g. a model without a tokenizer)
        if source.dim() != 2 or source.dtype not in (torch.int32, torch.int64):
            raise CalibrationError("calibration tokens must be an integer tensor [nsamples, seqlen]")
        return source.long()
    if source == "self":
        return sample_from_model(model, tokenizer, nsamples, seqlen, seed, device)
    text = _wikitext2_train() if source == "wikitext2" else read_text(source)
    bos = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None
    return random_windows(tokenize_text(tokenizer, text), nsamples, seqlen, seed, bos)
