"""Diagonal Fisher of the LM loss (squared gradients per quantized weight), two ways to compute it.

    F_W = mean over calibration batches of (dL/dW)²,   one float32 [out_features, in_features] per linear

``whole``   the whole model on the device, one backward per batch with every decoder block
            checkpointed: fast, but the model, the gradients of the named weights and the activations
            must all fit in the device's memory.
``blocks``  one decoder block on the device at a time (:func:`fisher_blocks`): works for a model larger
            than the device, at the cost of moving each block to the device about twice per batch.
``auto``    ``whole`` when :func:`whole_fisher_bytes` fits in the device's free memory, else ``blocks``
            (on the CPU the model already lives in host memory: ``whole``).

Both give the same per-batch gradient (the chain rule split at the block boundaries), so the same
Fisher up to float rounding.

fp16 models: the gradients of a loss averaged over thousands of tokens lie mostly below fp16's
smallest normal number (6.1e-5; on SmolLM2, 1 x 2048 tokens in fp32, the median weight gradient is
3.5e-5 and 70 % are smaller), and the per-token gradients flowing back from the logits (about 1/T each)
flush to zero. So the loss is scaled by :data:`FP16_LOSS_SCALE` before the backward pass, as
mixed-precision training does, and every gradient is unscaled in float32 before it is squared; where a
gradient overflows, the scale is halved and that step is redone.

Both run the model in eval mode (no dropout, no layer drop), take the
gradients with ``torch.autograd.grad`` (no ``.grad`` field is written) and leave the model's placement,
``requires_grad`` flags and training mode as found.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import LpqError, SpecError
from ..models.arch import find_blocks, find_linears, is_conv1d

log = logging.getLogger("lpq.fisher")

FISHER_MODES = ("auto", "whole", "blocks")

#: starting loss scale for fp16 models (halved on overflow); other dtypes have float32's range
FP16_LOSS_SCALE = 2.0**16


def _loss_scale(model: nn.Module) -> float:
    p = next(model.parameters(), None)
    return FP16_LOSS_SCALE if p is not None and p.dtype == torch.float16 else 1.0


def _finite(tensors) -> bool:
    return all(t is None or bool(torch.isfinite(t).all()) for t in tensors)


#: share of the device's free memory ``auto`` lets the whole-model estimate take (the rest: allocator
#: fragmentation, kernels' workspaces, what the estimate leaves out)
FIT_MARGIN = 0.85


def check_fisher_mode(value: Any) -> str:
    mode = str(value).lower() if value is not None else "auto"
    if mode not in FISHER_MODES:
        raise SpecError(f"--option fisher_mode={value!r} is not a Fisher mode: choose auto, whole or blocks")
    return mode


# ---- model state: what is changed, put back as found -----------------------------------------------


def _placement(module: nn.Module) -> tuple[dict[nn.Parameter, torch.device], dict[tuple[int, str], torch.device]]:
    """Where every parameter and buffer of ``module`` lives (``.to`` keeps Parameter objects)."""
    params = {p: p.device for p in module.parameters()}
    buffers = {(id(m), k): b.device for m in module.modules() for k, b in m._buffers.items() if b is not None}
    return params, buffers


def _restore_placement(module: nn.Module, placement) -> None:
    """Move the parameters and buffers of ``module`` back to where ``placement`` saw them (in place:
    tied weights stay tied)."""
    params, buffers = placement
    for m in module.modules():
        for p in m._parameters.values():
            if p is not None and p in params and p.device != params[p]:
                p.data = p.data.to(params[p])
        for k, b in m._buffers.items():
            dev = buffers.get((id(m), k))
            if b is not None and dev is not None and b.device != dev:
                m._buffers[k] = b.to(dev)


@contextlib.contextmanager
def _frozen_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode (dropout and layer drop off: the Fisher of the model as it is used) and no parameter
    requiring grad; ``requires_grad``, training mode and placement restored on exit."""
    requires = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    placement = _placement(model)
    try:
        for p in requires:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for p, r in requires.items():
            p.requires_grad_(r)
        model.train(was_training)
        _restore_placement(model, placement)


@contextlib.contextmanager
def _patched_forward(module: nn.Module, make: Callable[[Callable], Callable]) -> Iterator[None]:
    """Replace ``module.forward`` by ``make(current forward)`` on the instance (hooks keep working);
    an instance-level forward already there (e.g. an offloading hook) is put back on exit."""
    previous = module.__dict__.get("forward")
    module.forward = make(module.forward)
    try:
        yield
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous


def _fisher_shape(m: nn.Module) -> tuple[int, int]:
    return tuple(reversed(m.weight.shape)) if is_conv1d(m) else tuple(m.weight.shape)  # [out, in]


