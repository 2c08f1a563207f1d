"""SOLO: AdamW whose two moment estimates live in 2, 3 or 4 bits between steps.

After "Pushing the Limits of Low-Bit Optimizers: A Focus on EMA Dynamics" (Xu et al., 2025), which
names the two ways an exponential moving average (EMA) breaks when its state is re-quantized every step:

* the unsigned second moment v: beta2 = 0.999 moves v by 0.1 % per step, far less than one grid step
  of a 2-4 bit grid, so round-to-nearest leaves it where it was ("signal swamping"), and the small
  entries that decide the largest updates get no levels of a linear grid at all. Here v is quantized
  on a logarithmic grid per block of ``block_size`` entries, levels lo * rho**j (j = 0 .. 2**b - 1,
  from the block's smallest to its largest entry): a fixed relative resolution at every magnitude,
  and each block's extremes are exact because the grid is re-fitted to them at every step.
  Rounding is to the nearest level in the log domain; unbiased stochastic rounding is offered
  (``stochastic=True``) but was worse on the toy problem (its noise on 1/sqrt(v) costs more than
  the swamping it removes);
* the signed first moment m: its re-quantization error enters m every step and decays only as
  beta1**t, so its variance adds up to sigma_q**2 / (1 - beta1**2); a coarser grid (larger sigma_q)
  calls for a smaller beta1 so that fresh gradients outweigh the accumulated noise. m is quantized
  linearly per block (absmax scaling, a symmetric grid with zero: 3 levels at 2 bits, 7 at 3, 15 at
  4) and beta1 defaults to a value per precision (``DEFAULT_BETAS``). Measured on a noisy
  teacher-student MLP (3 seeds, 400 steps, final error / fp32 AdamW's): 4 bits 1.02 at beta1 0.9;
  3 bits 1.18 at 0.9, 1.11 at 0.85, 1.08 at 0.7, 1.04 at 0.5; 2 bits 209 at 0.9, 2.1 at 0.8, 1.26 at
  0.7, 1.13 at 0.5, 1.22 at 0.

Codes are bit-packed into int32 words (lpq's packing: a 3-bit state costs 3 bits per entry) plus one
fp32 absmax per block for m and two fp32 bounds per block for v. Tensors smaller than
``min_quant_numel`` keep fp32 states. The update itself is computed in fp32 from the dequantized
states, exactly as AdamW; only what is kept between steps is low-bit.

Sharded parameters (FSDP's DTensors): each process keeps and updates the states of its own shard only
(``to_local()`` of the parameter and of its gradient), so the blocks of the quantization, and the
fp32 fallback below ``min_quant_numel``, are laid over each process's shard, not over the whole
tensor: states of the same precision with blocks cut at other places (and a shard below the floor kept
in fp32), so a sharded run's curve is close to, not identical with, a one-process SOLO run's. Nothing
is communicated.
"""

from __future__ import annotations

import math

import torch

from ..errors import LpqError
from ..formats.packing import pack_rows, unpack_rows

STATE_BITS = (2, 3, 4)
#: (beta1, beta2) per state precision
DEFAULT_BETAS = {4: (0.9, 0.999), 3: (0.7, 0.999), 2: (0.5, 0.999)}
_PACK_RUN = 32  # codes per packed column: a whole number of packing chunks for 2, 3 and 4 bits


# ---------------------------------------------------------------------------------------------------
# pure maths: block-wise signed linear and unsigned logarithmic quantization of a flat tensor
# ---------------------------------------------------------------------------------------------------
def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """flat x [n] -> [nblocks, block], the tail padded with zeros."""
    n = x.numel()
    pad = (-n) % block
    x = x.reshape(-1).float()
    if pad:
        x = torch.cat([x, x.new_zeros(pad)])
    return x.view(-1, block)


def _round(u: torch.Tensor, stochastic: bool, generator: torch.Generator | None) -> torch.Tensor:
    if not stochastic:
        return torch.round(u)
    noise = torch.rand(u.shape, device=u.device, generator=generator)
    return torch.floor(u + noise)


