from .arch import find_blocks, find_linears, is_linear, linear_shape  # noqa: F401
from .loading import load_model, load_tokenizer, resolve_source  # noqa: F401
