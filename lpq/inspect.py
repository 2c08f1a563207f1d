"""Per-layer report of a packed directory, read from the safetensors headers (no tensor data)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .checkpoint import module_specs, safetensors_shapes, weight_files
from .errors import CheckpointError

_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
          "F8_E4M3": 1, "F8_E5M2": 1}


def _nbytes(shape, dtype: str) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * _BYTES.get(dtype, 4)


def inspect(path: str | Path) -> dict[str, Any]:
    """{bpw, model_bpw, quantized_bytes, total_bytes, fp16_bytes, params, widths, mixed, layers: [...]}.

    bpw counts every byte stored for the quantized linears (codes, scales, zeros, g_idx, codebooks,
    sparse parts; not their biases) over their weights; model_bpw does the same over every parameter
    of the model, with the unquantized ones (embeddings, norms) at their stored width. widths counts
    layers and weights per (bits, group size); mixed is the mixed-precision record of the config (the
    budget, the sensitivity kind and each layer's sensitivity), or None. A layer's "sensitivity" is
    filled in from it.
    """
    directory = Path(path)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{directory} has no config.json: not an lpq output directory")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{cfg_path} is not valid JSON: the checkpoint is damaged") from None
    qconfig = config.get("quantization_config")
    if not qconfig:
        raise CheckpointError(f"{directory} is not quantized (no quantization_config)")
    specs = module_specs(qconfig)
    shapes = safetensors_shapes(weight_files(directory))
    from .formats import get_format

    layers = []
    claimed: set[str] = set()
    q_bytes = 0
    q_weights = 0
    for name, spec in specs.items():
        tensors = {k[len(name) + 1 :]: v for k, v in shapes.items() if k.startswith(name + ".") and k[len(name) + 1 :] != "bias"}
        if "qweight" not in tensors:
            raise CheckpointError(f"the config names {name} but the weights do not hold {name}.qweight: the config does not match")
        fmt = get_format(spec.format)
        # shapes of the stored tensors tell the layer's size: qweight is [K * bits / 32, N]
        words, n = tensors["qweight"][0]
        infer = getattr(fmt, "in_features_from_shapes", None)  # formats whose qweight does not give K alone
        k = infer({t: s for t, (s, _) in tensors.items()}, spec) if infer else words * 32 // spec.bits
        expected = fmt.tensor_shapes(k, n, spec)
        for t, (shape, _) in expected.items():
            if t not in tensors or tuple(tensors[t][0]) != tuple(shape):
                raise CheckpointError(f"{name}.{t} does not have the shape its config implies: the config does not match")
        nbytes = sum(_nbytes(s, d) for s, d in tensors.values())
        claimed.update(f"{name}.{t}" for t in tensors)
        q_bytes += nbytes
        q_weights += k * n
        layers.append({"name": name, "method": spec.method, "format": spec.format, "bits": spec.bits,
                       "group_size": spec.group_size, "sym": spec.sym, "act_order": spec.act_order,
                       "in_features": k, "out_features": n, "bytes": nbytes, "bpw": 8 * nbytes / (k * n),
                       "sensitivity": ((qconfig.get("mixed") or {}).get("sensitivities") or {}).get(name)})
    other_bytes = 0
    other_params = 0
    for key, (shape, dtype) in shapes.items():
        if key in claimed:
            continue
        other_bytes += _nbytes(shape, dtype)
        n = 1
        for s in shape:
            n *= s
        other_params += n
    widths: dict[str, dict[str, int]] = {}
    for layer in layers:  # how many layers and weights at each width: a mixed-precision model shows several
        g = "pc" if layer["group_size"] == -1 else f"g{layer['group_size']}"
        w = widths.setdefault(f"w{layer['bits']} {g}", {"layers": 0, "weights": 0})
        w["layers"] += 1
        w["weights"] += layer["in_features"] * layer["out_features"]
    params = q_weights + other_params
    total = q_bytes + other_bytes
    return {
        "path": str(directory),
        "method": qconfig.get("method"),
        "bpw": 8 * q_bytes / q_weights,
        "model_bpw": 8 * total / params,
        "quantized_layers": len(layers),
        "quantized_weights": q_weights,
        "quantized_bytes": q_bytes,
        "params": params,
        "total_bytes": total,
        "fp16_bytes": 2 * params,
        "size_vs_fp16": total / (2 * params),
        "widths": dict(sorted(widths.items())),
        "mixed": qconfig.get("mixed"),
        "layers": layers,
    }
