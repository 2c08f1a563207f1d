"""Residual-stream rotation of a pre-RMSNorm decoder: an exact re-parametrisation before quantization.

In a pre-RMSNorm decoder (Llama, Mistral, Qwen2, Gemma) the residual stream x [tokens, d] is
    written by the embedding E [V, d] and by the linears that end a sub-block (o_proj, down_proj), and
    read    through an RMSNorm by the linears that start one (q/k/v, gate/up) and, after the final norm, lm_head.
Once each norm's scale gamma [d] is folded into the linears reading its output (W [out, d] <- W diag(gamma)),
the norm is x / rms(x), which commutes with any orthogonal Q [d, d] because rms(x Q) = rms(x). Then
    E <- E Q,   W_read <- W_read Q,   W_write <- Q^T W_write,   b_write <- Q^T b_write
makes the stream x Q everywhere and leaves the logits unchanged. With a randomized Hadamard-type Q every
rotated input column mixes all original ones, so outlier channels no longer dominate a weight group's
range: GPTQ's 3-bit error drops (SmolLM2 w3 g128 act-order+mse: 47.1 -> 40.0), while plain RTN can get
worse, so the transform is opt-in (``lpq quantize --rotate``).

With ``heads`` a second exact rotation acts inside each attention block. Attention mixes value
vectors over positions only, never across their channels, so for kv head j an orthogonal R_j [hd, hd]
    W_v[j] <- R_j^T W_v[j],  b_v[j] <- R_j^T b_v[j]     (W_v[j] [hd, d]: the rows of value head j)
    W_o[:, h] <- W_o[:, h] R_j                          (W_o[:, h] [d, hd]: the columns of query head h,
                                                         which reads kv head j = h // (num_heads / kv_heads))
turns every head's attention output o_h into o_h R_j, which o_proj undoes: the model is unchanged,
while o_proj's input channels (the attention output) are spread within each head before quantization.

Nothing is assumed from a model's name: the block structure is checked (norm classes, the expected
linears and their sizes, no parameter left unaccounted for) and each norm's form, w or (1 + w)
(Gemma), is probed. With ``check`` the rotated model is also run on a short probe, block by block,
against the original, so an architecture that only looks right is refused instead of silently broken.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..driver import split_block_call
from ..errors import UnsupportedModelError
from ..models.arch import find_blocks, is_conv1d
from ..progress import info, track

# a block's linears that read the stream (through its norm), by alternative layouts; and those that write it
ATTN_READERS = (("q_proj", "k_proj", "v_proj"), ("qkv_proj",))
MLP_READERS = (("gate_proj", "up_proj"), ("gate_up_proj",), ("up_proj",))
ATTN_WRITER, MLP_WRITER = "o_proj", "down_proj"
# per-head norms on the projections' outputs (Qwen3, Gemma3): they never see the stream, so they may stay
HEAD_NORMS = ("q_norm", "k_norm")
# a norm on the values (e.g. Gemma3n's v_norm) sits between v_proj and the attention: the head rotation
# is refused there rather than reasoned about
VALUE_NORMS = ("v_norm",)
FUSED_QKV = "qkv_proj"  # rows [q: num_heads*hd | k: kv_heads*hd | v: kv_heads*hd]

ROW_CHUNK = 16384  # rows of an embedding / lm_head moved to the device at a time ([V, d] need not fit there)
PROBE_TOKENS = 16
# largest relative change of a block's (rotated) output that still counts as "the same model"
CHECK_TOL = {torch.float64: 1e-8, torch.float32: 1e-3}
CHECK_TOL_HALF = 5e-2


def _refusal(model: nn.Module, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"--rotate supports pre-RMSNorm decoders (Llama, Mistral, Qwen2, Gemma); {type(model).__name__} {why}: "
        "quantize it without --rotate"
    )


def _heads_refusal(model: nn.Module, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"--rotate-heads needs attention with plain per-head value and output projections; {type(model).__name__} "
        f"{why}: quantize it without --rotate-heads"
    )


# ---------------------------------------------------------------------------------------------------
# the rotation
# ---------------------------------------------------------------------------------------------------
def _sylvester(n: int) -> torch.Tensor:
    """Normalized Sylvester Hadamard matrix [n, n] (n a power of two), float64, orthogonal."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def rotation_matrix(d: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A randomized Hadamard-type orthogonal matrix Q [d, d], a pure function of (d, seed).

    d = 2^a * b with b odd: Q = diag(s) (H_{2^a} kron R_b), H the normalized Sylvester Hadamard matrix,
    R_b a random orthogonal b x b (QR of a Gaussian, column signs fixed by diag(R) so the factor is
    unique), s random signs. Built in float64 on the CPU, then cast.
    """
    if d < 1:
        raise ValueError(f"rotation size must be positive, got {d}")
    a = (d & -d).bit_length() - 1  # the power of two in d
    b = d >> a
    gen = torch.Generator().manual_seed(int(seed))
    if b > 1:
        q, r = torch.linalg.qr(torch.randn(b, b, generator=gen, dtype=torch.float64))
        sign = torch.sign(torch.diagonal(r))
        odd = q * torch.where(sign == 0, torch.ones_like(sign), sign)[None, :]
    else:
        odd = torch.ones(1, 1, dtype=torch.float64)
    k = torch.kron(_sylvester(1 << a), odd.contiguous())
    s = torch.randint(0, 2, (d,), generator=gen, dtype=torch.int64).to(torch.float64) * 2 - 1
    return (s[:, None] * k).to(dtype)


def head_rotations(head_dim: int, kv_heads: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The value/output rotations R [kv_heads, head_dim, head_dim]: R[j] = rotation_matrix(head_dim, seed + 1 + j).

    One matrix per kv head (not one shared by all), so that a query head paired with the wrong kv head
    changes the model and the probe catches it; the same in every block."""
    return torch.stack([rotation_matrix(head_dim, seed + 1 + j, dtype) for j in range(kv_heads)])


