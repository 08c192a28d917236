"""to_tensorrt: a serialized TensorRT engine whose V:N:M linears run the vnm_compile plugin.

Experimental: this route has not yet been run end to end on a machine with TensorRT (CI has none and
the GPU runs so far had no TensorRT installed); its tests skip without it. Each entry point warns
(ExperimentalWarning) until it has. ONNX export (export/onnx.py) is the tested route.

Path: model -> to_onnx (VNMLinear nodes) -> prepare_for_tensorrt (drop the ONNX
function so the parser falls back to the plugin, tag the nodes with
``plugin_namespace``, int16 columns -> int32, dummies for absent inputs) ->
TensorRT's ONNX parser -> builder -> engine file. The plugin itself lives in
export/tensorrt_plugin.py; ``compile_with_torch_tensorrt`` is the torch-tensorrt
route (a converter for torch.ops.vnm.linear that adds the same plugin).

Requirements (not installable from this package's extras; see README):
TensorRT >= 10.8 with its Python package (``pip install tensorrt``), a CUDA GPU,
PyTorch with CUDA and Triton (the plugin runs the Triton kernels through
torch.ops.vnm.linear); torch-tensorrt matching the PyTorch version for
``compile_with_torch_tensorrt``.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .onnx import DEFAULT_OPSET, ExportInputs, _check_path, _split_inputs, to_onnx
from .onnx_function import DOMAIN, OP_TYPE
from .tensorrt_plugin import PLUGIN_ID, PLUGIN_NAMESPACE, register_plugin

__all__ = [
    "ExperimentalWarning",
    "MIN_TENSORRT",
    "require_tensorrt",
    "prepare_for_tensorrt",
    "to_tensorrt",
    "load_engine",
    "register_torch_tensorrt_converter",
    "compile_with_torch_tensorrt",
]

logger = logging.getLogger(__name__)

MIN_TENSORRT = (10, 8)  # tensorrt.plugin with ONNX-parser fallback to Python plugins
_INSTALL_HINT = (
    "pip install 'tensorrt>=10.8' (NVIDIA's wheels, CUDA 12; see https://docs.nvidia.com/deeplearning/tensorrt/) "
    "on a machine with an NVIDIA GPU and a CUDA build of PyTorch"
)


class ExperimentalWarning(UserWarning):
    """Issued by the TensorRT export entry points, which have not yet run end to end anywhere."""


def _warn_experimental(what: str) -> None:
    warnings.warn(
        f"{what} is experimental: the TensorRT route has not yet been run end to end with TensorRT installed; "
        "check the engine's outputs against the PyTorch model (ONNX export is the tested route)",
        ExperimentalWarning,
        stacklevel=3,
    )


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def require_tensorrt() -> Any:
    """Import TensorRT (>= 10.8, with tensorrt.plugin) and check for a CUDA GPU; clear errors otherwise.

    Returns:
        The ``tensorrt`` module.
    """
    try:
        import tensorrt as trt
    except ImportError as e:
        raise ImportError(f"TensorRT export needs the TensorRT Python package: {_INSTALL_HINT}") from e
    if _version_tuple(getattr(trt, "__version__", "0")) < MIN_TENSORRT:
        raise ImportError(
            f"TensorRT {trt.__version__} is too old: the V:N:M plugin needs TensorRT >= "
            f"{'.'.join(map(str, MIN_TENSORRT))} (tensorrt.plugin): {_INSTALL_HINT}"
        )
    try:
        import tensorrt.plugin  # noqa: F401
    except ImportError as e:
        raise ImportError(f"this TensorRT build has no tensorrt.plugin module: {_INSTALL_HINT}") from e
    if not torch.cuda.is_available():
        raise RuntimeError(
            "TensorRT export needs a CUDA GPU visible to PyTorch (torch.cuda.is_available() is False): "
            "install a CUDA build of PyTorch and run on a machine with an NVIDIA GPU"
        )
    return trt


# --------------------------------------------------------------------------- ONNX -> TensorRT-ready ONNX


def prepare_for_tensorrt(proto) -> Any:
    """A copy of a to_onnx ModelProto that TensorRT's ONNX parser maps onto the V:N:M plugin.

    - the VNMLinear function is removed (else the parser would inline its standard ops);
    - every VNMLinear node gets ``plugin_namespace``, ``has_row_index`` and ``has_bias``;
    - int16 column initializers become int32 (TensorRT has no int16);
    - empty row_index/bias placeholders become 1-element dummies (flagged absent).
    Needs only the onnx package, so it is tested on CPU.
    """
    import onnx
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    keep = [f for f in out.functions if not (f.domain == DOMAIN and f.name == OP_TYPE)]
    del out.functions[:]
    out.functions.extend(keep)

    inits = {init.name: init for init in out.graph.initializer}
    converted: set[str] = set()
    for node in out.graph.node:
        if node.domain != DOMAIN or node.op_type != OP_TYPE:
            continue
        x, values, columns, meta, row_index, bias = node.input
        for name in (values, columns, meta, row_index, bias):
            if name not in inits:
                raise ValueError(f"VNMLinear node {node.name!r}: input {name!r} is not an initializer")
        if inits[columns].data_type == onnx.TensorProto.INT16 and columns not in converted:
            arr = numpy_helper.to_array(inits[columns]).astype(np.int32)
            inits[columns].CopyFrom(numpy_helper.from_array(arr, columns))
            converted.add(columns)
        flags = {}
        for what, name, dtype in (("row_index", row_index, np.int32), ("bias", bias, None)):
            arr = numpy_helper.to_array(inits[name])
            flags[what] = int(arr.size > 0)
            if arr.size == 0:
                dummy_name = f"{node.name or node.output[0]}_{what}_absent"
                dummy_dtype = dtype or numpy_helper.to_array(inits[values]).dtype
                out.graph.initializer.append(numpy_helper.from_array(np.zeros(1, dtype=dummy_dtype), dummy_name))
                node.input[4 if what == "row_index" else 5] = dummy_name
        node.attribute.extend(
            [
                helper.make_attribute("plugin_namespace", PLUGIN_NAMESPACE),
                helper.make_attribute("has_row_index", flags["row_index"]),
                helper.make_attribute("has_bias", flags["bias"]),
            ]
        )
    return out


# --------------------------------------------------------------------------- engine


def _profile_shapes(
    network, example_shapes: Mapping[str, Sequence[int]], max_shapes: Mapping[str, Sequence[int]] | None
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) per network input: dynamic axes run 1 .. max (default 2x the example), opt = example."""
    shapes = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = tuple(tensor.shape)
        if all(d >= 0 for d in dims):
            continue
        if tensor.name not in example_shapes:
            raise ValueError(f"no example shape for the dynamic engine input {tensor.name!r}")
        opt = tuple(int(d) for d in example_shapes[tensor.name])
        if len(opt) != len(dims):
            raise ValueError(
                f"example shape {opt} of {tensor.name!r} does not match the engine input's rank {len(dims)}"
            )
        high = tuple(max_shapes[tensor.name]) if max_shapes and tensor.name in max_shapes else None
        low = tuple(1 if d < 0 else o for d, o in zip(dims, opt, strict=True))
        if high is None:
            high = tuple(2 * o if d < 0 else o for d, o in zip(dims, opt, strict=True))
        shapes[tensor.name] = (low, opt, high)
    return shapes


