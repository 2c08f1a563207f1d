"""Interoperability with GPTQ checkpoints, as pure transforms of one linear layer's state dict.

lpq's ``uniform`` format already uses GPTQ's tensor layout, so only two things differ:

* ``qzeros``. A GPTQ checkpoint in the original (v1, ``checkpoint_format: "gptq"``) convention stores
  every zero point minus one. lpq stores the zero points as they are, which is GPTQ's v2 convention
  (``checkpoint_format: "gptq_v2"``). The two differ only where a zero point is 0, and there the
  conversion follows GPTQModel (the loader behind transformers' GPTQ support), which writes and reads
  v1 exactly: at 2, 4 and 8 bits it subtracts one from every field of each int32 word at once, so a
  zero point of 0 becomes 2**bits - 1 and borrows one from the field above it (the top field's borrow
  leaves the word); at 3 bits, whose fields straddle words, each field is shifted on its own, modulo 8.
  Kernels that extract a field and add one without masking cannot read a zero point of 0 from v1 in
  any encoding; that is a limit of the v1 convention itself: only a group whose weights are all >= 0
  can get a zero point of 0 on lpq's asymmetric grid, and symmetric grids never do.
* ``g_idx``. GPTQ checkpoints carry it for every layer (the group of each input column; without
  act-order it is k // group_size, with a per-channel grid all zeros); lpq stores it only with
  act-order.

The bit layout is the same in both: ``qweight`` int32 [K*b/32, N] holds the codes of each output
column as one little-endian bit stream along K (for 3 bits, 32 codes fill 3 words: code 10 straddles
words 0/1 and code 21 words 1/2); ``qzeros`` int32 [G, N*b/32] the zero points the same way along N;
``scales`` fp16 [G, N]. A shorter last group (K not a multiple of the group size) has G = ceil(K/gs).
"""

from __future__ import annotations

import re
from typing import Any, Callable

import torch

from ..errors import FormatError
from ..quant import group_index, num_groups
from ..spec import SUPPORTED_GROUP_SIZES, QuantSpec
from .packing import chunk_shape, pack_cols, unpack_cols

_QUANT_KEYS = ("qweight", "qzeros", "scales", "g_idx")
#: checkpoint_format values whose qzeros carry the v1 "minus one" offset
_V1_FORMATS = ("gptq", "gemm", "")
_V2_FORMATS = ("gptq_v2",)


def _shift_zero_fields(qzeros: torch.Tensor, bits: int, n: int, delta: int) -> torch.Tensor:
    """Add ``delta`` (+-1) to every packed zero-point field of qzeros int32 [G, words], as GPTQModel does.

    3 bits: field by field, modulo 8 (no carry between fields). 2, 4 and 8 bits: on each whole int32 word
    modulo 2**32, so a field that wraps carries into / borrows from the field above it; identical to
    field by field unless a zero point is 0 (v2) or a stored field is 2**bits - 1 (v1), and exactly
    invertible, so v1 -> v2 -> v1 gives back the same words.
    """
    if bits == 3:
        zeros = unpack_cols(qzeros, bits, n)
        return pack_cols((zeros + delta) & ((1 << bits) - 1), bits)
    ones = sum(1 << shift for shift in range(0, 32, bits))  # a one in every field: 0x55555555, 0x11111111, 0x01010101
    words = (qzeros.to(torch.int64) + delta * ones) & 0xFFFFFFFF
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32).contiguous()


def to_gptq(
    tensors: dict[str, torch.Tensor], spec: QuantSpec, in_features: int, out_features: int
) -> dict[str, torch.Tensor]:
    """lpq ``uniform`` tensors of one linear -> the same layer in GPTQ's v1 checkpoint convention.

    Returns ``qweight``, ``qzeros`` (zero - 1, see :func:`_shift_zero_fields`), ``scales`` and ``g_idx``
    (always present); any other entry (e.g. ``bias``) is passed through unchanged.
    """
    _check(tensors, spec.bits, spec.group_size, in_features, out_features, "lpq")
    out = {key: t for key, t in tensors.items() if key not in _QUANT_KEYS}
    out["qweight"] = tensors["qweight"].to(torch.int32).contiguous()
    out["qzeros"] = _shift_zero_fields(tensors["qzeros"], spec.bits, out_features, -1)
    out["scales"] = tensors["scales"].to(torch.float16).contiguous()
    if "g_idx" in tensors:
        out["g_idx"] = tensors["g_idx"].to(torch.int32).contiguous()
    else:
        out["g_idx"] = group_index(in_features, spec.group_size, device=tensors["qweight"].device)
    return out


