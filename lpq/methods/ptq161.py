"""PTQ1.61 (Zhao et al., 2025): 4-bit salient input channels, binarized rest, block-wise learned scales.

Maths (pure functions, any device; W [N, K] = [out_features, in_features]):
  :func:`salient_count`      how many input channels stay at 4 bits (aligned for the packed format)
  :func:`salient_mask`       the 1-D structured mask: the channels with the largest activation statistic
  :func:`quantize_salient`   per-row asymmetric 4-bit min-max grid of the salient columns
  :func:`init_binary`        row mean mu, sign(W - mu) and alpha = mean |W - mu| of the binarized columns
  :func:`closed_init`        the two above: every column rounded on its own (``init=closed``)
  :func:`compensated_init`   the same grids, codes chosen by GPTQ's error feedback on H (``init=gptq``)
  :func:`assemble_weight`    the fake-quantized weight, differentiable in alpha, r1, r2
  :func:`layer_vectors`      the stored vectors of one linear in training (``learn=extended`` folded in)
  :func:`layer_weight`       its fake-quantized weight
  :func:`block_loss`         MSE + (-log cosine) against the two full-precision targets

Per decoder block (:meth:`PTQ161.quantize_block`), as the paper's block-wise optimisation does:
  1. the block's full-precision input X_fp (the unquantized model's activations) and the quantized
     model's input X_q (what the driver passes) are both kept; with the block's original weights,
     the targets Y_fp = block(X_fp) and Y_qfp = block(X_q) are computed, and the per-channel activation
     statistic of every linear is observed on X_fp (the paper takes it from the full-precision model);
  2. per linear: mask, fixed 4-bit salient columns, signs and mu fixed, alpha from the mean absolute
     deviation, r1 = 1 [N], r2 = 1 [B]. ``init`` chooses the fixed codes: ``closed`` (the paper's)
     rounds every column on its own (:func:`closed_init`); ``gptq`` (the default) keeps the same per-row
     grids but chooses the signs and 4-bit codes column by column with GPTQ's error feedback on each
     linear's input Hessian H = 2/n X_q^T X_q [K, K], so that later columns compensate the error of
     earlier ones in the layer output (:func:`compensated_init`). With ``sequential`` (default on) the
     Hessians are taken stage by stage (q/k/v, o, gate/up, down), each stage seeing the earlier ones at
     their initial quantization; with ``fp_targets`` (default 1 when sequential) each weight is first
     moved to the least-squares weight for the full-precision block's outputs (gptq.fp_target_weight);
  3. AdamW (lr 5e-4 for alpha, 1e-3 for r1 and r2, no weight decay) for ``epochs`` passes over the
     calibration windows minimises  MSE(Y, Y_fp) + MSE(Y, Y_qfp) - log|cos(Y, Y_fp)| - log|cos(Y, Y_qfp)|
     with Y = block_q(X_q) (cosine along the hidden size, averaged over tokens). ``learn=extended`` (the
     default) also trains each row's mean mu and its salient 4-bit scale, as dimensionless vectors at
     lr 1e-3 (mu + alpha * dmu, scale * rs); ``learn=paper`` trains alpha, r1, r2 only;
  4. pack (salient scale, alpha * r1, r2, mu rounded to fp16) and write the dequantized weights into the
     block; Y_fp becomes the next block's X_fp.
  The mask (step 2) ranks channels by ``act_stat``: the paper's max |x|, or (the default) ``error``, the
  output error that binarizing the channel would add (:func:`salient_score`).
  On SmolLM2-135M (H100, full protocol, bench/RESULTS.md) the defaults give 144.7 perplexity at 1.77
  bits per weight: the paper's method 417, init=gptq alone 182.2, with learn=extended 163.2, with the
  sequential full-precision-target codes 154.7, with act_stat=error 144.7.
Memory: besides the driver's quantized activations [S, L, H], this keeps X_fp, Y_fp and (after the
first block) Y_qfp, each [S, L, H] in the model's dtype on the work device: three more copies of the
calibration activations (128 x 2048 x 4096 fp16 = 2 GiB each for a 7B model). Training runs the
block in float32. ``init=gptq`` adds the block's Hessians, K^2 float32 per linear, during step 2
(0.8 GiB for a 7B Llama block: six 4096^2 and one 11008^2); sequential only keeps one stage's at a
time, and fp_targets adds a second K^2 matrix per linear of the stage plus an unquantized copy of the
block.

Optional preprocessing (``preprocess``, in :meth:`PTQ161.prepare`): a restorative LoRA. Every target
linear is first replaced by its closed-form PTQ1.61 quantization (mask, 4-bit salient part, binarized
part with alpha from the mean absolute deviation, no block optimisation); LoRA adapters (rank 64,
scale 16/64, dropout 0.1, AdamW lr 1e-4 as in the authors' setup) on those linears are trained with
the language-model loss on the calibration windows; the adapters are merged into the quantized weights
and the merged model is what the block-wise PTQ then quantizes.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LpqError, SpecError
from ..formats import QuantizedWeight
from ..formats.ptq161 import BINARY_ALIGN, SALIENT_ALIGN, SALIENT_BITS, binarized, pack_ptq161, spec_salient
from ..quant import fit_minmax
from . import Method, Observer, register_method
from .gptq import HessianObserver, _inverse_cholesky_upper, error_feedback_sweep, fp_target_weight, observe_paired

log = logging.getLogger("lpq.ptq161")

ACT_STATS = ("max", "mean", "l2", "error")
PREPROCESS_MERGE = ("quantized", "original")  # what the restorative LoRA's adapters are merged into
INITS = ("closed", "gptq")  # how the codes that the block-wise optimisation keeps fixed are chosen
LEARN = ("paper", "extended")  # what it trains: alpha, r1, r2; or also mu and the salient rows' scales


# ---- the maths -------------------------------------------------------------------------------------


def salient_count(in_features: int, ratio: float) -> int:
    """Salient channels of a layer with K inputs: the count nearest ratio * K among those the format
    packs without padding (S % 8 == 0 and (K - S) % 32 == 0; K % 32 == 0 gives multiples of 32)."""
    base = in_features % BINARY_ALIGN  # the smallest S with (K - S) % 32 == 0
    if base % SALIENT_ALIGN:
        raise SpecError(f"ptq161 needs in_features divisible by {SALIENT_ALIGN}; a layer has {in_features}")
    candidates = torch.arange(base, in_features + 1, BINARY_ALIGN)
    return int(candidates[(candidates.double() - ratio * in_features).abs().argmin()])


def salient_mask(stat: torch.Tensor, count: int) -> torch.Tensor:
    """stat [K] per-input-channel activation magnitude -> [K] bool, True for the ``count`` largest."""
    mask = torch.zeros(stat.numel(), dtype=torch.bool, device=stat.device)
    if count:
        mask[torch.topk(stat.float(), count, sorted=False).indices] = True
    return mask


def quantize_salient(w: torch.Tensor, bits: int = SALIENT_BITS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, S] -> (codes [N, S] int32, scale [N], zero [N]): per-row asymmetric min-max grid, scale
    rounded to fp16 as stored."""
    if w.shape[1] == 0:
        n = w.shape[0]
        return torch.zeros(n, 0, dtype=torch.int32, device=w.device), torch.ones(n, device=w.device), torch.zeros(n, device=w.device)
    scale, zero = fit_minmax(w, bits, sym=False)
    codes = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, (1 << bits) - 1).to(torch.int32)
    return codes, scale, zero


