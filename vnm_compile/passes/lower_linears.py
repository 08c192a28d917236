"""Replace each lowerable linear call with ``torch.ops.vnm.linear`` on its compressed weight.

The compressed tensors (values, columns, meta, row_index) become buffers of
the GraphModule read through ``get_attr``, passed as the op's weight bundle
(``kernels.op_weight.OpWeight``, built by ``graph.call_op``) (inductor treats them as parameters
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

from ..kernels.op_weight import OpWeight
from .context import CompileContext, LinearSite
from .graph import PREFIX, call_op, constant, fresh_prefix

__all__ = ["lower_linears", "LAYER_META", "PERM_META"]

logger = logging.getLogger(__name__)

LAYER_META = "vnm_layer"  # node.meta key: the layer name(s) a vnm op computes
# node.meta key of the index ops _lower_with_index_perms adds: ("in", layer) on x, ("out", layer) on the
# output, ("bias", layer) on the bias add after it (cancel_permutations reads them)
PERM_META = "vnm_perm"


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
    return constant(gm, graph, f"{prefix}_dense", masked)


def _layout_tensors(w) -> tuple[list[torch.Tensor], list[int]]:
    """The compressed weight in the layout vnm::compressed_linear runs best on its device, and the op's spec."""
    from ..deploy.linear import tc_layout_supported
    from ..kernels.compressed import LAYOUT_ROWS, LAYOUT_TC, CompressedSpec

    spec = CompressedSpec(LAYOUT_ROWS, w.block_rows, w.pattern.n, w.pattern.m, w.out_features)
    if tc_layout_supported(w.pattern, w.dtype, w.in_features, w.device):
        from ..kernels.sparse_tc import pack_sparse_tc

        packed = pack_sparse_tc(w)
        return [packed.records, packed.columns], spec.with_(layout=LAYOUT_TC)
    return [w.values, w.columns, w.meta], spec.with_()


def _lower_with_index_perms(gm: fx.GraphModule, site: LinearSite, prefix: str, selects: dict) -> int:
    """``y = compressed_linear(x[..., in_perm])[..., inverse(out_perm)] (+ bias)``: the weight held in the
    coordinates in which it obeys the pattern, the permutations as index ops that inductor fuses into the
    neighbouring ops (the ``permutations`` option)."""
    from ..kernels.compressed import OP as COMPRESSED_OP

    graph = gm.graph
    state, w = site.state, site.compressed
    tensors, spec = _layout_tensors(w)
    device = w.device
    first = site.nodes[0]
    with graph.inserting_before(first):
        weights = [constant(gm, graph, f"{prefix}_w{k}", t) for k, t in enumerate(tensors)]
        out_inv = None
        if state.out_perm is not None:
            perm = state.out_perm.to(device=device, dtype=torch.int64)
            inverse = torch.empty_like(perm)
            inverse[perm] = torch.arange(perm.numel(), device=device)
            out_inv = constant(gm, graph, f"{prefix}_out_inv", inverse)
        # an unpermuted layer's own masked weight, for the op's dense path (measured against the sparse one)
        dense = _dense_weight(gm, graph, site, prefix) if site.held_dense else None
    for node in site.nodes:
        x = node.args[0] if node.args else node.kwargs["input"]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        with graph.inserting_before(node):
            if state.in_perm is not None:
                key = (x, id(state.in_perm))
                if key not in selects:
                    perm = constant(gm, graph, f"{prefix}_in_perm", state.in_perm.to(device=device, dtype=torch.int64))
                    select = graph.call_function(torch.index_select, (x, -1, perm))
                    select.meta[PERM_META] = ("in", site.name)
                    selects[key] = (select, [])
                x, readers = selects[key]
                if site.name not in readers:
                    readers.append(site.name)
                site.in_perm_readers = readers  # one list per index op: every layer reading it
            args = (x, weights, spec, bias if out_inv is None else None)
            y = graph.call_function(COMPRESSED_OP, (*args, [dense]) if dense is not None else args)
            y.meta[LAYER_META] = site.name
            if out_inv is not None:
                y = graph.call_function(torch.index_select, (y, -1, out_inv))
                y.meta[PERM_META] = ("out", site.name)
                if bias is not None:
                    y = graph.call_function(torch.add, (y, bias))
                    y.meta[PERM_META] = ("bias", site.name)
        node.replace_all_uses_with(y)
        graph.erase_node(node)
    return len(site.nodes)


def lower_linears(gm: fx.GraphModule, ctx: CompileContext) -> bool:
    """Rewrite linear -> vnm.linear (or vnm.hybrid_linear) for every site with a compressed weight.

    Returns True if the graph changed.
    """
    graph = gm.graph
    lowered = 0
    index = fresh_prefix(gm)
    # (x node, permutation tensor id) -> its index op and the layers reading it: siblings share one
    selects: dict[tuple, tuple[fx.Node, list[str]]] = {}
    for site in ctx.to_lower():
        w = site.compressed
        if w is None:
            continue
        prefix = f"{PREFIX}{index}"
        index += 1
        if site.index_perms:
            lowered += _lower_with_index_perms(gm, site, prefix, selects)
            continue
        first = site.nodes[0]
        hybrid = site.max_sparse_tokens is not None
        with graph.inserting_before(first):
            weight = OpWeight.from_vnm(w, max_sparse_tokens=site.max_sparse_tokens).map_tensors(
                lambda name, t, prefix=prefix: constant(gm, graph, f"{prefix}_{name}", t)
            )
            dense = [_dense_weight(gm, graph, site, prefix)] if hybrid else None
        for node in site.nodes:
            x = node.args[0] if node.args else node.kwargs["input"]
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            with graph.inserting_before(node):
                new = call_op(graph, x, weight, bias, dense)
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
