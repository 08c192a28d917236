"""vnm_compile: V:N:M sparsity for Transformers on NVIDIA GPUs.

``calibrate`` -> ``sparsify_(model, VNMConfig("64:2:8"), stats)`` -> ``torch.compile(model, backend="vnm")``
(README.md is the user's guide). ``import vnm_compile`` stays light: it loads the pattern, mask, format,
calibration and pruning modules; the compiler passes, kernels (and Triton), recovery training and
export are imported when first used.
"""

from __future__ import annotations

import importlib
import logging
import sys

from .calibration import CalibrationStats, calibrate, importance
from .format import VNMWeight
from .masks import is_vnm, vnm_mask
from .pattern import VNMPattern, mask_diversity
from .sparsify import LayerReport, SparsifyReport, VNMConfig, sparsify_

__version__ = "0.1.0"

__all__ = [
    # patterns and masks
    "VNMPattern",
    "vnm_mask",
    "is_vnm",
    "importance",
    "mask_diversity",
    "select_pattern",
    "plan_patterns",
    "find_permutation",
    # calibration and pruning
    "calibrate",
    "CalibrationStats",
    "VNMConfig",
    "sparsify_",
    "SparsifyReport",
    "LayerReport",
    # compressed weights and deployment
    "VNMWeight",
    "VNMLinear",
    "compress_",
    "decompress_",
    "save_compressed",
    "load_compressed",
    # recovery training
    "recover_",
    "RecoveryConfig",
    # compiler and export
    "last_report",
    "to_onnx",
]

# Resolved on first use (module, attribute): the user-facing names whose modules are heavy (scipy,
# the compiler passes, Triton, onnx) and, out of __all__, older spellings of internals that stay
# importable (``from vnm_compile import ChannelObserver``).
_LAZY = {
    "select_pattern": (".calibration.selection", "select_pattern"),
    "plan_patterns": (".calibration.plan", "plan_patterns"),
    "find_permutation": (".calibration.permutation", "find_permutation"),
    "recover_": (".recovery", "recover_"),
    "RecoveryConfig": (".recovery", "RecoveryConfig"),
    "last_report": (".backend", "last_report"),
    "to_onnx": (".export.onnx", "to_onnx"),
    "VNMLinear": (".deploy", "VNMLinear"),
    "compress_": (".deploy", "compress_"),
    "decompress_": (".deploy", "decompress_"),
    "save_compressed": (".deploy", "save_compressed"),
    "load_compressed": (".deploy", "load_compressed"),
    # internals, kept importable from here for existing code
    "ChannelObserver": (".calibration.observer", "ChannelObserver"),
    "LinearSparsity": (".state", "LinearSparsity"),
    "get_sparsity": (".state", "get_sparsity"),
    "sparsity_state_dict": (".state", "sparsity_state_dict"),
    "load_sparsity_": (".state", "load_sparsity_"),
}

logging.getLogger(__name__).addHandler(logging.NullHandler())


# Subpackages reachable as attributes (``vnm_compile.kernels.vnm_linear``) without an import of their own.
_SUBMODULES = ("backend", "calibration", "deploy", "export", "kernels", "passes", "recovery")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name not in _LAZY:
        raise AttributeError(f"module 'vnm_compile' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module, __name__), attr)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))


def _entry_point_installed() -> bool:
    """True when torch can find the "vnm" backend through this package's torch_dynamo_backends entry point."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        eps = distribution("vnm_compile").entry_points
    except PackageNotFoundError:
        return False
    return any(e.group == "torch_dynamo_backends" and e.name == "vnm" for e in eps)


def _register_backend() -> None:
    """Make ``torch.compile(..., backend="vnm")`` work after ``import vnm_compile`` without importing
    torch._dynamo (about 2 s) here when that is not needed.

    1. Dynamo already imported: import the backend, which registers itself (cheap now).
    2. Installed (editable or wheel): torch's lookup_backend loads the backend through the entry point
       the first time "vnm" is asked for; nothing to do.
    3. Otherwise (on the path but not installed): import and register now.
    """
    if "torch._dynamo" in sys.modules or not _entry_point_installed():
        from . import backend  # noqa: F401  (registers the "vnm" backend)


_register_backend()