def from_gptq(
    tensors: dict[str, torch.Tensor],
    bits: int,
    group_size: int,
    sym: bool,
    desc_act: bool,
    checkpoint_format: str = "gptq",
) -> tuple[QuantSpec, dict[str, torch.Tensor]]:
    """One linear of a GPTQ checkpoint (made by lpq or another tool) -> (spec, lpq ``uniform`` tensors).

    ``checkpoint_format`` "gptq" (v1, the default of every GPTQ tool) removes the minus-one offset of
    the zero points; "gptq_v2" stores them as they are. ``g_idx`` is kept (and the spec marked
    act-order) when ``desc_act`` is set or when it is not the trivial k // group_size; a trivial one is
    dropped. Other entries (e.g. ``bias``) are passed through unchanged.
    """
    fmt = (checkpoint_format or "gptq").strip().lower()
    if fmt not in _V1_FORMATS + _V2_FORMATS:
        raise FormatError(
            f"GPTQ checkpoint_format {checkpoint_format!r} is not supported: lpq reads 'gptq' (v1) and 'gptq_v2'"
        )
    for key in ("qweight", "qzeros", "scales"):
        if key not in tensors:
            raise FormatError(f"GPTQ layer has no {key!r} tensor: the checkpoint is incomplete")
    if bits not in (2, 3, 4, 8):
        raise FormatError(f"GPTQ checkpoint with bits={bits}: lpq reads 2, 3, 4 and 8 bits")
    qweight = tensors["qweight"]
    per_chunk, words = chunk_shape(bits)
    in_features = qweight.shape[0] // words * per_chunk
    out_features = tensors["scales"].shape[1]
    # -1 (or 0, or a size covering the whole row, as some tools write it): one group per output channel
    gs = -1 if group_size is None or group_size <= 0 else int(group_size)
    if gs >= in_features and gs not in SUPPORTED_GROUP_SIZES:
        gs = -1
    _check(tensors, bits, gs, in_features, out_features, "GPTQ")

    g_idx = tensors.get("g_idx")
    trivial = group_index(in_features, gs, device=qweight.device)
    if g_idx is not None:
        g_idx = g_idx.to(torch.int32)
        if g_idx.shape != (in_features,):
            raise FormatError(f"GPTQ g_idx has shape {tuple(g_idx.shape)}, expected ({in_features},)")
        n_groups = num_groups(in_features, gs)
        if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
            raise FormatError(f"GPTQ g_idx points outside the {n_groups} groups of its layer: corrupt checkpoint")
    act_order = bool(desc_act) or (g_idx is not None and not torch.equal(g_idx, trivial))
    spec = QuantSpec(bits=bits, group_size=gs, sym=bool(sym), method="gptq", format="uniform", act_order=act_order)

    out = {key: t for key, t in tensors.items() if key not in _QUANT_KEYS}
    out["qweight"] = qweight.to(torch.int32).contiguous()
    qzeros = tensors["qzeros"].to(torch.int32)
    out["qzeros"] = _shift_zero_fields(qzeros, bits, out_features, +1) if fmt in _V1_FORMATS else qzeros.contiguous()
    out["scales"] = tensors["scales"].to(torch.float16).contiguous()
    if act_order:
        out["g_idx"] = (g_idx if g_idx is not None else trivial).contiguous()
    return spec, out


#: the key of the rotation record in a GPTQ quantization_config. Prefixed because GPTQ tools own the
#: unprefixed names (GPTQModel's config has a "rotation" field of its own, with another meaning); GPTQ
#: readers ignore keys they do not know (transformers' GPTQConfig takes them as unused keyword arguments).
ROTATION_KEY = "lpq_rotation"


