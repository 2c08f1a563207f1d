"""lpq: make large language models small.

Python API (the ``lpq`` command line is a thin layer over these):
    lpq.quantize(model, out, method="rtn", bits=4, group_size=128, ...)
    lpq.load(directory)                    -> a transformers model with QuantizedLinear layers
    lpq.load(directory, fuse=True)         -> the same, q/k/v and gate/up each run as one linear (inference)
    lpq.fuse_siblings(model)               -> fuse a loaded model's sibling projections in place
    lpq.fuse_for_decode(model)             -> and a gated MLP's silu(gate) * up inside its joint linear (lpq.load fuse="decode")
    lpq.evaluate.perplexity(model, tok, text)  /  lpq.evaluate.kl_divergence(...)
    lpq.inspect(directory)                 -> per-layer bits, bytes and the average bits per weight
    lpq.attention.enable(model)            -> attention "lpq": a split-key CUDA kernel for decode steps, SDPA otherwise
"""

__version__ = "0.1.0"

from .errors import LpqError  # noqa: E402
from .spec import QuantSpec  # noqa: E402
from .api import load, quantize
from . import attention, evaluate
from .inspect import inspect
from .fuse import fuse_for_decode, fuse_siblings
from .hf_integration import register as _register_with_transformers

_register_with_transformers()

__all__ = ["LpqError", "QuantSpec", "__version__", "attention", "evaluate", "fuse_for_decode", "fuse_siblings", "inspect", "load", "quantize"]