def init_binary(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, B] binarized columns -> (mu [N] row mean, signs [N, B] of w - mu in {-1, +1} (0 -> +1),
    alpha [N] = mean |w - mu|: the scale that minimises the L2 error of alpha * sign(w - mu))."""
    mu = w.mean(dim=1) if w.shape[1] else torch.zeros(w.shape[0], device=w.device)
    centred = w - mu[:, None]
    signs = torch.where(centred >= 0, 1.0, -1.0).to(w.dtype)
    alpha = centred.abs().mean(dim=1) if w.shape[1] else torch.zeros(w.shape[0], device=w.device)
    return mu, signs, alpha


def closed_init(w: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The closed-form initialisation: every column rounded on its own. w [N, K], mask [K] bool (salient)
    -> (codes [N, S] int32, scale [N], zero [N] of :func:`quantize_salient`; mu [N], signs [N, B],
    alpha [N] of :func:`init_binary`), S = mask.sum(), B = K - S, columns in increasing channel order."""
    codes, scale, zero = quantize_salient(w[:, mask])
    mu, signs, alpha = init_binary(w[:, ~mask])
    return codes, scale, zero, mu, signs, alpha


def compensated_init(w: torch.Tensor, H: torch.Tensor, mask: torch.Tensor, damp: float = 0.01,
                     block_size: int = 128) -> tuple[torch.Tensor, ...]:
    """The Hessian-compensated initialisation: :func:`closed_init`'s outputs, with the codes chosen by
    GPTQ's error feedback. w [N, K], H [K, K] the layer's input Hessian (2/n X^T X), mask [K] bool.

    The per-row grids are fixed first, from the original weights, exactly as :func:`closed_init` fits
    them: the salient 4-bit min-max scale and zero [N] of w[:, mask], and mu and alpha [N] of the
    binarized columns w[:, ~mask] (the block-wise optimisation then trains alpha, not mu or the grids).
    Then the columns are swept (:func:`~lpq.methods.gptq.error_feedback_sweep`): a binarized column is
    set to mu + alpha * sign(w - mu), a salient one rounded to its row's 4-bit grid, and its error is
    spread over the columns not yet swept through the inverse-Hessian Cholesky factor, so that they
    compensate it in the layer output ||X W^T - X W_hat^T||. The binarized columns go first and the
    salient ones last (each in channel order): the 4-bit columns then absorb the large errors of the
    1-bit ones on their finer grid. On the 35 linears of SmolLM2-135M blocks 0, 7, 15, 22, 29 this
    order gave a lower output error than channel order in every layer (relative error, geometric
    mean: 0.0945 closed form, 0.0420 channel order, 0.0334 binarized first, 0.0489 salient first,
    0.0430 GPTQ's act-order). alpha is kept: refitting it as the mean |w - mu| of the updated
    binarized columns raised that error (0.0342).
    Dampening and a Hessian that is not positive definite are handled as GPTQ does
    (:func:`~lpq.methods.gptq._inverse_cholesky_upper`: the dampening is raised until the Cholesky
    factorisation succeeds, else the identity, i.e. plain rounding, with a warning).
    """
    n, k = w.shape
    if H.shape != (k, k) or mask.shape != (k,):
        raise ValueError(f"Hessian {tuple(H.shape)} / mask {tuple(mask.shape)} do not fit a weight {tuple(w.shape)}")
    w = w.detach().float()
    mask = mask.to(w.device)
    _, scale, zero = quantize_salient(w[:, mask])  # [N] each; the codes come from the sweep
    mu, _, alpha = init_binary(w[:, ~mask])  # [N] each; the signs come from the sweep
    maxq = (1 << SALIENT_BITS) - 1
    # sweep order [K]: the B binarized channels, then the S salient ones, each in increasing channel
    # order, so that sweep position j < B is binarized column j and j >= B salient column j - B
    order = torch.cat([(~mask).nonzero().squeeze(1), mask.nonzero().squeeze(1)])
    b = k - int(mask.sum())
    signs_t = torch.empty(b, n, dtype=torch.float32, device=w.device)  # [B, N]
    codes_t = torch.empty(k - b, n, dtype=torch.int32, device=w.device)  # [S, N]

    def quantize_column(j: int, col: torch.Tensor) -> torch.Tensor:  # col [N], corrected by earlier errors
        if j < b:
            sign = torch.where(col - mu >= 0, 1.0, -1.0)
            signs_t[j] = sign
            return mu + alpha * sign
        code = torch.clamp(torch.round(col / scale) + zero, 0, maxq)
        codes_t[j - b] = code.to(torch.int32)
        return scale * (code - zero)

    H = H.detach().to(device=w.device, dtype=torch.float32)
    H = 0.5 * (H + H.t())  # symmetric by construction; guards against accumulated asymmetry, as GPTQ
    U, _ = _inverse_cholesky_upper(H[order][:, order], damp)  # [K, K], sweep order
    error_feedback_sweep(w[:, order].t().contiguous(), U, quantize_column, block_size)  # on [K, N]
    return codes_t.t().contiguous(), scale, zero, mu, signs_t.t().contiguous(), alpha