def _kv_head_of(num_heads: int, kv_heads: int) -> torch.Tensor:
    """kv head read by each query head [num_heads] (grouped-query attention repeats each kv head
    num_heads / kv_heads times in a row: query head h reads kv head h // group)."""
    return torch.arange(num_heads) // (num_heads // kv_heads)


def _rotate_value_rows(lin: nn.Linear, start: int, r: torch.Tensor) -> None:
    """Value rows of a linear W [out, d] (v_proj: start 0; fused qkv_proj: after the q and k rows).
    kv head j's rows W_j = W[start + j*hd : start + (j+1)*hd] [hd, d] <- R_j^T W_j, its bias b_j [hd] <- R_j^T b_j;
    r [kv, hd, hd] on the device and in the dtype the product is computed in."""
    kv, hd, _ = r.shape
    rows = slice(start, start + kv * hd)
    with torch.no_grad():
        w = lin.weight[rows]  # a view [kv*hd, d]: written back in place
        w3 = w.to(device=r.device, dtype=r.dtype).reshape(kv, hd, -1)
        w.copy_(torch.einsum("jab,jad->jbd", r, w3).reshape(kv * hd, -1).to(device=w.device, dtype=w.dtype))
        if lin.bias is not None:
            b = lin.bias[rows]  # [kv*hd]
            b2 = b.to(device=r.device, dtype=r.dtype).reshape(kv, hd)
            b.copy_(torch.einsum("jab,ja->jb", r, b2).reshape(-1).to(device=b.device, dtype=b.dtype))


def _rotate_output_cols(lin: nn.Linear, r: torch.Tensor, num_heads: int) -> None:
    """o_proj W [d, num_heads*hd]: query head h's columns W_h [d, hd] <- W_h R_{j(h)}, j(h) its kv head;
    r [kv, hd, hd]. A bias of o_proj is untouched (it is added after the heads are summed)."""
    kv, hd, _ = r.shape
    per_query = r[_kv_head_of(num_heads, kv).to(r.device)]  # [num_heads, hd, hd]
    with torch.no_grad():
        w = lin.weight
        w3 = w.to(device=r.device, dtype=r.dtype).reshape(w.shape[0], num_heads, hd)
        w.copy_(torch.einsum("dha,hab->dhb", w3, per_query).reshape(w.shape).to(device=w.device, dtype=w.dtype))


