"""to_onnx: a sparsified model as a compressed ONNX file that onnxruntime runs as is.

Steps:
  1. copy the model with every V:N:M linear swapped for a torch.ops.vnm.linear
     call over its compressed tensors (export/lowering.py; the user's model is
     not touched);
  2. torch.onnx.export (the torch.export-based exporter, which needs onnxscript)
     with a translation of vnm::linear into one ``vnm_compile.VNMLinear`` node;
  3. attach the node's ONNX function (export/onnx_function.py), check, save.

The rest of the model exports as usual, with dynamic batch (axis 0) and
sequence (axis 1) axes on every tensor input by default.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..kernels.vnm_linear import OP, TC_OFF, OpWeight
from .lowering import lowered_copy
from .onnx_function import DOMAIN, DOMAIN_VERSION, MIN_OPSET, OP_TYPE, register_schema, vnm_linear_function

__all__ = ["to_onnx", "DEFAULT_OPSET", "SUPPORTED_OPSETS", "onnx_summary", "ExportInputs"]

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18
# 18: the oldest with every op the function body uses (BitwiseAnd) and the
# torch exporter's native opset; 23: the newest tested with onnxruntime here.
SUPPORTED_OPSETS = range(MIN_OPSET, 24)
_PROTOBUF_LIMIT = 2**31 - 1  # larger models must keep their tensors in an external data file

ExportInputs = Tensor | tuple | list | Mapping


def _require_onnx() -> None:
    missing = []
    for module in ("onnx", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ImportError(
            f"ONNX export needs {' and '.join(missing)}: pip install 'vnm_compile[export]' "
            "(onnx>=1.16, onnxscript>=0.5, onnxruntime>=1.18 to run the file)"
        )


def _check_path(path: str | os.PathLike) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    p = Path(path)
    if str(path) == "" or p.is_dir():
        raise ValueError(f"path must name a file to write, got the directory {str(path)!r}")
    if not p.parent.is_dir():
        raise FileNotFoundError(f"cannot write {str(p)!r}: the directory {str(p.parent)!r} does not exist")
    if not os.access(p.parent, os.W_OK):
        raise PermissionError(f"cannot write {str(p)!r}: the directory {str(p.parent)!r} is not writable")
    return p


def _check_opset(opset: int) -> int:
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise TypeError(f"opset must be an int, got {type(opset).__name__}")
    if opset not in SUPPORTED_OPSETS:
        raise ValueError(
            f"ONNX opset {opset} is not supported: use {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1} "
            f"(the VNMLinear function body needs opset >= {MIN_OPSET})"
        )
    return opset


def _split_inputs(example_inputs: ExportInputs) -> tuple[tuple, dict]:
    """(args, kwargs) as calibrate() reads batches: dict -> kwargs, tuple/list -> args, tensor -> one arg."""
    if isinstance(example_inputs, Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError(
        f"example_inputs must be a Tensor, a tuple of arguments or a dict, got {type(example_inputs).__name__}"
    )


# Default dynamic axes and the names they get in the ONNX file.
_AXIS_NAMES = {0: "batch", 1: "sequence"}


def _dynamic_axes(x: Tensor) -> list[int]:
    """The batch/sequence axes of an example input: axes 0 and 1 of token ids and masks (integer or bool)
    and of (batch, sequence, features) activations; axis 0 only of a 2-D float input (tokens, features)
    or an image (batch, channels, ...): a feature or channel axis is never dynamic."""
    if x.dim() == 0:
        return []
    if x.dim() == 1:
        return [0]
    if not x.is_floating_point() or x.dim() == 3:
        return [0, 1]
    return [0]


def _default_dynamic_shapes(args: tuple, kwargs: dict) -> tuple[tuple, dict, tuple | dict]:
    """(args, kwargs, dynamic_shapes): the batch and sequence axes (_dynamic_axes) of every tensor input dynamic.

    torch.export specialises sizes 0 and 1, so an example of size 1 on such an axis (batch 1, one
    token) is traced repeated to size 2: the file still takes any size. Dim.AUTO lets torch.export
    refine ranges (e.g. sequence <= max positions) and keep an axis static that the model fixes;
    _name_dynamic_axes logs which axes stayed static.
    """

    def prepare(name: str, x: Any) -> tuple[Any, dict | None]:
        if not isinstance(x, Tensor):
            return x, None
        axes = _dynamic_axes(x)
        for axis in axes:
            if x.shape[axis] == 0:
                raise ValueError(
                    f"example input {name!r} has size 0 on axis {axis}: give an example with data (or pass "
                    "dynamic=False, or dynamic_shapes explicitly)"
                )
            if x.shape[axis] == 1:
                logger.info("to_onnx: %s has size 1 on axis %d; traced at size 2 (the axis stays dynamic)", name, axis)
                x = torch.cat([x, x], dim=axis)
        return x, ({axis: torch.export.Dim.AUTO for axis in axes} or None)

    new_args, specs = [], []
    for i, a in enumerate(args):
        a, spec = prepare(f"args[{i}]", a)
        new_args.append(a)
        specs.append(spec)
    new_kwargs, kw_specs = {}, {}
    for k, v in kwargs.items():
        new_kwargs[k], kw_specs[k] = prepare(k, v)
    if not args:
        return (), new_kwargs, kw_specs
    if not kwargs:
        return tuple(new_args), {}, tuple(specs)
    return tuple(new_args), new_kwargs, (*specs, *kw_specs.values())


def _without_cache(model: nn.Module, kwargs: dict) -> dict:
    """A transformers model's KV cache (``use_cache=True`` by default for causal LMs) returns a Cache
    object that torch.export cannot flatten: export without it unless the caller passed use_cache."""
    import inspect

    if "use_cache" in kwargs:
        return kwargs
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return kwargs
    if "use_cache" in params and getattr(getattr(model, "config", None), "use_cache", False):
        logger.info("to_onnx: exporting with use_cache=False (a KV cache does not export); pass use_cache to choose")
        return {**kwargs, "use_cache": False}
    return kwargs


def _name_dynamic_axes(proto) -> None:
    """Rename the symbolic sizes of the graph inputs' axes 0/1 to "batch"/"sequence" everywhere.

    torch.export may give two inputs' batch axes different symbols when the model never
    compares them (e.g. input_ids and attention_mask); they get the same name here
    because callers must pass equal sizes.
    """
    rename: dict[str, str] = {}
    for value in proto.graph.input:
        for axis, dim in enumerate(value.type.tensor_type.shape.dim[:2]):
            if dim.dim_param and dim.dim_param not in rename:
                rename[dim.dim_param] = _AXIS_NAMES[axis]
            elif not dim.dim_param:
                logger.info(
                    "to_onnx: input %r axis %d stays static (%d): the model fixes it", value.name, axis, dim.dim_value
                )
    if not rename:
        return
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]


def _output_names(program: torch.export.ExportedProgram) -> list[str] | None:
    """Names for the flattened outputs: a ModelOutput/dict's keys, "output" for one tensor, else None."""
    spec = program.call_spec.out_spec
    if spec is None:
        return None
    if spec.num_leaves == 1 and spec.is_leaf():
        return ["output"]
    keys = spec.context if isinstance(spec.context, list) else None
    children = spec.children() if hasattr(spec, "children") else spec.children_specs
    if keys and issubclass(spec.type, Mapping) and all(c.is_leaf() for c in children):
        return [str(k) for k in keys]
    return None


