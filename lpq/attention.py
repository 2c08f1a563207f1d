"""lpq's attention for transformers models: its decode kernel for one query token, SDPA for the rest.

    import lpq
    lpq.attention.enable(model)   # model.set_attn_implementation("lpq")

Why: at batch 1 every decode step attends one query token per head over the whole key/value cache, and
SDPA's kernels give each head one block, which leaves most of the GPU idle (bench/profile_decode.py).
``enable`` registers the implementation ``"lpq"`` with transformers' attention interface: a call with one
query token that the kernel can take (lpq.kernels.attention_cuda.problem) runs lpq's split-key decode
kernel; every other call (prefill, training, CPU, other head sizes) is handed to transformers' own SDPA
function unchanged, with the same (SDPA) masks. Nothing is changed in the model's weights; the setting
can be undone with ``model.set_attn_implementation("sdpa")``.
"""

from __future__ import annotations

import logging

import torch

from .kernels import attention_cuda

log = logging.getLogger("lpq")

NAME = "lpq"
_registered = {"done": False}


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention function signature: query [B, H, Q, D], key/value [B, Hkv, L, D] ->
    (output [B, Q, H, D], None).

    The kernel takes batch 1 without grouped heads, where it measured faster than SDPA on the H100
    (bench/attention.py: 1.5x at a 384-key cache, 1.1x at 2048). Grouped-query models (Hkv < H) and
    batches > 1 stay on SDPA: the kernel reads a key/value head once for each query head of its group
    (0.35-0.78x), and at batch 8 it measured 0.94x."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (attention_cuda.EXTENSION.ok and dropout == 0.0 and kwargs.get("softcap") is None
            and not kwargs.get("output_attentions", False) and kwargs.get("cache") is None
            and not (torch.is_grad_enabled() and query.requires_grad)
            and query.shape[0] == 1 and query.shape[1] == key.shape[1]  # where it was measured faster: below
            and attention_cuda.problem(query, key, value, attention_mask) is None):
        return attention_cuda.decode_attention(query, key, value, attention_mask, scaling), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def register() -> None:
    """Make ``"lpq"`` a transformers attention implementation (its masks: SDPA's)."""
    if _registered["done"]:
        return
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    _registered["done"] = True


def enable(model) -> str:
    """Switch ``model`` to lpq's attention; returns what its decode steps will run, in one line. On a
    CUDA model the kernel is built (once) and its counters allocated here, so that a CUDA graph captured
    later finds them."""
    register()
    model.set_attn_implementation(NAME)
    device = next(model.parameters()).device
    if device.type != "cuda":
        return "lpq attention: SDPA (the decode kernel needs CUDA)"
    if not attention_cuda.load():
        return f"lpq attention: SDPA ({attention_cuda.failure_reason()})"
    attention_cuda.counters(device)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if head not in attention_cuda.HEAD_SIZES:
        return f"lpq attention: SDPA (head size {head}; the decode kernel has {attention_cuda.HEAD_SIZES})"
    return "lpq attention: lpq decode kernel for one query token, SDPA otherwise"