def _build_engine(
    trt,
    onnx_file: Path,
    example_shapes: Mapping[str, Sequence[int]],
    *,
    fp16: bool,
    bf16: bool,
    max_shapes: Mapping[str, Sequence[int]] | None,
    workspace_bytes: int | None,
) -> bytes:
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_file)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT's ONNX parser rejected {onnx_file}: {errors}")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if bf16:
        config.set_flag(trt.BuilderFlag.BF16)
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    shapes = _profile_shapes(network, example_shapes, max_shapes)
    if shapes:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see the TensorRT log above)")
    return bytes(serialized)


def to_tensorrt(
    model: nn.Module | str | os.PathLike,
    example_inputs: ExportInputs | None,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    bf16: bool = False,
    max_shapes: Mapping[str, Sequence[int]] | None = None,
    example_shapes: Mapping[str, Sequence[int]] | None = None,
    workspace_bytes: int | None = None,
    onnx_path: str | os.PathLike | None = None,
) -> Path:
    """Build and save a TensorRT engine whose V:N:M linears run the ``vnm_compile::VNMLinear`` plugin.

    Args:
        model: a sparsified nn.Module (exported with to_onnx first), or the path of a to_onnx file.
        example_inputs: the model's example inputs (as for to_onnx); their shapes are the
            optimisation profile's opt shapes. May be None when ``model`` is an ONNX path and
            ``example_shapes`` is given.
        path: the engine file to write.
        fp16, bf16: allow TensorRT to pick reduced-precision kernels for the dense layers.
        max_shapes: per input name, the largest shape the engine accepts (default 2x the example
            on dynamic axes; the smallest is 1).
        example_shapes: per input name, the opt shape (default: from example_inputs).
        onnx_path: also keep the intermediate ONNX file here (default: a temporary file).

    Returns:
        The engine path. Load it with :func:`load_engine` (which registers the plugin first).

    Raises:
        ImportError: TensorRT (>= 10.8, with tensorrt.plugin) is not installed.
        RuntimeError: no CUDA GPU, or TensorRT failed to parse/build.
    """
    _warn_experimental("to_tensorrt")
    trt = require_tensorrt()
    import onnx

    path = _check_path(path)
    register_plugin()
    if example_shapes is None and example_inputs is None:
        raise ValueError("to_tensorrt needs example_inputs or example_shapes for the optimisation profile")
    with tempfile.TemporaryDirectory(prefix="vnm_trt_") as tmp:
        if isinstance(model, nn.Module):
            if example_inputs is None:
                raise ValueError("to_tensorrt needs example_inputs to export a model")
            source = Path(onnx_path) if onnx_path is not None else Path(tmp) / "model.onnx"
            to_onnx(model, example_inputs, source, opset=opset)
        elif isinstance(model, (str, os.PathLike)):
            source = Path(model)
            if not source.is_file():
                raise FileNotFoundError(f"ONNX file {str(source)!r} does not exist")
        else:
            raise TypeError(f"model must be an nn.Module or an ONNX file path, got {type(model).__name__}")
        prepared = prepare_for_tensorrt(onnx.load(str(source)))
        if example_shapes is None:
            example_shapes = _input_shapes(example_inputs, [i.name for i in prepared.graph.input])
        prepared_file = Path(tmp) / "model.trt.onnx"
        big = prepared.ByteSize() > 2**31 - 1
        onnx.save_model(prepared, str(prepared_file), save_as_external_data=big, location="model.trt.onnx.data")
        engine = _build_engine(
            trt,
            prepared_file,
            example_shapes,
            fp16=fp16,
            bf16=bf16,
            max_shapes=max_shapes,
            workspace_bytes=workspace_bytes,
        )
    path.write_bytes(engine)
    logger.info("to_tensorrt: wrote %s (%.1f MB)", path, len(engine) / 1e6)
    return path


