"""lpq: make large language models small.

Python API (the ``lpq`` command line is a thin layer over these):
    lpq.quantize(model, out, method="rtn", bits=4, group_size=128, ...)
    lpq.load(directory)                    -> a transformers model with QuantizedLinear layers
    lpq.evaluate.perplexity(model, tok, text)  /  lpq.evaluate.kl_divergence(...)
    lpq.inspect(directory)                 -> per-layer bits, bytes and the average bits per weight
"""

from .errors import LpqError
from .spec import QuantSpec

__version__ = "0.1.0"

__all__ = ["LpqError", "QuantSpec", "__version__"]
