"""The 3-bit "fields" layout of the uniform CUDA kernels, and a pure-torch emulation of their decoders.

One lane of a warp holds 64 codes of a 128-column chunk as 32 pairs P (csrc/uniform_kernels.cuh: pair
P = 4 j + r is A-fragment register r of k-tile j, its low code in the low 16 bits of the register, its
high code in the high 16 bits), packed into 6 words. The words form two triples (A, B, C) = words
(3T, 3T + 1, 3T + 2), triple T holding pairs 16 T .. 16 T + 15. Every 16-bit half of a word holds five
whole 3-bit fields and one spare bit, at the same bits in both halves (the high code 16 bits up):

    bit:  15        12         9          6          3          0
    A   [ i4 (13-15) | i3 (10-12) | i2 (7-9) | i1 (4-6) | i0 (1-3) | s.b0 (0) ]
    B   [ i12 (13-15) | i11 (10-12) | i10 (7-9) | s.b1 (6) | i9 (3-5) | i8 (0-2) ]
    C   [ i14 (13-15) | i13 (10-12) | s.b2 (9) | i7 (6-8) | i6 (3-5) | i5 (0-2) ]

(i: pair i of the triple; s = pair 15, whose three code bits are the spare bits of A, B and C.)

Why: the fp16 decoder turns a field into 1024 + 2^pos q with one LOP3 ((x & mask) | 0x6400 in both
halves; exact while the field stays inside the 10 mantissa bits, pos <= 7) and into q - z with one
HFMA2 (times 2^-pos, plus -(2^(10-pos) + z)). Here every field is read at pos 0, 3 or 6 of w, w >> 1 or
w >> 7 (A), w or w >> 7 (B and C), and the spare pair at bits 0/1/2 of A, B >> 5 and C >> 7: per triple
(16 pairs) 5 shifts, 18 LOP3 and 16 HFMA2, with 3 zero constants per row and fold. The earlier "planes"
layout (a 2-bit plane + a 1-bit plane) cost 2 shifts, 2 LOP3 and 1 HADD2 per pair; it is still built
when ``LPQ_W3_LAYOUT=planes`` (the CUDA build then defines LPQ_W3_PLANES), for comparisons.

W3_SLOTS / W3_SPARE_BITS must match LPQ_W3_SLOTS / LPQ_W3_SPARE_BITS of the kernel source (a test
reads them from there). All words here are int64 tensors holding unsigned 32-bit values.
"""

from __future__ import annotations

import os

import torch

W3_LAYOUT = "planes" if os.environ.get("LPQ_W3_LAYOUT", "").strip().lower() == "planes" else "fields"

# pair i (0..14) of a triple: (word of the triple: A=0, B=1, C=2, shift, pos); its code is bits
# [shift + pos, shift + pos + 3) of the word (low half; the high code 16 bits up)
W3_SLOTS = (
    (0, 1, 0), (0, 1, 3), (0, 1, 6), (0, 7, 3), (0, 7, 6),
    (2, 0, 0), (2, 0, 3), (2, 0, 6),
    (1, 0, 0), (1, 0, 3), (1, 7, 0), (1, 7, 3), (1, 7, 6),
    (2, 7, 3), (2, 7, 6),
)
# pair 15: bit b of its codes sits at bit W3_SPARE_BITS[b] of word b of the triple
W3_SPARE_BITS = (0, 6, 9)

FP16_MAGIC = 0x64006400  # 1024.0 in both halves
BF16_MAGIC = 0x43004300  # 128.0 in both halves


def pack_w3_fields(c: torch.Tensor) -> torch.Tensor:
    """c [..., 32 pairs, 2 codes] in 0..7 -> [..., 6] words (int64, unsigned 32-bit values)."""
    c = c.to(torch.int64)
    words = torch.zeros((*c.shape[:-2], 6), dtype=torch.int64, device=c.device)
    for t in range(2):
        for i in range(16):
            lo, hi = c[..., 16 * t + i, 0], c[..., 16 * t + i, 1]
            if i < 15:
                word, shift, pos = W3_SLOTS[i]
                bit = shift + pos
                words[..., 3 * t + word] |= (lo << bit) | (hi << (bit + 16))
            else:
                for b, bit in enumerate(W3_SPARE_BITS):
                    words[..., 3 * t + b] |= (((lo >> b) & 1) << bit) | (((hi >> b) & 1) << (bit + 16))
    return words