def quantize_signed(x: torch.Tensor, bits: int, block: int, stochastic: bool = False,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [n] -> (codes [nblocks * block] uint8 in [0, 2**bits - 2], absmax [nblocks] fp32).

    Levels are k * absmax / Q for k in -Q..Q, Q = 2**(bits-1) - 1; code = k + Q.
    Error bound: |x - deq| <= absmax / (2 Q) rounding to nearest, < absmax / Q stochastically.
    """
    qmax = (1 << (bits - 1)) - 1
    xb = _blocks(x, block)
    absmax = xb.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
    k = _round(xb / scale[:, None], stochastic, generator).clamp_(-qmax, qmax)
    return (k + qmax).to(torch.uint8).reshape(-1), absmax


def dequantize_signed(codes: torch.Tensor, absmax: torch.Tensor, bits: int, block: int, n: int) -> torch.Tensor:
    qmax = (1 << (bits - 1)) - 1
    k = codes.view(-1, block).float() - qmax
    return (k * (absmax / qmax)[:, None]).reshape(-1)[:n]


def log_levels(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """[nblocks, 2**bits] levels lo * (hi/lo)**(j / (2**bits - 1)), geometric from lo to hi."""
    j = torch.arange(1 << bits, device=lo.device, dtype=torch.float32) / ((1 << bits) - 1)
    ratio = torch.where(lo > 0, hi / lo.clamp(min=torch.finfo(torch.float32).tiny), torch.ones_like(hi))
    return lo[:, None] * ratio[:, None] ** j[None, :]


def quantize_log(x: torch.Tensor, bits: int, block: int, stochastic: bool = True,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x >= 0 [n] -> (codes [nblocks * block] uint8, lo [nblocks], hi [nblocks]) on a log grid.

    lo/hi are each block's smallest positive and largest entry (an all-zero block gets lo = hi = 0).
    Rounding to nearest happens in the log domain (relative error at most sqrt(rho) - 1 with
    rho = (hi/lo)**(1/(2**bits - 1))); stochastic rounding picks one of the two neighbouring levels
    with the probabilities that make the result unbiased in value.
    """
    top = (1 << bits) - 1
    xb = _blocks(x, block).clamp(min=0)
    hi = xb.amax(dim=1)
    pos = torch.where(xb > 0, xb, torch.full_like(xb, float("inf")))
    lo = pos.amin(dim=1)
    lo = torch.where(torch.isfinite(lo), lo, hi)  # all-zero block: lo = hi = 0
    levels = log_levels(lo, hi, bits)  # [B, L]
    log_rho = torch.log(hi / lo.clamp(min=torch.finfo(torch.float32).tiny)).clamp(min=0) / top  # [B]
    safe = log_rho > 0
    t = torch.log(xb.clamp(min=torch.finfo(torch.float32).tiny) / lo.clamp(min=torch.finfo(torch.float32).tiny)[:, None])
    t = torch.where(safe[:, None], t / torch.where(safe, log_rho, torch.ones_like(log_rho))[:, None],
                    torch.zeros_like(t)).clamp_(0, top)
    if not stochastic:
        codes = torch.round(t)
    else:
        j = torch.floor(t).clamp_(max=top - 1)
        low = levels.gather(1, j.long())
        high = levels.gather(1, (j + 1).clamp(max=top).long())
        gap = high - low
        p_up = torch.where(gap > 0, (xb - low) / torch.where(gap > 0, gap, torch.ones_like(gap)), torch.zeros_like(gap))
        up = torch.rand(xb.shape, device=xb.device, generator=generator) < p_up.clamp_(0, 1)
        codes = j + up.float()
        if top == 0:  # pragma: no cover - 1-bit grids are not offered
            codes = torch.zeros_like(t)
    return codes.to(torch.uint8).reshape(-1), lo, hi


def dequantize_log(codes: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, block: int, n: int) -> torch.Tensor:
    levels = log_levels(lo, hi, bits)  # [B, L]
    return levels.gather(1, codes.view(-1, block).long()).reshape(-1)[:n]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [n] (n a multiple of 32) -> int32 words [bits, n / 32] (3 bits per code at 3 bits)."""
    return pack_rows(codes.view(-1, _PACK_RUN).t().to(torch.int32), bits)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_rows(packed, bits, _PACK_RUN).t().reshape(-1).to(torch.uint8)


# ---------------------------------------------------------------------------------------------------
# the optimizer
# ---------------------------------------------------------------------------------------------------
def _local(t: torch.Tensor | None) -> torch.Tensor | None:
    """The part of ``t`` this process holds: a DTensor's local shard (a view of it under no_grad, so
    in-place updates reach the parameter), else ``t`` itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


