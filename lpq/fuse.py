"""Fused sibling projections: linears that read the same input run as one wider linear (inference only).

In a decoder block, q/k/v read the same hidden states, and so do the MLP's gate and up projections. At batch 1
each linear is one GEMV whose time is partly fixed (launch, ramp to full bandwidth, tail), so one GEMV of
4096 -> 12288 outputs takes less time than three of 4096 outputs. ``fuse_siblings(model)`` joins each such group
into one layer (``nn.Linear`` weights concatenated, or a packed format's ``concat_outputs``) and puts in each
sibling's place a small module that returns its slice of the joint output. The model's own forward code is
untouched: the first sibling called on a tensor computes the joint output, the others find it there (by the
identity of their input) and take their columns; after the last sibling the reference is dropped. A sibling
called on another tensor than the one cached (or on the same tensor modified in place, outside torch.compile)
computes the joint output again, so results never depend on the order of the calls.

This changes the module tree (the siblings' weights now live in the fused layer), so fuse a model only to run
it: save or re-quantize the unfused model. ``torch.compile`` traces it as one graph (the cache is plain Python
state between the sibling calls).

Two further steps fold the small kernels between a block's linears into them (lpq.epilogue), for decoder blocks
whose code is known (``GATED_MLPS``, ``PRE_NORM_BLOCKS``):

- ``fuse_gated_mlp(model)``: each gated SiLU MLP becomes a ``GatedMLP``: gate and up joined with their rows
  interleaved, so that the joint linear gives silu(gate) * up itself (in lpq's uniform CUDA kernel: in its
  epilogue; elsewhere in torch), then down. Run it before ``fuse_siblings``.
- ``fold_norms(model)``: each block's two RMSNorms become ``DeferredRMSNorm``s that hand w * h to the projection
  reading them, which scales by the rms of h itself. Run it after ``fuse_siblings`` and ``fuse_gated_mlp``: the
  q/k/v of a block must be one fused linear, and its MLP a GatedMLP or a fused gate/up.

``fuse_for_decode(model)`` runs the first two, fold_norms when asked (it measured no faster on the H100), and for
known attention classes ``fuse_attention`` (rotary, cache write and attention in one kernel: DecodeAttention) and
``fuse_blocks`` (DecodeBlock: each decoder block's residual adds and RMSNorms in its projections' epilogues, so that a
decode step of a block is five kernels). The last two act only on decode steps under lpq attention.
"""

from __future__ import annotations

import torch
from torch import nn

from .epilogue import linear_forward, linear_residual, swiglu_row_order
from .errors import LpqError
from .kernels import attention_cuda
from .nn import QuantizedLinear

# names of sibling linears that read the same input, per block (LLaMA, Mistral, Qwen2, Gemma, ...)
SIBLING_GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class SharedProjection(nn.Module):
    """The fused linear of one sibling group and the joint output of its last input."""

    def __init__(self, fused: nn.Module, names: tuple[str, ...], widths: list[int]) -> None:
        super().__init__()
        self.fused = fused
        self.names = names
        self.widths = widths
        self._x: torch.Tensor | None = None
        self._version = -1
        self._y: torch.Tensor | None = None
        self._served = 0
        object.__setattr__(self, "norm", None)  # a DeferredRMSNorm feeding this projection (fold_norms); not a submodule

    def joint(self, x: torch.Tensor) -> torch.Tensor:
        """The fused linear's output for x, computed now and not kept (for a caller that takes every column)."""
        if self.norm is not None:
            return linear_forward(self.fused, x, norm_of=self.norm.take(x), norm_eps=self.norm.eps)
        return self.fused(x)

    def output_for(self, x: torch.Tensor) -> torch.Tensor:
        stale = self._x is not x
        if not stale and not torch.compiler.is_compiling():
            stale = self._version != x._version  # modified in place since (eager only)
        if stale:
            self._y = self.joint(x)
            self._x, self._served = x, 0
            if not torch.compiler.is_compiling():
                self._version = x._version
        y = self._y
        self._served += 1
        if self._served == len(self.names):  # every sibling has its slice: hold nothing between calls
            self._x = self._y = None
        return y

    def extra_repr(self) -> str:
        return f"siblings={'/'.join(self.names)}, widths={self.widths}"


