"""GPTQ (Frantar et al., 2022): second-order rounding with error feedback, column by column.

The maths is a pure function of (weight, Hessian, spec): :func:`gptq_quantize`. The plugin
(:class:`GPTQ`) only gathers the Hessian of each linear's inputs during the calibration pass
(:class:`HessianObserver`) and packs the result in the uniform format.

Outline of :func:`gptq_quantize` for W [N, K] and H [K, K]:
  1. columns that never saw input (H_kk == 0) get H_kk = 1 and W[:, k] = 0 (their weights cannot
     matter to the layer output, so they are quantized to an exact zero);
  2. optional act-order: columns sorted by decreasing H_kk;
  3. H + λI with λ = damp * mean(diag H), raised step by step while a Cholesky factorisation fails;
  4. U = upper Cholesky factor of H^-1 (H^-1 = U^T U), from one Cholesky factorisation of H;
  5. sweep the columns in blocks of ``block_size`` (:func:`error_feedback_sweep`, shared with other
     methods' per-column quantizers): quantize column j on its group's grid, spread the scaled error
     (w - q) / U_jj over the rest of the block with row j of U, and apply the accumulated error of a
     block to all later columns at once (lazy batch update, one matmul);
  6. each group's min-max grid is fitted when the sweep enters the group, on the weights as they are
     then (already corrected by the errors of the earlier columns), unless ``static_groups``: then
     all grids are fitted on the original weights, before any permutation, so that the group of
     column k stays k // group_size even with act-order.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from typing import Any, Callable

import torch

from ..formats import QuantizedWeight
from ..formats.uniform import pack_uniform
from ..quant import fit_groups, fit_range, group_index, num_groups
from ..spec import QuantSpec
from ..errors import SpecError
from ..models.arch import find_linears
from . import Method, Observer, register_method

log = logging.getLogger("lpq.gptq")

#: relative dampening is multiplied by this while the Cholesky factorisation fails
_DAMP_STEP = 10.0
_MAX_DAMP_TRIES = 12


class HessianObserver(Observer):
    """H = 2/n Σ x xᵀ over all n input rows (tokens) seen, accumulated in float32 as a running mean.

    The running mean (H ← H·n/(n+m) + 2/(n+m)·Σ_new x xᵀ) keeps the values of order |x|² however many
    tokens pass, so float32 does not lose the late batches. n counts tokens rather than sequences;
    GPTQ is invariant to the scale of H, so this only changes the printed magnitudes.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.in_features = in_features
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=self.device)
        self.n = 0

    def update(self, inputs: torch.Tensor) -> None:
        if inputs.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs [..., {self.in_features}], got {tuple(inputs.shape)}")
        x = inputs.detach().reshape(-1, self.in_features)
        m = x.shape[0]
        if m == 0:
            return
        x = x.to(device=self.device, dtype=torch.float32)
        total = self.n + m
        if self.n:
            self.H.mul_(self.n / total)
        self.H.addmm_(x.t(), x, alpha=2.0 / total)
        self.n = total


