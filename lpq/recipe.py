"""Recipes: a quantization run written down as YAML, to re-run or edit.

    method: rtn
    bits: 4
    group_size: 128
    ignore: ["*.mlp.down_proj"]
    overrides:                      # per-module changes, by glob of the qualified name
      "model.layers.0.*": {bits: 8}
    calib: wiki.valid.tokens
    nsamples: 128

Keys are the keyword arguments of ``lpq.quantize``; options given on the command line win.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import LpqError

RECIPE_KEYS = {"model", "method", "bits", "group_size", "sym", "act_order", "method_options", "ignore", "overrides",
               "calib", "nsamples", "seqlen", "seed", "calib_batch_size", "dtype",
               # mixed precision (lpq.mixed): the request, and the record a saved plan carries
               "mixed", "sensitivity", "target_size", "candidates", "tie", "probes", "sensitivity_samples",
               "mixed_cost", "mixed_plan",
               # residual-stream rotation before quantizing, and the value/output heads' on top (lpq.transforms.rotate)
               "rotate", "rotate_heads"}


def load_recipe(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise LpqError(f"recipe {path} not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise LpqError(f"recipe {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise LpqError(f"recipe {path} must be a mapping of quantize options")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - RECIPE_KEYS)
    if unknown:
        raise LpqError(f"recipe {path} has unknown keys {', '.join(unknown)}: allowed are {', '.join(sorted(RECIPE_KEYS))}")
    return data


def save_recipe(path: str | Path, options: dict[str, Any]) -> None:
    data = {k: v for k, v in options.items() if k in RECIPE_KEYS and v not in (None, (), [], {})}
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