class SiblingSlice(nn.Module):
    """Stands where a sibling linear was: its columns [start, stop) of the shared joint output."""

    def __init__(self, shared: SharedProjection, start: int, stop: int, in_features: int) -> None:
        super().__init__()
        # a plain attribute, not a submodule: the fused weights are registered once, on the parent
        object.__setattr__(self, "shared", shared)
        self.start, self.stop = start, stop
        self.in_features, self.out_features = in_features, stop - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.output_for(x)[..., self.start:self.stop]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, columns [{self.start}, {self.stop})"


def join_linears(layers: list[nn.Module]) -> nn.Module | None:
    """One layer computing the outputs of ``layers`` side by side, or None if they cannot be joined (different
    types, inputs, dtypes, devices, specs, bias presence, or a packed format without ``concat_outputs``)."""
    first = layers[0]
    has_bias = [getattr(layer, "bias", None) is not None for layer in layers]
    if len(set(has_bias)) != 1 or len({type(layer) for layer in layers}) != 1:
        return None
    if type(first) is nn.Linear:
        weights = [layer.weight for layer in layers]
        if len({(w.shape[1], w.dtype, w.device) for w in weights}) != 1:
            return None
        out = nn.Linear(first.in_features, sum(w.shape[0] for w in weights), bias=has_bias[0],
                        dtype=first.weight.dtype, device=first.weight.device)
        with torch.no_grad():
            out.weight.copy_(torch.cat(weights))
            if has_bias[0]:
                out.bias.copy_(torch.cat([layer.bias for layer in layers]))
        out.requires_grad_(False)
        return out
    if type(first) is QuantizedLinear:
        qws = [layer.quantized_weight() for layer in layers]
        joined = qws[0].format.concat_outputs(qws)
        if joined is None:
            return None
        bias = torch.cat([layer.bias for layer in layers]) if has_bias[0] else None
        dtype = first.bias.dtype if has_bias[0] else torch.float16
        home = first.canonical_home or first.qweight.device
        out = QuantizedLinear.from_quantized(joined.to(home), bias.to(home) if bias is not None else None, dtype)
        return out
    return None


def fuse_siblings(model: nn.Module, groups: tuple[tuple[str, ...], ...] = SIBLING_GROUPS) -> list[str]:
    """Join every group of sibling linears of ``model`` (in place); -> the names of the fused groups, e.g.
    ``model.layers.0.self_attn.q_proj+k_proj+v_proj``. A group whose members cannot be joined stays as it was."""
    fused = []
    for parent_name, parent in list(model.named_modules()):
        for names in groups:
            layers = [getattr(parent, n, None) for n in names]
            if any(not isinstance(layer, (nn.Linear, QuantizedLinear)) for layer in layers):
                continue
            joined = join_linears(layers)
            if joined is None:
                continue
            widths = [layer.out_features for layer in layers]
            shared = SharedProjection(joined, names, widths)
            parent.add_module("fused_" + "_".join(names), shared)
            start = 0
            for name, width in zip(names, widths):
                setattr(parent, name, SiblingSlice(shared, start, start + width, layers[0].in_features))
                start += width
            fused.append(f"{parent_name}.{'+'.join(names)}" if parent_name else "+".join(names))
    return fused


# Modules whose forward is known to be the one fuse_gated_mlp / fold_norms replace: a gated MLP
# down(act(gate(x)) * up(x)); a pre-norm decoder block whose input_layernorm output is read only by self_attn's
# q/k/v projections and post_attention_layernorm's only by the mlp; an RMSNorm weight * (h * rsqrt(mean(h^2) + eps)).
GATED_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")
PRE_NORM_BLOCKS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")
RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
SILU_ACTIVATIONS = ("SiLU", "SiLUActivation")


