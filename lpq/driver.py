"""The generic block-by-block driver that every method plugs into.

    capture the inputs of the first decoder block once (hidden states [S, L, H] + the kwargs the
    model passes its blocks: attention mask, rotary embeddings, ...)
    for each block:
        move it to the work device
        method.quantize_block(ctx): observers on the linears, calibration batches through the block,
                                    quantize, write the dequantized weights back (stage by stage)
        run the block again on the same inputs -> quantized outputs = the next block's inputs
        save the block's packed tensors to the work directory (for --resume), move it back
The model itself stays on the CPU, so a model larger than the GPU quantizes on one GPU.
"""

from __future__ import annotations

import fnmatch
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import CheckpointError, LpqError, SpecError
from .formats import QuantizedWeight, get_format
from .methods import Method, Observer
from .models.arch import find_blocks, find_linears, linear_shape, linear_weight, set_linear_weight
from .progress import GLOBAL_TIMER, PhaseTimer, info, track
from .spec import QuantSpec


class _StopForward(Exception):
    pass


@dataclass
class BlockInputs:
    """Calibration activations entering one block, split into batches.

    hidden: list of [B, L, H] tensors; args/kwargs: the other arguments the model gave the first
    block for that batch (the same for every block).
    """

    hidden: list[torch.Tensor]
    args: list[tuple]
    kwargs: list[dict[str, Any]]


def _to(obj: Any, device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _move_outside_blocks(model: nn.Module, blocks: nn.ModuleList, device) -> None:
    """Move every parameter and buffer that is not inside a decoder block to ``device``.

    Parameter data is moved in place, so tied weights (lm_head = embed_tokens) stay tied.
    """
    inside = {id(m) for m in blocks.modules()}
    for module in model.modules():
        if id(module) in inside:
            continue
        for p in module._parameters.values():
            if p is not None and p.device != torch.device(device):
                p.data = p.data.to(device)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = b.to(device)


CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")  # "cache": transformers >= 5.24


def split_block_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    """(hidden states, other positional args, keyword args without the KV cache) of a call to a decoder
    block, as a forward pre-hook with kwargs sees it (families pass hidden states by position or by name)."""
    if args:
        hidden, rest = args[0], args[1:]
    else:
        kwargs = dict(kwargs)
        hidden, rest = kwargs.pop("hidden_states"), ()
    return hidden, rest, {k: v for k, v in kwargs.items() if k not in CACHE_KWARGS}


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, tokens: torch.Tensor, batch_size: int, device) -> BlockInputs:
    """Run the model up to its first block on every calibration batch; keep what the block receives."""
    captured = BlockInputs([], [], [])

    def hook(module, args, kwargs):
        hidden, rest, kwargs = split_block_call(args, kwargs)
        captured.hidden.append(hidden.detach())
        captured.args.append(rest)
        captured.kwargs.append(kwargs)
        raise _StopForward

    _move_outside_blocks(model, blocks, device)
    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in track(range(0, tokens.shape[0], batch_size), "calibration: inputs of the first block"):
            batch = tokens[start : start + batch_size].to(device)
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
        _move_outside_blocks(model, blocks, "cpu")
    return captured


@dataclass
class RunOptions:
    """Everything a quantization run needs besides the model."""

    method: Method
    spec: QuantSpec
    ignore: list[str] = field(default_factory=list)  # glob patterns of qualified module names
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # glob -> spec changes
    device: str = "cpu"
    calib_batch_size: int = 1
    work_dir: Path | None = None  # per-block results, for --resume
    resume: bool = False


