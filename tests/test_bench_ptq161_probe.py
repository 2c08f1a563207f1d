"""bench/ptq161_preprocess_probe.py: it swaps exactly the linears that lpq quantizes."""

from __future__ import annotations

import lpq
from lpq.nn import QuantizedLinear

from conftest import load_bench_script, make_model


def test_target_linears_are_the_quantized_ones(qdir):
    """The probe's Q(W) model must differ from the unquantized one in the same layers as a quantized
    checkpoint of that model does: every linear of every block, not lm_head, nothing twice."""
    names = load_bench_script("ptq161_preprocess_probe").target_linears(make_model("llama"))
    model = lpq.load(qdir, device="cpu")
    packed = sorted(n for n, m in model.named_modules() if isinstance(m, QuantizedLinear))
    assert len(names) == len(set(names))
    assert sorted(names) == packed
