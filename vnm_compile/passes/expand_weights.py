"""Pass 6 (option ``expand_weights``): hold each lowered weight expanded over its kept columns.

For every vnm::linear / vnm::hybrid_linear call left by the earlier passes (fused or not) whose
compressed tensors are graph constants and whose n is 2, the expanded weights
(``kernels.vnm_triton.expand_weights``: (Rp, 4G) in x's dtype, each row's kept values at its
block's 4 kept columns per group, 4/M of the dense weight's bytes) become one more constant,
passed as the ``expanded`` field of the op's weight (``kernels.op_weight.OpWeight``). The gather
GEMM then streams them from 2 tokens up instead of rebuilding them on every call; find_linears chose
the token limits from the timings measured that way (``dispatch.sparse_token_limit(...,
expanded=True)``). A recompile that sees the same compressed tensors reuses their expanded weights.

``attach_constants`` is the machinery this pass shares with interleave_rows (pass 7) and
sparse_tc_weights (pass 8).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import fx
from torch.utils.weak import WeakIdKeyDictionary

from ..kernels.vnm_linear import HYBRID_OP, OP
from ..kernels.vnm_triton import expand_weights as _expand
from .context import CompileContext
from .find_linears import _example
from .graph import attr_tensor, constant, op_args, op_weight, set_op_weight
from .lower_linears import LAYER_META

__all__ = ["expand_weights", "attach_constants", "LayerTensors"]

logger = logging.getLogger(__name__)

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TARGETS = (OP, HYBRID_OP)
# (kind, values tensor) -> (meta, dtype, made): recompiles (new shapes, guards) reuse what was built.
_CACHE: dict[str, WeakIdKeyDictionary] = {}


class LayerTensors(NamedTuple):
    """A vnm op call's compressed weight (graph constants) and sizes, what a Builder reads."""

    values: torch.Tensor
    columns: torch.Tensor
    meta: torch.Tensor
    row_index: torch.Tensor | None
    v: int
    m: int
    out_features: int
    in_features: int


# build(layer, x dtype) -> the values of OpWeight fields (tensors become graph constants, other
# values are passed as they are), or None when the layer cannot use them
Builder = Callable[[LayerTensors, torch.dtype], "tuple | None"]


def _built(kind: str, layer: LayerTensors, dtype, build: Builder):
    cache = _CACHE.setdefault(kind, WeakIdKeyDictionary())
    hit = cache.get(layer.values)
    if hit is not None and hit[0] is layer.meta and hit[1] == dtype:
        return hit[2]
    with torch.no_grad():
        made = build(layer, dtype)
    cache[layer.values] = (layer.meta, dtype, made)
    return made


def attach_constants(
    gm: fx.GraphModule,
    ctx: CompileContext,
    kind: str,
    names: tuple[str, ...],
    build: Builder,
    record: str,
    per_call: Callable[[fx.Node], dict[str, object] | None] | None = None,
) -> int:
    """For every vnm op call on constant compressed tensors with n = 2: ``build`` the values of
    the ``OpWeight`` fields ``names`` once per weight, hold the tensors among them as graph
    constants, pass them in the op's weight (None results stay None) and record their bytes on the
    layers' sites (attribute ``record``). ``per_call(node)`` (optional) gives per-call values for some of
    ``names`` (non-tensor ones), or None to skip that call. Returns how many calls now take them."""
    graph = gm.graph
    sites = {s.name: s for s in ctx.sites}
    added = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _TARGETS:
            continue
        w = op_weight(node)
        vals, cols, words = attr_tensor(gm, w.values), attr_tensor(gm, w.columns), attr_tensor(gm, w.meta)
        rows, example = attr_tensor(gm, w.row_index), _example(op_args(node)["x"])
        if w.n != 2 or vals is None or cols is None or words is None:
            continue
        if w.row_index is not None and rows is None:
            continue
        if getattr(w, names[0]) is not None:
            continue  # already passed
        overrides = per_call(node) if per_call is not None else {}
        if overrides is None:
            continue
        dtype = example.dtype if example is not None else vals.dtype
        in_features = example.shape[-1] if example is not None else 0
        layer = LayerTensors(vals, cols, words, rows, w.v, w.m, w.out_features, in_features)
        made = _built(kind, layer, dtype, build) if dtype in _DTYPES else None
        if made is None:
            continue
        made = tuple(overrides.get(name, value) for name, value in zip(names, made, strict=True))
        with graph.inserting_before(node):
            consts = []
            for name, value in zip(names, made, strict=True):
                if not isinstance(value, torch.Tensor):
                    consts.append(value)
                    continue
                attr = f"{w.values.target}_{name}"
                exists = hasattr(gm, attr)  # another call of the same weight
                consts.append(graph.get_attr(attr) if exists else constant(gm, graph, attr, value))
        set_op_weight(node, dataclasses.replace(w, **dict(zip(names, consts, strict=True))))
        nbytes = sum(t.numel() * t.element_size() for t in made if isinstance(t, torch.Tensor))
        for layer in str(node.meta.get(LAYER_META, "")).split("+"):
            if layer in sites:
                setattr(sites[layer], record, nbytes)
        added += 1
    if added:
        graph.lint()
        gm.recompile()
    return added


def _expanded(layer: LayerTensors, dtype):
    return (_expand(layer.values, layer.meta, dtype),)


def expand_weights(gm: fx.GraphModule, ctx: CompileContext) -> bool:
    """Pass the expanded weights to every vnm op call that can use them. True if the graph changed."""
    if not ctx.options.expand_weights:
        return False
    added = attach_constants(gm, ctx, "expanded", ("expanded",), _expanded, "expanded_bytes")
    logger.debug("expand_weights: expanded weights passed to %d vnm op calls", added)
    return added > 0