# ---------------------------------------------------------------------------------------------------
# norms
# ---------------------------------------------------------------------------------------------------
def norm_form(norm: nn.Module) -> float | None:
    """The offset of an RMSNorm-like module's scale: 0.0 for x/rms(x) * w, 1.0 for x/rms(x) * (1 + w)
    (Gemma); None when the module is not a scale-only RMS norm over its weight (e.g. it subtracts the mean).

    Probed, not read from the class: with the weight zeroed, a ones vector comes out ~0 or ~1; with the
    weight at the identity value, x must come out as x / rms(x). The weight is restored afterwards.
    """
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or getattr(norm, "bias", None) is not None:
        return None
    d = w.shape[0]
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4, d, generator=gen) + 0.5).to(device=w.device, dtype=w.dtype)  # mean != 0 on purpose
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.zero_()
            y0 = norm(torch.ones(1, d, device=w.device, dtype=w.dtype)).float()
            if y0.abs().max() < 1e-3:
                offset = 0.0
            elif (y0 - 1).abs().max() < 1e-2:
                offset = 1.0
            else:
                return None
            w.fill_(1.0 - offset)
            y = norm(x).float()
            xf = x.float()
            want = xf / xf.pow(2).mean(-1, keepdim=True).sqrt()
            if (y - want).norm() > 1e-2 * want.norm():
                return None
        return offset
    finally:
        with torch.no_grad():
            w.copy_(saved)


def _apply_rows(weight: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], device, dtype,
                chunk_rows: int | None = None) -> None:
    """weight <- fn(weight), fn computed in ``dtype`` on ``device`` and written back in place (the
    weight's own dtype and device); ``chunk_rows`` rows at a time when fn acts on rows independently."""
    rows = weight.shape[0]
    step = rows if chunk_rows is None else max(1, chunk_rows)
    with torch.no_grad():
        for start in range(0, rows, step):
            part = weight[start : start + step]
            part.copy_(fn(part.to(device=device, dtype=dtype)).to(part.dtype))


def fuse_norm_into(norm: nn.Module, linears: Iterable[nn.Linear], rotation: torch.Tensor | None = None, *,
                   offset: float | None = None, chunk_rows: int | None = None) -> None:
    """Fold an RMSNorm's scale gamma [d] into the linears that read its output and make the norm's scale 1.

    W [out, d] <- W diag(gamma), and with an orthogonal ``rotation`` Q [d, d] also W <- W diag(gamma) Q in
    the same pass (one rounding to the weight's dtype). Computed in Q's dtype on Q's device, or in float64
    on each weight's device without Q. ``offset`` is the norm's form (``norm_form``), probed when not given.
    """
    if offset is None:
        offset = norm_form(norm)
        if offset is None:
            raise UnsupportedModelError(
                f"{type(norm).__name__} is not a scale-only RMS norm: its scale cannot be folded into the next linears"
            )
    for lin in linears:
        device = rotation.device if rotation is not None else lin.weight.device
        dtype = rotation.dtype if rotation is not None else torch.float64
        gamma = (offset + norm.weight.detach().to(device=device, dtype=dtype))[None, :]  # [1, d]
        if rotation is None:
            _apply_rows(lin.weight, lambda w: w * gamma, device, dtype, chunk_rows)
        else:
            _apply_rows(lin.weight, lambda w: (w * gamma) @ rotation, device, dtype, chunk_rows)
    with torch.no_grad():
        norm.weight.fill_(1.0 - offset)


def _rotate_writer(lin: nn.Linear, q: torch.Tensor) -> None:
    """A linear writing into the stream: W [d, in] <- Q^T W, b [d] <- Q^T b (as a row: b Q)."""
    _apply_rows(lin.weight, lambda w: q.T @ w, q.device, q.dtype)
    if lin.bias is not None:
        with torch.no_grad():
            b = lin.bias.detach().to(device=q.device, dtype=q.dtype)
            lin.bias.copy_((b @ q).to(lin.bias.dtype))


