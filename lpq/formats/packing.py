"""Bit packing of integer codes into int32 words, as pure vectorised torch functions.

The layout is GPTQ's: codes are laid out as one little-endian bit stream along the packed dimension,
code ``j`` occupying bits ``[b*j, b*j + b)``, cut into 32-bit words. For 2, 4 and 8 bits each word holds
``32 // b`` whole codes; for 3 bits a run of 32 codes fills exactly 3 words (code 10 straddles words
0 and 1, code 21 straddles words 1 and 2). One formula serves every width.
"""

from __future__ import annotations

import math

import torch

_MASK32 = 0xFFFFFFFF


def chunk_shape(bits: int) -> tuple[int, int]:
    """(codes, words) of the smallest run of codes that fills whole words: (8, 1) for 4 bits, (32, 3) for 3."""
    run_bits = math.lcm(bits, 32)
    return run_bits // bits, run_bits // 32


def packed_length(n_codes: int, bits: int) -> int:
    """Number of int32 words holding ``n_codes`` codes (``n_codes`` must be a multiple of the chunk)."""
    codes, words = chunk_shape(bits)
    return n_codes // codes * words


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes along dim 0: [K, N] integers in [0, 2**bits) -> [K * bits / 32, N] int32.

    K must be a multiple of ``chunk_shape(bits)[0]`` (8 for 4 bits, 32 for 3 bits).
    """
    k, n = codes.shape
    per_chunk, words_per_chunk = chunk_shape(bits)
    if k % per_chunk:
        raise ValueError(f"cannot pack {k} rows of {bits}-bit codes: need a multiple of {per_chunk}")
    c = codes.to(torch.int64).reshape(k // per_chunk, per_chunk, n)  # [chunks, codes, N]
    start = torch.arange(per_chunk, device=codes.device) * bits  # first bit of each code in its chunk
    words = []
    for w in range(words_per_chunk):
        shift = start - 32 * w  # where the code's bit 0 lands in word w (may be negative: straddling code)
        overlaps = (start < 32 * (w + 1)) & (start + bits > 32 * w)
        left = shift.clamp(min=0).view(1, -1, 1)
        right = (-shift).clamp(min=0).view(1, -1, 1)
        part = ((c << left) >> right) & _MASK32
        part = part * overlaps.view(1, -1, 1)
        words.append(part.sum(dim=1))  # bits do not overlap, so the sum is the OR
    packed = torch.stack(words, dim=1).reshape(k // per_chunk * words_per_chunk, n)
    # reinterpret the unsigned 32-bit value as int32 (two's complement)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def unpack_rows(packed: torch.Tensor, bits: int, k: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: [K * bits / 32, N] int32 -> [K, N] int32 codes.

    Works in int32 throughout: arithmetic right shifts are fine because every code is masked after.
    """
    n_words, n = packed.shape
    per_chunk, words_per_chunk = chunk_shape(bits)
    if n_words % words_per_chunk:
        raise ValueError(f"{n_words} packed words do not hold whole runs of {bits}-bit codes")
    mask = (1 << bits) - 1
    packed = packed.to(torch.int32)
    start = torch.arange(per_chunk, device=packed.device, dtype=torch.int32) * bits
    offset = (start % 32).view(1, -1, 1)
    if words_per_chunk == 1:  # 2, 4, 8 bits: whole codes per word, one shift-and-mask
        codes = (packed.unsqueeze(1) >> offset) & mask  # [words, codes per word, N]
    else:  # 3 bits: codes that straddle two words take their high bits from the next word
        w = packed.reshape(n_words // words_per_chunk, words_per_chunk, n)
        lo_idx = (start // 32).long()
        straddle = (offset + bits > 32)
        hi_idx = (lo_idx + 1).clamp(max=words_per_chunk - 1)
        hi_shift = torch.where(straddle, 32 - offset, torch.zeros_like(offset))
        hi = torch.where(straddle, w[:, hi_idx, :] << hi_shift, torch.zeros((), dtype=torch.int32, device=w.device))
        # the low part of a straddling code is the top (32 - offset) bits of its word: mask away the
        # sign extension of the arithmetic shift before the high bits are OR-ed in
        lo_mask = torch.where(straddle, (1 << (32 - offset).clamp(max=31)) - 1, torch.full_like(offset, mask))
        codes = (((w[:, lo_idx, :] >> offset) & lo_mask) | hi) & mask
    codes = codes.reshape(-1, n)
    return codes[:k] if k is not None else codes


def pack_cols(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes along dim 1 ([G, N] -> [G, ceil(N / chunk) * words]), padding N with zero codes.

    Used for the zero points, whose packed dimension is the output features (GPTQ's ``qzeros``).
    """
    g, n = codes.shape
    per_chunk, _ = chunk_shape(bits)
    pad = (-n) % per_chunk
    if pad:
        codes = torch.cat([codes, codes.new_zeros(g, pad)], dim=1)
    return pack_rows(codes.t(), bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_cols`: returns [G, n] int32 codes."""
    return unpack_rows(packed.t(), bits)[:n].t().contiguous()
