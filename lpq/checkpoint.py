"""Save and load packed models as a directory a transformers user recognises.

    OUT/config.json               the model's config + quantization_config (quant_method "lpq")
    OUT/model.safetensors         or model-0000k-of-0000n.safetensors + model.safetensors.index.json
    OUT/tokenizer files, generation_config.json

quantization_config = {quant_method: "lpq", format_version, lpq_version, method, default: <spec>,
modules: {qualified linear name: <changes from default>}, calibration, method_options, and rotation
({kind: "hadamard", seed} when the weights were rotated before quantization, plus heads: true when the
value/output heads were rotated too: lpq.transforms.rotate)}. A GPTQ-format output (--format gptq) carries
the same record as "lpq_rotation" in its GPTQ quantization_config (lpq.formats.gptq_compat).
Writing goes to a temporary sibling directory that is renamed into place at the end, so an
interrupted save never leaves a half-written OUT.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from . import __version__
from .errors import CheckpointError, FormatError, OutputExistsError
from .nn import QuantizedLinear
from .spec import QuantSpec

FORMAT_VERSION = 1
QUANT_METHOD = "lpq"


# ---------------------------------------------------------------------------------------------------
# quantization_config
# ---------------------------------------------------------------------------------------------------
def make_quant_config(default: QuantSpec, specs: dict[str, QuantSpec], calibration: dict | None,
                      method_options: dict | None, rotation: dict | None = None) -> dict[str, Any]:
    base = default.to_dict()
    modules = {}
    for name, spec in specs.items():
        d = spec.to_dict()
        modules[name] = {k: v for k, v in d.items() if base.get(k) != v}
    qconfig = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "lpq_version": __version__,
        "method": default.method,
        "default": base,
        "modules": modules,
        "calibration": calibration,
        "method_options": method_options or {},
    }
    if rotation:  # only when used: the weights were rotated before quantization (lpq.transforms.rotate)
        qconfig["rotation"] = rotation
    return qconfig


def module_specs(qconfig: dict[str, Any]) -> dict[str, QuantSpec]:
    """Qualified module name -> QuantSpec, from a quantization_config."""
    if qconfig.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"quantization_config has quant_method {qconfig.get('quant_method')!r}, not 'lpq'")
    version = qconfig.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"this checkpoint uses lpq format version {version}, newer than this lpq ({FORMAT_VERSION}): upgrade lpq"
        )
    try:
        base = qconfig["default"]
        return {name: QuantSpec.from_dict({**base, **changes}) for name, changes in qconfig["modules"].items()}
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"quantization_config is malformed ({e}): the checkpoint is damaged") from None


# ---------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------
def check_output(out: str | os.PathLike, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output directory {out} already exists: choose another --out or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a directory: choose another --out")
    return out


@contextmanager
def atomic_directory(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; on success it replaces ``out`` in one rename."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            if not overwrite:
                raise OutputExistsError(f"output directory {out} already exists: pass --overwrite")
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _dedupe_shared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop tensors that share storage with an earlier one (tied embeddings); loading re-ties them."""
    seen: set[tuple] = set()
    out = {}
    for k, v in state.items():
        key = (v.device, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        out[k] = v.detach().contiguous().cpu()
    return out


def _parse_size(size: str | int) -> int:
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def write_state_dict(state: dict[str, torch.Tensor], directory: Path, max_shard_size: str | int = "5GB") -> list[str]:
    """Write safetensors shards (one file below the limit) and the index; return the file names."""
    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, str(directory / name), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
            "weight_map": {k: name for name, shard in zip(names, shards) for k in shard},
        }
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names


def storage_dtype(config) -> torch.dtype:
    """The dtype for the unquantized weights on disk: the model's own 16-bit dtype, else float16."""
    dt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    return dt if dt in (torch.float16, torch.bfloat16) else torch.float16


def gptq_export(model: nn.Module, state: dict[str, torch.Tensor], qconfig: dict) -> tuple[dict, dict]:
    """lpq state dict + config -> the same model as a GPTQ v1 checkpoint (state dict, quantization_config).

    Layers whose spec differs from the default, and linears of the blocks left unquantized, are
    written as GPTQModel's per-module ``dynamic`` overrides ("+:regex" / "-:regex"); a rotation record
    is kept as "lpq_rotation".
    """
    import re

    from .formats.gptq_compat import gptq_quantization_config, to_gptq
    from .models.arch import find_blocks, find_linears

    specs = module_specs(qconfig)
    default = QuantSpec.from_dict(qconfig["default"])
    if any(s.format != "uniform" for s in specs.values()):
        raise FormatError("--format gptq holds only uniform integer layers: save this model with --format lpq")
    state = dict(state)
    dynamic: dict[str, dict] = {}
    for name, spec in specs.items():
        layer = model.get_submodule(name)
        tensors = {t: state.pop(f"{name}.{t}") for t in list(layer.tensors())}
        for t, v in to_gptq(tensors, spec, layer.in_features, layer.out_features).items():
            state[f"{name}.{t}"] = v
        if (spec.bits, spec.group_size, spec.sym, spec.act_order) != (default.bits, default.group_size, default.sym,
                                                                       default.act_order):
            dynamic[f"+:^{re.escape(name)}$"] = {"bits": spec.bits, "group_size": spec.group_size, "sym": spec.sym,
                                                 "desc_act": spec.act_order}
    blocks_name, blocks = find_blocks(model)
    for i, block in enumerate(blocks):
        for n in find_linears(block):
            full = f"{blocks_name}.{i}.{n}"
            if full not in specs:
                dynamic[f"-:^{re.escape(full)}$"] = {}
    gconfig = gptq_quantization_config(default, rotation=qconfig.get("rotation"))
    if dynamic:
        gconfig["dynamic"] = dynamic
    return state, gconfig


