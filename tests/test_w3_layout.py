"""The 3-bit "fields" layout of the uniform CUDA kernels, checked on the CPU (no GPU needed).

The repack (uniform_cuda.repack) packs each lane's 64 codes of a chunk into 6 words; the kernels read them
back with masks, shifts and the fp16 magic-number FMA. Here the kernels' decoders are emulated in torch
(lpq/kernels/w3_layout.py, instruction by instruction) on the repacked words, and must give back exactly
the canonical codes, in the order the mma fragments consume them. The layout table is also read from the
kernel source, so that the CUDA decoder and the emulation cannot drift apart.
"""

from __future__ import annotations

import re

import pytest
import torch

from lpq.formats.uniform import UNIFORM, pack_uniform
from lpq.kernels import uniform_cuda, w3_layout
from lpq.kernels.cuda_build import CSRC
from lpq.kernels.w3_layout import W3_SLOTS, W3_SPARE_BITS, decode_fast_fp16, decode_generic, pack_w3_fields
from lpq.spec import QuantSpec


def test_tables_match_kernel_source():
    src = (CSRC / "uniform_kernels.cuh").read_text()
    block = src[src.index("// W3_SLOTS_BEGIN"):src.index("// W3_SLOTS_END")]
    slots_text = block[block.index("#define LPQ_W3_SLOTS"):block.index("#define LPQ_W3_SPARE_BITS")]
    slots = tuple(tuple(int(v) for v in m) for m in re.findall(r"\{\s*(\d+),\s*(\d+),\s*(\d+)\s*\}", slots_text))
    spare = tuple(int(v) for v in re.search(r"#define LPQ_W3_SPARE_BITS\s+(\d+),\s*(\d+),\s*(\d+)", block).groups())
    assert slots == W3_SLOTS
    assert spare == W3_SPARE_BITS


def test_every_bit_holds_one_code_bit():
    """One-hot codes: each (pair, code, bit) lands on its own bit of the 6 words; the high code of a pair
    sits 16 bits above the low code (one mask serves both halves); all 192 bits are used."""
    seen = {}
    for p in range(32):
        for e in range(2):
            for b in range(3):
                c = torch.zeros((32, 2), dtype=torch.int64)
                c[p, e] = 1 << b
                words = pack_w3_fields(c)
                nz = [(w, bit) for w in range(6) for bit in range(32) if (int(words[w]) >> bit) & 1]
                assert len(nz) == 1, (p, e, b, nz)
                seen[(p, e, b)] = nz[0]
    assert len(set(seen.values())) == 192
    for (p, e, b), (w, bit) in seen.items():
        if e == 1:
            assert (w, bit) == (seen[(p, 0, b)][0], seen[(p, 0, b)][1] + 16)
        assert w // 3 == p // 16  # a pair stays in its triple


def test_decoder_cost_properties():
    """What makes the fp16 decoder cheap: every field is read at mask position 0, 3 or 6 (inside the 10
    fp16 mantissa bits, so 1024 + 2^pos q is exact; 3 zero constants per row), from a field that lies
    inside one 16-bit half, and a triple needs 5 distinct shifted words (spare reads included)."""
    shifts = set()
    for word, shift, pos in W3_SLOTS:
        assert pos in (0, 3, 6) and shift + pos + 3 <= 16
        if shift:
            shifts.add((word, shift))
    for b, bit in enumerate(W3_SPARE_BITS):
        assert bit - b >= 0 and bit < 16
        if bit - b:
            shifts.add((b, bit - b))
    assert len(shifts) == 5