class DeferredRMSNorm(nn.Module):
    """Stands where a block's RMSNorm was: returns x = w * h and leaves the rms scale to the one projection that
    reads x, which asks for h with ``take(x)`` (lpq.epilogue). The weight is the norm's own parameter."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight = norm.weight
        self.eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
        self._x: torch.Tensor | None = None
        self._h: torch.Tensor | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = (self.weight * h).to(h.dtype)
        self._x, self._h = x, h
        return x

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """h for the x this norm returned last (then forgotten). Any other tensor means the block's code did not
        hand the norm's output straight to the projection, where the rms scale would be lost: an error."""
        if self._x is None or self._x is not x:
            raise LpqError("fold_norms: a folded RMSNorm's output reached its projection as another tensor (a hook "
                           "or a block whose code differs); load the model again without folded norms")
        h = self._h
        self._x = self._h = None
        return h

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, scale folded into the next projection"


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up joined into ``gate_up``, rows interleaved by
    lpq.epilogue.swiglu_row_order, whose kernel gives silu(gate) * up directly (swiglu epilogue)."""

    def __init__(self, gate_up: nn.Module, down_proj: nn.Module, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up = gate_up
        self.down_proj = down_proj
        self.intermediate_size = intermediate_size
        object.__setattr__(self, "norm", None)  # a DeferredRMSNorm feeding this MLP (fold_norms); not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            a = linear_forward(self.gate_up, x, norm_of=self.norm.take(x), norm_eps=self.norm.eps, swiglu=True)
        else:
            a = linear_forward(self.gate_up, x, swiglu=True)
        return self.down_proj(a)

    def extra_repr(self) -> str:
        return f"intermediate_size={self.intermediate_size}, gate/up interleaved, silu(gate) * up in the linear"


def permute_outputs(layer: nn.Module, order: torch.Tensor) -> nn.Module | None:
    """A copy of ``layer`` (nn.Linear or QuantizedLinear) whose output j is its output order[j], or None where its
    packed format cannot reorder rows."""
    if type(layer) is nn.Linear:
        order = order.to(layer.weight.device)
        out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                        dtype=layer.weight.dtype, device=layer.weight.device)
        with torch.no_grad():
            out.weight.copy_(layer.weight[order])
            if layer.bias is not None:
                out.bias.copy_(layer.bias[order])
        return out.requires_grad_(False)
    if type(layer) is QuantizedLinear:
        qw = layer.quantized_weight()
        moved = qw.format.permute_outputs(qw, order)
        if moved is None:
            return None
        bias = layer.bias[order.to(layer.bias.device)] if layer.bias is not None else None
        dtype = layer.bias.dtype if layer.bias is not None else torch.float16
        home = layer.canonical_home or layer.qweight.device
        return QuantizedLinear.from_quantized(moved.to(home), bias.to(home) if bias is not None else None, dtype)
    return None


def fuse_gated_mlp(model: nn.Module) -> list[str]:
    """Replace every gated SiLU MLP of a known class (GATED_MLPS) by a GatedMLP (in place); -> their names. An MLP
    whose gate and up cannot be joined and reordered, or whose width is not a multiple of 8, stays as it was."""
    from .epilogue import SWIGLU_TILE

    done = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, mlp in list(parent.named_children()):
            if type(mlp).__name__ not in GATED_MLPS or type(getattr(mlp, "act_fn", None)).__name__ not in SILU_ACTIVATIONS:
                continue
            gate, up, down = (getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
            if any(not isinstance(layer, (nn.Linear, QuantizedLinear)) for layer in (gate, up, down)):
                continue  # e.g. siblings already fused: fuse_gated_mlp runs first
            width = gate.out_features
            if width % SWIGLU_TILE or up.out_features != width:
                continue
            joined = join_linears([gate, up])
            if joined is None:
                continue
            joined = permute_outputs(joined, swiglu_row_order(width))
            if joined is None:
                continue
            setattr(parent, child_name, GatedMLP(joined, down, width))
            done.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return done


def _qkv_projection(attn: nn.Module) -> SharedProjection | None:
    """The SharedProjection computing all of attn's q/k/v, if fuse_siblings joined them."""
    if isinstance(attn, DecodeAttention):
        return attn.shared
    slices = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj")]
    if not all(isinstance(s, SiblingSlice) for s in slices):
        return None
    shared = slices[0].shared
    return shared if all(s.shared is shared for s in slices) and len(shared.names) == 3 else None


def _mlp_consumer(mlp: nn.Module) -> nn.Module | None:
    """What reads the MLP's input: a GatedMLP itself, or the SharedProjection of a fused gate/up."""
    if isinstance(mlp, GatedMLP):
        return mlp
    if type(mlp).__name__ not in GATED_MLPS:
        return None
    slices = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj")]
    if all(isinstance(s, SiblingSlice) for s in slices) and slices[0].shared is slices[1].shared \
            and len(slices[0].shared.names) == 2:
        return slices[0].shared
    return None


BLOCK_NORMS = ("input_layernorm", "post_attention_layernorm")


