"""Function-preserving transforms of a full-precision model, applied before quantization."""

from .rotate import fuse_norm_into, norm_form, rotate_model, rotation_matrix

__all__ = ["fuse_norm_into", "norm_form", "rotate_model", "rotation_matrix"]
