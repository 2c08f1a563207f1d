"""Decode attention: one query token a sequence over a key/value cache, split along the keys (CUDA).

Importing this module needs torch only; the extension (ops ``torch.ops.lpq_attn.decode_attention`` and
``...plan``) is built on first use like the other kernels (``cuda_build``), as its own extension so that
a failure here never takes the GEMM kernels down.

Shapes (transformers' layout): q [B, H, 1, D], k and v [B, Hkv, L, D] (H a multiple of Hkv: grouped
query attention reads key/value head h // (H / Hkv)), an optional mask broadcastable as [B, H, 1, L]
(bool, true = attend, or additive), output [B, 1, H, D]. D in {64, 128, 256}, float16 or bfloat16.

The kernel (csrc/decode_attention.cu) splits each (batch, head) into runs of keys, one block each, and
the last block of a (batch, head) merges the runs' partial softmax sums in split order. It finds that
block through a per-(batch, head) int32 counter that it leaves at zero: :func:`counters` keeps one zeroed
buffer a device, so two calls must not run concurrently on different streams.

:func:`reference` is the format of the computation in plain torch (fp32 scores and sums); a query whose
keys are all masked out by a boolean mask gets zeros (torch's SDPA gives NaN there).
"""

from __future__ import annotations

import logging
import math

import torch

from . import cuda_build

log = logging.getLogger("lpq.kernels")

SOURCES = ["attention_binding.cpp", "decode_attention.cu"]
HEADERS = ["decode_attention.h", "async_copy.cuh"]
HEAD_SIZES = (64, 128, 256)
COUNTERS = 1 << 16  # batch x heads a call may have (one int32 counter each)

_counters: dict[int, torch.Tensor] = {}  # CUDA device index -> counters


def _register_fakes() -> None:
    @torch.library.register_fake("lpq_attn::decode_attention")
    def _fake(q, k, v, mask, counters, scale, force_splits=0):
        return q.new_empty((q.shape[0], 1, q.shape[1], q.shape[3]))

    @torch.library.register_fake("lpq_attn::rope_cache_attention")
    def _rope_fake(qkv, cos, sin, k_cache, v_cache, position, mask, counters, scale, heads, force_splits=0, pdl=False):
        return qkv.new_empty((1, 1, heads, k_cache.shape[3]))


EXTENSION = cuda_build.Extension("lpq_attn", SOURCES, HEADERS, _register_fakes, "decode attention kernel", "SDPA")


def load() -> bool:
    """Build/load the extension once. True if the op is usable; otherwise one warning, and False."""
    return EXTENSION.load()


def failure_reason() -> str | None:
    return EXTENSION.failure_reason()


def counters(device: torch.device) -> torch.Tensor:
    """The zeroed int32 counters the kernel uses on ``device`` (allocated on first use, outside any graph
    capture: call it once before capturing)."""
    device = torch.device(device)
    index = torch.cuda.current_device() if device.index is None else device.index
    buf = _counters.get(index)
    if buf is None:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("lpq decode attention: its counters must be allocated before a CUDA graph capture "
                               "(run one decode step, or lpq.attention.enable(model), first)")
        buf = torch.zeros(COUNTERS, dtype=torch.int32, device=torch.device("cuda", index))
        _counters[index] = buf
    return buf


