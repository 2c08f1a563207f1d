"""Find decoder blocks and their linear layers generically, for any transformers causal LM.

No per-family copies of the driver: the decoder blocks are the largest ``nn.ModuleList`` whose
children share one class and hold linear layers (``model.layers`` in Llama/Mistral/Qwen2/Gemma,
``model.decoder.layers`` in OPT, ``transformer.h`` in GPT-2, ``gpt_neox.layers`` in GPT-NeoX).
GPT-2's ``Conv1D`` stores its weight as [in, out]; ``linear_weight``/``set_linear_weight`` hide that.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModelError

try:  # transformers' Conv1D (GPT-2 family): y = x @ W + b with W [in_features, out_features]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment]


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def is_conv1d(module: nn.Module) -> bool:
    return bool(Conv1D) and isinstance(module, Conv1D)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features)."""
    if is_conv1d(module):
        k, n = module.weight.shape
        return k, n
    return module.in_features, module.out_features


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as [out_features, in_features] (a transposed view for Conv1D)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def set_linear_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write weight [out_features, in_features] back into the module, in its own layout and dtype."""
    w = weight.t() if is_conv1d(module) else weight
    module.weight.data.copy_(w.to(module.weight.dtype))


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the decoder blocks."""
    from ..nn import QuantizedLinear  # a packed model's blocks hold QuantizedLinear layers instead

    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) != 1 or not any(is_linear(m) or isinstance(m, QuantizedLinear) for m in module[0].modules()):
            continue
        size = sum(t.numel() for t in list(module.parameters()) + list(module.buffers()))
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise UnsupportedModelError(
            f"unsupported architecture {type(model).__name__}: lpq found no stack of decoder blocks with "
            "linear layers in it; it supports transformers causal LMs such as Llama, Mistral, Qwen2, "
            "Gemma, OPT, GPT-2 and GPT-NeoX"
        )
    return best[1], best[2]


def find_linears(block: nn.Module) -> dict[str, nn.Module]:
    """Linear layers of a block by their name inside it, in registration order."""
    return {name: m for name, m in block.named_modules() if name and is_linear(m)}
