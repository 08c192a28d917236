"""Pass 6 (option ``expand_weights``): hold each lowered weight expanded over its kept columns.

For every vnm::linear / vnm::hybrid_linear call left by the earlier passes (fused or not) whose
compressed tensors are graph constants and whose n is 2, the expanded weights
(``kernels.vnm_triton.expand_weights``: (Rp, 4G) in x's dtype, each row's kept values at its
block's 4 kept columns per group, 4/M of the dense weight's bytes) become one more constant,
passed as the op's ``expanded`` argument. The gather GEMM then streams them from 2 tokens up
instead of rebuilding them on every call; find_linears chose the token limits from the timings
measured that way (``dispatch.sparse_token_limit(..., expanded=True)``). A recompile that sees the
same compressed tensors reuses their expanded weights.

``attach_constants`` is the machinery this pass shares with interleave_rows (pass 7).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import fx
from torch.utils.weak import WeakIdKeyDictionary

from ..kernels.vnm_linear import HYBRID_OP, OP
from ..kernels.vnm_triton import expand_weights as _expand
from .context import CompileContext
from .find_linears import _example
from .fuse_siblings import _attr, _sparse_args
from .lower_linears import LAYER_META, _constant

__all__ = ["expand_weights", "attach_constants"]

logger = logging.getLogger(__name__)

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The optional trailing arguments of the two ops, by name: their positions.
_OPTIONAL = {
    OP: {"expanded": 10, "rows_values": 11, "rows_meta": 12},
    HYBRID_OP: {"expanded": 12, "rows_values": 13, "rows_meta": 14},
}
# (kind, values tensor) -> (meta, key, tensors): recompiles (new shapes, guards) reuse what was built.
_CACHE: dict[str, WeakIdKeyDictionary] = {}

# build(values, meta, x dtype) -> (key, tensors), or None when the layer cannot use them
Builder = Callable[[torch.Tensor, torch.Tensor, int, torch.dtype], "tuple[object, tuple[torch.Tensor, ...]] | None"]


def _built(kind: str, values, meta, v: int, dtype, build: Builder):
    cache = _CACHE.setdefault(kind, WeakIdKeyDictionary())
    hit = cache.get(values)
    if hit is not None and hit[0] is meta and hit[1] == dtype:
        return hit[2]
    with torch.no_grad():
        made = build(values, meta, v, dtype)
    cache[values] = (meta, dtype, made)
    return made


def attach_constants(
    gm: fx.GraphModule, ctx: CompileContext, kind: str, names: tuple[str, ...], build: Builder, record: str
) -> int:
    """For every vnm op call on constant compressed tensors with n = 2: ``build`` the tensors for
    the op's optional arguments ``names`` once per weight, hold them as graph constants, pass
    them (earlier optional arguments left unset become None) and record their bytes on the
    layers' sites (attribute ``record``). Returns how many calls now take them."""
    graph = gm.graph
    sites = {s.name: s for s in ctx.sites}
    added = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _OPTIONAL:
            continue
        positions = [_OPTIONAL[node.target][name] for name in names]
        x, values, _, meta, _, _, v, n, _, _ = _sparse_args(node)[:10]
        vals, words, example = _attr(gm, values), _attr(gm, meta), _example(x)
        if n != 2 or vals is None or words is None or node.kwargs:
            continue
        if len(node.args) > positions[0] and node.args[positions[0]] is not None:
            continue  # already passed
        dtype = example.dtype if example is not None else vals.dtype
        made = _built(kind, vals, words, v, dtype, build) if dtype in _DTYPES else None
        if made is None:
            continue
        with graph.inserting_before(node):
            consts = []
            for name, tensor in zip(names, made, strict=True):
                attr = f"{values.target}_{name}"
                exists = hasattr(gm, attr)  # another call of the same weight
                consts.append(graph.get_attr(attr) if exists else _constant(gm, graph, attr, tensor))
        args = list(node.args) + [None] * (positions[-1] + 1 - len(node.args))
        for pos, const in zip(positions, consts, strict=True):
            args[pos] = const
        node.args = tuple(args)
        nbytes = sum(t.numel() * t.element_size() for t in made)
        for layer in str(node.meta.get(LAYER_META, "")).split("+"):
            if layer in sites:
                setattr(sites[layer], record, nbytes)
        added += 1
    if added:
        graph.lint()
        gm.recompile()
    return added


def _expanded(values, meta, v, dtype):
    return (_expand(values, meta, dtype),)


def expand_weights(gm: fx.GraphModule, ctx: CompileContext) -> bool:
    """Pass the expanded weights to every vnm op call that can use them. True if the graph changed."""
    if not ctx.options.expand_weights:
        return False
    added = attach_constants(gm, ctx, "expanded", ("expanded",), _expanded, "expanded_bytes")
    logger.debug("expand_weights: expanded weights passed to %d vnm op calls", added)
    return added > 0
