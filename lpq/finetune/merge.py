"""Merge trained QAT layers back into packed ``uniform`` layers: the result is a fully quantized model.

Each QATLinear becomes a QuantizedLinear of the same bits, group size, symmetry and act-order,
holding the re-quantized codes, the learned fp16 scales and the (integer) zeros; its spec records
``options.qat`` (variant, rank, steps) so the checkpoint says how it was made. Save with
:func:`save_merged` in lpq's format or, where the widths allow, as a GPTQ v1 checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..checkpoint import make_quant_config, module_specs, save_quantized
from ..formats.uniform import pack_uniform
from ..nn import QuantizedLinear
from ..spec import QuantSpec
from .qat import QATLinear, _set_module, qat_layers


def merge_layer(layer: QATLinear, record: dict | None = None) -> QuantizedLinear:
    """One QATLinear -> a QuantizedLinear whose dequantized weight is what the layer learned."""
    codes, scales, zeros = layer.merged_tensors()
    spec = layer.spec
    options = dict(spec.options or {})
    options["qat"] = {"variant": layer.variant, "rank": layer.rank, **(record or {})}
    spec = spec.replace(options=options)
    g_idx = layer.g_idx.to(torch.int32) if spec.act_order else None
    qw = pack_uniform(codes, scales, zeros, spec, g_idx=g_idx)
    bias = layer.bias.detach() if layer.bias is not None else None
    dtype = bias.dtype if bias is not None else torch.float32
    return QuantizedLinear.from_quantized(qw, bias, dtype)


def merge_qat(model: nn.Module, record: dict | None = None) -> dict[str, QuantSpec]:
    """Replace every QATLinear of ``model`` (in place) by its merged QuantizedLinear.

    Updates ``model.config.quantization_config`` (the spec of every layer, with ``options.qat``) and
    returns name -> spec of the merged layers.
    """
    specs = {}
    for name, layer in qat_layers(model).items():
        merged = merge_layer(layer, record)
        _set_module(model, name, merged)
        specs[name] = merged.spec
    qconfig = getattr(model.config, "quantization_config", None)
    if isinstance(qconfig, dict) and qconfig.get("quant_method") == "lpq":
        old = module_specs(qconfig)
        default = QuantSpec.from_dict(qconfig["default"])
        first = next(iter(specs.values()), None)
        if first is not None:  # the record in the default spec, so that layers do not repeat it
            default = default.replace(options={**(default.options or {}), "qat": first.options["qat"]})
        all_specs = {**old, **specs}
        new = make_quant_config(default, all_specs, qconfig.get("calibration"), qconfig.get("method_options"))
    else:  # a model loaded from a GPTQ checkpoint: describe it in lpq's own terms from now on
        first = next(iter(specs.values()))
        new = make_quant_config(first.replace(options={}), specs, None, {})
    new["finetune"] = dict(record or {})
    model.config.quantization_config = new
    return specs


def save_merged(model: nn.Module, tokenizer, out: str | Path, overwrite: bool = False,
                save_format: str = "lpq") -> Path:
    """Write a merged model (no QATLinear left) as lpq's directory or a GPTQ v1 checkpoint."""
    if qat_layers(model):
        raise ValueError("merge the QAT layers (merge_qat) before saving")
    return save_quantized(model, tokenizer, Path(out), model.config.quantization_config, overwrite=overwrite,
                          save_format=save_format)
