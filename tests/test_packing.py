import pytest
import torch

from lpq.errors import FormatError
from lpq.formats.packing import chunk_shape, pack_cols, pack_rows, unpack_cols, unpack_rows
from lpq.formats.uniform import UNIFORM, pack_uniform
from lpq.spec import QuantSpec


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("chunks,n", [(1, 1), (3, 7), (5, 33), (18, 64)])
def test_pack_unpack_rows_identity(bits, chunks, n):
    per, words = chunk_shape(bits)
    codes = torch.randint(0, 2**bits, (per * chunks, n))
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (chunks * words, n)
    assert torch.equal(unpack_rows(packed, bits), codes.to(torch.int32))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 5, 31, 32, 33, 100])
def test_pack_unpack_cols_identity_with_padding(bits, n):
    codes = torch.randint(0, 2**bits, (3, n))
    assert torch.equal(unpack_cols(pack_cols(codes, bits), bits, n), codes.to(torch.int32))


def test_layout_matches_gptq_bit_stream():
    # 4 bits: code j sits at bits 4j..4j+3 of the word
    c = torch.zeros(8, 1, dtype=torch.long)
    c[1], c[7] = 5, 15
    assert pack_rows(c, 4)[0, 0].item() & 0xFFFFFFFF == 0xF0000050
    # 3 bits: 32 codes in 3 words; code 10 straddles words 0 and 1, code 21 words 1 and 2
    c = torch.zeros(32, 1, dtype=torch.long)
    c[10] = 0b111
    assert [w & 0xFFFFFFFF for w in pack_rows(c, 3)[:, 0].tolist()] == [0xC0000000, 0x1, 0x0]
    c = torch.zeros(32, 1, dtype=torch.long)
    c[21] = 0b111
    assert [w & 0xFFFFFFFF for w in pack_rows(c, 3)[:, 0].tolist()] == [0x0, 0x80000000, 0x3]
    c = torch.zeros(32, 1, dtype=torch.long)
    c[31] = 0b101
    assert [w & 0xFFFFFFFF for w in pack_rows(c, 3)[:, 0].tolist()] == [0x0, 0x0, 0xA0000000]


def test_rows_not_a_multiple_of_the_chunk_are_refused():
    with pytest.raises(ValueError):
        pack_rows(torch.zeros(33, 2, dtype=torch.long), 3)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_format_refuses_unpackable_shapes(bits):
    per, _ = chunk_shape(bits)
    spec = QuantSpec(bits=bits, group_size=-1)
    with pytest.raises(FormatError, match="multiple of"):
        UNIFORM.check_shape(per * 3 + 1, 64, spec, layer="x.proj")
    UNIFORM.check_shape(per * 3, 65, spec)  # any out_features is fine (zeros are padded)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size,k", [(-1, 96), (32, 96), (128, 576), (64, 576), (256, 800)])
def test_uniform_pack_roundtrip_exact(bits, group_size, k):
    if k % chunk_shape(bits)[0]:
        pytest.skip("shape not packable at this width")
    n = 37
    spec = QuantSpec(bits=bits, group_size=group_size)
    g = -(-k // (k if group_size == -1 else group_size))
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.int32)
    scales = torch.rand(g, n).half() + 0.01
    zeros = torch.randint(0, 2**bits, (g, n), dtype=torch.int32)
    qw = pack_uniform(codes, scales, zeros, spec)
    c2, s2, z2, g_idx = UNIFORM.unpack(qw.tensors, spec, k, n)
    assert torch.equal(c2, codes) and torch.equal(s2, scales) and torch.equal(z2, zeros)
    shapes = UNIFORM.tensor_shapes(k, n, spec)
    assert {t: tuple(v.shape) for t, v in qw.tensors.items()} == {t: s for t, (s, _) in shapes.items()}
    gs = k if group_size == -1 else group_size
    w = qw.dequantize()
    col = k - 1  # the last column belongs to the (possibly shorter) last group
    expected = scales[col // gs].float() * (codes[:, col].float() - zeros[col // gs].float())
    assert torch.equal(w[:, col], expected)


def test_act_order_stores_g_idx():
    spec = QuantSpec(bits=4, group_size=32, act_order=True)
    k, n = 64, 8
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
    g_idx = torch.randperm(k) // 32
    qw = pack_uniform(codes, torch.ones(2, n).half(), torch.full((2, n), 8), spec, g_idx=g_idx)
    assert torch.equal(qw.tensors["g_idx"], g_idx.int())
    assert torch.equal(qw.dequantize(), (codes - 8).float())
