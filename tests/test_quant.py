import pytest
import torch

from lpq.errors import SpecError
from lpq.methods.rtn import rtn_quantize
from lpq.quant import dequantize_codes, fake_quantize, fit_groups, fit_minmax, group_index, quantize_codes
from lpq.spec import QuantSpec


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_minmax_asym_keeps_zero_and_bounds_error(bits):
    maxq = 2**bits - 1
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(bits)) + 0.3
    scale, zero = fit_minmax(w, bits, sym=False)
    assert torch.all(zero >= 0) and torch.all(zero <= maxq)
    g = torch.zeros(128, dtype=torch.int32)
    q = quantize_codes(w, scale[None], zero[None], g, bits)
    err = (dequantize_codes(q, scale[None], zero[None], g) - w).abs()
    s = scale[:, None]
    inside = (q > 0) & (q < maxq)
    assert torch.all(err[inside] <= (s / 2 * 1.0001 + 1e-6).expand_as(err)[inside])  # half a step, unclamped
    # a clamped extreme: the integer zero shifts the grid by up to half a step, and the fp16-rounded
    # scale shrinks its span by up to maxq * 2**-11 steps
    assert torch.all(err <= s * (1.0 + maxq * 2.0**-11) + 1e-6)


def test_minmax_sym_zero_is_middle_and_dead_rows_are_safe():
    w = torch.randn(4, 64)
    w[2] = 0
    scale, zero = fit_minmax(w, 4, sym=True)
    assert torch.all(zero == 8)
    assert torch.all(scale > 0)
    assert torch.all(fake_quantize(w, 4, -1, True)[2] == 0)


def test_shorter_last_group_matches_groupwise_fit():
    w = torch.randn(8, 576)
    scales, zeros = fit_groups(w, 4, 128, sym=False)
    assert scales.shape == (5, 8)
    s_last, z_last = fit_minmax(w[:, 512:], 4, sym=False)
    assert torch.equal(scales[4], s_last) and torch.equal(zeros[4], z_last)
    assert torch.equal(group_index(576, 128)[-1:], torch.tensor([4], dtype=torch.int32))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 128])
@pytest.mark.parametrize("sym", [False, True])
def test_rtn_packed_equals_fake_quantization(bits, group_size, sym):
    w = torch.randn(48, 576)
    qw = rtn_quantize(w, QuantSpec(bits=bits, group_size=group_size, sym=sym))
    assert torch.equal(qw.dequantize(), fake_quantize(w, bits, group_size, sym))


def test_more_bits_and_smaller_groups_lower_error():
    w = torch.randn(64, 512)
    err = {(b, g): (fake_quantize(w, b, g, False) - w).norm().item() for b in (2, 3, 4, 8) for g in (-1, 32)}
    assert err[(2, 32)] > err[(3, 32)] > err[(4, 32)] > err[(8, 32)]
    for b in (2, 3, 4):
        assert err[(b, 32)] < err[(b, -1)]


@pytest.mark.parametrize("bad", [dict(bits=5), dict(bits=1), dict(group_size=100), dict(group_size=0)])
def test_spec_out_of_range(bad):
    with pytest.raises(SpecError, match="not supported"):
        QuantSpec(**bad)


def test_spec_roundtrip():
    s = QuantSpec(bits=3, group_size=64, sym=True, method="rtn", act_order=True)
    assert QuantSpec.from_dict(s.to_dict()) == s


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("sym", [False, True])
def test_mse_grid_never_worse_than_minmax_and_clips_outliers(bits, sym):
    from lpq.quant import fit_mse

    torch.manual_seed(bits)
    w = torch.randn(32, 128)
    w[:, 0] *= 8  # an outlier per row: min-max wastes the grid on it
    g = torch.zeros(128, dtype=torch.int32)

    def err(scale, zero):
        q = quantize_codes(w, scale[None], zero[None], g, bits)
        return (dequantize_codes(q, scale[None], zero[None], g) - w).abs().pow(2.4).sum(1)

    e_mm = err(*fit_minmax(w, bits, sym))
    e_mse = err(*fit_mse(w, bits, sym))
    assert torch.all(e_mse <= e_mm * (1 + 1e-6))
    assert e_mse.sum() < 0.97 * e_mm.sum()


def test_rtn_mse_option_changes_the_grid():
    from lpq.methods import get_method

    w = torch.randn(16, 64)
    w[:, 3] = 10
    spec = QuantSpec(bits=3, group_size=32)
    plain = get_method("rtn").quantize_layer("x", w, None, spec).dequantize()
    clipped = get_method("rtn", mse=True).quantize_layer("x", w, None, spec).dequantize()
    assert (clipped - w).norm() < (plain - w).norm()