def fold_norms(model: nn.Module, which: tuple[str, ...] = BLOCK_NORMS) -> list[str]:
    """In every pre-norm decoder block of a known class (PRE_NORM_BLOCKS, RMS_NORMS), put a DeferredRMSNorm in
    place of input_layernorm (read by the fused q/k/v) and of post_attention_layernorm (read by a GatedMLP or a
    fused gate/up): their projections scale by the rms themselves. ``which`` limits it to some of the two.
    -> the names of the folded norms.

    Caution in float16: the projection's input w * h is formed before normalising, so a hidden state with
    |w * h| > 65504 overflows where RMSNorm itself would not (bfloat16 has no such limit)."""
    done = []
    fused = {id(m.block) for m in model.modules() if isinstance(m, DecodeBlock)}  # their norms feed the epilogues
    for name, block in model.named_modules():
        if type(block).__name__ not in PRE_NORM_BLOCKS or id(block) in fused:
            continue
        pairs = (("input_layernorm", _qkv_projection(getattr(block, "self_attn", nn.Module()))),
                 ("post_attention_layernorm", _mlp_consumer(getattr(block, "mlp", nn.Module()))))
        for norm_name, consumer in pairs:
            norm = getattr(block, norm_name, None)
            if norm_name not in which or consumer is None or type(norm).__name__ not in RMS_NORMS:
                continue
            deferred = DeferredRMSNorm(norm)
            setattr(block, norm_name, deferred)
            object.__setattr__(consumer, "norm", deferred)
            done.append(f"{name}.{norm_name}" if name else norm_name)
    return done


# attention modules whose forward is transformers' Llama attention: q/k/v projections, apply_rotary_pos_emb (rotate_half
# over the whole head), the cache's update, the attention function, o_proj. Mistral and Qwen2 differ only by a
# sliding window, which DecodeAttention leaves to the original forward.
ROPE_ATTENTIONS = ("LlamaAttention", "MistralAttention", "Qwen2Attention")
# the keyword a block passes its KV cache by: ``cache`` from transformers 5.24, ``past_key_values`` before
CACHE_KWARGS = ("cache", "past_key_values")


def cache_argument(kwargs: dict):
    """The KV cache among a block's keyword arguments, under either name, or None."""
    for name in CACHE_KWARGS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


class DecodeAttention(nn.Module):
    """Stands where a block's self-attention (ROPE_ATTENTIONS) was, with its q/k/v fused. A call that is one decode
    step of one sequence over transformers' static cache, on CUDA, with lpq's attention implementation
    (lpq.attention.enable) and no grouped heads, runs the fused q/k/v projection, then one lpq kernel that rotates q
    and the new key, writes the key and value into the cache, attends over it and moves the cache's length on
    (attention_cuda.rope_cache_attention: four small kernels fewer a block), then o_proj. Every other call
    (prefill, other caches, CPU, training, a sliding window) runs the original module's forward unchanged."""

    def __init__(self, attn: nn.Module, shared: SharedProjection) -> None:
        super().__init__()
        self.attn = attn
        object.__setattr__(self, "shared", shared)  # registered under attn (fused_q_proj_k_proj_v_proj)
        cfg = attn.config
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(attn.head_dim)
        self.train(attn.training)  # a new module starts in training mode; keep the model's

    def _sliding_window(self) -> bool:
        if getattr(self.attn, "sliding_window", None) is not None:
            return True
        return type(self.attn).__name__ == "MistralAttention" and getattr(self.attn.config, "sliding_window", None) is not None

    @staticmethod
    def _kernel_ready(hidden_states: torch.Tensor) -> bool:
        return hidden_states.is_cuda and attention_cuda.EXTENSION.ok

    def _static_layer(self, hidden_states, position_embeddings, attention_mask, cache, kwargs):
        """The static cache layer this call writes, if the fused kernel takes the call, else None."""
        if self.attn.config._attn_implementation != "lpq" or self.training or not self._kernel_ready(hidden_states):
            return None
        if hidden_states.dim() != 3 or hidden_states.shape[0] != 1 or hidden_states.shape[1] != 1:
            return None
        if (torch.is_grad_enabled() and hidden_states.requires_grad) or kwargs.get("output_attentions", False):
            return None
        if position_embeddings is None or self._sliding_window() or self.heads != self.kv_heads:
            return None  # grouped heads: the kernel measured slower than SDPA there (lpq.attention)
        layers = getattr(cache, "layers", None)
        idx = getattr(self.attn, "layer_idx", None)
        if layers is None or idx is None or idx >= len(layers):
            return None
        layer = layers[idx]
        if type(layer).__name__ != "StaticLayer" or not getattr(layer, "is_initialized", False):
            return None
        cos, sin = position_embeddings
        if attention_cuda.rope_problem(cos, sin, layer.keys, layer.values, layer.cumulative_length, attention_mask,
                                       self.heads, hidden_states.dtype) is not None:
            return None
        return layer

    def kernel_layer(self, hidden_states: torch.Tensor, position_embeddings, attention_mask, kwargs: dict):
        """The static cache layer of this call (keyword arguments as the block passes them) if the fused kernel
        takes it, else None."""
        rest = {k: v for k, v in kwargs.items() if k not in CACHE_KWARGS}
        return self._static_layer(hidden_states, position_embeddings, attention_mask, cache_argument(kwargs), rest)

    def attend(self, qkv: torch.Tensor, layer, position_embeddings, attention_mask) -> torch.Tensor:
        """qkv [1, 1, (H + 2 Hkv) D] of the new token -> the attention output [1, 1, H D] (o_proj's input); the
        new key and value are written into ``layer``."""
        cos, sin = position_embeddings  # [1, 1, D] each
        out = attention_cuda.rope_cache_attention(qkv, cos, sin, layer.keys, layer.values, layer.cumulative_length,
                                                  attention_mask, self.heads, self.attn.scaling)  # [1, 1, H, D]
        return out.reshape(1, 1, self.heads * self.head_dim)

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, **kwargs):
        layer = self.kernel_layer(hidden_states, position_embeddings, attention_mask, kwargs)
        if layer is None:  # the cache goes on under the keyword it came by
            return self.attn(hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask,
                             **kwargs)
        qkv = self.shared.joint(hidden_states)  # [1, 1, (H + 2 Hkv) D]
        return self.attn.o_proj(self.attend(qkv, layer, position_embeddings, attention_mask)), None

    def extra_repr(self) -> str:
        return "decode steps: rotary, cache write and attention in one lpq kernel"


