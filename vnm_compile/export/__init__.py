"""Export sparsified models: ONNX (custom node + standard-op function) and TensorRT (V:N:M plugin).

Names are resolved on first use, so ``vnm --help`` and ``import vnm_compile.export.cli``
stay light; onnx/onnxscript/tensorrt are imported only by the functions that need them.
"""

from __future__ import annotations

import importlib

__all__ = [
    "to_onnx",
    "onnx_summary",
    "to_tensorrt",
    "load_engine",
    "compile_with_torch_tensorrt",
    "DOMAIN",
    "OP_TYPE",
    "DEFAULT_OPSET",
    "SUPPORTED_OPSETS",
]

_WHERE = {
    "to_onnx": "onnx",
    "onnx_summary": "onnx",
    "DEFAULT_OPSET": "onnx",
    "SUPPORTED_OPSETS": "onnx",
    "DOMAIN": "onnx_function",
    "OP_TYPE": "onnx_function",
    "to_tensorrt": "tensorrt",
    "load_engine": "tensorrt",
    "compile_with_torch_tensorrt": "tensorrt",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'vnm_compile.export' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
