"""Quantization-aware LoRA layers over a packed ``uniform`` linear, as pure maths plus one module.

A packed layer holds integer codes q [N, K], per-group scales s0 and zero points z [G, N] (g_idx [K]
says which group each input column belongs to). Its weight is W0 = s0 * (q - z). Two ways to train it
so that the result is again a packed layer of the same width:

``l4q`` (LoRA + learned step sizes, after L4Q): the layer computes with the fake-quantized weight

    Wq = s * (clamp(round((W0 + B A) / s) + z, 0, 2**bits - 1) - z)

where A [r, K], B [N, r] are the LoRA factors and s [G, N] the learned steps (LSQ: the rounding passes
gradients straight through, the clamp does not; s is stored as a log-ratio to s0, so one learning
rate fits layers whose steps differ by orders of magnitude, and rounded to fp16 in the forward
because that is how the format stores it). Training sees exactly the weights that will be stored:
merging is the same re-quantization, so merge then dequantize equals the trained weights.

``qalora`` (group-pooled adapter, after QA-LoRA): the adapter reads the mean of each group's inputs,
A [r, G], so its weight delta B A / |group| is constant inside a group and folds into the zero point:
s0 * (q - z) + c = s0 * (q - (z - c / s0)). That fold is exact only with real-valued zeros; lpq's
``uniform`` format (and GPTQ's) stores integer zeros in ``bits`` bits, so the merge rounds and clamps
them, which can lose what was learned (measured in bench/finetune.py).

Codes are kept unpacked as uint8 buffers (1 byte per weight, frozen, never trained); the dense
weight is rebuilt in fp32 on each forward (with gradient checkpointing, only one block's worth lives
at a time) and cached in eval mode. Sharded over several processes (FSDP, which shards parameters and
leaves buffers whole on every process), :meth:`QATLinear.freeze_as_parameters` turns codes, scales0 and
zeros into frozen parameters (requires_grad False: no gradient, never in an optimizer or a checkpoint
of the trainable tensors) and stops the eval-mode cache, which would keep every layer's dense weight.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LpqError
from ..formats import get_format
from ..nn import QuantizedLinear
from ..quant import num_groups
from ..spec import QuantSpec

VARIANTS = ("l4q", "qalora")


# ---------------------------------------------------------------------------------------------------
# pure maths
# ---------------------------------------------------------------------------------------------------
def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) in the forward, identity in the backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def fp16_ste(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the nearest fp16 value in the forward, identity in the backward."""
    return x + (x.to(torch.float16).float() - x).detach()


