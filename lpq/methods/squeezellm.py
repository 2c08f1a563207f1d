"""SqueezeLLM (Kim et al., 2023): sensitivity-weighted per-row codebooks plus a dense-and-sparse split.

Maths (pure functions, any device):
  :func:`fisher_diagonal`       squared gradients of the LM loss, per quantized linear, in float32
  :func:`split_dense_sparse`    which weights leave the dense part: outliers and most sensitive ones
  :func:`weighted_kmeans_rows`  per-row weighted 1-D k-means, vectorised over all rows at once
  :func:`squeezellm_quantize`   weight [N, K] (+ sensitivity) -> indices, codebook, sparse mask
  :func:`lut_gptq_sweep`        GPTQ's column sweep with error feedback onto fixed per-row codebooks

The plugin (:class:`SqueezeLLM`) computes the Fisher diagonal once in ``prepare`` and packs each linear
in the ``squeezellm`` format. Memory: the Fisher diagonal is one float32 per quantized weight, kept on
the CPU (twice the fp16 model). Option ``fisher_mode``: ``whole`` backpropagates through the whole model
on the device (the model, the quantized weights' gradients and checkpointed activations must fit),
``blocks`` holds one decoder block on the device at a time (see :mod:`lpq.methods.fisher`), ``auto``
(default) takes ``whole`` when it fits in the device's free memory.

Option ``gptq`` (on by default; not in the paper, whose assignment is nearest-centroid: ``gptq=false``;
on SmolLM2 3-bit it lowered perplexity from 89.3 to 44.2 dense and from 43.9 to 33.8 with 0.45 %
sparse, bench/RESULTS.md): the codebooks are fitted as above, then the
weights are assigned to them column by column with GPTQ's error feedback on the layer's input Hessian
(the rounding error of each column is spread over the columns not yet assigned, so the layer's output
error, not each weight's, is what is minimised). It needs the input activations (one Hessian
[K, K] per linear, quantized stage by stage as GPTQ's true-sequential order) and costs one sweep per
linear; the stored format is the same.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..errors import LpqError, SpecError
from ..formats import QuantizedWeight
from ..formats.squeezellm import SQUEEZELLM_BITS, pack_squeezellm
from ..spec import QuantSpec
from . import Method, register_method
from .fisher import FISHER_MODES, check_fisher_mode, fisher_diagonal  # noqa: F401  (fisher_diagonal: public here too)
from .gptq import HessianObserver, _inverse_cholesky_upper, error_feedback_sweep

log = logging.getLogger("lpq.squeezellm")


# ---- options ---------------------------------------------------------------------------------------


def check_percent(name: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise SpecError(f"--{name} {value!r} is not a number: give a percentage in [0, 100)") from None
    if not 0.0 <= v < 100.0:
        raise SpecError(f"--{name} {value} is out of range: give a percentage in [0, 100) (e.g. 0.40 for 0.40 %)")
    return v


def check_bits(spec: QuantSpec, layer: str = "") -> None:
    if spec.bits not in SQUEEZELLM_BITS:
        where = f" (layer {layer})" if layer else ""
        raise SpecError(f"squeezellm does not support --bits {spec.bits}{where}: choose 2, 3 or 4")


# ---- the maths -------------------------------------------------------------------------------------


def weighted_objective(w: torch.Tensor, weights: torch.Tensor, centroids: torch.Tensor,
                       assign: torch.Tensor) -> torch.Tensor:
    """Σ weights · (w - centroids[assign])², summed over each row -> [N] (float64)."""
    err = w - torch.gather(centroids, 1, assign)
    return (weights.double() * err.double() ** 2).sum(dim=1)


def _assign(w: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid of each weight; centroids [N, k] sorted ascending -> [N, M] int64."""
    mid = ((centroids[:, 1:] + centroids[:, :-1]) * 0.5).contiguous()  # [N, k-1] decision boundaries
    return torch.searchsorted(mid, w.contiguous())