def _translate_vnm_linear(x, weight, spec: list[int], bias):
    """torch.ops.vnm.linear -> one vnm_compile.VNMLinear node (absent row_index/bias become empty tensors)."""
    import onnx_ir as ir
    from onnxscript import opset18 as op
    from onnxscript.values import Opset

    w = OpWeight.unpack(list(weight), spec)
    if w.expanded is not None or w.interleaved is not None or w.tc_mode != TC_OFF or w.max_sparse_tokens is not None:
        raise ValueError("vnm::linear: the ONNX VNMLinear node takes the compressed weight alone (no held copies)")
    values, columns, meta, row_index = w.values, w.columns, w.meta, w.row_index
    register_schema()
    custom = Opset(DOMAIN, DOMAIN_VERSION)
    if row_index is None:
        row_index = op.Constant(value=ir.tensor(np.zeros(0, dtype=np.int32), name="vnm_no_row_index"))
    if bias is None:
        bias = op.Constant(value=ir.tensor(np.zeros(0, dtype=np.float32), name="vnm_no_bias"))
    in_features = x.shape[-1] if x.shape is not None else None
    if not isinstance(in_features, int):
        raise ValueError("vnm::linear: the input's feature (last) axis must have a static size to export")
    return custom.VNMLinear(
        x, values, columns, meta, row_index, bias, v=w.v, n=w.n, m=w.m, out_features=w.out_features,
        in_features=in_features,
    )  # fmt: skip


def _attach_function(proto, opset: int) -> int:
    """Add the VNMLinear function and the domain import; returns the number of VNMLinear nodes."""
    import onnx

    nodes = [nd for nd in proto.graph.node if nd.domain == DOMAIN and nd.op_type == OP_TYPE]
    if not nodes:
        return 0
    if not any(f.domain == DOMAIN and f.name == OP_TYPE for f in proto.functions):
        proto.functions.append(vnm_linear_function(opset))
    if not any(o.domain == DOMAIN for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    return len(nodes)


def _check_no_dense_copies(proto, swapped: Sequence[str]) -> None:
    """No initializer may carry a lowered layer's dense weight."""
    dense_names = {f"{name}.weight" for name in swapped}
    for init in proto.graph.initializer:
        if init.name in dense_names:
            raise RuntimeError(f"internal error: the dense weight {init.name!r} of a V:N:M layer was exported")


def _save(proto, path: Path, external_data: bool | None) -> None:
    import onnx

    big = proto.ByteSize() > _PROTOBUF_LIMIT if external_data is None else external_data
    if big:
        location = path.name + ".data"
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location)
    else:
        onnx.save_model(proto, str(path))
    onnx.checker.check_model(str(path))