def save_quantized(model: nn.Module, tokenizer, out: Path, qconfig: dict, overwrite: bool = False,
                   max_shard_size: str | int = "5GB", save_format: str = "lpq") -> Path:
    """Write the packed model; unquantized float tensors (embeddings, norms, biases) in 16 bits."""
    save_dtype = storage_dtype(model.config)
    state = _dedupe_shared(model.state_dict())
    if save_format == "gptq":
        state, qconfig = gptq_export(model, state, qconfig)
    state = {k: v.to(save_dtype) if v.is_floating_point() and v.dtype != torch.float16 else v for k, v in state.items()}
    with atomic_directory(out, overwrite) as tmp:
        write_state_dict(state, tmp, max_shard_size)
        config = copy.deepcopy(model.config)
        config.dtype = save_dtype
        config.quantization_config = qconfig
        config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    gen.save_pretrained(tmp)
                except Exception:  # an invalid generation config is not worth failing the run for
                    pass
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out


# ---------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------
def weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is damaged ({e}): re-run lpq quantize") from None
        files = [directory / n for n in names]
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory} holds no .safetensors weights (lpq loads only safetensors)")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"shard {f.name} named in the index is missing from {directory}")
    return files


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), "pt") as handle:
                for k in handle.keys():
                    state[k] = handle.get_tensor(k)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{f} is corrupt or truncated ({str(e).splitlines()[0]}): re-create it with lpq quantize") from None
    return state


def safetensors_shapes(files: list[Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, dtype string) from the headers only (no tensor data read)."""
    out = {}
    for f in files:
        try:
            with safe_open(str(f), "pt") as handle:
                for k in handle.keys():
                    sl = handle.get_slice(k)
                    out[k] = (tuple(sl.get_shape()), sl.get_dtype())
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{f} is corrupt or truncated ({str(e).splitlines()[0]}): re-create it with lpq quantize") from None
    return out


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def replace_with_quantized(model: nn.Module, specs: dict[str, QuantSpec], dtype: torch.dtype, device="meta") -> None:
    """Swap each named linear for an empty QuantizedLinear of the same shape (before loading tensors)."""
    from .models.arch import is_linear, linear_shape

    for name, spec in specs.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"quantization_config names {name}, which this model does not have: the config does not match") from None
        if not is_linear(old):
            raise CheckpointError(f"quantization_config names {name}, which is not a linear layer")
        k, n = linear_shape(old)
        _set_module(model, name, QuantizedLinear(k, n, spec, bias=old.bias is not None, dtype=dtype, device=device))


def load_quantized(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load an lpq directory as a transformers model whose quantized linears are QuantizedLinear."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory} has no config.json: not an lpq output directory")
    try:
        config = AutoConfig.from_pretrained(str(directory))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {directory / 'config.json'}: {str(e).splitlines()[0]}") from None
    qconfig = getattr(config, "quantization_config", None)
    if not isinstance(qconfig, dict):
        qconfig = qconfig.to_dict() if qconfig is not None else None
    if not qconfig:
        raise CheckpointError(f"{directory} is not quantized (no quantization_config): load it with transformers")
    if qconfig.get("quant_method") == "gptq":
        from .formats import gptq_compat

        specs, state = gptq_compat.load_gptq_state(directory, qconfig, weight_files(directory), read_safetensors)
    else:
        specs = module_specs(qconfig)
        state = read_safetensors(weight_files(directory))
    if dtype is None:
        dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    skeleton_config = copy.deepcopy(config)
    del skeleton_config.quantization_config
    with init_empty_weights(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(skeleton_config, dtype=dtype)
    replace_with_quantized(model, specs, dtype)
    expected = model.state_dict()
    tied = _tied_keys(model)
    missing = [k for k in expected if k not in state and k not in tied]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
        if unexpected:
            parts.append(f"unexpected {unexpected[0]}" + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""))
        raise CheckpointError(f"the config of {directory} does not match its tensors: {'; '.join(parts)}")
    for k, v in state.items():
        want = expected[k]
        if tuple(v.shape) != tuple(want.shape):
            raise CheckpointError(
                f"the config of {directory} does not match its tensors: {k} is {tuple(v.shape)}, the config implies {tuple(want.shape)}"
            )
        if v.is_floating_point() and want.is_floating_point():
            # the skeleton knows each tensor's dtype: the model dtype for ordinary weights, the format's
            # own for packed-layer tensors (fp16 scales, codebooks, sparse values)
            state[k] = v.to(want.dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_weights()
    still_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.device.type == "meta"]
    if still_meta:
        raise CheckpointError(f"{directory} lacks {still_meta[0]}: the config does not match the tensors")
    model.config.quantization_config = qconfig
    model.to(device)
    model.eval()
    return model


def _tied_keys(model: nn.Module) -> set[str]:
    """State-dict keys that the model ties to another (e.g. lm_head.weight with tie_word_embeddings)."""
    keys = set()
    if getattr(model.config, "tie_word_embeddings", False):
        out = model.get_output_embeddings()
        if out is not None:
            for name, module in model.named_modules():
                if module is out:
                    keys.add(f"{name}.weight")
    return keys