def problem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> str | None:
    """Why the kernel cannot take this call (None: it can). Uses shapes, dtypes and strides only, so that it
    also runs on the fake tensors of torch.compile."""
    if not (q.is_cuda and k.is_cuda and v.is_cuda):
        return "q, k and v are not all on a CUDA device"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q, k and v must be 4-D"
    if q.shape[2] != 1:
        return f"{q.shape[2]} query tokens (the kernel takes one: decode)"
    b, h, _, d = q.shape
    if d not in HEAD_SIZES:
        return f"head size {d} (the kernel has 64, 128, 256)"
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d or h % k.shape[1] != 0:
        return "k and v must be [B, Hkv, L, D] with the query heads a multiple of Hkv"
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype}/{k.dtype}/{v.dtype} (the kernel takes float16 or bfloat16, all alike)"
    if b * h > COUNTERS:
        return f"batch x heads = {b * h} > {COUNTERS}"
    compiling = torch.compiler.is_compiling()
    for name, t in (("q", q), ("k", k), ("v", v)):
        # the allocator's blocks start 16-byte aligned: an element offset and strides in multiples of 8 keep
        # every row there. Under torch.compile the offset is not asked (dynamo cannot trace it without a graph
        # break); the op checks the address itself and raises a readable error.
        if t.stride(3) != 1 or any(t.stride(i) % 8 for i in range(3) if t.shape[i] > 1) \
                or (not compiling and t.storage_offset() % 8):
            return f"{name}'s rows are not contiguous 16-byte aligned runs"
    return _mask_problem(mask, b, h, k.shape[2], q.dtype)


def _mask_problem(mask: torch.Tensor | None, b: int, h: int, keys: int, dtype: torch.dtype) -> str | None:
    if mask is not None:
        if mask.dim() != 4 or mask.shape[2] != 1 or mask.shape[3] != keys or mask.shape[0] not in (1, b) \
                or mask.shape[1] not in (1, h) or mask.stride(3) != 1:
            return f"mask of shape {tuple(mask.shape)} (the kernel takes [B or 1, H or 1, 1, L], keys contiguous)"
        if mask.dtype not in (torch.bool, dtype, torch.float32):
            return f"mask dtype {mask.dtype}"
    return None