class QuantizationRun:
    """The state of one run over a model; methods see it in ``Method.prepare``."""

    def __init__(self, model: nn.Module, opts: RunOptions, calib_tokens: torch.Tensor | None = None, tokenizer=None):
        self.model = model
        self.opts = opts
        self.calib_tokens = calib_tokens  # [S, L] or None
        self.tokenizer = tokenizer
        self.device = torch.device(opts.device)
        self.blocks_name, self.blocks = find_blocks(model)
        self.results: dict[str, QuantizedWeight] = {}
        self.timer = PhaseTimer()
        self.specs = self._plan()

    # -- which linears, with which spec ---------------------------------------------------------------
    def _plan(self) -> dict[str, QuantSpec]:
        """Qualified linear name -> spec, for every linear inside the blocks that is not ignored."""
        specs: dict[str, QuantSpec] = {}
        for i, block in enumerate(self.blocks):
            for name, module in find_linears(block).items():
                qualified = f"{self.blocks_name}.{i}.{name}"
                if any(fnmatch.fnmatchcase(qualified, pat) for pat in self.opts.ignore):
                    continue
                spec = self.opts.spec
                for pat, changes in self.opts.overrides.items():
                    if fnmatch.fnmatchcase(qualified, pat):
                        try:
                            spec = spec.replace(**changes)
                        except TypeError:
                            raise SpecError(
                                f"override {pat!r}: {changes} has an unknown key; use bits, group_size, sym, ..."
                            ) from None
                k, n = linear_shape(module)
                get_format(spec.format).check_shape(k, n, spec, layer=qualified)
                specs[qualified] = spec
        if not specs:
            raise LpqError("no linear layer is left to quantize: check the --ignore patterns")
        return specs

    # -- the main loop --------------------------------------------------------------------------------
    def run(self) -> dict[str, QuantizedWeight]:
        method = self.opts.method
        inputs = None
        if method.needs_calibration:
            if self.calib_tokens is None:
                raise LpqError(f"method {method.name} needs calibration data")
            with self.timer.phase("calib"):
                inputs = capture_block_inputs(
                    self.model, self.blocks, self.calib_tokens, self.opts.calib_batch_size, self.device
                )
        with self.timer.phase("method"):
            method.prepare(self)
        for i in track(range(len(self.blocks)), f"quantizing {len(self.blocks)} blocks ({method.name})"):
            block = self.blocks[i]
            block.to(self.device)
            ctx = BlockContext(self, i, block, inputs)
            done = self._load_block(i, ctx)
            if not done:
                packed_before = GLOBAL_TIMER.seconds["pack"]
                with self.timer.phase("method"):
                    method.quantize_block(ctx)
                packing = GLOBAL_TIMER.seconds["pack"] - packed_before  # bit packing inside the method
                self.timer.seconds["pack"] += packing
                self.timer.seconds["method"] -= packing
                missing = [n for n in ctx.linears if n not in ctx.results]
                if missing:
                    raise RuntimeError(f"method {method.name} left {missing} of block {i} unquantized")
                self._save_block(i, ctx)
            if inputs is not None:
                with self.timer.phase("calib"):
                    inputs = ctx.forward_all()
                    _sync(self.device)
            block.to("cpu")
            for name, qw in ctx.results.items():
                self.results[ctx.qualified(name)] = qw
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return self.results

    # -- resume ---------------------------------------------------------------------------------------
    def restore_saved_specs(self) -> None:
        """With --resume, the layers of blocks already saved keep the specs they were saved with.

        For methods whose spec depends on the data (squeezellm's nnz, ptq161's salient count), the
        plan made before the run cannot know them; each saved block file records them.
        """
        if not self.opts.resume or self.opts.work_dir is None:
            return
        from safetensors import safe_open

        for i in range(len(self.blocks)):
            path = self._block_file(i)
            if path is None or not path.is_file():
                continue
            try:
                with safe_open(str(path), "pt") as f:
                    meta = f.metadata() or {}
            except Exception:
                continue  # a damaged block file is reported when the driver loads it
            for name, m in meta.items():
                qualified = f"{self.blocks_name}.{i}.{name}"
                if qualified in self.specs:
                    self.specs[qualified] = QuantSpec.from_dict(json.loads(m)["spec"])

    def _block_file(self, i: int) -> Path | None:
        return None if self.opts.work_dir is None else self.opts.work_dir / "blocks" / f"{i:05d}.safetensors"

    def _save_block(self, i: int, ctx: "BlockContext") -> None:
        path = self._block_file(i)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors, meta = {}, {}
        for name, qw in ctx.results.items():
            for t, v in qw.tensors.items():
                tensors[f"{name}.{t}"] = v.contiguous().cpu()
            meta[name] = json.dumps({"spec": qw.spec.to_dict(), "in": qw.in_features, "out": qw.out_features})
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)  # a block file is either whole or absent

    def _load_block(self, i: int, ctx: "BlockContext") -> bool:
        path = self._block_file(i)
        if path is None or not self.opts.resume or not path.is_file():
            return False
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"the saved block {path} is damaged ({e}); delete it and --resume again") from None
        for name in ctx.linears:
            if name not in meta:
                raise CheckpointError(f"{path} lacks {name}: the partial run does not match; start over with --overwrite")
            m = json.loads(meta[name])
            qw = QuantizedWeight(QuantSpec.from_dict(m["spec"]), m["in"], m["out"],
                                 {t[len(name) + 1 :]: v for t, v in tensors.items() if t.startswith(name + ".")})
            ctx.set_result(name, qw)
        return True