# ---------------------------------------------------------------------------------------------------
# what gets rotated: checked before anything is changed
# ---------------------------------------------------------------------------------------------------
@dataclass
class HeadPlan:
    values: nn.Linear  # v_proj, or the fused qkv_proj whose last kv_heads*head_dim rows are the values
    value_start: int  # first value row of ``values``
    out: nn.Linear  # o_proj, reading num_heads*head_dim columns
    num_heads: int
    kv_heads: int
    head_dim: int


@dataclass
class BlockPlan:
    in_norm: nn.Module
    post_norm: nn.Module
    attn_readers: list[nn.Linear]
    mlp_readers: list[nn.Linear]
    writers: list[nn.Linear]
    in_offset: float = 0.0
    post_offset: float = 0.0
    heads: HeadPlan | None = None  # only when the value/output heads are rotated too


@dataclass
class RotationPlan:
    hidden: int
    embed: nn.Module
    lm_head: nn.Linear
    final_norm: nn.Module
    final_offset: float
    blocks: nn.ModuleList
    block_plans: list[BlockPlan] = field(default_factory=list)
    tied: bool = False


def _is_rms_norm_class(module: Any) -> bool:
    return isinstance(module, nn.Module) and type(module).__name__.endswith("RMSNorm")


def _uses_layer_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.LayerNorm) or (type(m).__name__.endswith("LayerNorm") and not _is_rms_norm_class(m))
               for m in model.modules())


def _pick_linears(model, parent: nn.Module, layouts: tuple[tuple[str, ...], ...], where: str) -> list[nn.Linear]:
    for names in layouts:
        mods = [getattr(parent, n, None) for n in names]
        if all(isinstance(m, nn.Linear) for m in mods):
            return mods
    options = " or ".join("/".join(names) for names in layouts)
    raise _refusal(model, f"has no {options} linears in {where}")


def _checked_norm(model, norm, d: int, where: str) -> float:
    if norm is None:
        raise _refusal(model, f"has no {where}")
    if not _is_rms_norm_class(norm) or getattr(norm, "bias", None) is not None:
        raise _refusal(model, f"uses {type(norm).__name__} as {where}, not a bias-free RMSNorm")
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != (d,):
        raise _refusal(model, f"has a {where} without a [{d}] scale")
    offset = norm_form(norm)
    if offset is None:
        raise _refusal(model, f"has a {where} ({type(norm).__name__}) that does not compute x / rms(x) * scale")
    return offset


def _head_counts(model: nn.Module, d: int) -> tuple[int, int, int]:
    """(num_heads, kv_heads, head_dim) from the model's (text) config; head_dim may be explicit (Gemma, Qwen3)."""
    cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    num_heads = getattr(cfg, "num_attention_heads", None)
    if not isinstance(num_heads, int) or num_heads < 1:
        raise _heads_refusal(model, "has no num_attention_heads in its config")
    kv_heads = getattr(cfg, "num_key_value_heads", None) or num_heads
    head_dim = getattr(cfg, "head_dim", None) or d // num_heads
    if not isinstance(kv_heads, int) or not isinstance(head_dim, int) or kv_heads < 1 or num_heads % kv_heads:
        raise _heads_refusal(model, f"has {num_heads} attention heads and {kv_heads} kv heads in its config, "
                                    "not a whole number of query heads per kv head")
    return num_heads, kv_heads, head_dim


