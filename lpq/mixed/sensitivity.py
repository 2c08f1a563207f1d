"""How much each quantized linear's weights matter to the loss: Ω_i, per weight.

Three estimates, all normalised by the layer's number of weights n_i (HAWQ-v2's "average trace"):

  hutchinson  Ω_i = tr(∇²_{W_i} L) / n_i, the trace of the diagonal block of the loss Hessian that
              belongs to W_i, by Hutchinson's estimator: tr(A) = E[vᵀ A v] for random v with
              E[v vᵀ] = I (Rademacher ±1 entries). One Hessian-vector product (a second backward
              through the first one's graph) with a probe over *all* quantized weights gives every
              layer's estimate at once: E[v_iᵀ (H v)_i] = tr(H_ii), since the probe entries of
              different layers are independent with mean zero.
  fisher      Ω_i = mean over batches of ||∇_{W_i} L||² / n_i, the trace of the empirical Fisher
              (squared gradients): one backward per batch, no second-order pass.
  gptq        Ω_i = tr(H_x,i) / K_i = 2 E||x||² / K_i, the mean diagonal of layer i's input Hessian
              (what GPTQ collects): it prices the *layer output* error, not the loss, so it is blind to
              how much later layers amplify an error. No backward at all.

The loss is the causal LM loss on the calibration windows. The gradient passes run on the work
device in float32 (a float16 / bfloat16 model is converted for the pass and back, which is exact),
with attention in its plain math form (fused attention kernels have no second derivative).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from ..errors import SpecError

KINDS = ("hutchinson", "fisher", "gptq")


@dataclass
class Sensitivity:
    """Ω per layer, and how the estimate built up.

    values:  name -> Ω (raw estimate; Hutchinson's can come out ≤ 0 for a layer whose Hessian block is
             indefinite or tiny: the allocator raises it to a tiny positive floor, plan.usable_sensitivity).
    samples: [S, L] per-sample estimates of Ω (rows: probes for hutchinson, batches for fisher), in the
             order of ``names``; the running mean of the first s rows is the estimate after s samples.
    """

    kind: str
    values: dict[str, float]
    names: list[str] = field(default_factory=list)
    samples: torch.Tensor | None = None
    seconds: float = 0.0
    detail: dict = field(default_factory=dict)

    def stability(self, rtol: float = 0.1) -> dict:
        """How the estimates settle: per-layer number of samples after which the running mean stays
        within ``rtol`` of the final value, its median / 90th percentile / max over layers, and the rank
        agreement (Spearman) of estimates from the first and second half of the samples."""
        if self.samples is None or self.samples.shape[0] < 2:
            return {"samples": 0 if self.samples is None else int(self.samples.shape[0])}
        settle = settle_counts(self.samples, rtol)
        s = self.samples.shape[0]
        half = s // 2
        rho = spearman(self.samples[:half].mean(0), self.samples[half:].mean(0))
        st = sorted(settle)
        return {
            "samples": s,
            "rtol": rtol,
            "settle_median": st[len(st) // 2],
            "settle_p90": st[min(len(st) - 1, int(math.ceil(0.9 * len(st))) - 1)],
            "settle_max": st[-1],
            "unsettled_layers": int(sum(1 for x in settle if x >= s)),
            "split_half_spearman": rho,
            "nonpositive_layers": int(sum(1 for v in self.values.values() if v <= 0)),
        }


def settle_counts(samples: torch.Tensor, rtol: float = 0.1) -> list[int]:
    """samples [S, L] -> for each column the least s (1..S) such that the running mean of rows 1..t is
    within rtol·|final| of the final mean for every t ≥ s. A column still moving at the end gets S."""
    s = samples.shape[0]
    x = samples.double()
    running = torch.cumsum(x, 0) / torch.arange(1, s + 1, dtype=torch.float64, device=x.device)[:, None]
    final = running[-1]
    off = (running - final).abs() > rtol * final.abs()  # [S, L]
    out = []
    for col in range(x.shape[1]):
        bad = off[:, col].nonzero()
        out.append(1 if bad.numel() == 0 else min(s, int(bad[-1]) + 2))
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation of two 1-D tensors (ties broken by position)."""
    ra = torch.argsort(torch.argsort(a.double())).double()
    rb = torch.argsort(torch.argsort(b.double())).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else 1.0


# ---- the estimator itself (pure autograd, any differentiable loss) ---------------------------------


def rademacher_like(p: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return (torch.randint(0, 2, p.shape, generator=generator, device=p.device, dtype=torch.int8) * 2 - 1).to(p.dtype)


def hutchinson_probes(grads: list[torch.Tensor], params: list[torch.Tensor], probes: int,
                      generator: torch.Generator) -> torch.Tensor:
    """Hutchinson samples of the trace of each parameter's diagonal Hessian block.

    grads: ∇L w.r.t. ``params``, computed with create_graph=True. -> [probes, len(params)] float64, row j
    = (v_pᵀ (H v)_p for each p) for the j-th Rademacher probe v over all params (one Hessian-vector
    product per probe; the mean of a column is an unbiased estimate of tr(H_pp)).
    """
    out = torch.zeros(probes, len(params), dtype=torch.float64)
    for j in range(probes):
        vs = [rademacher_like(p, generator) for p in params]
        hvs = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=j + 1 < probes, allow_unused=True)
        for i, (v, hv) in enumerate(zip(vs, hvs)):
            out[j, i] = 0.0 if hv is None else float((v * hv).sum(dtype=torch.float64))
    return out


