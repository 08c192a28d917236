"""Sparse linear kernels (Triton) and the vnm::linear torch.library op."""

from .vnm_linear import OP, vnm_linear, vnm_linear_reference

__all__ = ["OP", "vnm_linear", "vnm_linear_reference"]