def test_magic_fma_exhaustive():
    """Every code at every slot against every zero point: the emulated LOP3 + HFMA2 give q - z exactly
    in fp16, and the generic shift + mask + subtraction path gives it in fp16 and bf16."""
    n = torch.arange(8).view(8, 1, 1)
    codes = (n + torch.arange(32).view(1, 32, 1) + torch.arange(2).view(1, 1, 2)) % 8  # each slot sees 0..7
    words = pack_w3_fields(codes)
    for z in range(8):
        zt = torch.full((8, 32, 2), z, dtype=torch.int64)
        want = (codes - z).to(torch.float32)
        assert torch.equal(decode_fast_fp16(words, zt).float(), want)
        assert torch.equal(decode_generic(words, zt, torch.float16).float(), want)
        assert torch.equal(decode_generic(words, zt, torch.bfloat16).float(), want)


def test_random_lanes_round_trip():
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 8, (500, 32, 2), generator=gen)
    z = torch.randint(0, 8, (500, 32, 2), generator=gen)
    words = pack_w3_fields(codes)
    assert int(words.min()) >= 0 and int(words.max()) < 2**32
    want = (codes - z).float()
    assert torch.equal(decode_fast_fp16(words, z).float(), want)
    assert torch.equal(decode_generic(words, z, torch.bfloat16).float(), want)
    # a wrong table would not round-trip: swapping two slots breaks it
    bad = pack_w3_fields(codes[:, [1, 0] + list(range(2, 32))])
    assert not torch.equal(decode_fast_fp16(bad, z).float(), want)