def _accumulate(acc: torch.Tensor, m: nn.Module, grad: torch.Tensor | None, scale: float = 1.0) -> None:
    """acc [out, in] float32 CPU += (grad / scale)² (a Conv1D gradient [in, out] is transposed; ``scale``
    the loss scale the gradient was taken with)."""
    if grad is None:  # the weight took no part in this loss
        return
    g = grad.t() if is_conv1d(m) else grad
    acc += (g.float() / scale).pow(2).cpu()


def _batches(tokens: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """[S, L] -> batches [B, L], in the order the driver's capture uses."""
    return [tokens[s : s + batch_size] for s in range(0, tokens.shape[0], batch_size)]


# ---- whole model ----------------------------------------------------------------------------------


def fisher_whole(
    model: nn.Module, tokens: torch.Tensor, names: list[str], device: torch.device | str = "cpu", batch_size: int = 1
) -> dict[str, torch.Tensor]:
    """Mean over batches of the squared gradient of the LM loss for each named linear's weight, with the
    whole model on ``device``. -> {name: [out, in] float32 on the CPU} (Conv1D weights transposed).

    Device memory: the model, the named weights' gradients, the logits [B, L, V] and, as every decoder
    block is checkpointed (its forward recomputed in the backward), one [B, L, H] state per block plus
    one block's activations.
    """
    device = torch.device(device)
    modules = {n: model.get_submodule(n) for n in names}
    fisher = {n: torch.zeros(_fisher_shape(m), dtype=torch.float32) for n, m in modules.items()}
    try:
        _, blocks = find_blocks(model)
    except LpqError:
        blocks = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(_frozen_eval(model))
        for block in blocks:  # checkpointing of our own: transformers' only works in training mode
            stack.enter_context(_patched_forward(
                block, lambda fwd: lambda *a, **k: checkpoint(fwd, *a, use_reentrant=False, **k)))
        for m in modules.values():
            m.weight.requires_grad_(True)
        model.to(device)
        weights = [m.weight for m in modules.values()]
        batches = _batches(tokens, batch_size)
        scale = _loss_scale(model)
        for batch in batches:
            batch = batch.to(device)
            while True:
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                grads = torch.autograd.grad(loss * scale, weights, allow_unused=True)
                if scale <= 1.0 or _finite(grads):
                    break
                del loss, grads
                scale /= 2  # overflow: redo the batch with half the scale
            for (n, m), g in zip(modules.items(), grads):
                _accumulate(fisher[n], m, g, scale)
            del loss, grads
    for f in fisher.values():
        f /= max(len(batches), 1)
    return fisher


# ---- block by block -------------------------------------------------------------------------------


def _names_by_block(model: nn.Module, names: list[str], blocks_name: str, n_blocks: int) -> list[dict[str, nn.Module]]:
    """[block index] -> {qualified name: linear} of the named linears inside that block."""
    per_block: list[dict[str, nn.Module]] = [{} for _ in range(n_blocks)]
    for n in names:
        rest = n[len(blocks_name) + 1 :] if n.startswith(blocks_name + ".") else ""
        index = rest.split(".", 1)[0]
        if not index.isdigit() or int(index) >= n_blocks:
            raise LpqError(f"the block-wise Fisher covers linears inside the decoder blocks ({blocks_name}.N.*), "
                           f"not {n}: use --option fisher_mode=whole")
        per_block[int(index)][n] = model.get_submodule(n)
    return per_block


def _like_block_output(example: Any) -> Callable[[torch.Tensor], Any]:
    """hidden [B, L, H] -> the structure a block returns (a tensor, or a tuple led by the hidden state)."""
    if isinstance(example, (tuple, list)):
        rest = tuple(example[1:])
        return lambda h: (h, *rest)
    return lambda h: h


class _Resident:
    """Keeps at most one decoder block on the device; the others where they were found."""

    def __init__(self, blocks: nn.ModuleList, device: torch.device, placement) -> None:
        self.blocks, self.device, self.placement = blocks, device, placement
        self.index: int | None = None

    def get(self, i: int) -> nn.Module:
        if self.index != i:
            self.release()
            self.blocks[i].to(self.device)
            self.index = i
        return self.blocks[i]

    def release(self) -> None:
        if self.index is not None:
            _restore_placement(self.blocks[self.index], self.placement)
            self.index = None


def fisher_blocks(
    model: nn.Module, tokens: torch.Tensor, names: list[str], device: torch.device | str = "cpu", batch_size: int = 1
) -> dict[str, torch.Tensor]:
    """The same Fisher as :func:`fisher_whole`, holding one decoder block on ``device`` at a time.

    Per calibration batch [B, L] (the gradient of the batch's loss is the whole model's, split by the
    chain rule at the block boundaries):

    1. forward without gradients: the first block's inputs (hidden state + the attention mask, position
       embeddings, ... the model gives its blocks) come from the driver's capture; then block after block
       on the device, keeping each block's input h_i [B, L, H] and the last block's output on the CPU;
    2. the head: the model's own forward runs with every block replaced by a stand-in (the last one
       returns the saved final state as a leaf that requires grad), so that the family's final norm,
       projection, lm_head and loss are its own code; autograd gives g = dL/dh_n [B, L, H];
    3. backward in reverse: block i recomputes its forward from h_i (requiring grad) with gradients on
       for its named linears' weights; ``autograd.grad(out, (h_i, W...), g)`` gives dL/dW (squared and
       added on the CPU in float32) and dL/dh_i, which becomes g for block i - 1. Blocks before the first
       one with a named linear are skipped.

    Memory per batch: on the CPU (blocks + 1) x B x L x H x dtype bytes of states (e.g. LLaMA-7B fp16,
    B = 1, L = 2048: 33 x 2048 x 4096 x 2 B = 0.55 GB); on the device the parameters outside the blocks
    (embeddings, final norm, lm_head), one block's weights, its activations and weight gradients, and
    the logits [B, L, V]. Every block crosses to the device twice per batch (the last and first blocks
    stay for the next phase).

    The captured block arguments are those of the first block, as in the driver: a family that gives
    different blocks different masks (alternating sliding-window layers) is not covered.
    """
    from ..driver import _block_output, _move_outside_blocks, _to, capture_block_inputs
    from ..progress import track

    device = torch.device(device)
    blocks_name, blocks = find_blocks(model)
    per_block = _names_by_block(model, names, blocks_name, len(blocks))
    fisher = {n: torch.zeros(_fisher_shape(m), dtype=torch.float32) for d in per_block for n, m in d.items()}
    if not fisher:
        return fisher
    first = min(i for i, d in enumerate(per_block) if d)  # nothing before it needs a gradient
    batches = _batches(tokens, batch_size)
    start_scale = _loss_scale(model)
    with _frozen_eval(model):
        placement = _placement(model)  # as found (restored again by _frozen_eval on exit)
        resident = _Resident(blocks, device, placement)
        try:
            captured = capture_block_inputs(model, blocks, tokens, batch_size, device)  # leaves non-block parts on the CPU
            hidden0 = [h.cpu() for h in captured.hidden]  # [B, L, H] per batch
            extra = [(_to(a, "cpu"), _to(k, "cpu")) for a, k in zip(captured.args, captured.kwargs)]
            del captured
            _move_outside_blocks(model, blocks, device)  # embeddings, final norm, lm_head: for the head pass
            for b in track(range(len(batches)), f"Fisher block by block ({len(blocks)} blocks)"):
                batch = batches[b].to(device)
                args, kwargs = _to(extra[b][0], device), _to(extra[b][1], device)

                # (1) forward: states[i] = input of block i, states[-1] = the last block's output, on the CPU
                states = [hidden0[b]]
                h = hidden0[b].to(device)
                with torch.no_grad():
                    for i in range(len(blocks)):
                        out = resident.get(i)(h, *args, **kwargs)
                        h = _block_output(out)
                        states.append(h.cpu())
                wrap = _like_block_output(out)
                del out, h

                # (2) head: dL/dh_n through the model's own final norm / lm_head / loss (times the
                # loss scale; g below always carries ``scale``)
                leaf = states[-1].to(device).requires_grad_(True)  # [B, L, H]
                last = len(blocks) - 1
                scale = start_scale
                with contextlib.ExitStack() as stack:
                    for i, block in enumerate(blocks):
                        def stand_in(fwd, i=i):
                            def forward(*a, **k):
                                x = a[0] if a else k["hidden_states"]
                                return wrap(leaf if i == last else x)
                            return forward
                        stack.enter_context(_patched_forward(block, stand_in))
                    with torch.enable_grad():
                        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                        while True:
                            (g,) = torch.autograd.grad(loss * scale, leaf, retain_graph=scale > 1.0)  # [B, L, H]
                            if scale <= 1.0 or _finite([g]):
                                break
                            scale /= 2
                del loss, leaf
                states.pop()

                # (3) backward, block by block in reverse
                for i in range(last, first - 1, -1):
                    block = resident.get(i)
                    mods = per_block[i]
                    weights = [m.weight for m in mods.values()]
                    x = states.pop().to(device).requires_grad_(i > first)  # h_i [B, L, H]
                    for w in weights:
                        w.requires_grad_(True)
                    try:
                        with torch.enable_grad():
                            y = _block_output(block(x, *args, **kwargs))  # [B, L, H]
                            wanted = ([x] if i > first else []) + weights
                            while True:  # the backward is linear in g: on overflow halve g and its scale
                                grads = torch.autograd.grad(y, wanted, grad_outputs=g, allow_unused=True,
                                                            retain_graph=scale > 1.0)
                                if scale <= 1.0 or _finite(grads):
                                    break
                                g, scale = g / 2, scale / 2
                    finally:
                        for w in weights:
                            w.requires_grad_(False)
                    if i > first:
                        g, grads = grads[0], grads[1:]  # dL/dh_i: the incoming gradient of block i - 1
                    for (n, m), gw in zip(mods.items(), grads):
                        _accumulate(fisher[n], m, gw, scale)
                    del x, y, grads
                del g, states
        finally:
            resident.release()
    for f in fisher.values():
        f /= max(len(batches), 1)
    return fisher


# ---- which one --------------------------------------------------------------------------------------


def _config_int(model: nn.Module, *keys: str, default: int = 0) -> int:
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    for k in keys:
        v = getattr(config, k, None)
        if isinstance(v, int) and v > 0:
            return v
    return default


def whole_fisher_bytes(model: nn.Module, names: list[str], batch_size: int, seqlen: int,
                       device: torch.device | str) -> int:
    """Estimated device bytes :func:`fisher_whole` needs beyond what already lives on ``device``.

    weights (those not on the device yet) + gradients of the named weights (their dtype) +
    per batch of T = B x L tokens and element size d: the checkpointed block states (blocks x T x H x d),
    one block's recomputed activations (T x (10 H + 3 I) x d, I the widest linear output of a block),
    its attention scores (B x heads x L² x d, in case attention is not fused) and the logits with their
    float32 copy and gradient (T x V x (d + 8)).
    """
    device = torch.device(device)
    seen: set[int] = set()
    weights = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen or t.device == device:
            continue
        seen.add(id(t))
        weights += t.numel() * t.element_size()
    p0 = next(model.parameters())
    d = p0.element_size() if p0.is_floating_point() else 4
    grads = sum(model.get_submodule(n).weight.numel() for n in names) * d
    try:
        _, blocks = find_blocks(model)
        n_blocks = len(blocks)
        widest = max((max(m.weight.shape) for m in find_linears(blocks[0]).values()), default=0)
    except LpqError:
        n_blocks, widest = 0, 0
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    hidden = _config_int(model, "hidden_size", "n_embd", "d_model",
                         default=int(getattr(emb, "embedding_dim", 0) or 0))
    vocab = _config_int(model, "vocab_size", default=int(getattr(emb, "num_embeddings", 0) or 0))
    heads = _config_int(model, "num_attention_heads", "n_head", default=1)
    t = batch_size * seqlen
    acts = (n_blocks * t * hidden * d + t * (10 * hidden + 3 * widest) * d
            + batch_size * heads * seqlen * seqlen * d + t * vocab * (d + 8))
    return int(weights + grads + acts)


def device_free_bytes(device: torch.device | str) -> int | None:
    """Bytes this process can still allocate on ``device``; None for the CPU (the model lives in host
    memory already, so the whole-model pass is the natural one there)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    # memory our caching allocator holds but does not use is free for us too
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def choose_fisher_mode(mode: str, model: nn.Module, names: list[str], tokens_shape: tuple[int, int],
                       batch_size: int, device: torch.device | str, free_bytes: int | None = -1) -> str:
    """``whole`` or ``blocks`` for ``mode`` (auto decides by memory). ``free_bytes`` -1: ask the device
    (:func:`device_free_bytes`); None: no limit."""
    mode = check_fisher_mode(mode)
    if mode != "auto":
        return mode
    if free_bytes == -1:
        free_bytes = device_free_bytes(device)
    if free_bytes is None:
        return "whole"
    need = whole_fisher_bytes(model, names, min(batch_size, tokens_shape[0]), tokens_shape[1], device)
    chosen = "whole" if need <= FIT_MARGIN * free_bytes else "blocks"
    log.info("Fisher: the whole model needs about %.2f GB of the device's %.2f GB free: %s",
             need / 1e9, free_bytes / 1e9, "whole model" if chosen == "whole" else "block by block")
    return chosen


def fisher_diagonal(
    model: nn.Module, tokens: torch.Tensor, names: list[str], device: torch.device | str = "cpu", batch_size: int = 1,
    mode: str = "auto", free_bytes: int | None = -1,
) -> dict[str, torch.Tensor]:
    """Mean over batches of the squared gradient of the LM loss for each named linear's weight.

    tokens [S, L] -> {name: [out_features, in_features] float32 on the CPU} (Conv1D weights transposed).
    ``mode``: auto (whole model if it fits on ``device``, else block by block), whole or blocks; the
    model is left as found. ``free_bytes`` overrides the device's free memory for auto (tests).
    """
    chosen = choose_fisher_mode(mode, model, names, tuple(tokens.shape), batch_size, device, free_bytes)
    if chosen == "blocks":
        return fisher_blocks(model, tokens, names, device, batch_size)
    return fisher_whole(model, tokens, names, device, batch_size)