def gptq_quantization_config(spec: QuantSpec, rotation: dict | None = None) -> dict[str, Any]:
    """The ``quantization_config`` of config.json for a checkpoint written by :func:`to_gptq`.

    Carries what transformers (GPTQConfig), optimum and vLLM read: quant_method, bits, group_size,
    desc_act, sym, checkpoint_format, plus the record of how it was made (true_sequential,
    damp_percent, static_groups), taken from ``spec.options`` where the method put them there, and,
    when the weights were rotated before quantization (lpq.transforms.rotate), ``rotation`` under
    :data:`ROTATION_KEY`. The rotation is already in the saved weights: a reader needs nothing from it.
    """
    opts = spec.options or {}

    def opt(*names: str, default: Any) -> Any:
        for name in names:
            if opts.get(name) is not None:
                return opts[name]
        return default

    config = {
        "quant_method": "gptq",
        "bits": spec.bits,
        "group_size": spec.group_size,
        "desc_act": bool(spec.act_order),
        "sym": bool(spec.sym),
        "checkpoint_format": "gptq",
        "true_sequential": bool(opt("true_sequential", default=True)),
        "damp_percent": float(opt("damp_percent", "damp", default=0.01)),
        "static_groups": bool(opt("static_groups", default=False)),
    }
    if rotation:  # only when used, like lpq's own config
        config[ROTATION_KEY] = dict(rotation)
    return config


def load_gptq_state(
    directory: Any,
    qconfig: dict[str, Any],
    files: list[Any],
    read: Callable[[list[Any]], dict[str, torch.Tensor]],
) -> tuple[dict[str, QuantSpec], dict[str, torch.Tensor]]:
    """A whole GPTQ checkpoint (lpq's or another tool's) -> (module name -> spec, lpq state dict).

    ``qconfig`` is its ``quantization_config``; ``read(files)`` returns the raw state dict. Every
    module with a ``<name>.qweight`` is converted with :func:`from_gptq`; all other tensors pass
    through. Per-module overrides in GPTQModel's ``dynamic`` map ({"+:regex" or "regex": {bits, ...}})
    are honoured for bits, group_size, sym and desc_act.
    """
    if qconfig.get("bits") is None:
        raise FormatError(f"the GPTQ quantization_config of {directory} has no 'bits': the config is damaged")
    base = {
        "bits": int(qconfig["bits"]),
        "group_size": int(qconfig["group_size"]) if qconfig.get("group_size") is not None else -1,
        "sym": bool(qconfig.get("sym", True)),
        "desc_act": bool(qconfig.get("desc_act", False)),
    }
    fmt = qconfig.get("checkpoint_format") or "gptq"
    dynamic = qconfig.get("dynamic") or {}
    raw = read(files)
    names = sorted(key[: -len(".qweight")] for key in raw if key.endswith(".qweight"))
    specs: dict[str, QuantSpec] = {}
    state: dict[str, torch.Tensor] = {}
    taken: set[str] = set()
    for name in names:
        opts = dict(base)
        for pattern, override in dynamic.items():
            if pattern.startswith("-:") or not isinstance(override, dict):
                continue
            if re.match(pattern[2:] if pattern.startswith("+:") else pattern, name):
                opts.update({k: override[k] for k in base if k in override})
        layer = {}
        for key in _QUANT_KEYS:
            full = f"{name}.{key}"
            if full in raw:
                layer[key] = raw[full]
                taken.add(full)
        try:
            spec, tensors = from_gptq(layer, opts["bits"], opts["group_size"], opts["sym"], opts["desc_act"], fmt)
        except FormatError as e:
            raise FormatError(f"{directory}: layer {name}: {e}") from None
        specs[name] = spec
        state.update({f"{name}.{key}": t for key, t in tensors.items()})
    state.update({key: t for key, t in raw.items() if key not in taken})
    return specs, state


def _check(tensors, bits: int, group_size: int, in_features: int, out_features: int, who: str) -> None:
    per_chunk, words = chunk_shape(bits)
    if in_features % per_chunk:
        raise FormatError(f"{bits}-bit GPTQ packing needs in_features a multiple of {per_chunk}, got {in_features}")
    g = num_groups(in_features, group_size)
    expect = {
        "qweight": (in_features // per_chunk * words, out_features),
        "scales": (g, out_features),
        "qzeros": (g, -(-out_features // per_chunk) * words),
    }
    for key, shape in expect.items():
        got = tuple(tensors[key].shape)
        if got != shape:
            raise FormatError(
                f"{who} tensor {key} has shape {got}, expected {shape} for a {out_features}x{in_features} "
                f"layer at {bits} bits, group size {group_size}: the checkpoint does not match its config"
            )