def fuse_attention(model: nn.Module) -> list[str]:
    """Put a DecodeAttention in place of every self-attention of a known class (ROPE_ATTENTIONS) whose q/k/v
    fuse_siblings has joined (in place); -> their names. Run it after fuse_siblings (and fold_norms)."""
    done = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, attn in list(parent.named_children()):
            if type(attn).__name__ not in ROPE_ATTENTIONS or not hasattr(attn, "head_dim"):
                continue
            shared = _qkv_projection(attn)
            if shared is None or tuple(shared.names) != ("q_proj", "k_proj", "v_proj"):
                continue
            setattr(parent, child_name, DecodeAttention(attn, shared))
            done.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return done


def _norm_eps(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


class DecodeBlock(nn.Module):
    """Stands where a pre-norm decoder block (PRE_NORM_BLOCKS) was, whose attention is a DecodeAttention and whose
    MLP a GatedMLP, with unfolded RMSNorms. On a call the fused attention kernel takes (one decode token, batch 1,
    static cache, lpq attention), the block runs as five kernels and no other: the q/k/v projection with the
    input RMSNorm folded in (lpq.epilogue ``norm_sq``), the attention kernel, o_proj with the residual add and the
    second RMSNorm's weight in its epilogue (``residual``), the joint gate/up with that norm's scale and silu(gate)
    * up, and down_proj with the residual add and the next block's input-norm weight. What down_proj leaves for the
    next block (h, w * h and the sums of h^2) waits on that block (``next_block``), which takes it when it is called
    on that h; the last block (no next) adds down_proj's output in torch. Every other call runs the block's own
    forward. Kernels other than lpq's uniform CUDA kernel compute the same epilogues in torch."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        object.__setattr__(self, "next_block", None)  # the DecodeBlock called after this one; not a submodule
        self._carry: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.train(block.training)

    def __getattr__(self, name: str):
        # the wrapped block's own attributes (self_attn, mlp, attention_type, ...) read through the wrapper, for code
        # that walks model.layers
        try:
            return super().__getattr__(name)
        except AttributeError:
            block = self.__dict__.get("_modules", {}).get("block")
            if block is None:
                raise
            return getattr(block, name)

    def forward(self, hidden_states: torch.Tensor, *args, attention_mask=None, position_embeddings=None, **kwargs):
        carry, self._carry = self._carry, None
        attn, mlp = self.block.self_attn, self.block.mlp
        layer = None
        if not args and not (self.block._forward_hooks or self.block._forward_pre_hooks):  # hooks see the block's own
            layer = attn.kernel_layer(hidden_states, position_embeddings, attention_mask, kwargs)
        if layer is None:
            return self.block(hidden_states, *args, attention_mask=attention_mask,
                              position_embeddings=position_embeddings, **kwargs)
        norm_in, norm_post = self.block.input_layernorm, self.block.post_attention_layernorm
        h0 = hidden_states  # [1, 1, D]
        if carry is not None and carry[0] is h0:  # the previous block's down_proj made them
            x0, sq0 = carry[1], carry[2]
        else:
            x0 = (norm_in.weight * h0).to(h0.dtype)
            sq0 = h0.float().pow(2).sum(-1, keepdim=True)  # [1, 1, 1]
        qkv = linear_forward(attn.shared.fused, x0, norm_sq=sq0, norm_eps=_norm_eps(norm_in))
        a = attn.attend(qkv, layer, position_embeddings, attention_mask)  # [1, 1, H D]
        h1, x1, sq1 = linear_residual(attn.attn.o_proj, a, h0, norm_post.weight)
        g = linear_forward(mlp.gate_up, x1, norm_sq=sq1, norm_eps=_norm_eps(norm_post), swiglu=True)  # [1, 1, I]
        nxt = self.next_block
        if nxt is None:
            return h1 + mlp.down_proj(g)
        h2, x2, sq2 = linear_residual(mlp.down_proj, g, h1, nxt.block.input_layernorm.weight)
        nxt._carry = (h2, x2, sq2)
        return h2

    def extra_repr(self) -> str:
        return "decode steps: residual adds and RMSNorms in the projections' epilogues"


def fuse_blocks(model: nn.Module) -> list[str]:
    """Put a DecodeBlock in place of every decoder block of a known class (PRE_NORM_BLOCKS) in a ModuleList whose
    attention fuse_attention replaced, whose MLP is a GatedMLP and whose two norms are RMSNorms (RMS_NORMS, not
    folded); consecutive ones are chained (in place). -> their names. Run it after fuse_attention."""
    done = []
    for list_name, blocks in list(model.named_modules()):
        if not isinstance(blocks, nn.ModuleList):
            continue
        previous = None
        for i, block in enumerate(blocks):
            ok = (type(block).__name__ in PRE_NORM_BLOCKS and isinstance(getattr(block, "self_attn", None), DecodeAttention)
                  and isinstance(getattr(block, "mlp", None), GatedMLP) and block.mlp.norm is None
                  and all(type(getattr(block, n, None)).__name__ in RMS_NORMS for n in BLOCK_NORMS))
            if not ok:
                previous = None
                continue
            wrapped = DecodeBlock(block)
            blocks[i] = wrapped
            if previous is not None:
                object.__setattr__(previous, "next_block", wrapped)
            previous = wrapped
            done.append(f"{list_name}.{i}" if list_name else str(i))
    return done


def fuse_for_decode(model: nn.Module, norms: tuple[str, ...] = (), attention: bool = True,
                    blocks: bool = True) -> dict[str, list[str]]:
    """fuse_gated_mlp, fuse_siblings, fold_norms (of ``norms``, none by default), fuse_attention (unless
    ``attention`` is False) and fuse_blocks (unless ``blocks`` is False; it needs the attention fused and no norm
    folded), in that order (in place) -> what each changed. Folding the norms alone is off by default: on the H100
    it did not make the 7B-shaped decode step faster (bench/RESULTS.md, the A/B runs of 2026-11-24: W4 2.34 ms/token
    with the MLP's norm folded, 2.36 with both, 2.33 with none), because the residual add before each norm stayed a
    kernel of its own. The fused blocks take that add into the projections' epilogues as well (A/B, same session:
    W4 2.22 -> 2.13 ms, W3 2.08 -> 2.01). The fused attention and the fused blocks act only under lpq's attention
    implementation (lpq.attention.enable)."""
    mlps = fuse_gated_mlp(model)
    siblings = fuse_siblings(model)
    norms = fold_norms(model, norms)
    attns = fuse_attention(model) if attention else []
    fused_blocks = fuse_blocks(model) if blocks else []
    return {"gated_mlp": mlps, "siblings": siblings, "norms": norms, "attention": attns, "blocks": fused_blocks}