def rope_problem(cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 position: torch.Tensor, mask: torch.Tensor | None, heads: int, dtype: torch.dtype) -> str | None:
    """Why :func:`rope_cache_attention` cannot take a decode step with these operands (None: it can); shapes,
    dtypes and strides only (it runs on torch.compile's fake tensors). The projection's row is checked by the op."""
    if not all(t.is_cuda for t in (cos, sin, k_cache, v_cache, position)):
        return "not every operand is on a CUDA device"
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[0] != 1:
        return "the cache must be [1, Hkv, L, D] (batch 1)"
    _, hkv, keys, d = k_cache.shape
    if d not in HEAD_SIZES:
        return f"head size {d} (the kernel has 64, 128, 256)"
    if heads % hkv or heads + 1 > COUNTERS:
        return f"{heads} query heads over {hkv} key/value heads"
    if dtype not in (torch.float16, torch.bfloat16) or any(t.dtype != dtype for t in (cos, sin, k_cache, v_cache)):
        return f"dtypes (the kernel takes float16 or bfloat16, all alike; got {dtype}, {cos.dtype}, {k_cache.dtype})"
    if cos.numel() != d or sin.numel() != d or not (cos.is_contiguous() and sin.is_contiguous()):
        return f"rotary factors of {cos.numel()} elements (the kernel takes one position's {d}, contiguous)"
    if position.dtype != torch.int64 or position.numel() != 1:
        return "the cache position must be one int64"
    if any(t.stride(3) != 1 or t.stride(1) % 8 or t.stride(2) % 8 for t in (k_cache, v_cache)):
        return "the cache's rows are not contiguous 16-byte aligned runs"
    return _mask_problem(mask, 1, heads, keys, dtype)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                     scale: float | None = None, splits: int = 0) -> torch.Tensor:
    """The kernel's call: q [B, H, 1, D], k/v [B, Hkv, L, D] -> [B, 1, H, D]. ``splits`` > 0 forces that
    many runs of keys a (batch, head) (tests, benchmarks). The caller has checked :func:`problem`."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return torch.ops.lpq_attn.decode_attention(q, k, v, mask, counters(q.device), scale, splits)


def rope_cache_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, position: torch.Tensor, mask: torch.Tensor | None, heads: int,
                         scale: float | None = None, splits: int = 0, pdl: bool | None = None) -> torch.Tensor:
    """One decode step of a Llama-style attention at batch 1, in one kernel: qkv [..., (H + 2 Hkv) D] (the fused
    projection's row of the new token), cos / sin [..., D] (its rotary factors), the static cache k_cache / v_cache
    [1, Hkv, L, D] and position (int64, one element: the cache row of the token, < L). Writes the rotated key and
    the value to that row, adds 1 to position (in place, as transformers' StaticLayer.update), and returns the
    attention of the rotated query over the cache under ``mask`` [1, H or 1, 1, L] -> [1, 1, H, D].
    :func:`rope_reference` is the same in plain torch. The caller has checked :func:`rope_problem`.

    ``pdl`` (default: the uniform kernels' setting, ``lpq.kernels.uniform_cuda.PDL``) launches the kernel with
    programmatic dependent launch: it requests the cache's first rows while the kernel before it (the fused q/k/v
    projection) ends, and reads everything else after it."""
    scale = 1.0 / math.sqrt(k_cache.shape[-1]) if scale is None else float(scale)
    if pdl is None:
        from lpq.kernels import uniform_cuda

        pdl = uniform_cuda.PDL
    return torch.ops.lpq_attn.rope_cache_attention(qkv, cos, sin, k_cache, v_cache, position, mask,
                                                   counters(qkv.device), scale, heads, splits, bool(pdl))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(-x[..., D/2:], x[..., :D/2]): the rotation of transformers' Llama rotary embedding."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, position: torch.Tensor, mask: torch.Tensor | None, heads: int,
                   scale: float | None = None) -> torch.Tensor:
    """:func:`rope_cache_attention` in plain torch (any device), with the same effects on the cache and position:
    the rotary embedding in fp32 rounded once to the cache's dtype, the cache row written with index_copy_ (as
    transformers' StaticLayer.update), then :func:`reference` attention."""
    _, hkv, _, d = k_cache.shape
    row = qkv.reshape(-1)
    q = row[: heads * d].view(1, heads, 1, d)
    k = row[heads * d: (heads + hkv) * d].view(1, hkv, 1, d)
    v = row[(heads + hkv) * d:].view(1, hkv, 1, d)
    c, s = cos.reshape(1, 1, 1, d).float(), sin.reshape(1, 1, 1, d).float()

    def rotary(x: torch.Tensor) -> torch.Tensor:
        return (x.float() * c + rotate_half(x.float()) * s).to(x.dtype)

    q, k = rotary(q), rotary(k)
    where = position.reshape(1).to(k_cache.device)
    k_cache.index_copy_(2, where, k)
    v_cache.index_copy_(2, where, v)
    position.add_(1)
    return reference(q, k_cache, v_cache, mask, scale)


def plan(batch_heads: int, keys: int, head_size: int, splits: int = 0) -> tuple[int, int]:
    """(runs of keys a (batch, head), keys a run) the kernel would use on the current GPU."""
    s, kps = torch.ops.lpq_attn.plan(batch_heads, keys, head_size, splits)
    return int(s), int(kps)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              scale: float | None = None) -> torch.Tensor:
    """Plain-torch attention of q [B, H, Q, D] over k/v [B, Hkv, L, D] in fp32 -> [B, Q, H, D] in q's dtype.
    A bool mask (true = attend) or an additive one broadcasts as [B, H, Q, L]; a query whose keys a bool mask
    removes entirely gets zeros."""
    b, h, nq, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    rep = h // k.shape[1]
    kf = k.float().repeat_interleave(rep, dim=1)  # [B, H, L, D]
    vf = v.float().repeat_interleave(rep, dim=1)
    s = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale  # [B, H, Q, L]
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.float()
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # rows with every key masked: softmax of all -inf
    out = torch.matmul(p, vf)  # [B, H, Q, D]
    return out.transpose(1, 2).to(q.dtype)