def to_onnx(
    model: nn.Module,
    example_inputs: ExportInputs,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic: bool = True,
    dynamic_shapes: Mapping | Sequence | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    external_data: bool | None = None,
) -> Path:
    """Export a (sparsified) model to ONNX with one ``vnm_compile.VNMLinear`` node per V:N:M linear.

    Args:
        model: any nn.Module; linears sparsified by ``sparsify_`` are exported compressed
            (values, columns, metadata, row permutation, bias as initializers), the rest as usual.
            The model is not modified (a copy sharing its tensors is exported, in eval mode).
        example_inputs: a tensor, a tuple of positional arguments, or a dict of keyword arguments.
        path: the .onnx file to write (its directory must exist).
        opset: ONNX opset of the standard ops (18..23).
        dynamic: make the batch (axis 0) and sequence (axis 1) axes of every tensor input dynamic:
            both for token ids, masks and (batch, sequence, features) inputs, axis 0 only for 2-D
            float (tokens, features) and image inputs. An example of size 1 there is traced at size 2.
            A transformers model whose config has use_cache=True is exported with use_cache=False
            unless ``example_inputs`` passes use_cache (a KV cache object does not export).
        dynamic_shapes: torch.export-style dynamic shapes; overrides ``dynamic``.
        input_names, output_names: graph input/output names (defaults: argument names;
            a ModelOutput's keys).
        external_data: store tensors in ``<path>.data``; default only above the 2 GB protobuf limit.

    Returns:
        The path written. A model with no sparsified linear is exported densely with a warning.
    """
    _require_onnx()
    path = _check_path(path)
    opset = _check_opset(opset)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    args, kwargs = _split_inputs(example_inputs)

    # 1. Lowered copy (the user's model keeps its modules, mode and tensors).
    clone, swapped = lowered_copy(model)
    clone.eval()
    if not swapped:
        warnings.warn(
            "to_onnx: the model has no sparsified linear (run vnm_compile.sparsify_ first); exporting it densely",
            UserWarning,
            stacklevel=2,
        )
    kwargs = _without_cache(model, kwargs)
    default_axes = dynamic_shapes is None and dynamic
    if default_axes:
        args, kwargs, dynamic_shapes = _default_dynamic_shapes(args, kwargs)

    # 2. torch.export, then ONNX with vnm::linear translated into the custom node.
    program = torch.export.export(clone, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    if output_names is None:
        output_names = _output_names(program)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
        onnx_program = torch.onnx.export(
            program,
            dynamo=True,
            opset_version=opset,
            input_names=list(input_names) if input_names is not None else None,
            output_names=list(output_names) if output_names is not None else None,
            custom_translation_table={OP: _translate_vnm_linear},
            verbose=False,
        )
    proto = onnx_program.model_proto

    # 3. Function body, axis names, checks, save.
    if default_axes:
        _name_dynamic_axes(proto)
    n_nodes = _attach_function(proto, opset)
    if n_nodes != len(swapped):
        logger.warning("to_onnx: %d V:N:M linears lowered but %d VNMLinear nodes exported", len(swapped), n_nodes)
    _check_no_dense_copies(proto, swapped)
    _save(proto, path, external_data)
    logger.info("to_onnx: wrote %s (%d VNMLinear nodes, %.1f MB)", path, n_nodes, path.stat().st_size / 1e6)
    return path


def onnx_summary(path: str | os.PathLike) -> dict[str, Any]:
    """What a file holds: VNMLinear node count, initializer bytes (total, in VNMLinear inputs), opsets."""
    import onnx

    proto = onnx.load(str(path), load_external_data=True)
    sizes = {init.name: _tensor_nbytes(init) for init in proto.graph.initializer}
    custom = [nd for nd in proto.graph.node if nd.domain == DOMAIN and nd.op_type == OP_TYPE]
    sparse_inputs = {name for nd in custom for name in nd.input[1:]}
    return {
        "vnm_nodes": len(custom),
        "initializer_bytes": sum(sizes.values()),
        "vnm_initializer_bytes": sum(b for name, b in sizes.items() if name in sparse_inputs),
        "file_bytes": Path(path).stat().st_size,
        "opsets": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
        "has_function": any(f.domain == DOMAIN and f.name == OP_TYPE for f in proto.functions),
    }


def _tensor_nbytes(init) -> int:
    from onnx import helper

    numel = int(np.prod(init.dims)) if len(init.dims) else 1
    return numel * np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