# --------------------------------------------------------------------------- emulation of the decoders


def _lop_and_or(a: torch.Tensor, mask: int, c) -> torch.Tensor:
    """(a & mask) | c on 32-bit values: the kernels' lop_and_or (one LOP3)."""
    return (a & mask) | c


def w3_pos(p: int, at_zero: bool) -> int:
    """Mask position of pair p's field as w3_raw leaves it (the kernel's w3_pos)."""
    i = p % 16
    return 0 if (i == 15 or at_zero) else W3_SLOTS[i][2]


def w3_raw(words: torch.Tensor, p: int, at_zero: bool, magic: int) -> torch.Tensor:
    """Emulates the kernel's w3_raw<P, kAtZero>: words [..., 6] -> [...] 32-bit magic + 2^pos q per half."""
    base, i = 3 * (p // 16), p % 16
    if i == 15:
        s1, s2 = W3_SPARE_BITS[1] - 1, W3_SPARE_BITS[2] - 2
        t = _lop_and_or(words[..., base], 0x00010001, magic)
        u = _lop_and_or(words[..., base + 1] >> s1, 0x00020002, t)
        return _lop_and_or(words[..., base + 2] >> s2, 0x00040004, u)
    word, shift, pos = W3_SLOTS[i]
    if at_zero:
        shift, pos = shift + pos, 0
    return _lop_and_or(words[..., base + word] >> shift, 0x00070007 << pos, magic)


def _bits16(h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """16-bit patterns (int64 0..65535) -> the fp16/bf16 numbers they encode."""
    return torch.where(h >= 0x8000, h - 0x10000, h).to(torch.int16).view(dtype)


def _halves(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """32-bit values [...] -> [..., 2] (low half, high half) as fp16/bf16 numbers."""
    return _bits16(torch.stack([v & 0xFFFF, (v >> 16) & 0xFFFF], dim=-1), dtype)


def fast_off(z: torch.Tensor, i: int, bits: int = 3) -> torch.Tensor:
    """The kernel's fast_off<BITS>(z, i): the half2 bits of -(2^(10 - bits*i) + z), one IMAD."""
    v = z.to(torch.int64) * ((1 << (bits * i)) * 0x00010001) + (((25 - bits * i) << 10 | 0x8000) * 0x00010001)
    return v & 0xFFFFFFFF


def decode_fast_fp16(words: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Emulates tile_a_fast<3, J> for every pair: words [..., 6], z [..., 32, 2] (the zero point of each
    code's row) -> fp16 [..., 32, 2], computed as the kernel does: raw = magic + 2^pos q (LOP3s), then one
    fused multiply-add raw * 2^-pos + fast_off(z, pos / 3). It equals q - z only if the layout and the
    magic-number arithmetic are right (a field spilling into the exponent gives another number)."""
    out = []
    for p in range(32):
        pos = w3_pos(p, False)
        raw = _halves(w3_raw(words, p, False, FP16_MAGIC), torch.float16)
        # the constant of each code's row (both halves of fast_off hold the same value)
        off = _bits16(fast_off(z[..., p, :], pos // 3) & 0xFFFF, torch.float16)
        # an fp16 FMA rounds once; in float64 the product and sum are exact, then one rounding to fp16
        v = raw.double() * 2.0 ** -pos + off.double()
        out.append(v.to(torch.float16))
    return torch.stack(out, dim=-2)


def decode_generic(words: torch.Tensor, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Emulates decode_tile<3> + sub2 (the v3 bf16 path, the dequantize kernel, the v2 kernel's bf16
    path): every field shifted to bit 0, magic + q, minus magic + z. -> [..., 32, 2] in ``dtype``."""
    magic, one = (FP16_MAGIC, 0x6400) if dtype == torch.float16 else (BF16_MAGIC, 0x4300)
    out = []
    for p in range(32):
        raw = _halves(w3_raw(words, p, True, magic), dtype)
        zz = _bits16(one | z[..., p, :].to(torch.int64), dtype)  # magic + z of each code's row
        out.append((raw.double() - zz.double()).to(dtype))
    return torch.stack(out, dim=-2)
