"""Deployment: the compressed form of a sparsified model (VNMLinear), converting to and from it, and
compressed checkpoints."""

from .checkpoint import load_compressed, save_compressed
from .convert import compress_, compressed_linears, decompress_, memory_report
from .linear import VNMLinear
from .streaming import sparsify_and_compress_

__all__ = ["VNMLinear", "compress_", "decompress_", "compressed_linears", "memory_report", "save_compressed",
           "load_compressed", "sparsify_and_compress_"]  # fmt: skip
