"""vnm_compile: V:N:M sparsity for Transformers on NVIDIA GPUs.

``torch.compile(model, backend="vnm")`` after ``sparsify_(model, VNMConfig(...))``.
"""

from __future__ import annotations

import logging

from . import backend as _backend  # noqa: F401  (registers the "vnm" torch.compile backend)
from .calibration import CalibrationStats, ChannelObserver, calibrate, importance
from .format import VNMWeight
from .masks import is_vnm, vnm_mask
from .pattern import VNMPattern, mask_diversity
from .sparsify import LayerReport, SparsifyReport, VNMConfig, sparsify_
from .state import LinearSparsity, get_sparsity, load_sparsity_, sparsity_state_dict

__version__ = "0.1.0"

__all__ = [
    "VNMPattern",
    "vnm_mask",
    "is_vnm",
    "importance",
    "VNMWeight",
    "calibrate",
    "CalibrationStats",
    "ChannelObserver",
    "VNMConfig",
    "sparsify_",
    "SparsifyReport",
    "LayerReport",
    "LinearSparsity",
    "get_sparsity",
    "sparsity_state_dict",
    "load_sparsity_",
    "mask_diversity",
    "select_pattern",
    "find_permutation",
    "VNMLinear",
    "compress_",
    "decompress_",
    "save_compressed",
    "load_compressed",
]

_DEPLOY = ("VNMLinear", "compress_", "decompress_", "save_compressed", "load_compressed")

logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name: str):
    # Lazily resolved so that `import vnm_compile` stays light.
    if name == "select_pattern":
        from .calibration.selection import select_pattern

        return select_pattern
    if name == "find_permutation":
        from .calibration.permutation import find_permutation

        return find_permutation
    if name in _DEPLOY:
        from . import deploy

        return getattr(deploy, name)
    raise AttributeError(f"module 'vnm_compile' has no attribute {name!r}")