def _plan_heads(model: nn.Module, attn: nn.Module, readers: list[nn.Linear], writer: nn.Linear, where: str,
                counts: tuple[int, int, int]) -> HeadPlan:
    """Check one attention module against the config's head counts: the value rows and o_proj's columns
    must have exactly the sizes that num_heads, kv_heads and head_dim imply."""
    num_heads, kv_heads, hd = counts
    for name in VALUE_NORMS:
        if getattr(attn, name, None) is not None:
            raise _heads_refusal(model, f"has {where}.{name}, a norm on the values")
    if getattr(attn, "head_dim", hd) != hd or getattr(attn, "num_key_value_groups", num_heads // kv_heads) != num_heads // kv_heads:
        raise _heads_refusal(model, f"has {where} with other head sizes than its config "
                                    f"({num_heads} heads, {kv_heads} kv heads of {hd})")
    if len(readers) == 1:  # fused qkv_proj
        values, start = readers[0], (num_heads + kv_heads) * hd
        sizes = {FUSED_QKV: (values.out_features, (num_heads + 2 * kv_heads) * hd)}
    else:
        q, k, values = readers
        start = 0
        sizes = {"q_proj": (q.out_features, num_heads * hd), "k_proj": (k.out_features, kv_heads * hd),
                 "v_proj": (values.out_features, kv_heads * hd)}
    sizes[ATTN_WRITER + " inputs"] = (writer.in_features, num_heads * hd)
    for name, (got, want) in sizes.items():
        if got != want:
            raise _heads_refusal(model, f"has {where}.{name} of size {got}, not the {want} that {num_heads} heads, "
                                        f"{kv_heads} kv heads of {hd} imply")
    return HeadPlan(values, start, writer, num_heads, kv_heads, hd)


def plan_rotation(model: nn.Module, heads: bool = False) -> RotationPlan:
    """Find and check everything the rotation touches; raise UnsupportedModelError (model untouched) if
    any piece is not where a pre-RMSNorm decoder has it (with ``heads``: or if the attention's value and
    output projections are not split into the heads the config names)."""
    if _uses_layer_norm(model):
        raise _refusal(model, "uses LayerNorm")
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embed is None or not isinstance(getattr(embed, "weight", None), torch.Tensor) or embed.weight.dim() != 2:
        raise _refusal(model, "has no input embedding matrix")
    d = embed.weight.shape[1]
    if not isinstance(head, nn.Linear) or is_conv1d(head) or head.in_features != d:
        raise _refusal(model, f"has no linear lm_head reading the hidden size {d}")
    blocks_name, blocks = find_blocks(model)
    base = model.get_submodule(blocks_name.rpartition(".")[0])
    final_norm = getattr(base, "norm", None)
    final_offset = _checked_norm(model, final_norm, d, "final norm")
    plan = RotationPlan(d, embed, head, final_norm, final_offset, blocks, tied=head.weight is embed.weight)

    known = {id(p) for m in (embed, head, final_norm) for p in m.parameters()}
    counts = _head_counts(model, d) if heads else None
    for i, block in enumerate(blocks):
        where = f"block {i}"
        attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
        if not isinstance(attn, nn.Module) or not isinstance(mlp, nn.Module):
            raise _refusal(model, f"has no self_attn and mlp in {where}")
        bp = BlockPlan(
            in_norm=getattr(block, "input_layernorm", None), post_norm=getattr(block, "post_attention_layernorm", None),
            attn_readers=_pick_linears(model, attn, ATTN_READERS, f"{where}.self_attn"),
            mlp_readers=_pick_linears(model, mlp, MLP_READERS, f"{where}.mlp"),
            writers=_pick_linears(model, attn, ((ATTN_WRITER,),), f"{where}.self_attn")
            + _pick_linears(model, mlp, ((MLP_WRITER,),), f"{where}.mlp"),
        )
        bp.in_offset = _checked_norm(model, bp.in_norm, d, f"input_layernorm in {where}")
        bp.post_offset = _checked_norm(model, bp.post_norm, d, f"post_attention_layernorm in {where}")
        for lin in bp.attn_readers + bp.mlp_readers:
            if lin.in_features != d:
                raise _refusal(model, f"has a linear in {where} that reads {lin.in_features} features, not the hidden size {d}")
        for lin in bp.writers:
            if lin.out_features != d:
                raise _refusal(model, f"has a linear in {where} that writes {lin.out_features} features, not the hidden size {d}")
        allowed = [bp.in_norm, bp.post_norm, *bp.attn_readers, *bp.mlp_readers, *bp.writers]
        allowed += [m for n in HEAD_NORMS if _is_rms_norm_class(m := getattr(attn, n, None))]
        ok = {id(p) for m in allowed for p in m.parameters()}
        for name, p in block.named_parameters():
            if id(p) not in ok:
                raise _refusal(model, f"has {where}.{name}, which --rotate does not know how to rotate")
        known |= ok
        if counts is not None:
            bp.heads = _plan_heads(model, attn, bp.attn_readers, bp.writers[0], f"{where}.self_attn", counts)
        plan.block_plans.append(bp)
    for name, p in model.named_parameters():
        if id(p) not in known:
            raise _refusal(model, f"has {name} outside the embeddings, decoder blocks, final norm and lm_head")
    return plan


# ---------------------------------------------------------------------------------------------------
# the probe that checks the rotated model against the original
# ---------------------------------------------------------------------------------------------------
class _Stop(Exception):
    pass


def _to(obj: Any, device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _capture_probe(model: nn.Module, first_block: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, tuple, dict]:
    """(hidden [1, T, d], args, kwargs) that the model hands its first block for ``tokens`` [1, T]; the
    model runs where it lives (only the embedding and the position encodings are computed)."""
    got: dict[str, Any] = {}

    def hook(module, args, kwargs):
        hidden, rest, kw = split_block_call(args, kwargs)
        got["inputs"] = (hidden.detach(), rest, kw)
        raise _Stop

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids=tokens.to(model.get_input_embeddings().weight.device), use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "inputs" not in got:
        raise _refusal(model, "did not run its first decoder block on a probe input")
    return got["inputs"]


def _out(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


def _rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------------
# the transform
# ---------------------------------------------------------------------------------------------------
def _untie(model: nn.Module, plan: RotationPlan) -> None:
    """Give lm_head its own copy of the embedding matrix: the final norm's scale goes into lm_head only."""
    emb = plan.embed.weight
    plan.lm_head.weight = nn.Parameter(emb.detach().clone(), requires_grad=emb.requires_grad)
    configs = {id(c): c for c in (model.config, getattr(model.config, "get_text_config", lambda: model.config)())}
    for c in configs.values():
        if hasattr(c, "tie_word_embeddings"):
            c.tie_word_embeddings = False
    if hasattr(model, "all_tied_weights_keys") and hasattr(model, "get_expanded_tied_weights_keys"):
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)  # now without lm_head
    v, d = emb.shape
    info(f"--rotate: lm_head was tied to the embeddings and is now a separate matrix, so the saved model grows by "
         f"{v} x {d} 16-bit weights ({v * d * 2 / 1e6:.1f} MB)")


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0, device: str | torch.device | None = None, check: bool = True,
                 heads: bool = False) -> dict:
    """Rotate the residual stream of a pre-RMSNorm decoder in place by Q = rotation_matrix(d, seed).

    Norm scales are folded into the linears that read them (norms become scale 1), E <- E Q, readers
    W <- W Q, writers W <- Q^T W (and their biases), a tied lm_head is untied. With ``heads`` each
    attention block's value heads are also rotated by R = head_rotations(head_dim, kv_heads, seed) and
    o_proj's input columns by the matching R (see the module docstring), in the same pass. The matmuls run on
    ``device`` (default: where the model is) in float32 on a GPU, float64 on the CPU, one decoder block
    at a time; a model that lives on the CPU stays there and each block visits the device and comes back.
    With ``check`` each rotated block and the logits are compared with the original on a short probe.
    Returns a record of what was done. Raises UnsupportedModelError, before changing anything, for
    models that are not pre-RMSNorm decoders (and, with ``heads``, for attention whose projections do
    not match the head counts of the config, or that normalizes its values).
    """
    start = time.perf_counter()
    plan = plan_rotation(model, heads=heads)
    dev = torch.device(device) if device is not None else plan.embed.weight.device
    work = torch.float64 if dev.type == "cpu" else torch.float32
    d = plan.hidden
    q = rotation_matrix(d, seed).to(device=dev, dtype=work)
    hp = plan.block_plans[0].heads if heads and plan.block_plans else None
    r = head_rotations(hp.head_dim, hp.kv_heads, seed).to(device=dev, dtype=work) if hp is not None else None
    dtype = plan.embed.weight.dtype
    tol = CHECK_TOL.get(dtype, CHECK_TOL_HALF)

    probe = None
    if check:
        gen = torch.Generator().manual_seed(int(seed))
        tokens = torch.randint(0, plan.embed.weight.shape[0], (1, PROBE_TOKENS), generator=gen)
        hidden, args, kwargs = _capture_probe(model, plan.blocks[0], tokens)
        probe = (hidden.to(dev), _to(args, dev), _to(kwargs, dev))

    def rotated(h: torch.Tensor) -> torch.Tensor:  # a stream [.., d] -> stream Q, in its own dtype and device
        return (h.to(device=dev, dtype=work) @ q).to(device=h.device, dtype=h.dtype)

    def verify(got: torch.Tensor, want_rotated: torch.Tensor, what: str) -> float:
        err = _rel_error(got, want_rotated)
        if not err <= tol:  # also catches NaN
            raise _refusal(model, f"changes its {what} under the rotation (relative error {err:.2g} > {tol:g}), "
                                  "so it is not a plain pre-RMSNorm decoder")
        return err

    untied = plan.tied
    if plan.tied:
        _untie(model, plan)
    _apply_rows(plan.embed.weight, lambda e: e @ q, dev, work, ROW_CHUNK)

    errors: list[float] = []
    for i in track(range(len(plan.blocks)), f"rotating the residual stream ({len(plan.blocks)} blocks)"):
        block, bp = plan.blocks[i], plan.block_plans[i]
        home = next(block.parameters()).device
        block.to(dev)
        ref = None
        if probe is not None:
            h, args, kwargs = probe
            ref = _out(block(h, *args, **kwargs))
        fuse_norm_into(bp.in_norm, bp.attn_readers, q, offset=bp.in_offset)
        fuse_norm_into(bp.post_norm, bp.mlp_readers, q, offset=bp.post_offset)
        for lin in bp.writers:
            _rotate_writer(lin, q)
        if bp.heads is not None:  # acts on v's output rows and o_proj's input columns: commutes with Q
            _rotate_value_rows(bp.heads.values, bp.heads.value_start, r)
            _rotate_output_cols(bp.heads.out, r, bp.heads.num_heads)
        if probe is not None:
            got = _out(block(rotated(h), *args, **kwargs))
            errors.append(verify(got, rotated(ref), f"block {i} outputs"))
            probe = (ref, args, kwargs)  # the original stream feeds the next block's comparison
        block.to(home)

    head_dev = plan.lm_head.weight.device
    ref_logits = None
    if probe is not None:
        h_head = probe[0].to(head_dev)
        ref_logits = plan.lm_head(plan.final_norm(h_head))
    fuse_norm_into(plan.final_norm, [plan.lm_head], q, offset=plan.final_offset, chunk_rows=ROW_CHUNK)
    if ref_logits is not None:
        got = plan.lm_head(plan.final_norm(rotated(h_head)))
        errors.append(verify(got, ref_logits, "logits"))

    record = {"kind": "hadamard", "seed": int(seed), "hidden_size": d, "blocks": len(plan.blocks),
              "untied_lm_head": untied, "device": str(dev), "work_dtype": str(work).replace("torch.", ""),
              "max_check_error": max(errors) if errors else None, "heads": hp is not None}
    if hp is not None:
        record.update(num_heads=hp.num_heads, kv_heads=hp.kv_heads, head_dim=hp.head_dim)
    record["seconds"] = time.perf_counter() - start
    checked = f"; probe outputs match the original to {record['max_check_error']:.1e}" if errors else ""
    if hp is None:
        what, shape = "the residual stream", f"hidden {d}, Hadamard-type Q"
    else:
        what = "the residual stream and the value/output heads"
        shape = (f"hidden {d}, {hp.num_heads} heads on {hp.kv_heads} kv heads of {hp.head_dim}, "
                 "Hadamard-type Q and R")
    info(f"rotated {what} ({len(plan.blocks)} blocks, {shape}, seed {seed}) in {record['seconds']:.1f} s{checked}")
    return record
