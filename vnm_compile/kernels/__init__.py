"""Sparse linear kernels (Triton) and the vnm::linear torch.library op."""

from .cusparselt import CSLTLinear, cusparselt_available
from .dispatch import prefer_sparse
from .vnm_linear import OP, expand_weights, interleave_rows, vnm_linear, vnm_linear_reference

__all__ = [
    "OP",
    "CSLTLinear",
    "cusparselt_available",
    "expand_weights",
    "interleave_rows",
    "prefer_sparse",
    "vnm_linear",
    "vnm_linear_reference",
]