class BlockContext:
    """What a method sees of one decoder block while quantizing it."""

    def __init__(self, run: QuantizationRun, index: int, block: nn.Module, inputs: BlockInputs | None):
        self.run = run
        self.index = index
        self.block = block
        self.inputs = inputs
        self.device = run.device
        prefix = f"{run.blocks_name}.{index}."
        self._prefix = prefix
        self.modules = {n: m for n, m in find_linears(block).items() if prefix + n in run.specs}
        self.linears = list(self.modules)
        self.results: dict[str, QuantizedWeight] = {}

    def qualified(self, name: str) -> str:
        return self._prefix + name

    def spec(self, name: str) -> QuantSpec:
        return self.run.specs[self.qualified(name)]

    def in_features(self, name: str) -> int:
        return linear_shape(self.modules[name])[0]

    def weight(self, name: str) -> torch.Tensor:
        """The current weight as float32 [out_features, in_features] on the work device."""
        return linear_weight(self.modules[name]).detach().to(self.device, torch.float32).clone()

    def set_result(self, name: str, qw: QuantizedWeight) -> None:
        """Record a quantized layer and write its dequantized weight into the block."""
        w = qw.dequantize()
        set_linear_weight(self.modules[name], w.to(self.modules[name].weight.device))
        self.results[name] = qw.to("cpu")

    # -- running calibration data through the block ---------------------------------------------------
    @torch.no_grad()
    def _forward(self, i: int) -> torch.Tensor:
        inp = self.inputs
        return _block_output(self.block(inp.hidden[i], *inp.args[i], **inp.kwargs[i]))

    def forward_all(self) -> BlockInputs:
        """Outputs of the (quantized) block for every calibration batch: the next block's inputs."""
        outs = [self._forward(i) for i in range(len(self.inputs.hidden))]
        return BlockInputs(outs, self.inputs.args, self.inputs.kwargs)

    def observe(self, observers: dict[str, Observer]) -> None:
        """Run every calibration batch through the block, feeding each named linear's input to its observer.

        Each forward stops as soon as every observed linear has seen its input: the layers after them
        cannot change what the observers saw (for Llama's q/k/v stage that skips almost the whole block).
        """
        if not observers:
            return
        pending: set[str] = set()

        def hook(name: str, observer: Observer):
            def fn(module, args, out):
                observer.update(args[0].detach())
                pending.discard(name)
                if not pending:
                    raise _StopForward
            return fn

        handles = [self.modules[n].register_forward_hook(hook(n, o)) for n, o in observers.items()]
        start = time.perf_counter()
        try:
            for i in range(len(self.inputs.hidden)):
                pending.update(observers)
                try:
                    self._forward(i)
                except _StopForward:
                    pass
            _sync(self.device)  # GPU work is asynchronous: charge it to calibration, not to the method
        finally:
            spent = time.perf_counter() - start  # calibration forward, not the method's own maths
            self.run.timer.seconds["calib"] += spent
            self.run.timer.seconds["method"] -= spent
            for h in handles:
                h.remove()

    def stages(self) -> list[list[str]]:
        """The block's linears grouped by shared input, in execution order (true-sequential order).

        E.g. Llama: [[q, k, v], [o], [gate, up], [down]]. Found by running one batch and noting
        which linears receive the very same input tensor.
        """
        if self.inputs is None:
            return [list(self.linears)]
        # keep the input tensors themselves alive (not their ids, which Python may reuse after a free)
        order: list[tuple[str, torch.Tensor]] = []

        def pre(name):
            def hook(module, args):
                order.append((name, args[0]))
            return hook

        handles = [m.register_forward_pre_hook(pre(n)) for n, m in self.modules.items()]
        try:
            self._forward(0)
        finally:
            for h in handles:
                h.remove()
        stages: list[list[str]] = []
        seen: set[str] = set()
        last_input = None
        for name, key in order:
            if name in seen:
                continue
            seen.add(name)
            if stages and key is last_input:
                stages[-1].append(name)
            else:
                stages.append([name])
            last_input = key
        rest = [n for n in self.linears if n not in seen]  # never called on this batch
        if rest:
            stages.append(rest)
        return stages