class _Flat:
    """Tensors laid end to end, each padded to a whole number of blocks: the flat state of one group.

    Sizes and shapes are those of each tensor's local part (a shard under FSDP).
    """

    def __init__(self, params: list, quantized: bool, block: int) -> None:
        self.params, self.quantized = params, quantized
        self.shapes = [_local(p).shape for p in params]
        self.sizes = [_local(p).numel() for p in params]
        self.padded = [-(-k // block) * block for k in self.sizes]
        self.numel = sum(self.padded)
        self._seg: dict[str, torch.Tensor] = {}

    def segment_ids(self, device: torch.device) -> torch.Tensor:
        key = str(device)
        if key not in self._seg:
            self._seg[key] = torch.repeat_interleave(torch.arange(len(self.sizes), device=device),
                                                     torch.tensor(self.padded, device=device))
        return self._seg[key]

    def gather(self, grads: list) -> torch.Tensor:
        """Per-tensor gradients (None: zeros) -> [numel] fp32 with zero padding; one concatenation."""
        dev = _local(self.params[0]).device
        pieces = []
        for g, k, kp in zip(grads, self.sizes, self.padded):
            pieces.append(torch.zeros(kp, device=dev) if g is None else g.reshape(-1).float())
            if g is not None and kp > k:
                pieces.append(torch.zeros(kp - k, device=dev))
        return torch.cat(pieces)

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """[numel] -> a view of each tensor's entries, in its shape."""
        return [part[:k].view(shape) for part, k, shape in zip(flat.split(self.padded), self.sizes, self.shapes)]


# ---------------------------------------------------------------------------------------------------
class SOLO(torch.optim.Optimizer):
    """AdamW with ``bits``-bit moment states (see the module docstring).

    ``betas=None`` takes the per-precision default. ``stochastic`` rounds the second moment (and,
    with ``stochastic_m``, the first) stochastically, from the optimizer's own generator (seeded by
    ``seed``, saved in ``state_dict``, so a resumed run repeats the same rounding); both default off.
    """

    def __init__(self, params, lr: float = 1e-4, bits: int = 3, betas: tuple[float, float] | None = None,
                 eps: float = 1e-8, weight_decay: float = 0.0, block_size: int = 128, min_quant_numel: int = 1024,
                 stochastic: bool = False, stochastic_m: bool = False, seed: int = 0) -> None:
        if bits not in STATE_BITS:
            raise LpqError(f"--state-bits {bits} is not supported: choose 2, 3 or 4")
        if block_size % _PACK_RUN:
            raise LpqError(f"SOLO block size {block_size} must be a multiple of {_PACK_RUN}")
        if lr <= 0:
            raise LpqError(f"--lr {lr} must be positive")
        betas = tuple(betas) if betas is not None else DEFAULT_BETAS[bits]
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.bits, self.block_size, self.min_quant_numel = bits, block_size, min_quant_numel
        self.stochastic, self.stochastic_m, self.seed = stochastic, stochastic_m, seed
        self._generators: dict[str, torch.Generator] = {}
        self._flat: dict[int, tuple] = {}  # group index -> (the group's tensors, their flat layouts)

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            self._generators[key] = g
        return self._generators[key]

    def _quantized(self, p: torch.Tensor) -> bool:
        return _local(p).numel() >= self.min_quant_numel

    # -- the step: one flat pass per parameter group -------------------------------------------------
    # A LoRA fine-tune has hundreds of small trainable tensors; quantizing each one's states on its own
    # costs ~700 tensor operations per tensor per step (launch-bound on a GPU: seconds per step). So the
    # tensors of a group are laid end to end, each padded to whole blocks (a block never spans two
    # tensors, so the numbers are exactly those of a per-tensor SOLO), and the states of the whole
    # group are updated and re-quantized at once. The flat states live in the state of the group's
    # first tensor of each kind (low-bit, or fp32 for tensors under ``min_quant_numel``).
    def _layouts(self, gi: int, group: dict) -> list[_Flat]:
        key = (gi, tuple(id(p) for p in group["params"]))
        if self._flat.get(gi, (None,))[0] != key:
            quant = [p for p in group["params"] if self._quantized(p)]
            plain = [p for p in group["params"] if not self._quantized(p)]
            self._flat[gi] = (key, [_Flat(ps, True, self.block_size) for ps in (quant,) if ps]
                              + [_Flat(ps, False, self.block_size) for ps in (plain,) if ps])
        return self._flat[gi][1]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            for flat in self._layouts(gi, group):
                self._step_flat(flat, group)
        return loss

    def _step_flat(self, flat: _Flat, group: dict) -> None:
        bits, block = self.bits, self.block_size
        beta1, beta2 = group["betas"]
        params = [_local(p) for p in flat.params]  # the tensors this process updates (its shards)
        has = [p.grad is not None for p in flat.params]
        if not any(has):
            return
        dev = params[0].device
        state = self.state[flat.params[0]]
        n = flat.numel
        if "steps" not in state:
            state["steps"] = torch.zeros(len(params), device=dev)
            m = torch.zeros(n, device=dev)
            v = torch.zeros(n, device=dev)
        elif flat.quantized:
            m = dequantize_signed(unpack_codes(state["m_codes"], bits), state["m_absmax"], bits, block, n)
            v = dequantize_log(unpack_codes(state["v_codes"], bits), state["v_lo"], state["v_hi"], bits, block, n)
        else:
            m, v = state["m"], state["v"]
        g = flat.gather([_local(p.grad) if h else None for p, h in zip(flat.params, has)])  # [n] fp32, zero padding
        seg = flat.segment_ids(dev)  # [n]: which tensor each entry belongs to
        stepped = torch.tensor(has, device=dev)
        state["steps"] += stepped
        t = state["steps"][seg]  # [n] each entry's own step count (tensors without a gradient keep theirs)
        new_m = m * beta1 + g * (1 - beta1)
        new_v = v * beta2 + g * g * (1 - beta2)
        if all(has):
            m, v = new_m, new_v
        else:
            mask = stepped[seg]
            m, v = torch.where(mask, new_m, m), torch.where(mask, new_v, v)
        update = (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + group["eps"])
        live = [p for p, h in zip(params, has) if h]
        parts = [u.to(p.dtype) for u, p, h in zip(flat.split(update), params, has) if h]
        if group["weight_decay"]:
            torch._foreach_mul_(live, 1 - group["lr"] * group["weight_decay"])
        torch._foreach_add_(live, parts, alpha=-group["lr"])
        if not flat.quantized:
            state["m"], state["v"] = m, v
            return
        gen = self._generator(dev)
        mc, absmax = quantize_signed(m, bits, block, self.stochastic_m, gen)
        vc, lo, hi = quantize_log(v, bits, block, self.stochastic, gen)
        state["m_codes"], state["m_absmax"] = pack_codes(mc, bits), absmax
        state["v_codes"], state["v_lo"], state["v_hi"] = pack_codes(vc, bits), lo, hi

    # -- memory and checkpoints ----------------------------------------------------------------------
    def state_bytes(self) -> int:
        """Bytes held by the moment states (codes, block scales and fp32 fallbacks; not the step counters)."""
        total = 0
        for state in self.state.values():
            for k, v in state.items():
                if k != "steps" and isinstance(v, torch.Tensor):
                    total += v.numel() * v.element_size()
        return total

    def state_dict(self):
        sd = super().state_dict()
        sd["solo_rng"] = {k: g.get_state() for k, g in self._generators.items()}
        return sd

    def load_state_dict(self, state_dict) -> None:
        # torch's own loader casts every state tensor of a float parameter to the parameter's dtype,
        # which would turn packed int32 words into floats: restore the states ourselves
        saved = state_dict["state"]
        super().load_state_dict({**{k: v for k, v in state_dict.items() if k != "solo_rng"}, "state": {}})
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            if i in saved:
                self.state[p] = {k: (v.to(p.device) if isinstance(v, torch.Tensor) and k != "step" else v)
                                 for k, v in saved[i].items()}
        for key, rng in state_dict.get("solo_rng", {}).items():
            self._generator(torch.device(key)).set_state(rng.cpu() if hasattr(rng, "cpu") else rng)


def adam_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the moment states of any optimizer (AdamW: exp_avg + exp_avg_sq), step counters excluded."""
    if isinstance(optimizer, SOLO):
        return optimizer.state_bytes()
    total = 0
    for state in optimizer.state.values():
        for k, v in state.items():
            if k != "step" and isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total


def signed_error_bound(absmax: torch.Tensor, bits: int, stochastic: bool) -> torch.Tensor:
    """Per-block bound on |x - dequantize(quantize(x))| of :func:`quantize_signed`."""
    step = absmax / ((1 << (bits - 1)) - 1)
    return step if stochastic else step / 2


def log_ratio_bound(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-block rho = (hi/lo)**(1/(2**bits - 1)): round to nearest keeps x/deq within [rho**-0.5, rho**0.5]."""
    return (hi / lo.clamp(min=torch.finfo(torch.float32).tiny)) ** (1.0 / ((1 << bits) - 1))