class PairedHessianObserver(HessianObserver):
    """H = 2/n Σ x xᵀ of the inputs x in the quantized model, plus D = 2/n Σ (x̃ - x) xᵀ with x̃ the same
    token's input in the full-precision model (both [K, K], float32 running means over the same n).

    With them, the weight that best reproduces the full-precision outputs from the quantized inputs,
    argmin_V ||X̃ Wᵀ - X Vᵀ||², is V = W (X̃ᵀX)(XᵀX)^-1 = W + W D H^-1 (see :func:`fp_target_weight`).
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, device)
        self.D = torch.zeros(in_features, in_features, dtype=torch.float32, device=self.device)

    def update(self, inputs: torch.Tensor, fp_inputs: torch.Tensor | None = None) -> None:
        if fp_inputs is None:
            raise ValueError("PairedHessianObserver needs the full-precision inputs of the same tokens")
        x = inputs.detach().reshape(-1, self.in_features).to(device=self.device, dtype=torch.float32)
        xf = fp_inputs.detach().reshape(-1, self.in_features).to(device=self.device, dtype=torch.float32)
        if xf.shape != x.shape:
            raise ValueError(f"full-precision inputs {tuple(xf.shape)} do not pair with {tuple(x.shape)}")
        m, n0 = x.shape[0], self.n
        super().update(x)
        if m:
            if n0:
                self.D.mul_(n0 / self.n)
            self.D.addmm_((xf - x).t(), x, alpha=2.0 / self.n)


def fp_target_weight(W: torch.Tensor, H: torch.Tensor, D: torch.Tensor, damp: float = 0.01,
                     alpha: float = 1.0) -> torch.Tensor:
    """W [N, K] -> W + alpha · W D (H + λI)^-1, the least-squares weight for full-precision targets.

    GPTQ on (this weight, H) minimises ||X̃ Wᵀ - X Qᵀ||² (the quantized layer, fed the quantized model's
    inputs X, matches the full-precision layer on the full-precision inputs X̃), because that objective
    equals ||X (Vᵀ - Qᵀ)||² plus a constant for V the least-squares weight. alpha in [0, 1] shrinks
    the correction (0: plain GPTQ). λ = damp · mean(diag H), as in GPTQ's own dampening.
    """
    if alpha == 0:
        return W
    k = H.shape[0]
    lam = damp * H.diagonal().mean().clamp_min(1e-12)
    Hd = H + lam * torch.eye(k, dtype=H.dtype, device=H.device)
    L, info = torch.linalg.cholesky_ex(Hd)
    if int(info) != 0 or not bool(torch.isfinite(L).all()):
        log.warning("gptq: full-precision target skipped for a layer (Hessian not positive definite)")
        return W
    WD = W @ D  # [N, K]
    corr = torch.cholesky_solve(WD.t(), L).t()  # W D (H + λI)^-1
    if not bool(torch.isfinite(corr).all()):
        return W
    return W + alpha * corr


def observe_paired(ctx, stage: list[str], fp_block: torch.nn.Module,
                   fp_hidden: list[torch.Tensor]) -> dict[str, PairedHessianObserver]:
    """Paired Hessians (H, D) of the named linears of one block: every calibration batch runs through
    ``fp_block`` (an unquantized copy of the block) on the full-precision inputs ``fp_hidden`` (list of
    [B, L, H]) and through ``ctx.block`` (as quantized so far) on the quantized inputs ``ctx.inputs``;
    each forward stops once every named linear has seen its input."""
    from ..driver import _StopForward

    inp = ctx.inputs
    fp_modules = find_linears(fp_block)
    observers = {n: PairedHessianObserver(ctx.in_features(n), ctx.device) for n in stage}
    fp_seen: dict[str, torch.Tensor] = {}
    pending: set[str] = set()

    def capture_fp(name):
        def fn(module, args, out):
            fp_seen[name] = args[0].detach()
            pending.discard(name)
            if not pending:
                raise _StopForward
        return fn

    def observe_q(name):
        def fn(module, args, out):
            observers[name].update(args[0], fp_seen.pop(name))
            pending.discard(name)
            if not pending:
                raise _StopForward
        return fn

    handles = [fp_modules[n].register_forward_hook(capture_fp(n)) for n in stage]
    handles += [ctx.modules[n].register_forward_hook(observe_q(n)) for n in stage]
    try:
        with torch.no_grad():
            for i in range(len(inp.hidden)):
                for block, hidden in ((fp_block, fp_hidden[i]), (ctx.block, inp.hidden[i])):
                    pending.update(stage)
                    try:
                        block(hidden, *inp.args[i], **inp.kwargs[i])
                    except _StopForward:
                        pass
    finally:
        for h in handles:
            h.remove()
    return observers


# ---- the maths -----------------------------------------------------------------------------------


def _inverse_cholesky_upper(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, dict[str, Any]]:
    """Upper Cholesky factor U of (H + λI)^-1, raising λ until every factorisation succeeds.

    λ starts at ``damp * mean(diag H)`` and is multiplied by 10 on each failure; one warning says which
    dampening finally worked.
    Returns U (finite) and a record of the dampening actually used. As a last resort (H hopeless,
    e.g. not finite), the identity is used, which makes GPTQ round to nearest.
    """
    k = H.shape[0]
    diag_mean = H.diagonal().abs().mean().item() if k else 1.0
    if not math.isfinite(diag_mean) or diag_mean <= 0:
        diag_mean = 1.0
    rel = damp if damp > 0 else 0.0
    eye = torch.eye(k, dtype=H.dtype, device=H.device)
    finite = bool(torch.isfinite(H).all())
    tries = 0
    if finite:
        while tries < _MAX_DAMP_TRIES:
            lam = rel * diag_mean
            # With J the order-reversing permutation and J(H + λI)J = L Lᵀ (lower Cholesky), the upper
            # Cholesky factor of (H + λI)^-1 is U = J L^-1 J: one factorisation and one triangular
            # inverse, instead of factorise, invert, factorise again.
            L, info = torch.linalg.cholesky_ex((H + lam * eye).flip(0, 1))
            if int(info) == 0:
                U = torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1)
                del L
                if bool(torch.isfinite(U).all()) and bool((U.diagonal() > 0).all()):
                    if tries:
                        log.warning(
                            "gptq: Hessian not positive definite with the requested dampening; "
                            "succeeded with damp=%.3g (x mean diagonal) after %d increase(s)", rel, tries
                        )
                    return U, {"damp": rel, "damp_abs": lam, "damp_increases": tries, "fallback": False}
            tries += 1
            new_rel = rel * _DAMP_STEP if rel > 0 else 1e-4
            log.debug(
                "gptq: Cholesky factorisation failed with damp=%.3g (x mean diagonal); retrying with damp=%.3g",
                rel, new_rel,
            )
            rel = new_rel
    log.warning(
        "gptq: Hessian unusable (%s); falling back to an identity Hessian (round to nearest) for this layer",
        "not finite" if not finite else f"still not positive definite at damp={rel:.3g}",
    )
    return eye.clone(), {"damp": rel, "damp_abs": float("nan"), "damp_increases": tries, "fallback": True}


def _block_size_for(block_size: int, group: int, in_features: int) -> int:
    """A block size for which every group start is either a block start or lies with its whole
    group inside one block, so a grid is always fitted on fully updated weights."""
    block_size = max(1, int(block_size))
    if group >= in_features or block_size % group == 0 or group % block_size == 0:
        return block_size
    if group < block_size:
        return (block_size // group) * group
    return group


def error_feedback_sweep(
    WT: torch.Tensor, U: torch.Tensor, quantize_column: Callable[[int, torch.Tensor], torch.Tensor], block_size: int,
) -> float:
    """GPTQ's column sweep with error feedback, for any per-column quantizer.

    WT [K, N] is the weight transposed (one contiguous row per column of W, in sweep order), updated in
    place; U [K, K] is the upper Cholesky factor of the damped inverse Hessian in the same order (see
    :func:`_inverse_cholesky_upper`). For j = 0..K-1, ``quantize_column(j, w)`` gets column j as corrected
    by the errors of columns 0..j-1 (w [N], a view into WT: do not modify it) and returns its quantized
    value [N]; the scaled error (w - q) / U_jj is spread over the rest of the block with row j of U and
    each block's errors over all later columns at once (lazy batch update, one matmul). ``quantize_column``
    may read WT[j:] (e.g. to fit a grid on the updated weights). -> the GPTQ loss, sum of (w - q)^2 / U_jj^2 / 2.
    """
    k, n = WT.shape
    loss = torch.zeros((), dtype=torch.float32, device=WT.device)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        cnt = i2 - i1
        W1 = WT[i1:i2]  # a view: updated in place
        U1 = U[i1:i2, i1:i2]
        E1 = torch.empty(cnt, n, dtype=torch.float32, device=WT.device)
        for i in range(cnt):
            w = W1[i]
            err = torch.sub(w, quantize_column(i1 + i, w), out=E1[i])
            err.div_(U1[i, i])
            if i + 1 < cnt:
                W1[i + 1 :].addr_(U1[i, i + 1 :], err, alpha=-1.0)
        loss += E1.square().sum() * 0.5
        if i2 < k:
            WT[i2:].addmm_(U[i1:i2, i2:].t(), E1, alpha=-1.0)
    return float(loss)


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: QuantSpec,
    damp: float = 0.01,
    block_size: int = 128,
    static_groups: bool = False,
    mse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """GPTQ of one layer: W [N, K], H [K, K] -> codes [N, K] int32, scales [G, N] fp32 (fp16-exact),
    zeros [G, N] fp32 (integers), g_idx [K] int32, info (dict).

    Act-order is ``spec.act_order``. ``dequantize_codes(codes, scales, zeros, g_idx)`` is the quantized
    weight. Works on W's device; neither input is modified.
    """
    t0 = time.perf_counter()
    device = W.device
    n, k = W.shape
    if H.shape != (k, k):
        raise ValueError(f"Hessian of shape {tuple(H.shape)} does not match weight {tuple(W.shape)}")
    bits, sym, maxq = spec.bits, spec.sym, spec.maxq
    gs = spec.group_size_for(k)
    n_groups = num_groups(k, spec.group_size)

    W = W.detach().to(dtype=torch.float32).clone()
    H = H.detach().to(device=device, dtype=torch.float32).clone()
    H = 0.5 * (H + H.t())  # symmetric by construction; guards against accumulated asymmetry

    # 1. dead columns
    diag = H.diagonal()
    dead = diag == 0
    n_dead = int(dead.sum())
    if n_dead:
        idx = dead.nonzero().squeeze(1)
        H[idx, idx] = 1.0
        W[:, idx] = 0.0

    # static groups: every grid fitted now, on the original column order
    if static_groups:
        st_scales, st_zeros = fit_groups(W, bits, spec.group_size, sym, mse)  # [G, N]

    # 2. act-order
    perm = None
    if spec.act_order:
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]

    # 3./4. dampening and the inverse Cholesky factor
    U, damp_info = _inverse_cholesky_upper(H, damp)
    del H

    # group of each position in the sweep order
    if static_groups:
        orig = perm if perm is not None else torch.arange(k, device=device)
        sweep_group = (orig // gs).tolist()
        scales, zeros = st_scales, st_zeros
    else:
        sweep_group = [j // gs for j in range(k)]
        scales = torch.empty(n_groups, n, dtype=torch.float32, device=device)
        zeros = torch.empty(n_groups, n, dtype=torch.float32, device=device)

    # The sweep works on W transposed ([K, N], one contiguous row per column of W), so that reading a
    # column and the rank-1 updates of the rest of a block run over contiguous memory.
    WT = W.t().contiguous()
    del W
    QT = torch.empty(k, n, dtype=torch.float32, device=device)  # codes, sweep order
    s = z = None  # the current group's scale and zero, [N] each

    def quantize_column(j: int, w: torch.Tensor) -> torch.Tensor:  # w [N] -> its grid value [N]
        nonlocal s, z
        g = sweep_group[j]
        if static_groups:
            s, z = scales[g], zeros[g]
        elif j % gs == 0:
            # entering group g: fit its grid on the weights as updated so far (at a block start,
            # WT[j:] already carries all earlier errors; otherwise the group lies inside the sweep's
            # block, see _block_size_for)
            s, z = fit_range(WT[j : min(j + gs, k)].t(), bits, sym, mse)
            scales[g], zeros[g] = s, z
        q = torch.clamp(torch.round(w / s) + z, 0, maxq)
        QT[j] = q
        return s * (q - z)

    B = _block_size_for(block_size, gs, k)
    loss = error_feedback_sweep(WT, U, quantize_column, B)

    Q = QT.t()
    if perm is not None:
        inv = torch.argsort(perm)
        Q = Q[:, inv]
        if static_groups:
            g_idx = group_index(k, spec.group_size, device=device)
        else:
            g_idx = (inv // gs).to(torch.int32)  # original column c sat at sweep position inv[c]
    else:
        g_idx = group_index(k, spec.group_size, device=device)

    info = {
        "dead_columns": n_dead,
        "loss": loss,
        "block_size": B,
        "seconds": time.perf_counter() - t0,
        **damp_info,
    }
    return Q.to(torch.int32), scales, zeros, g_idx.to(torch.int32), info


# ---- the plugin ----------------------------------------------------------------------------------


def _opt(options: dict[str, Any], key: str, default: Any) -> Any:
    value = options.get(key)
    return default if value is None else value


@register_method
class GPTQ(Method):
    """Options: damp (0.01), static_groups (False), true_sequential (True), block_size (128), mse (False),
    fp_targets (0: off; alpha in (0, 1]: fit each layer to the full-precision model's outputs, see
    :func:`fp_target_weight`; costs a second stream of block inputs and one block copy in memory)."""

    name = "gptq"
    needs_calibration = True
    sequential = True
    option_names = ("damp", "static_groups", "true_sequential", "block_size", "mse", "fp_targets")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.damp = float(_opt(options, "damp", 0.01))
        self.static_groups = bool(_opt(options, "static_groups", False))
        self.sequential = bool(_opt(options, "true_sequential", True))
        self.block_size = int(_opt(options, "block_size", 128))
        self.mse = bool(_opt(options, "mse", False))
        self.fp_targets = float(_opt(options, "fp_targets", 0.0))
        if not 0.0 <= self.fp_targets <= 1.0:
            raise SpecError(f"gptq option fp_targets={self.fp_targets} is out of range: give a weight in [0, 1]")
        # the full-precision model's inputs of the next block (list of [B, L, H]), when fp_targets > 0
        self._fp_hidden: list[torch.Tensor] | None = None
        self._fp_index = -1

    def make_observer(self, name, in_features, spec, device):
        return HessianObserver(in_features, device)

    # ---- full-precision targets -----------------------------------------------------------------------
    def quantize_block(self, ctx) -> None:
        if self.fp_targets <= 0 or ctx.inputs is None:
            return super().quantize_block(ctx)
        from ..driver import _block_output

        inp = ctx.inputs
        if self._fp_hidden is None or self._fp_index != ctx.index:
            if ctx.index > 0:
                log.warning("gptq: no full-precision stream for block %d (resumed run): it starts from the "
                            "quantized model's inputs", ctx.index)
            self._fp_hidden = [h.clone() for h in inp.hidden]
        fp_hidden = self._fp_hidden
        fp_block = copy.deepcopy(ctx.block)  # the block before any of its linears is quantized
        stages = ctx.stages() if self.sequential else [list(ctx.linears)]
        for stage in stages:
            observers = observe_paired(ctx, stage, fp_block, fp_hidden)
            for n in stage:
                obs = observers.pop(n)
                W = fp_target_weight(ctx.weight(n), obs.H, obs.D, self.damp, self.fp_targets)
                ctx.set_result(n, self._quantize(ctx.qualified(n), W, obs.H, ctx.spec(n)))
                del obs
        with torch.no_grad():  # the full-precision inputs of the next block
            self._fp_hidden = [_block_output(fp_block(h, *inp.args[i], **inp.kwargs[i]))
                               for i, h in enumerate(fp_hidden)]
        self._fp_index = ctx.index + 1
        del fp_block

    def quantize_layer(self, name, weight, observer, spec) -> QuantizedWeight:
        k = weight.shape[1]
        if observer is None or getattr(observer, "n", 0) == 0:
            log.warning("gptq: no calibration inputs reached %s; quantizing it with an identity Hessian", name)
            H = torch.eye(k, dtype=torch.float32, device=weight.device)
        else:
            H = observer.H
        return self._quantize(name, weight, H, spec)

    def _quantize(self, name, weight, H, spec) -> QuantizedWeight:
        codes, scales, zeros, g_idx, info = gptq_quantize(
            weight, H, spec, damp=self.damp, block_size=self.block_size, static_groups=self.static_groups, mse=self.mse
        )
        if info["dead_columns"]:
            log.info("gptq: %s: %d input column(s) never saw input", name, info["dead_columns"])
        log.debug("gptq: %s: loss %.4g, damp %.3g, %.2fs", name, info["loss"], info["damp"], info["seconds"])
        return pack_uniform(codes, scales, zeros, spec, g_idx=g_idx if spec.act_order else None, layer=name)
