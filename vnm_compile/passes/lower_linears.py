"""Replace each lowerable linear call with ``torch.ops.vnm.linear`` on its compressed weight.

The compressed tensors (values, columns, meta, row_index) become buffers of
the GraphModule read through ``get_attr`` (inductor treats them as parameters
of the compiled graph);
the original weight placeholder may stay behind as an unused graph input.

A site with a token limit (``site.max_sparse_tokens``, set by find_linears)
becomes ``torch.ops.vnm.hybrid_linear`` instead, whose dense branch reads the
linear's own weight node: the model's masked Parameter, no extra memory.
Only a weight with nonzeros outside its mask (compile-time pruning leaves the
model's weights untouched) gets a masked dense copy as a buffer.
"""

from __future__ import annotations

import logging

import torch
from torch import fx

from ..kernels.vnm_linear import HYBRID_OP, OP
from .context import CompileContext, LinearSite

__all__ = ["lower_linears", "LAYER_META"]

logger = logging.getLogger(__name__)

_PREFIX = "_vnm"
LAYER_META = "vnm_layer"  # node.meta key: the layer name(s) a vnm op computes


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


def _dense_weight(gm: fx.GraphModule, graph: fx.Graph, site: LinearSite, prefix: str) -> fx.Node | torch.Tensor:
    """The masked weight for hybrid_linear's dense branch: the graph's weight node when it is masked already."""
    node = site.nodes[0]
    weight_node = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
    with torch.no_grad():
        w = site.weight.detach()
        mask = site.state.mask.to(device=w.device, dtype=torch.bool)
        if not w.masked_fill(mask, 0).any():
            return weight_node
        masked = w * mask
    logger.info(
        "%s: the weight has nonzeros outside its V:N:M mask; hybrid_linear keeps a masked dense copy (%d bytes)",
        site.name,
        masked.numel() * masked.element_size(),
    )
    return _constant(gm, graph, f"{prefix}_dense", masked)


def lower_linears(gm: fx.GraphModule, ctx: CompileContext) -> bool:
    """Rewrite linear -> vnm.linear (or vnm.hybrid_linear) for every site with a compressed weight.

    Returns True if the graph changed.
    """
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
        hybrid = site.max_sparse_tokens is not None
        with graph.inserting_before(first):
            tensors = {k: _constant(gm, graph, f"{prefix}_{k}", t) for k, t in w.tensors().items()}
            dense = _dense_weight(gm, graph, site, prefix) if hybrid else None
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
            if hybrid:
                args = (x, [dense], *args[1:], site.max_sparse_tokens)
            with graph.inserting_before(node):
                new = graph.call_function(HYBRID_OP if hybrid else OP, args)
            new.meta = dict(node.meta)
            new.meta[LAYER_META] = site.name
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            lowered += 1
    if lowered:
        graph.lint()
        gm.recompile()
    logger.debug("lower_linears: %d linear calls replaced with vnm.linear / vnm.hybrid_linear", lowered)
    return lowered > 0