def assemble_weight(mask: torch.Tensor, salient: torch.Tensor, signs: torch.Tensor, alpha: torch.Tensor,
                    r1: torch.Tensor, r2: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """The fake-quantized weight [N, K]: the fixed dequantized salient columns salient [N, S] at the
    mask, (r1 r2^T) * (alpha * sign) + mu elsewhere. Differentiable in alpha [N], r1 [N], r2 [B]."""
    n, k = signs.shape[0], mask.numel()
    w = signs.new_zeros(n, k)
    if salient.numel():
        w = w.index_copy(1, mask.nonzero().squeeze(1), salient.to(w.dtype))
    binary = binarized(signs, alpha * r1, r2, mu)  # [N, B]
    return w.index_copy(1, (~mask).nonzero().squeeze(1), binary)


def layer_vectors(lay: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The stored vectors of one linear in training (a dict of :meth:`PTQ161.quantize_block`): salient
    scale and zero [N], binarized row scale alpha * r1 [N], column scale r2 [B], row mean mu [N]; with
    ``learn=extended`` the salient scale is times rs and mu is moved by alpha * dmu."""
    scale, mu = lay["scale"], lay["mu"]
    if "rs" in lay:
        scale = scale * lay["rs"]
        mu = mu + lay["alpha"] * lay["dmu"]
    return {"sscales": scale, "szeros": lay["zero"], "bscale": lay["alpha"] * lay["r1"], "colscale": lay["r2"], "mu": mu}


def layer_weight(lay: dict[str, Any]) -> torch.Tensor:
    """The fake-quantized weight [N, K] of one linear in training, differentiable in its learned vectors."""
    v = layer_vectors(lay)
    salient = (lay["codes"].float() - v["szeros"][:, None]) * v["sscales"][:, None]  # [N, S]
    ones = torch.ones_like(v["bscale"])
    return assemble_weight(lay["mask"], salient, lay["signs"], v["bscale"], ones, v["colscale"], v["mu"])


def cosine_term(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-log |mean cosine similarity| along the hidden size (tokens averaged), as the paper's angular term."""
    cos = F.cosine_similarity(y, target, dim=-1).mean().abs()
    return -torch.log(cos.clamp(min=1e-8))


def block_loss(y: torch.Tensor, y_fp: torch.Tensor, y_qfp: torch.Tensor) -> torch.Tensor:
    """y: quantized block on quantized inputs; y_fp: fp block on fp inputs; y_qfp: fp block on quantized
    inputs (all [B, L, H])."""
    return F.mse_loss(y, y_fp) + F.mse_loss(y, y_qfp) + cosine_term(y, y_fp) + cosine_term(y, y_qfp)


def salient_score(stat: torch.Tensor, w: torch.Tensor, act_stat: str) -> torch.Tensor:
    """The score the mask ranks input channels by: the activation statistic stat [K] itself (the paper's
    max |x|, or mean |x|, or the L2 norm), or for "error" the output error that binarizing column k alone
    would add, E[x_k^2] * sum_n (|w_nk - mu_n| - alpha_n)^2, with mu, alpha [N] the row mean and mean
    absolute deviation over all columns of w [N, K]."""
    if act_stat != "error":
        return stat
    w = w.float()
    centred = (w - w.mean(dim=1, keepdim=True)).abs()  # [N, K]
    cost = (centred - centred.mean(dim=1, keepdim=True)).pow(2).sum(dim=0)  # [K]
    return stat.to(cost) * cost


def closed_form_quantize(weight: torch.Tensor, stat: torch.Tensor, ratio: float, act_stat: str = "max") -> torch.Tensor:
    """PTQ1.61 without block optimisation (r1 = r2 = 1): weight [N, K], stat [K] -> fake-quantized [N, K]."""
    w = weight.float()
    mask = salient_mask(salient_score(stat, w, act_stat), salient_count(w.shape[1], ratio))
    codes, scale, zero, mu, signs, alpha = closed_init(w, mask)
    r1 = torch.ones_like(alpha)
    r2 = torch.ones(signs.shape[1], device=w.device)
    return assemble_weight(mask, (codes.float() - zero[:, None]) * scale[:, None], signs, alpha, r1, r2, mu)


class ActStatObserver(Observer):
    """Per-input-channel activation magnitude over all calibration tokens: max |x| (the paper's choice,
    as SmoothQuant's activation scales), mean |x|, or the L2 norm."""

    def __init__(self, in_features: int, stat: str, device) -> None:
        self.stat = stat
        self.acc = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def update(self, inputs: torch.Tensor) -> None:  # [..., K]
        x = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        if self.stat == "max":
            self.acc = torch.maximum(self.acc, x.abs().amax(dim=0))
        elif self.stat == "mean":
            self.acc += x.abs().sum(dim=0)
        else:
            self.acc += x.pow(2).sum(dim=0)
        self.tokens += x.shape[0]

    def value(self) -> torch.Tensor:
        """[K]; for "error" the mean of x^2 (diag of the Hessian / 2), weighted later by :func:`salient_score`."""
        if self.stat == "error":
            return self.acc / max(self.tokens, 1)
        if self.stat == "mean":
            return self.acc / max(self.tokens, 1)
        if self.stat == "l2":
            return self.acc.sqrt()
        return self.acc


# ---- options ---------------------------------------------------------------------------------------


def _number(name: str, value: Any, kind, low: float, high: float | None = None, low_open: bool = False):
    try:
        v = kind(value)
        if kind is int and float(value) != v:
            raise ValueError
    except (TypeError, ValueError):
        raise SpecError(f"ptq161 option {name}={value!r} is not {'an integer' if kind is int else 'a number'}") from None
    if (v <= low if low_open else v < low) or (high is not None and v > high):
        bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
        raise SpecError(f"ptq161 option {name}={value} is out of range: give a value {bound}")
    return v


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, str):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise SpecError(f"ptq161 option {name}={value!r} is not a yes/no value: use true or false")
    if isinstance(value, (bool, int)) and value in (0, 1):
        return bool(value)
    raise SpecError(f"ptq161 option {name}={value!r} is not a yes/no value: use true or false")


def _cast_floats(obj: Any, dtype: torch.dtype) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_cast_floats(o, dtype) for o in obj)
    if isinstance(obj, list):
        return [_cast_floats(o, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: _cast_floats(v, dtype) for k, v in obj.items()}
    return obj


def _output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


# ---- preprocessing: restorative LoRA ---------------------------------------------------------------


@torch.no_grad()
def activation_stats(model: nn.Module, names: list[str], tokens: torch.Tensor, device, stat: str = "max",
                     batch_size: int = 1) -> dict[str, torch.Tensor]:
    """Per-input-channel activation statistic of each named linear over the calibration tokens [S, L]."""
    from ..models.arch import linear_shape

    modules = {n: model.get_submodule(n) for n in names}
    observers = {n: ActStatObserver(linear_shape(m)[0], stat, device) for n, m in modules.items()}
    handles = [m.register_forward_hook(lambda mod, args, out, o=observers[n]: o.update(args[0]))
               for n, m in modules.items()]
    try:
        for start in range(0, tokens.shape[0], batch_size):
            model(input_ids=tokens[start:start + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: o.value() for n, o in observers.items()}


def restorative_lora(model: nn.Module, names: list[str], tokens: torch.Tensor, device, ratio: float,
                     stat: str = "max", rank: int = 64, lora_alpha: float = 16.0, dropout: float = 0.1,
                     lr: float = 1e-4, epochs: int = 1, batch_size: int = 1, seed: int = 0,
                     merge_into: str = "quantized") -> list[float]:
    """Replace each named linear's weight W by Q(W) + (lora_alpha / rank) B A, where Q is closed-form
    PTQ1.61 and the adapters A [rank, K], B [N, rank] (B starts at zero) are trained with the LM loss on
    tokens [S, L]. The model is run on ``device`` (gradient checkpointing where supported) and left on
    its original device with the merged weights. -> mean loss of each epoch.

    ``merge_into="original"`` merges the same adapters into the unquantized weights instead: W + s B A.
    The block-wise pass takes the merged model as its full-precision reference, and Q(W) + s B A is far
    from the unquantized model after a short LoRA (bench/ptq161_preprocess_probe.py); W + s B A stays
    close to it while moving each weight in the direction that helped its quantized version."""
    if merge_into not in PREPROCESS_MERGE:
        raise SpecError(f"ptq161 option preprocess_merge={merge_into!r} is not known: choose {', '.join(PREPROCESS_MERGE)}")
    from ..models.arch import linear_shape, linear_weight, set_linear_weight

    device = torch.device(device)
    orig_device = next(model.parameters()).device
    was_training = model.training
    requires = {p: p.requires_grad for p in model.parameters()}
    checkpointing = bool(getattr(model, "supports_gradient_checkpointing", False))
    modules = {n: model.get_submodule(n) for n in names}
    gen = torch.Generator().manual_seed(seed)
    handles = []
    losses: list[float] = []
    try:
        model.to(device)
        model.eval()
        stats = activation_stats(model, names, tokens, device, stat, batch_size)
        adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        originals: dict[str, torch.Tensor] = {}  # [N, K] each, model dtype, only for merge_into="original"
        for n, m in modules.items():
            k, out = linear_shape(m)
            w = linear_weight(m).detach().float()
            if merge_into == "original":
                originals[n] = linear_weight(m).detach().clone()
            set_linear_weight(m, closed_form_quantize(w, stats.pop(n), ratio, stat).to(m.weight.dtype))
            a = (torch.randn(rank, k, generator=gen) / math.sqrt(k)).to(device).requires_grad_(True)
            b = torch.zeros(out, rank, device=device, requires_grad=True)
            adapters[n] = (a, b)
        for p in model.parameters():
            p.requires_grad_(False)
        scale = lora_alpha / rank

        def hook(a, b):
            def fn(module, args, out):
                x = args[0]
                if module.training and dropout > 0:
                    x = F.dropout(x, dropout, training=True)
                return out + ((x.float() @ a.t()) @ b.t() * scale).to(out.dtype)
            return fn

        handles = [m.register_forward_hook(hook(*adapters[n])) for n, m in modules.items()]
        if checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # LoRA dropout and checkpointing run in training mode; model dropouts as configured
        params = [t for ab in adapters.values() for t in ab]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        for _ in range(epochs):
            total, count = 0.0, 0
            for start in range(0, tokens.shape[0], batch_size):
                batch = tokens[start:start + batch_size].to(device)
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, count = total + float(loss.detach()), count + 1
            losses.append(total / max(count, 1))
        with torch.no_grad():
            for n, m in modules.items():
                a, b = adapters[n]
                base = originals.pop(n) if merge_into == "original" else linear_weight(m)
                merged = base.float() + scale * (b @ a)
                set_linear_weight(m, merged.to(m.weight.dtype))
    finally:
        for h in handles:
            h.remove()
        if checkpointing:
            disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
            disable()
        for p, r in requires.items():
            p.requires_grad_(r)
        model.train(was_training)
        model.to(orig_device)
    return losses


# ---- the plugin ------------------------------------------------------------------------------------


@register_method
class PTQ161(Method):
    """Options: salient_ratio (0.2), epochs (20), lr_alpha (5e-4), lr_r (1e-3), batch_size (1 window per
    optimiser step), act_stat (error | max | mean | l2: the mask's ranking, see :func:`salient_score`; the paper's is max), preprocess (False) with preprocess_epochs (1),
    preprocess_lr (1e-4), preprocess_rank (64), preprocess_merge (quantized | original: what the adapters
    are merged into, see :func:`restorative_lora`), init (gptq | closed: how the fixed codes are chosen,
    the Hessian-compensated :func:`compensated_init`, or the paper's :func:`closed_init`; gptq took
    SmolLM2-135M from 417 to 182 perplexity, bench/RESULTS.md), sequential (True: the init's Hessians
    stage by stage), fp_targets (1.0 when sequential, else 0: weight of the full-precision-target
    correction in [0, 1]), learn (extended | paper: also train mu and the salient scales, or not).
    The paper's method is ``init=closed learn=paper act_stat=max``."""

    name = "ptq161"
    needs_calibration = True
    option_names = ("salient_ratio", "epochs", "lr_alpha", "lr_r", "batch_size", "act_stat", "preprocess",
                    "preprocess_epochs", "preprocess_lr", "preprocess_rank", "preprocess_merge", "init",
                    "sequential", "fp_targets", "learn")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)

        def opt(key, default):
            v = options.get(key)
            return default if v is None else v

        self.salient_ratio = _number("salient_ratio", opt("salient_ratio", 0.2), float, 0.0, 1.0)
        self.epochs = _number("epochs", opt("epochs", 20), int, 0)
        self.lr_alpha = _number("lr_alpha", opt("lr_alpha", 5e-4), float, 0.0)
        self.lr_r = _number("lr_r", opt("lr_r", 1e-3), float, 0.0)
        self.batch_size = _number("batch_size", opt("batch_size", 1), int, 1)
        self.act_stat = str(opt("act_stat", "error"))
        if self.act_stat not in ACT_STATS:
            raise SpecError(f"ptq161 option act_stat={self.act_stat!r} is not known: choose {', '.join(ACT_STATS)}")
        self.preprocess = _flag("preprocess", opt("preprocess", False))
        self.preprocess_epochs = _number("preprocess_epochs", opt("preprocess_epochs", 1), int, 1)
        self.preprocess_lr = _number("preprocess_lr", opt("preprocess_lr", 1e-4), float, 0.0, low_open=True)
        self.preprocess_rank = _number("preprocess_rank", opt("preprocess_rank", 64), int, 1)
        self.preprocess_merge = str(opt("preprocess_merge", "quantized"))
        if self.preprocess_merge not in PREPROCESS_MERGE:
            raise SpecError(f"ptq161 option preprocess_merge={self.preprocess_merge!r} is not known: "
                            f"choose {', '.join(PREPROCESS_MERGE)}")
        self.init = str(opt("init", "gptq"))
        if self.init not in INITS:
            raise SpecError(f"ptq161 option init={self.init!r} is not known: choose {', '.join(INITS)}")
        self.sequential = _flag("sequential", opt("sequential", True))
        # fp_targets helps only with the sequential Hessians (without them the least-squares weights
        # of the later stages are fitted to inputs the block will not see): its default follows sequential
        self.fp_targets = _number("fp_targets", opt("fp_targets", 1.0 if self.sequential else 0.0), float, 0.0, 1.0)
        if self.fp_targets > 0 and not self.sequential and self.init == "gptq":
            log.warning("ptq161: fp_targets without sequential fits each stage to inputs the quantized block will "
                        "not see (SmolLM2 CPU proxy: 237 -> 966 perplexity); add sequential=1 or drop fp_targets")
        self.learn = str(opt("learn", "extended"))
        if self.learn not in LEARN:
            raise SpecError(f"ptq161 option learn={self.learn!r} is not known: choose {', '.join(LEARN)}")
        self._run = None
        self._fp_inputs: list[torch.Tensor] | None = None  # X_fp of the next block
        self._fp_index = 0
        #: per block: {"block", "loss" (mean per epoch), "mse_init", "mse_final"} (block output MSE vs Y_fp)
        self.history: list[dict[str, Any]] = []
        self.preprocess_losses: list[float] = []

    def _record(self) -> dict[str, Any]:
        return {"salient_ratio": self.salient_ratio, "epochs": self.epochs, "lr_alpha": self.lr_alpha,
                "lr_r": self.lr_r, "batch_size": self.batch_size, "act_stat": self.act_stat,
                "preprocess": self.preprocess, "init": self.init, "sequential": self.sequential,
                "fp_targets": self.fp_targets, "learn": self.learn}

    # -- whole model -------------------------------------------------------------------------------
    def prepare(self, run) -> None:
        from ..formats import get_format
        from ..models.arch import linear_shape

        self._run = run
        self._fp_inputs, self._fp_index = None, 0
        for name, spec in list(run.specs.items()):
            if spec.bits != SALIENT_BITS:
                raise SpecError(f"ptq161 keeps salient channels at 4 bits: use --bits 4 (layer {name} asks for {spec.bits})")
            spec = spec.replace(format="ptq161", group_size=-1, act_order=False,
                                options={**(spec.options or {}), **self._record()})
            k, n = linear_shape(run.model.get_submodule(name))
            spec = spec.replace(options={**spec.options, "salient": salient_count(k, self.salient_ratio)})
            get_format("ptq161").check_shape(k, n, spec, layer=name)
            run.specs[name] = spec
        if hasattr(run, "restore_saved_specs"):
            run.restore_saved_specs()  # --resume: saved blocks keep their data-dependent specs
        if self.preprocess:
            if run.calib_tokens is None:
                raise LpqError("ptq161 preprocess needs calibration data")
            log.info("ptq161: restorative LoRA on %d linears", len(run.specs))
            self.preprocess_losses = restorative_lora(
                run.model, list(run.specs), run.calib_tokens, run.device, self.salient_ratio, self.act_stat,
                rank=self.preprocess_rank, lr=self.preprocess_lr, epochs=self.preprocess_epochs,
                batch_size=getattr(run.opts, "calib_batch_size", 1), merge_into=self.preprocess_merge)

    # -- one block ---------------------------------------------------------------------------------
    def quantize_block(self, ctx) -> None:
        from ..driver import BlockInputs
        from ..models.arch import is_conv1d, set_linear_weight

        if ctx.inputs is None:
            raise LpqError("ptq161 needs calibration data")
        q_in = ctx.inputs.hidden
        if self._fp_inputs is not None and self._fp_index == ctx.index:
            fp_in = self._fp_inputs
        else:
            if ctx.index != 0:  # earlier blocks came from --resume: their fp outputs are gone
                log.warning("ptq161: block %d starts without full-precision inputs (resumed run); using the "
                            "quantized ones as both", ctx.index)
            fp_in = q_in
        quant_ctx_inputs = ctx.inputs
        fp_inputs = BlockInputs(fp_in, ctx.inputs.args, ctx.inputs.kwargs)

        # 1. statistics and targets from the block's original weights
        observers = {n: ActStatObserver(ctx.in_features(n), self.act_stat, ctx.device) for n in ctx.linears}
        try:
            ctx.inputs = fp_inputs
            ctx.observe(observers)
            y_fp = ctx.forward_all().hidden
        finally:
            ctx.inputs = quant_ctx_inputs
        y_qfp = y_fp if fp_in is q_in else ctx.forward_all().hidden

        # 2. initial quantization of every linear. init=gptq needs each linear's input Hessian
        # H = 2/n X_q^T X_q [K, K] in the quantized model (X_q: the inputs the quantized block is trained
        # on). sequential: stage by stage (q/k/v, o, gate/up, down for Llama), each stage's Hessians taken
        # with the earlier stages already at their initial quantization, as GPTQ's true-sequential mode;
        # else all linears in one pass on the original weights. fp_targets: each weight is first moved to
        # the least-squares weight for the full-precision model's outputs (gptq.fp_target_weight), which
        # needs the paired Hessians of an unquantized copy of the block on X_fp.
        compensated = self.init == "gptq"
        stages = ctx.stages() if compensated and self.sequential else [list(ctx.linears)]
        fp_block = copy.deepcopy(ctx.block) if compensated and self.fp_targets > 0 else None
        layers = {}
        for stage in stages:
            hessians = {}
            if fp_block is not None:
                hessians = observe_paired(ctx, stage, fp_block, fp_in)
            elif compensated:
                hessians = {n: HessianObserver(ctx.in_features(n), ctx.device) for n in stage}
                ctx.observe(hessians)
            for n in stage:
                spec = ctx.spec(n)
                w = ctx.weight(n)  # [N, K] float32, the original weight
                mask = salient_mask(salient_score(observers.pop(n).value(), w, self.act_stat), spec_salient(spec))
                if compensated:
                    obs = hessians.pop(n)
                    if fp_block is not None:
                        w = fp_target_weight(w, obs.H, obs.D, alpha=self.fp_targets)
                    codes, scale, zero, mu, signs, alpha = compensated_init(w, obs.H, mask)
                    del obs
                else:
                    codes, scale, zero, mu, signs, alpha = closed_init(w, mask)
                layers[n] = {
                    "mask": mask, "codes": codes, "scale": scale, "zero": zero, "mu": mu, "signs": signs,
                    "alpha": alpha.clone().requires_grad_(True),
                    "r1": torch.ones_like(alpha).requires_grad_(True),
                    "r2": torch.ones(signs.shape[1], device=w.device).requires_grad_(True),
                    "conv1d": is_conv1d(ctx.modules[n]),
                }
                if self.learn == "extended":
                    # dimensionless so one learning rate fits: the salient rows' scale times rs [N], and
                    # mu + alpha * dmu [N]; both start at the initialisation's values
                    layers[n]["rs"] = torch.ones_like(alpha).requires_grad_(True)
                    layers[n]["dmu"] = torch.zeros_like(alpha).requires_grad_(True)
                if len(stages) > 1:  # the later stages' Hessians see this linear at its initial quantization
                    with torch.no_grad():
                        set_linear_weight(ctx.modules[n], layer_weight(layers[n]))
        del observers, fp_block

        # 3. block-wise optimisation of alpha, r1, r2
        record = {"block": ctx.index, "loss": []}
        if self.epochs > 0:
            self._optimise(ctx, layers, q_in, y_fp, y_qfp, record)
        self.history.append(record)

        # 4. pack with the fp16-rounded vectors and write the dequantized weights into the block
        for n, lay in layers.items():
            with torch.no_grad():
                v = {k: t.detach() for k, t in layer_vectors(lay).items()}
                qw = pack_ptq161(lay["mask"], lay["signs"], lay["codes"], v["sscales"], v["szeros"], v["bscale"],
                                 v["colscale"], v["mu"], ctx.spec(n), layer=ctx.qualified(n))
            ctx.set_result(n, qw)
            if self._run is not None and ctx.qualified(n) in self._run.specs:
                self._run.specs[ctx.qualified(n)] = qw.spec
        del layers, y_qfp
        last = ctx.index == len(ctx.run.blocks) - 1
        self._fp_inputs, self._fp_index = (None, 0) if last else (y_fp, ctx.index + 1)  # free after the last block

    def _optimise(self, ctx, layers, q_in, y_fp, y_qfp, record) -> None:
        from torch.func import functional_call

        block = ctx.block
        params = list(block.parameters())
        requires = [p.requires_grad for p in params]
        # every parameter and buffer keeps its own dtype afterwards (some models keep fp32 buffers in fp16)
        dtypes = {id(t): t.dtype for t in [*params, *block.buffers()]}
        dtype = torch.float32 if all(d == torch.float32 for d in dtypes.values()) else None
        args, kwargs = ctx.inputs.args, ctx.inputs.kwargs
        try:
            for p in params:
                p.requires_grad_(False)
            if dtype is None:
                block.float()  # train in float32, as the paper's AMP setup keeps the block in float

            def weights():
                out = {}
                for n, lay in layers.items():
                    w = layer_weight(lay)
                    out[f"{n}.weight"] = w.t() if lay["conv1d"] else w
                return out

            def forward(i, ws):
                a = _cast_floats(args[i], torch.float32)
                kw = _cast_floats(kwargs[i], torch.float32)
                return _output(functional_call(block, ws, (q_in[i].float(), *a), kw))

            def extended(lay):  # learn=extended's dimensionless vectors, at lr_r as r1 and r2
                return [lay[k] for k in ("rs", "dmu") if k in lay]

            @torch.no_grad()
            def mse() -> float:
                ws = weights()
                total = sum(float(F.mse_loss(forward(i, ws), y_fp[i].float())) for i in range(len(q_in)))
                return total / len(q_in)

            record["mse_init"] = mse()
            opt = torch.optim.AdamW(
                [{"params": [lay["alpha"] for lay in layers.values()], "lr": self.lr_alpha},
                 {"params": [t for lay in layers.values() for t in (lay["r1"], lay["r2"], *extended(lay))],
                  "lr": self.lr_r}],
                weight_decay=0.0)
            windows = [q.shape[0] for q in q_in]
            for _ in range(self.epochs):
                total, seen, pending = 0.0, 0, 0
                opt.zero_grad(set_to_none=True)
                for i in range(len(q_in)):
                    y = forward(i, weights())
                    loss = block_loss(y, y_fp[i].float(), y_qfp[i].float())
                    # batch_size windows per optimiser step (gradients of driver batches accumulated)
                    (loss * windows[i] / self.batch_size).backward()
                    total += float(loss.detach()) * windows[i]
                    seen += windows[i]
                    pending += windows[i]
                    if pending >= self.batch_size or i == len(q_in) - 1:
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                        pending = 0
                record["loss"].append(total / max(seen, 1))
            record["mse_final"] = mse()
            log.info("ptq161: block %d output MSE %.4g -> %.4g after %d epochs", ctx.index, record["mse_init"],
                     record["mse_final"], self.epochs)
        finally:
            if dtype is None:
                for t in [*block.parameters(), *block.buffers()]:
                    t.data = t.data.to(dtypes[id(t)])
            for p, r in zip(params, requires):
                p.requires_grad_(r)

    def quantize_layer(self, name, weight, observer, spec) -> QuantizedWeight:
        raise LpqError("ptq161 quantizes whole blocks (block-wise optimisation); it has no per-layer path")