def weighted_kmeans_rows(
    w: torch.Tensor, weights: torch.Tensor | None, k: int, iters: int = 50, tol: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row weighted 1-D k-means (Lloyd), all rows at once.

    w [N, M], weights [N, M] >= 0 (None: all ones; a row whose weights sum to 0 is clustered unweighted)
    -> (centroids [N, k] sorted ascending, assign [N, M] int64: each weight's nearest centroid).

    Starts from the weighted (j + 0.5) / k quantiles of each row (deterministic); stops after ``iters``
    updates, or as soon as no weight changes cluster (or, with ``tol`` > 0, the objective improves by at
    most ``tol`` relatively). Empty clusters keep their centroid. Every step never increases the
    weighted objective.

    In 1-D the clusters of sorted centroids are intervals between midpoints. So each row is sorted once,
    and every iteration only binary-searches the k - 1 midpoints in the sorted row and reads the
    clusters' weight sums and weighted sums as differences of prefix sums (float64): O(N k log M) per
    iteration instead of O(N M); the O(N M) nearest-centroid assignment is made once, at the end.
    """
    n, m = w.shape
    w = w.float()
    if weights is None:
        weights = torch.ones_like(w)
    weights = weights.float()
    dead = weights.sum(dim=1) <= 0
    if bool(dead.any()):
        weights = torch.where(dead[:, None], torch.ones_like(weights), weights)
    sorted_w, order = torch.sort(w, dim=1)
    sw = torch.gather(weights, 1, order).double()
    zero = torch.zeros(n, 1, dtype=torch.float64, device=w.device)
    cum_w = torch.cat([zero, torch.cumsum(sw, dim=1)], dim=1)  # [N, M+1]
    cum_ww = torch.cat([zero, torch.cumsum(sw * sorted_w.double(), dim=1)], dim=1)
    cum_www = torch.cat([zero, torch.cumsum(sw * sorted_w.double() ** 2, dim=1)], dim=1) if tol > 0 else None
    del sw

    # initial centroids: weighted quantiles
    total = cum_w[:, -1:]
    targets = total * (torch.arange(k, device=w.device, dtype=torch.float64) + 0.5) / k  # [N, k]
    pos = torch.searchsorted(cum_w[:, 1:].contiguous(), targets.contiguous()).clamp(max=m - 1)
    centroids = torch.gather(sorted_w, 1, pos)

    first = torch.zeros(n, 1, dtype=torch.int64, device=w.device)
    last = torch.full((n, 1), m, dtype=torch.int64, device=w.device)

    def bounds(c: torch.Tensor) -> torch.Tensor:
        # cluster j holds the sorted positions [b_j, b_{j+1}); a weight equal to a midpoint goes to the
        # lower cluster, as in _assign
        mid = ((c[:, 1:] + c[:, :-1]) * 0.5).contiguous()
        return torch.cat([first, torch.searchsorted(sorted_w, mid, right=True), last], dim=1)  # [N, k+1]

    def cluster_sums(cum: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.gather(cum, 1, b[:, 1:]) - torch.gather(cum, 1, b[:, :-1])

    b = bounds(centroids)
    prev_obj = None
    for _ in range(iters):
        den = cluster_sums(cum_w, b)
        num = cluster_sums(cum_ww, b)
        new = torch.where(den > 0, num / den.clamp(min=1e-300), centroids.double()).float()
        # the exact means are ordered; keep them so against float rounding
        centroids = torch.cummax(new, dim=1).values
        new_b = bounds(centroids)
        changed = bool((new_b != b).any())
        b = new_b
        if not changed:
            break
        if cum_www is not None:
            c = centroids.double()
            obj = float((cluster_sums(cum_www, b) - 2 * c * cluster_sums(cum_ww, b) + c * c * cluster_sums(cum_w, b)).sum())
            if prev_obj is not None and prev_obj - obj <= tol * max(prev_obj, 1e-30):
                break
            prev_obj = obj
    return centroids, _assign(w, centroids)


def outlier_scores(w: torch.Tensor) -> torch.Tensor:
    """|w - row mean| over the row's standard deviation: how far out a weight lies relative to its
    row's typical range (a raw magnitude would only ever pick the widest rows)."""
    mean = w.mean(dim=1, keepdim=True)
    std = w.std(dim=1, keepdim=True).clamp(min=1e-12)
    return (w - mean).abs() / std


def _count(percent: float, numel: int) -> int:
    return min(numel, int(round(percent / 100.0 * numel)))


def split_dense_sparse(
    w: torch.Tensor, fisher: torch.Tensor | None, outliers: float, sensitive: float
) -> torch.Tensor:
    """-> sparse mask [N, K] bool: the ``outliers`` % of the layer's weights that lie farthest out
    relative to their row (:func:`outlier_scores`), plus the ``sensitive`` % of the rest with the
    largest Fisher values. ``0, 0`` gives an all-False mask (dense only)."""
    n, k = w.shape
    mask = torch.zeros(n, k, dtype=torch.bool, device=w.device)
    n_out = _count(outliers, n * k)
    if n_out:
        top = torch.topk(outlier_scores(w.float()).flatten(), n_out, sorted=False).indices
        mask.view(-1)[top] = True
    n_sens = _count(sensitive, n * k)
    if n_sens:
        if fisher is None:
            raise SpecError("--sensitive needs the Fisher sensitivities: pass --sensitive 0 with fisher off")
        f = fisher.float().flatten().masked_fill(mask.view(-1), float("-inf"))
        top = torch.topk(f, min(n_sens, n * k - n_out), sorted=False).indices
        mask.view(-1)[top] = True
    return mask


def squeezellm_quantize(
    weight: torch.Tensor,
    fisher: torch.Tensor | None,
    bits: int,
    outliers: float = 0.40,
    sensitive: float = 0.05,
    iters: int = 50,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [N, K] (+ Fisher [N, K]) -> (idx [N, K] int64, lut [N, 2**b] fp16, sparse mask [N, K],
    the fake-quantized weight [N, K] float32 exactly as the squeezellm format dequantizes it).

    The sparse weights get zero k-means weight (they do not pull the codebooks); after clustering the
    codebooks are rounded to fp16 and every dense weight re-assigned to its nearest stored centroid.
    """
    w = weight.float()
    mask = split_dense_sparse(w, fisher, outliers, sensitive)
    kweights = fisher.float() if fisher is not None else torch.ones_like(w)
    kweights = kweights.masked_fill(mask, 0.0)
    centroids, _ = weighted_kmeans_rows(w, kweights, 1 << bits, iters)
    lut = centroids.to(torch.float16)
    lut32 = torch.cummax(lut.float(), dim=1).values  # fp16 rounding keeps the order; make it certain
    lut = lut32.to(torch.float16)
    idx = _assign(w, lut32)
    if bool(mask.any()):
        nearest_zero = lut32.abs().argmin(dim=1, keepdim=True).expand_as(idx)
        idx = torch.where(mask, nearest_zero, idx)
    fake = torch.gather(lut32, 1, idx)
    fake = torch.where(mask, w.to(torch.float16).float(), fake)
    return idx, lut, mask, fake


def lut_gptq_sweep(
    weight: torch.Tensor, hessian: torch.Tensor, lut: torch.Tensor, keep: torch.Tensor | None = None,
    damp: float = 0.01, block_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Assign weight [N, K] to fixed per-row codebooks lut [N, C] (sorted ascending) column by column,
    in order of decreasing input energy (H_jj), with GPTQ's error feedback on the input Hessian
    H [K, K]: after column j is rounded, its error e / U_jj is subtracted from the later columns through
    the inverse Cholesky factor U of H (lazy block updates of ``block_size`` columns: the sweep is
    :func:`lpq.methods.gptq.error_feedback_sweep`, each column rounded to its rows' nearest centroids).
    Positions in ``keep`` [N, K] bool are stored exactly (fp16) instead: their error is only fp16 rounding.

    -> (idx [N, K] int64 into each row's codebook; at ``keep`` the centroid nearest 0, as the format
    stores them, fake [N, K] float32: the weight the squeezellm format dequantizes to, info dict).
    Columns without input (H_jj = 0) get weight 0 before rounding, as GPTQ treats them.
    """
    n, k = weight.shape
    device = weight.device
    if hessian.shape != (k, k):
        raise ValueError(f"Hessian of shape {tuple(hessian.shape)} does not match weight {tuple(weight.shape)}")
    lut32 = lut.to(device=device, dtype=torch.float32)
    W = weight.detach().to(torch.float32).clone()
    H = hessian.detach().to(device=device, dtype=torch.float32).clone()
    H = 0.5 * (H + H.t())
    dead = H.diagonal() == 0
    if bool(dead.any()):
        d = dead.nonzero().squeeze(1)
        H[d, d] = 1.0
        W[:, d] = 0.0
    keep = torch.zeros(n, k, dtype=torch.bool, device=device) if keep is None else keep.to(device)
    perm = torch.argsort(H.diagonal(), descending=True, stable=True)  # no groups: any order can be stored
    W, keep, H = W[:, perm], keep[:, perm], H[perm][:, perm]
    U, info = _inverse_cholesky_upper(H, damp)
    del H
    mid = ((lut32[:, 1:] + lut32[:, :-1]) * 0.5).contiguous()  # [N, C-1] decision boundaries
    KT = keep.t().contiguous()  # [K, N] in sweep order, as the swept W^T
    IT = torch.empty(k, n, dtype=torch.int64, device=device)  # [K, N] codebook indices, sweep order
    QT = torch.empty(k, n, dtype=torch.float32, device=device)  # [K, N] stored values, sweep order

    def quantize_column(j: int, w: torch.Tensor) -> torch.Tensor:  # w [N]: column j, corrected so far
        idx = torch.searchsorted(mid, w[:, None]).squeeze(1)  # [N] nearest centroid of each row
        q = torch.gather(lut32, 1, idx[:, None]).squeeze(1)
        q = torch.where(KT[j], w.to(torch.float16).float(), q)  # kept: stored exactly, fp16 rounding only
        IT[j], QT[j] = idx, q
        return q

    # on W^T [K, N]: one contiguous row per column of W
    loss = error_feedback_sweep(W.t().contiguous(), U, quantize_column, max(1, int(block_size)))
    inv = torch.argsort(perm)
    idx = IT.t()[:, inv].contiguous()
    fake = QT.t()[:, inv].contiguous()
    keep = keep[:, inv]
    if bool(keep.any()):
        nearest_zero = lut32.abs().argmin(dim=1, keepdim=True).expand_as(idx)
        idx = torch.where(keep, nearest_zero, idx)
    info.update(loss=loss, dead_columns=int(dead.sum()))
    return idx, fake, info


def squeezellm_gptq_quantize(
    weight: torch.Tensor, hessian: torch.Tensor, fisher: torch.Tensor | None, bits: int,
    outliers: float = 0.40, sensitive: float = 0.05, iters: int = 50, damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """As :func:`squeezellm_quantize` (same split, same Fisher-weighted codebooks fitted on the original
    weights), but the weights are assigned with :func:`lut_gptq_sweep`. -> (idx, lut fp16, sparse mask,
    fake [N, K] float32 as the format dequantizes it; its values at the mask are the sparse values)."""
    w = weight.float()
    mask = split_dense_sparse(w, fisher, outliers, sensitive)
    kweights = fisher.float() if fisher is not None else torch.ones_like(w)
    kweights = kweights.masked_fill(mask, 0.0)
    centroids, _ = weighted_kmeans_rows(w, kweights, 1 << bits, iters)
    lut32 = torch.cummax(centroids.to(torch.float16).float(), dim=1).values
    idx, fake, _ = lut_gptq_sweep(w, hessian, lut32, mask, damp)
    return idx, lut32.to(torch.float16), mask, fake


# ---- the plugin ------------------------------------------------------------------------------------


def _opt(options: dict[str, Any], key: str, default: Any) -> Any:
    value = options.get(key)
    return default if value is None else value


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, str):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise SpecError(f"--{name} {value!r} is not a yes/no value: use true or false")
    return bool(value)


@register_method
class SqueezeLLM(Method):
    """Options: outliers (0.40 %), sensitive (0.05 %), iters (50), fisher (True), fisher_mode (auto,
    whole or blocks: how the Fisher is computed; the same sensitivities either way), gptq (True:
    assign the weights with GPTQ's error feedback, see the module docstring; False: nearest centroid,
    as the paper) and damp (0.01, its
    dampening)."""

    name = "squeezellm"
    needs_calibration = True
    sequential = False
    option_names = ("outliers", "sensitive", "iters", "fisher", "fisher_mode", "gptq", "damp")

    def check_spec(self, spec: QuantSpec) -> None:
        check_bits(spec)

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.fisher = _as_bool("fisher", _opt(options, "fisher", True))
        self.fisher_mode = check_fisher_mode(_opt(options, "fisher_mode", "auto"))
        self.outliers = check_percent("outliers", _opt(options, "outliers", 0.40))
        if not self.fisher and options.get("sensitive") is None:
            self.sensitive = 0.0  # the default sensitive share needs Fisher; unweighted means none
        else:
            self.sensitive = check_percent("sensitive", _opt(options, "sensitive", 0.05))
        if not self.fisher and self.sensitive > 0:
            raise SpecError("--sensitive needs the Fisher sensitivities: pass --sensitive 0 with fisher off")
        try:
            self.iters = int(_opt(options, "iters", 50))
        except (TypeError, ValueError):
            raise SpecError(f"--iters {options.get('iters')!r} is not an integer") from None
        if self.iters < 0:
            raise SpecError(f"--iters {self.iters} is negative: give the k-means iteration cap (e.g. 50)")
        self.gptq = _as_bool("gptq", _opt(options, "gptq", True))
        try:
            self.damp = float(_opt(options, "damp", 0.01))
        except (TypeError, ValueError):
            raise SpecError(f"--damp {options.get('damp')!r} is not a number (e.g. 0.01)") from None
        if not self.damp > 0:
            raise SpecError(f"--damp {self.damp} must be positive (e.g. 0.01)")
        # data: the Fisher needs gradients on it; the gptq sweep needs each linear's input Hessian,
        # taken stage by stage (each stage sees the already quantized earlier ones, as GPTQ)
        self.needs_calibration = self.fisher or self.gptq
        self.sequential = self.gptq
        self._fisher: dict[str, torch.Tensor] = {}
        self._run = None

    def _record(self) -> dict[str, Any]:
        rec = {"outliers": self.outliers, "sensitive": self.sensitive, "iters": self.iters, "fisher": self.fisher}
        if self.gptq:
            rec.update(gptq=True, damp=self.damp)
        return rec

    def make_observer(self, name, in_features, spec, device):
        return HessianObserver(in_features, device) if self.gptq else None

    def prepare(self, run) -> None:
        self._run = run
        for name, spec in list(run.specs.items()):
            check_bits(spec, name)
            # the saved config rebuilds each module from its spec: the format is squeezellm, per row
            run.specs[name] = spec.replace(format="squeezellm", group_size=-1, act_order=False,
                                           options={**(spec.options or {}), **self._record()})
        if hasattr(run, "restore_saved_specs"):
            run.restore_saved_specs()  # --resume: saved blocks keep their data-dependent specs
        if self.fisher:
            if run.calib_tokens is None:
                raise LpqError("squeezellm needs calibration data for its Fisher sensitivities (or fisher=False)")
            log.info("squeezellm: Fisher sensitivities over %d sequences", run.calib_tokens.shape[0])
            self._fisher = fisher_diagonal(run.model, run.calib_tokens, list(run.specs), run.device,
                                           getattr(run.opts, "calib_batch_size", 1), mode=self.fisher_mode)

    def quantize_layer(self, name, weight, observer, spec) -> QuantizedWeight:
        check_bits(spec, name)
        fisher = None
        if self.fisher:
            fisher = self._fisher.pop(name, None)
            if fisher is None:
                raise LpqError(f"squeezellm has no Fisher sensitivities for {name}: prepare() was not run")
            fisher = fisher.to(weight.device)
        if self.gptq:
            if observer is None or observer.n == 0:
                raise LpqError(f"squeezellm gptq=true has no input statistics for {name}: it needs calibration data")
            idx, lut, mask, fake = squeezellm_gptq_quantize(weight, observer.H, fisher, spec.bits, self.outliers,
                                                            self.sensitive, self.iters, self.damp)
            kept = fake  # the sparse values are the swept weights at the mask, as stored
        else:
            idx, lut, mask, _ = squeezellm_quantize(weight, fisher, spec.bits, self.outliers, self.sensitive, self.iters)
            kept = weight
        spec = spec.replace(options={**(spec.options or {}), **self._record()})
        qw = pack_squeezellm(idx, lut, mask, kept, spec, layer=name)
        if self._run is not None and name in self._run.specs:
            self._run.specs[name] = qw.spec  # what config.json records: format and nnz of this module
        return qw
