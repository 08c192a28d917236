"""The ``vnm_compile::VNMLinear`` TensorRT plugin (TensorRT >= 10.8 Python plugin API, tensorrt.plugin).

The plugin runs ``torch.ops.vnm.linear`` on TensorRT's buffers and stream, so it is
backed by the project's Triton kernels (kernels/vnm_triton.py) on the GPU. Its id
``vnm_compile::VNMLinear`` is the ONNX node's domain and op type: TensorRT's ONNX
parser maps a ``VNMLinear`` node carrying ``plugin_namespace="vnm_compile"``
(added by ``prepare_for_tensorrt``) to it, and the torch-tensorrt converter adds
it with ``network.add_plugin``.

Inputs as in export/onnx_function.py, except: ``columns`` is int32 (TensorRT has
no int16), and absent ``row_index``/``bias`` are 1-element dummies flagged by
the ``has_row_index``/``has_bias`` attributes (no zero-size tensors).

Only the just-in-time implementation (``tensorrt.plugin.impl``, Python at run
time) exists; an ahead-of-time ``aot_impl`` would need the Triton kernel's
launch fixed to one compiled configuration and is not written yet.

This module deliberately has no ``from __future__ import annotations``:
``tensorrt.plugin.register`` reads the signature's annotations as objects.
"""

import functools
import logging

__all__ = ["PLUGIN_ID", "PLUGIN_NAMESPACE", "PLUGIN_NAME", "PLUGIN_ATTRIBUTES", "register_plugin"]

log = logging.getLogger(__name__)

PLUGIN_NAMESPACE = "vnm_compile"  # == the ONNX domain (export/onnx_function.py DOMAIN)
PLUGIN_NAME = "VNMLinear"  # == the ONNX op type
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
PLUGIN_ATTRIBUTES = ("v", "n", "m", "out_features", "in_features", "has_row_index", "has_bias")


@functools.cache
def register_plugin() -> str:
    """Register the plugin's description, type combinations and implementation once per process.

    Returns:
        The plugin id. Raises ImportError without tensorrt.plugin (TensorRT >= 10.8).
    """
    import tensorrt as trt
    import tensorrt.plugin as trtp

    @trtp.register(PLUGIN_ID)
    def _describe(
        x: trtp.TensorDesc,
        values: trtp.TensorDesc,
        columns: trtp.TensorDesc,
        meta: trtp.TensorDesc,
        row_index: trtp.TensorDesc,
        bias: trtp.TensorDesc,
        v: int,
        n: int,
        m: int,
        out_features: int,
        in_features: int,
        has_row_index: int,
        has_bias: int,
    ) -> trtp.TensorDesc:
        # Y: x's shape with the last axis out_features, x's dtype.
        dims = [x.shape_expr[i] for i in range(x.ndim - 1)] + [out_features]
        return trtp.from_shape_expr(tuple(dims), dtype=x.dtype)

    @trtp.autotune(PLUGIN_ID)
    def _combinations(x, values, columns, meta, row_index, bias, outputs) -> list:
        # Position-aligned: x, values, bias and Y share one float type; indices are int32.
        floats = "FP32|FP16|BF16"
        return [trtp.AutoTuneCombination(f"{floats}, {floats}, INT32, INT32, INT32, {floats}, {floats}")]

    @trtp.impl(PLUGIN_ID)
    def _run(
        x, values, columns, meta, row_index, bias, v, n, m, out_features, has_row_index, has_bias, outputs, stream
    ):
        import torch

        from ..kernels.vnm_linear import OP, OpWeight

        device = torch.device("cuda", torch.cuda.current_device())
        with torch.cuda.stream(torch.cuda.ExternalStream(stream, device=device)):
            t = [torch.as_tensor(a, device=device) for a in (x, values, columns, meta, row_index, bias)]
            weight = OpWeight(
                t[1], t[2], t[3], int(v), int(n), int(m), int(out_features), t[4] if has_row_index else None
            )
            y = OP(t[0], *weight.pack(), t[5] if has_bias else None)
            torch.as_tensor(outputs[0], device=device).copy_(y)

    log.debug("registered TensorRT plugin %s (TensorRT %s)", PLUGIN_ID, trt.__version__)
    return PLUGIN_ID