def _input_shapes(example_inputs: ExportInputs, input_names: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Example shapes by graph input name (the ONNX inputs follow the example's tensors in order)."""
    args, kwargs = _split_inputs(example_inputs)
    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    if len(tensors) != len(input_names):
        raise ValueError(
            f"the ONNX graph has inputs {list(input_names)} but the example has {len(tensors)} tensors: "
            "pass example_shapes={name: shape}"
        )
    return {name: tuple(t.shape) for name, t in zip(input_names, tensors, strict=True)}


def load_engine(path: str | os.PathLike) -> Any:
    """Deserialize an engine written by to_tensorrt (registers the V:N:M plugin first)."""
    trt = require_tensorrt()
    register_plugin()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
    if engine is None:
        raise RuntimeError(f"TensorRT could not deserialize {str(path)!r} (built with another TensorRT version?)")
    return engine


# --------------------------------------------------------------------------- torch-tensorrt


def _require_torch_tensorrt() -> Any:
    require_tensorrt()
    try:
        import torch_tensorrt
    except ImportError as e:
        raise ImportError(
            "compile_with_torch_tensorrt needs torch-tensorrt built for this PyTorch: pip install torch-tensorrt "
            f"(and {_INSTALL_HINT})"
        ) from e
    return torch_tensorrt


@functools.cache
def register_torch_tensorrt_converter() -> None:
    """Register a torch-tensorrt converter that turns torch.ops.vnm.linear into the V:N:M plugin."""
    _require_torch_tensorrt()
    import tensorrt.plugin as trtp
    from torch_tensorrt.dynamo.conversion import dynamo_tensorrt_converter
    from torch_tensorrt.dynamo.conversion.converter_utils import get_trt_tensor

    from ..kernels.vnm_linear import OP, OpWeight

    register_plugin()

    @dynamo_tensorrt_converter(OP, supports_dynamic_shapes=True)
    def _convert_vnm_linear(ctx, target, args, kwargs, name):
        x, weight, spec, bias = args
        w = OpWeight.unpack(list(weight), spec)  # the lowered copy holds the compressed weight alone
        values, columns, meta, row_index, v, n, m, out_features = (
            w.values, w.columns, w.meta, w.row_index, w.v, w.n, w.m, w.out_features
        )  # fmt: skip
        # Frozen buffers may arrive as numpy arrays; TensorRT has no int16 (columns -> int32).
        values, columns, meta, row_index, bias = (
            torch.from_numpy(t) if isinstance(t, np.ndarray) else t for t in (values, columns, meta, row_index, bias)
        )
        if isinstance(columns, torch.Tensor):
            columns = columns.to(torch.int32)
        has_row_index, has_bias = int(row_index is not None), int(bias is not None)
        if row_index is None:
            row_index = torch.zeros(1, dtype=torch.int32)
        if bias is None:
            bias = torch.zeros(1, dtype=values.dtype if isinstance(values, torch.Tensor) else torch.float32)
        inputs = [
            get_trt_tensor(ctx, t, f"{name}_{what}")
            for t, what in zip(
                (x, values, columns, meta, row_index, bias),
                ("x", "values", "columns", "meta", "row_index", "bias"),
                strict=True,
            )
        ]
        plugin = getattr(getattr(trtp.op, PLUGIN_ID.split("::")[0]), PLUGIN_ID.split("::")[1])
        in_features = int(inputs[0].shape[-1])
        layer = ctx.net.add_plugin(
            plugin(
                *inputs,
                v=int(v),
                n=int(n),
                m=int(m),
                out_features=int(out_features),
                in_features=in_features,
                has_row_index=has_row_index,
                has_bias=has_bias,
            )
        )
        layer.name = f"vnm_linear_{name}"
        return layer.get_output(0)


def compile_with_torch_tensorrt(model: nn.Module, example_inputs: ExportInputs, **compile_kwargs) -> nn.Module:
    """``torch_tensorrt.compile`` a sparsified model with its V:N:M linears as plugin layers.

    The model is lowered on a copy (export/lowering.py; the user's model is unchanged),
    the converter is registered, and the copy is compiled with ``ir="dynamo"``.
    Extra keyword arguments go to torch_tensorrt.compile.
    """
    _warn_experimental("compile_with_torch_tensorrt")
    torch_tensorrt = _require_torch_tensorrt()
    from .lowering import lowered_copy

    register_torch_tensorrt_converter()
    clone, swapped = lowered_copy(model)
    if not swapped:
        logger.warning("compile_with_torch_tensorrt: the model has no sparsified linear; compiling it densely")
    args, kwargs = _split_inputs(example_inputs)
    return torch_tensorrt.compile(
        clone.eval(), ir="dynamo", arg_inputs=list(args), kwarg_inputs=kwargs, **compile_kwargs
    )