def fragment_index(fold: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) inside a 16 x 128 tile of code e of pair P of lane l, [32 lanes, 32 pairs, 2]: the
    m16n8k16 A-fragment order of csrc/uniform_kernels.cuh (register r of k-tile j = f * S/16 + jj: row
    g + 8 (r & 1), columns f S + t S/4 + 4 jj + 2 (r >> 1) + e)."""
    lane = torch.arange(32).view(32, 1, 1)
    p = torch.arange(32).view(1, 32, 1)
    e = torch.arange(2).view(1, 1, 2)
    g, t = lane // 4, lane % 4
    j, r = p // 4, p % 4
    tpf = fold // 16
    f, jj = j // tpf, j % tpf
    row = g + 8 * (r & 1) + 0 * e
    col = f * fold + t * (fold // 4) + 4 * jj + 2 * (r >> 1) + e
    return row.expand(32, 32, 2), col.expand(32, 32, 2)


def kernel_view(st: dict, dtype=torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """Emulate what the fused kernel decodes from the repacked tensors: (q - z as the decoder returns it
    [N_pad, K_pad], z [N_pad, K_pad] read from the repacked zero table as the kernel indexes it)."""
    fold, gs, k = st["fold"], st["gs"], st["k"]
    nt = st["sc"].shape[1]
    chunks = -(-k // 128)
    blk = (st["qw"].to(torch.int64) & 0xFFFFFFFF).view(nt, chunks, 192)
    # [lane][4 words] segment, then the [lane][2 words] tail
    words = torch.cat([blk[..., :128].reshape(nt, chunks, 32, 4), blk[..., 128:].reshape(nt, chunks, 32, 2)], dim=-1)
    row, col = fragment_index(fold)
    # zero points: zp [G][nt][8] u16 = z[g] | z[g + 8] << 8; the group of a fold is (its first column) // gs
    zp = st["zp"].contiguous().view(torch.uint8).view(-1, nt, 8, 2).to(torch.int64)  # [G, nt, g, (g, g+8)]
    kf = torch.arange(chunks).view(chunks, 1) * 128 + torch.arange(128 // fold).view(1, -1) * fold
    grp = torch.where(kf < k, kf // gs, 0)  # [chunks, folds]; folds past K are skipped by the kernel
    f_of = col // fold  # [32, 32, 2]
    g_of = torch.arange(32).view(32, 1, 1) // 4
    half = (row >= 8).long()
    z = zp[grp[:, f_of], :, g_of.expand(32, 32, 2), half]  # [chunks, 32, 32, 2, nt]
    z = z.permute(4, 0, 1, 2, 3)  # [nt, chunks, 32 lanes, 32 pairs, 2]
    if dtype == torch.float16:
        dec = decode_fast_fp16(words, z)
    else:
        dec = decode_generic(words, z, dtype)
    out = torch.zeros((nt, chunks, 16, 128), dtype=torch.float32)
    zout = torch.zeros((nt, chunks, 16, 128), dtype=torch.int64)
    out[:, :, row, col] = dec.float()
    zout[:, :, row, col] = z
    to2d = lambda v: v.permute(0, 2, 1, 3).reshape(nt * 16, chunks * 128)  # noqa: E731
    return to2d(out), to2d(zout)


CASES = [  # (N, K, group size, act-order): tile edges in N (half n-tiles), K (partial chunks, short groups)
    (200, 320, 128, False),
    (16, 128, -1, False),
    (40, 320, 32, False),
    (33, 576, 64, True),
    (48, 4128, 128, False),
    (17, 160, -1, False),
    (64, 96, 32, True),
]


@pytest.mark.parametrize("n,k,gs,act", CASES)
def test_repack_then_kernel_decode_gives_codes(n, k, gs, act):
    """uniform_cuda.repack, then the emulated fp16 kernel decode (fields read with masks at bit 0/3/6,
    zero points subtracted by the HFMA2 constants): q - z + z is the canonical code at every (row, col)."""
    if w3_layout.W3_LAYOUT != "fields":
        pytest.skip("LPQ_W3_LAYOUT=planes selects the earlier layout")
    spec = QuantSpec(bits=3, group_size=gs, sym=False, act_order=act)
    gen = torch.Generator().manual_seed(n * 1000 + k)
    g = -(-k // (k if gs == -1 else gs))
    codes = torch.randint(0, 8, (n, k), generator=gen, dtype=torch.int32)
    scales = (torch.rand((g, n), generator=gen) * 0.02 + 0.002).to(torch.float16)
    zeros = torch.randint(0, 8, (g, n), generator=gen, dtype=torch.int32)
    g_idx = None
    if act:
        perm = torch.randperm(k, generator=gen)
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[perm] = (torch.arange(k) // gs).to(torch.int32)
    qw = pack_uniform(codes, scales, zeros, spec, g_idx=g_idx)
    st = uniform_cuda.repack(qw.tensors, spec, k, n)
    assert st["w3_layout"] == "fields"
    want_codes, _, want_zeros, gi = UNIFORM.unpack(qw.tensors, spec, k, n)
    if st["perm"] is not None:
        want_codes, gi = want_codes[:, st["perm"]], gi[st["perm"]]
    for dtype in (torch.float16, torch.bfloat16):
        dec, z = kernel_view(st, dtype)
        got = dec + z
        assert torch.equal(got[:n, :k].to(torch.int32), want_codes)
        # the zero point used for column c is that of c's group (after the act-order sort)
        assert torch.equal(z[:n, :k], want_zeros.t()[:, gi.long()].to(torch.int64))
        assert torch.equal(got[:, k:], torch.zeros_like(got[:, k:]))  # K padding: code 0 (x is 0 there)


def test_planes_layout_still_packs():
    """LPQ_W3_LAYOUT=planes keeps the earlier layout: words 0..3 the low two bits, 4..5 the third bit."""
    gen = torch.Generator().manual_seed(9)
    c = torch.randint(0, 8, (20, 32, 2), generator=gen)
    words = uniform_cuda._pack_lane_codes(c, 3, w3_layout="planes")
    for p in range(32):
        w, h = words[..., p // 8], words[..., 4 + p // 16]
        sh, i = 2 * (p % 8), p % 16
        assert torch.equal(((w >> sh) & 3) | (((h >> i) & 1) << 2), c[:, p, 0])
        assert torch.equal(((w >> (sh + 16)) & 3) | (((h >> (i + 16)) & 1) << 2), c[:, p, 1])
    assert torch.equal(uniform_cuda._pack_lane_codes(c, 3, w3_layout="fields"), pack_w3_fields(c))
