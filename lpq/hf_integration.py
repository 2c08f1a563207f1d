"""Let plain transformers load lpq directories: after ``import lpq``,
``AutoModelForCausalLM.from_pretrained(DIR)`` builds the QuantizedLinear layers itself.

transformers lets a package register a quantization config class and a quantizer under its
``quant_method`` name; the quantizer swaps the linears for empty QuantizedLinear modules before the
safetensors are read into them.
"""

from __future__ import annotations

from typing import Any

import torch

_REGISTERED = False


def register() -> bool:
    """Register the 'lpq' quant_method with transformers (idempotent). False if this transformers cannot."""
    global _REGISTERED
    if _REGISTERED:
        return True
    try:
        from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                                  register_quantization_config, register_quantizer)
        from transformers.quantizers.base import HfQuantizer
        from transformers.utils.quantization_config import QuantizationConfigMixin
    except ImportError:  # pragma: no cover - transformers without custom quantizers
        return False
    if "lpq" in AUTO_QUANTIZER_MAPPING:
        _REGISTERED = True
        return True

    @register_quantization_config("lpq")
    class LpqConfig(QuantizationConfigMixin):
        """The ``quantization_config`` of an lpq directory, kept as the plain dict lpq wrote."""

        def __init__(self, **kwargs: Any) -> None:
            self.quant_method = "lpq"
            self.raw = dict(kwargs, quant_method="lpq")

        @classmethod
        def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
            config = cls(**config_dict)
            return (config, kwargs) if return_unused_kwargs else config

        def to_dict(self) -> dict[str, Any]:
            return dict(self.raw)

        def to_diff_dict(self) -> dict[str, Any]:
            return self.to_dict()

    @register_quantizer("lpq")
    class LpqHfQuantizer(HfQuantizer):
        requires_calibration = True  # loading packed checkpoints only; quantizing goes through lpq.quantize

        def _process_model_before_weight_loading(self, model, **kwargs):
            from .checkpoint import module_specs, replace_with_quantized

            dtype = kwargs.get("dtype") or getattr(model.config, "dtype", None) or torch.float32
            if isinstance(dtype, str):
                dtype = getattr(torch, dtype)
            replace_with_quantized(model, module_specs(self.quantization_config.to_dict()), dtype, device="meta")

        def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
            return False  # the tensors on disk are already packed

        def is_serializable(self, safe_serialization=None):
            return True

        @property
        def is_trainable(self) -> bool:
            return False

    _REGISTERED = True
    return True