def expand_groups(t: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """Per-group values [G, N] -> per-weight [N, K] through g_idx [K] (long)."""
    return t[g_idx].t()


def base_weight(codes: torch.Tensor, scales0: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """W0 = s0 * (q - z): codes [N, K] uint8, scales0/zeros [G, N], g_idx [K] -> [N, K] fp32."""
    return (codes.float() - expand_groups(zeros, g_idx)) * expand_groups(scales0, g_idx)


def l4q_codes_and_weight(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                         bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-quantize w [N, K] onto the grid (scales, zeros [G, N]): -> (codes with STE [N, K], weight [N, K]).

    The codes carry straight-through gradients to w and to the scales (LSQ); the clamp to
    [0, 2**bits - 1] passes none for weights outside the grid, as in LSQ.
    """
    s = expand_groups(scales, g_idx)
    z = expand_groups(zeros, g_idx)
    q = torch.clamp(round_ste(w / s) + z, 0, (1 << bits) - 1)
    return q, s * (q - z)


def group_pool_matrix(g_idx: torch.Tensor, groups: int) -> torch.Tensor:
    """[K, G] matrix P with x @ P = mean of each group's inputs (act-order groups included)."""
    k = g_idx.numel()
    p = torch.zeros(k, groups, device=g_idx.device)
    p[torch.arange(k, device=g_idx.device), g_idx] = 1.0
    return p / p.sum(dim=0, keepdim=True).clamp(min=1.0)


def _linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear in x's dtype (autocast, when on, picks the compute dtype itself)."""
    if not torch.is_autocast_enabled(x.device.type):
        w = w.to(x.dtype)
        bias = bias.to(x.dtype) if bias is not None else None
    return F.linear(x, w, bias)


# ---------------------------------------------------------------------------------------------------
# the trainable layer
# ---------------------------------------------------------------------------------------------------
class QATLinear(nn.Module):
    """A packed uniform linear made trainable: frozen codes, LoRA adapter, (l4q) learned steps.

    Buffers: codes uint8 [N, K], scales0 fp32 [G, N] (the stored fp16 scales), zeros fp32 [G, N]
    (integers), g_idx int64 [K], bias (frozen, if any). Parameters: lora_a [r, K] (l4q) or [r, G]
    (qalora), lora_b [N, r] (zero at start, so the layer starts as the packed layer), and for l4q
    log_step [G, N] (s = s0 * exp(log_step), zero at start).
    """

    def __init__(self, layer: QuantizedLinear, rank: int = 16, alpha: float | None = None, variant: str = "l4q",
                 learn_scales: bool = True) -> None:
        super().__init__()
        spec = layer.spec
        if spec.format != "uniform":
            raise LpqError(f"QAT fine-tuning needs the uniform format, this layer is {spec.format}: "
                           "quantize with rtn or gptq")
        if variant not in VARIANTS:
            raise LpqError(f"QAT variant {variant!r} is not known: choose {' or '.join(VARIANTS)}")
        if rank < 1:
            raise LpqError(f"--lora-rank {rank} is not valid: use a positive rank such as 16")
        self.spec: QuantSpec = spec
        self.variant = variant
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.rank = rank
        self.scaling = (alpha if alpha is not None else rank) / rank
        fmt = get_format("uniform")
        codes, scales, zeros, g_idx = fmt.unpack(layer.tensors(), spec, layer.in_features, layer.out_features)
        self.groups = num_groups(layer.in_features, spec.group_size)
        dev = codes.device
        self.register_buffer("codes", codes.to(torch.uint8).contiguous())  # [N, K]
        self.register_buffer("scales0", scales.float().contiguous())  # [G, N]
        self.register_buffer("zeros", zeros.float().contiguous())  # [G, N]
        self.register_buffer("g_idx", g_idx.long().contiguous())  # [K]
        if layer.bias is not None:
            self.register_buffer("bias", layer.bias.detach().float().clone())
        else:
            self.bias = None
        a_in = layer.in_features if variant == "l4q" else self.groups
        self.lora_a = nn.Parameter(torch.empty(rank, a_in, device=dev))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # the usual LoRA init: A random, B zero
        self.lora_b = nn.Parameter(torch.zeros(layer.out_features, rank, device=dev))
        if variant == "l4q" and learn_scales:
            self.log_step = nn.Parameter(torch.zeros_like(self.scales0))
        else:
            self.register_parameter("log_step", None)
        if variant == "qalora":
            self.register_buffer("pool", group_pool_matrix(self.g_idx, self.groups), persistent=False)  # [K, G]
        self._cached: torch.Tensor | None = None
        self.cache_weight = True  # keep the dense weight between eval forwards (off when sharded)

    def freeze_as_parameters(self) -> None:
        """codes [N, K] uint8, scales0 and zeros [G, N] fp32 -> frozen nn.Parameters, for FSDP to shard.

        Same values (the forward and the merge read them as before); only their kind changes, so that a
        sharded run keeps 1/world of them per process. FSDP2 of torch <= 2.11 makes every sharded
        parameter with requires_grad=True before clearing it, which integer tensors refuse; so the codes
        travel as a floating-point view of the same bytes: fp16 [N, K/2] (two codes per element, bit
        for bit; never computed with), or fp32 [N, K] values when K is odd. :meth:`code_tensor` reads
        them back as uint8 [N, K]. No eval-mode cache after.
        """
        for name in ("codes", "scales0", "zeros"):
            if name in self._buffers:
                t = self._buffers.pop(name)
                if name == "codes":
                    t = t.view(torch.float16) if t.shape[1] % 2 == 0 else t.float()
                self.register_parameter(name, nn.Parameter(t, requires_grad=False))
        self.cache_weight = False
        self._cached = None

    def code_tensor(self) -> torch.Tensor:
        """The codes as uint8 [N, K], however they are held (buffer, or the frozen parameter's view)."""
        c = self.codes
        if c.dtype == torch.uint8:
            return c
        return c.view(torch.uint8) if c.dtype == torch.float16 else c.to(torch.uint8)

    # -- weights -------------------------------------------------------------------------------------
    def step_sizes(self) -> torch.Tensor:
        """The learned steps s [G, N] as the format will store them (fp16 values, STE gradient)."""
        if self.log_step is None:
            return self.scales0
        return fp16_ste(self.scales0 * torch.exp(self.log_step))

    def delta(self) -> torch.Tensor:
        """The adapter's weight delta B A * scaling: [N, K] (l4q) or [N, G] (qalora), fp32."""
        return (self.lora_b.float() @ self.lora_a.float()) * self.scaling

    def fake_quant_weight(self) -> torch.Tensor:
        """[N, K] fp32: the weight this layer computes with (l4q: already on the grid)."""
        with torch.autocast(device_type=self.codes.device.type, enabled=False):
            w0 = base_weight(self.code_tensor(), self.scales0, self.zeros, self.g_idx)
            if self.variant == "l4q":
                return l4q_codes_and_weight(w0 + self.delta(), self.step_sizes(), self.zeros, self.g_idx,
                                            self.spec.bits)[1]
            counts = torch.bincount(self.g_idx, minlength=self.groups).clamp(min=1).float()  # [G]
            return w0 + (self.delta() / counts)[:, self.g_idx]

    def merged_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes [N, K] int32, scales [G, N] fp16, zeros [G, N] int32) of the merged packed layer."""
        with torch.no_grad(), torch.autocast(device_type=self.codes.device.type, enabled=False):
            maxq = self.spec.maxq
            if self.variant == "l4q":
                w0 = base_weight(self.code_tensor(), self.scales0, self.zeros, self.g_idx)
                scales = self.step_sizes()
                q, _ = l4q_codes_and_weight(w0 + self.delta(), scales, self.zeros, self.g_idx, self.spec.bits)
                return q.to(torch.int32), scales.to(torch.float16), self.zeros.to(torch.int32)
            # qalora: delta [N, G] per pooled input = c * |group| per weight; z' = z - c / s0
            counts = torch.bincount(self.g_idx, minlength=self.groups).clamp(min=1).float()  # [G]
            c = (self.delta() / counts).t()  # [G, N] weight offset of each group
            zeros = torch.clamp(torch.round(self.zeros - c / self.scales0), 0, maxq)
            return self.code_tensor().to(torch.int32), self.scales0.to(torch.float16), zeros.to(torch.int32)

    # -- forward ------------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        self._cached = None
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.variant == "qalora":
            # base through the frozen dense weight, adapter on the group means: x @ P [.., G]
            if self._cached is None or self.training:
                with torch.no_grad(), torch.autocast(device_type=self.codes.device.type, enabled=False):
                    w0 = base_weight(self.code_tensor(), self.scales0, self.zeros, self.g_idx)
                if not self.training and self.cache_weight:
                    self._cached = w0
            else:
                w0 = self._cached
            pooled = x @ self.pool.to(x.dtype)  # [.., G]
            adapter = F.linear(F.linear(pooled, self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype)) * self.scaling
            return _linear(x, w0, self.bias) + adapter
        if not self.training and not torch.is_grad_enabled() and self.cache_weight:
            if self._cached is None:
                self._cached = self.fake_quant_weight().detach()
            w = self._cached
        else:
            self._cached = None
            w = self.fake_quant_weight()
        return _linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.spec.label()}, "
                f"variant={self.variant}, rank={self.rank}")


# ---------------------------------------------------------------------------------------------------
# whole models
# ---------------------------------------------------------------------------------------------------
def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def prepare_qat(model: nn.Module, rank: int = 16, variant: str = "l4q", alpha: float | None = None,
                learn_scales: bool = True) -> dict[str, QATLinear]:
    """Swap every packed uniform QuantizedLinear of ``model`` for a QATLinear (in place); freeze the rest.

    Returns name -> QATLinear. Embeddings, norms, biases and the head stay frozen: only the adapters
    and the step sizes train.
    """
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    if not targets:
        raise LpqError("the model has no quantized linear layers: QAT fine-tuning needs a model made by lpq quantize")
    others = [n for n, m in targets if m.spec.format != "uniform"]
    if others:
        raise LpqError(f"layer {others[0]} is stored as {model.get_submodule(others[0]).spec.format}: "
                       "QAT fine-tuning needs uniform integer layers (quantize with rtn or gptq)")
    for p in model.parameters():
        p.requires_grad_(False)
    out = {}
    for name, layer in targets:
        qat = QATLinear(layer, rank=rank, alpha=alpha, variant=variant, learn_scales=learn_scales)
        _set_module(model, name, qat)
        out[name] = qat
    return out


def qat_layers(model: nn.Module) -> dict[str, QATLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QATLinear)}


def trainable_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(adapter parameters, step-size parameters) of every QATLinear, in module order."""
    adapters, steps = [], []
    for m in qat_layers(model).values():
        adapters += [m.lora_a, m.lora_b]
        if m.log_step is not None:
            steps.append(m.log_step)
    return adapters, steps
