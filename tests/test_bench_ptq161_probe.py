"""bench/ptq161_preprocess_probe.py: it swaps exactly the linears that lpq quantizes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import lpq
from lpq.nn import QuantizedLinear

from conftest import make_model

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "ptq161_preprocess_probe.py"


def load_script():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("lpq_bench_ptq161_probe", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_target_linears_are_the_quantized_ones(qdir):
    """The probe's Q(W) model must differ from the unquantized one in the same layers as a quantized
    checkpoint of that model does: every linear of every block, not lm_head, nothing twice."""
    names = load_script().target_linears(make_model("llama"))
    model = lpq.load(qdir, device="cpu")
    packed = sorted(n for n, m in model.named_modules() if isinstance(m, QuantizedLinear))
    assert len(names) == len(set(names))
    assert sorted(names) == packed
