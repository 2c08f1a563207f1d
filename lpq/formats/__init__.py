"""Packed storage formats, registered by name.

A format is a pure description of how one quantized linear layer lives in a state dict: which
tensors (names, shapes, dtypes), how to check that a layer's shape fits, and how to dequantize it in
pure torch. That dequantize is also the reference every CUDA kernel of the format is tested against.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..errors import FormatError
from ..spec import QuantSpec

_FORMATS: dict[str, "PackedFormat"] = {}


class PackedFormat(ABC):
    name: str = ""
    version: int = 1

    @abstractmethod
    def check_shape(self, in_features: int, out_features: int, spec: QuantSpec, layer: str = "") -> None:
        """Raise FormatError (one line, with the fix) if this layer's shape cannot be stored."""

    @abstractmethod
    def tensor_shapes(self, in_features: int, out_features: int, spec: QuantSpec) -> dict[str, tuple[tuple, torch.dtype]]:
        """Name -> (shape, dtype) of every tensor the layer stores (bias excluded)."""

    @abstractmethod
    def dequantize(self, tensors: dict[str, torch.Tensor], spec: QuantSpec, in_features: int, out_features: int) -> torch.Tensor:
        """The stored tensors -> weight [out_features, in_features] in float32."""

    def concat_outputs(self, weights: list["QuantizedWeight"]) -> "QuantizedWeight | None":
        """One layer whose outputs are those of ``weights`` one after another (the same input features and
        spec), exactly, or None where this format cannot join them (then they stay apart)."""
        return None

    def permute_outputs(self, weight: "QuantizedWeight", order: torch.Tensor) -> "QuantizedWeight | None":
        """The layer whose output j is output ``order[j]`` of ``weight`` (order: a permutation of
        range(out_features)), exactly, or None where this format cannot reorder its rows."""
        return None

    def empty(self, in_features: int, out_features: int, spec: QuantSpec, device=None) -> dict[str, torch.Tensor]:
        return {
            name: torch.zeros(shape, dtype=dtype, device=device)
            for name, (shape, dtype) in self.tensor_shapes(in_features, out_features, spec).items()
        }


def register_format(fmt: PackedFormat) -> PackedFormat:
    _FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> PackedFormat:
    if name not in _FORMATS:
        raise FormatError(f"unknown packed format {name!r}: lpq knows {', '.join(sorted(_FORMATS))}")
    return _FORMATS[name]


def available_formats() -> list[str]:
    return sorted(_FORMATS)


@dataclass
class QuantizedWeight:
    """What a method produces for one linear: the packed tensors plus how to read them."""

    spec: QuantSpec
    in_features: int
    out_features: int
    tensors: dict[str, torch.Tensor]

    @property
    def format(self) -> PackedFormat:
        return get_format(self.spec.format)

    def dequantize(self) -> torch.Tensor:
        return self.format.dequantize(self.tensors, self.spec, self.in_features, self.out_features)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to(self, device) -> "QuantizedWeight":
        return QuantizedWeight(self.spec, self.in_features, self.out_features,
                               {k: v.to(device) for k, v in self.tensors.items()})


from . import uniform  # noqa: E402,F401  (registers the built-in formats)
from . import squeezellm  # noqa: E402,F401
from . import ptq161  # noqa: E402,F401
