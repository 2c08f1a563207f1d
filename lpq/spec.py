"""Quantization specs: what to do to one linear layer.

A ``QuantSpec`` is a small validated, serialisable dataclass. The whole-model default spec plus
per-module overrides (by module name) is how lpq expresses both uniform and mixed-precision models,
and it is exactly what is written into ``config.json`` under ``quantization_config``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import SpecError

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class QuantSpec:
    """How one linear layer is quantized and stored.

    bits:        code width of the stored weights.
    group_size:  input features that share one scale/zero; -1 = one per output channel.
    sym:         symmetric grid (zero fixed at the middle code) or asymmetric min-max.
    method:      name of the method plugin that produced the codes (rtn, gptq, ...).
    format:      name of the packed-format plugin that stores them (uniform, ...).
    act_order:   columns were quantized in a permuted order; the format stores ``g_idx``.
    options:     method-specific settings, kept for the record (damping, ratios, ...).
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    method: str = "rtn"
    format: str = "uniform"
    act_order: bool = False
    options: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise SpecError(
                f"--bits {self.bits} is not supported: choose one of {', '.join(map(str, SUPPORTED_BITS))}"
            )
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            sizes = ", ".join(str(g) for g in SUPPORTED_GROUP_SIZES if g > 0)
            raise SpecError(
                f"--group-size {self.group_size} is not supported: use -1 (per output channel) or one of {sizes}"
            )

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def group_size_for(self, in_features: int) -> int:
        """The effective group size for a layer with ``in_features`` inputs (-1 means all of them)."""
        return in_features if self.group_size == -1 else self.group_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def replace(self, **changes: Any) -> "QuantSpec":
        return dataclasses.replace(self, **changes)

    def label(self) -> str:
        g = "pc" if self.group_size == -1 else f"g{self.group_size}"
        return f"{self.method} w{self.bits} {g}{' sym' if self.sym else ''}{' act-order' if self.act_order else ''}"
