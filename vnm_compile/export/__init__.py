"""Export sparsified models: ONNX (custom node + standard-op function) and TensorRT (V:N:M plugin)."""

from __future__ import annotations

from .onnx import DEFAULT_OPSET, SUPPORTED_OPSETS, onnx_summary, to_onnx
from .onnx_function import DOMAIN, OP_TYPE

__all__ = ["to_onnx", "onnx_summary", "to_tensorrt", "DOMAIN", "OP_TYPE", "DEFAULT_OPSET", "SUPPORTED_OPSETS"]


def __getattr__(name: str):
    # TensorRT code is imported on use only: `import vnm_compile.export` must not need tensorrt.
    if name == "to_tensorrt":
        from .tensorrt import to_tensorrt

        return to_tensorrt
    raise AttributeError(f"module 'vnm_compile.export' has no attribute {name!r}")
