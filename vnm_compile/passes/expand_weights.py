"""Pass 6 (option ``expand_weights``): hold each lowered weight expanded over its kept columns.

For every vnm::linear / vnm::hybrid_linear call left by the earlier passes (fused or not) whose
compressed tensors are graph constants and whose n is 2, the expanded weights
(``kernels.vnm_triton.expand_weights``: (Rp, 4G) in x's dtype, each row's kept values at its
block's 4 kept columns per group, 4/M of the dense weight's bytes) become one more constant,
passed as the op's last argument. The gather GEMM then streams them from 2 tokens up instead of
rebuilding them on every call; find_linears chose the token limits from the timings measured
that way (``dispatch.sparse_token_limit(..., expanded=True)``). A recompile that sees the same
compressed tensors reuses their expanded weights.
"""

from __future__ import annotations

import logging

import torch
from torch import fx
from torch.utils.weak import WeakIdKeyDictionary

from ..kernels.vnm_linear import HYBRID_OP, OP
from ..kernels.vnm_triton import expand_weights as _expand
from .context import CompileContext
from .find_linears import _example
from .fuse_siblings import _attr, _sparse_args
from .lower_linears import LAYER_META, _constant

__all__ = ["expand_weights"]

logger = logging.getLogger(__name__)

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# values tensor -> (meta, dtype, expanded): recompiles (new shapes, guards) reuse the expansion.
_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _expanded(values: torch.Tensor, meta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    hit = _CACHE.get(values)
    if hit is not None and hit[0] is meta and hit[1] == dtype:
        return hit[2]
    with torch.no_grad():
        e = _expand(values, meta, dtype)
    _CACHE[values] = (meta, dtype, e)
    return e


def expand_weights(gm: fx.GraphModule, ctx: CompileContext) -> bool:
    """Append the expanded weights to every vnm op call that can use them. True if the graph changed."""
    if not ctx.options.expand_weights:
        return False
    graph = gm.graph
    sites = {s.name: s for s in ctx.sites}
    added = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (OP, HYBRID_OP):
            continue
        full = 13 if node.target is HYBRID_OP else 11  # arguments with the optional expanded weights
        x, values, _, meta, _, _, _, n, _, _ = _sparse_args(node)[:10]
        vals, words, example = _attr(gm, values), _attr(gm, meta), _example(x)
        if len(node.args) >= full or n != 2 or vals is None or words is None:
            continue
        dtype = example.dtype if example is not None else vals.dtype
        if dtype not in _DTYPES:
            continue
        name = f"{values.target}_expanded"
        with graph.inserting_before(node):
            if hasattr(gm, name):  # another call of the same weight
                e = graph.get_attr(name)
            else:
                e = _constant(gm, graph, name, _expanded(vals, words, dtype))
        node.args = (*node.args, e)
        tensor = getattr(gm, name)
        for layer in str(node.meta.get(LAYER_META, "")).split("+"):
            if layer in sites:
                sites[layer].expanded_bytes = tensor.numel() * tensor.element_size()
        added += 1
    if added:
        graph.lint()
        gm.recompile()
    logger.debug("expand_weights: expanded weights passed to %d vnm op calls", added)
    return added > 0