# ---- running the model with gradients ---------------------------------------------------------------


@contextlib.contextmanager
def _gradient_mode(model: nn.Module, names: list[str], device: torch.device) -> Iterator[list[torch.Tensor]]:
    """Parameters on ``device`` in float32 (buffers moved, their dtype kept), eval mode (no dropout),
    gradients only for the named linears' weights, plain-math attention; all restored on exit.
    Yields the weights. (float16/bfloat16 -> float32 -> back is exact.)"""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    was_training = model.training
    saved = {p: (p.device, p.dtype, p.requires_grad) for p in model.parameters()}
    buffers = [(m, k, b.device) for m in model.modules() for k, b in m._buffers.items() if b is not None]
    params = [model.get_submodule(n).weight for n in names]
    try:
        for p in saved:
            p.requires_grad_(False)
            p.data = p.data.to(device=device, dtype=torch.float32 if p.is_floating_point() else p.dtype)
        for m, k, _ in buffers:
            m._buffers[k] = m._buffers[k].to(device)
        model.eval()
        for p in params:
            p.requires_grad_(True)
        with sdpa_kernel([SDPBackend.MATH]):
            yield params
    finally:
        for p in params:
            p.grad = None
        for p, (d, dt, r) in saved.items():
            p.data = p.data.to(device=d, dtype=dt)
            p.requires_grad_(r)
        for m, k, d in buffers:
            m._buffers[k] = m._buffers[k].to(d)
        model.train(was_training)


def _batches(tokens: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, tokens.shape[0], batch_size):
        yield tokens[start : start + batch_size]


def _lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch, labels=batch, use_cache=False).loss


def hutchinson(model: nn.Module, tokens: torch.Tensor, names: list[str], device: str | torch.device = "cpu",
               probes: int = 4, batch_size: int = 1, seed: int = 0) -> Sensitivity:
    """Ω_i = tr(H_ii)/n_i over the LM loss of ``tokens`` [S, L]: per batch one gradient with its graph,
    then ``probes`` Hessian-vector products with fresh Rademacher probes."""
    from ..progress import track

    if probes < 1:
        raise SpecError(f"--probes {probes}: need at least one probe vector")
    dev = torch.device(device)
    t0 = time.perf_counter()
    rows = []
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    with _gradient_mode(model, names, dev) as params:
        sizes = torch.tensor([p.numel() for p in params], dtype=torch.float64)
        for batch in track(list(_batches(tokens, batch_size)), "mixed precision: Hessian traces (Hutchinson)"):
            loss = _lm_loss(model, batch.to(dev))
            grads = torch.autograd.grad(loss, params, create_graph=True)
            rows.append(hutchinson_probes(list(grads), params, probes, gen) / sizes)
            del loss, grads
    samples = torch.cat(rows, 0)
    mean = samples.mean(0)
    return Sensitivity("hutchinson", {n: float(v) for n, v in zip(names, mean)}, list(names), samples,
                       time.perf_counter() - t0, {"probes_per_batch": probes, "batches": len(rows)})


def fisher(model: nn.Module, tokens: torch.Tensor, names: list[str], device: str | torch.device = "cpu",
           batch_size: int = 1) -> Sensitivity:
    """Ω_i = mean over batches of ||∇_{W_i} L||² / n_i (trace of the empirical Fisher, per weight)."""
    from ..progress import track

    dev = torch.device(device)
    t0 = time.perf_counter()
    rows = []
    with _gradient_mode(model, names, dev) as params:
        sizes = torch.tensor([p.numel() for p in params], dtype=torch.float64)
        for batch in track(list(_batches(tokens, batch_size)), "mixed precision: squared gradients (Fisher)"):
            loss = _lm_loss(model, batch.to(dev))
            grads = torch.autograd.grad(loss, params)
            rows.append(torch.tensor([float(g.double().square().sum()) for g in grads], dtype=torch.float64) / sizes)
            del loss, grads
    samples = torch.stack(rows, 0)
    mean = samples.mean(0)
    return Sensitivity("fisher", {n: float(v) for n, v in zip(names, mean)}, list(names), samples,
                       time.perf_counter() - t0, {"batches": len(rows)})


def from_input_energy(energy: dict[str, float], names: list[str], seconds: float = 0.0) -> Sensitivity:
    """The ``gptq`` proxy from the input energies tr(H_x)/K the cost pass collected."""
    missing = [n for n in names if n not in energy]
    if missing:
        raise RuntimeError(f"no input statistics for {missing[:3]}")
    return Sensitivity("gptq", {n: energy[n] for n in names}, list(names), None, seconds, {})


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise SpecError(f"--sensitivity {kind} is not known: choose {', '.join(KINDS)}")
    return kind
