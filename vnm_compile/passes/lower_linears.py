"""Replace each lowerable linear call with ``torch.ops.vnm.linear`` on its compressed weight.

The compressed tensors (values, columns, meta, row_index) become buffers of
the GraphModule read through ``get_attr`` (inductor treats them as parameters
of the compiled graph);
the original weight placeholder may stay behind as an unused graph input.
"""

from __future__ import annotations

import logging

import torch
from torch import fx

from ..kernels.vnm_linear import OP
from .context import CompileContext

__all__ = ["lower_linears"]

logger = logging.getLogger(__name__)

_PREFIX = "_vnm"


def _constant(gm: fx.GraphModule, graph: fx.Graph, name: str, tensor: torch.Tensor) -> fx.Node:
    """Register ``tensor`` as a buffer of ``gm`` and read it with get_attr.

    AOTAutograd maps every parameter/buffer of a Dynamo graph to a source
    (``gm._param_name_to_source``), as Dynamo does for the constants it registers;
    these tensors exist only in the compiled copy, so they get a ConstantSource.
    """
    gm.register_buffer(name, tensor)
    sources = getattr(gm, "_param_name_to_source", None)
    if isinstance(sources, dict):
        from torch._dynamo.source import ConstantSource

        sources[name] = ConstantSource(name)
    return graph.get_attr(name)


def _fresh_prefix(gm: fx.GraphModule) -> int:
    index = 0
    while hasattr(gm, f"{_PREFIX}{index}_values"):
        index += 1
    return index


def lower_linears(gm: fx.GraphModule, ctx: CompileContext) -> bool:
    """Rewrite linear -> vnm.linear for every site with a compressed weight; True if the graph changed."""
    graph = gm.graph
    lowered = 0
    index = _fresh_prefix(gm)
    for site in ctx.to_lower():
        w = site.compressed
        if w is None:
            continue
        prefix = f"{_PREFIX}{index}"
        index += 1
        first = site.nodes[0]
        with graph.inserting_before(first):
            tensors = {k: _constant(gm, graph, f"{prefix}_{k}", t) for k, t in w.tensors().items()}
        for node in site.nodes:
            x = node.args[0] if node.args else node.kwargs["input"]
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            args = (
                x,
                tensors["values"],
                tensors["columns"],
                tensors["meta"],
                tensors.get("row_index"),
                bias,
                w.block_rows,
                w.pattern.n,
                w.pattern.m,
                w.out_features,
            )
            with graph.inserting_before(node):
                new = graph.call_function(OP, args)
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            lowered += 1
    if lowered:
        graph.lint()
        gm.recompile()
    logger.debug("lower_linears: %d linear calls replaced with vnm.linear", lowered)
    return lowered > 0
