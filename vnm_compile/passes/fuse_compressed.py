"""Fuse sibling vnm::compressed_linear calls (one input, one pattern) into one launch.

The compressed form of a model (``compress_``: VNMLinear modules) calls ``vnm::compressed_linear`` once per
layer; at decode each call is a short memory-bound kernel whose fixed launch and ramp-up cost is a good part
of its time. q/k/v read one activation, as do gate/up: one call over their weights stacked along the output
rows does the same work with one fixed cost. Each layer's output becomes a column slice of the fused output
(``torch.split``: views).

Siblings read the same tensor: the same x node, or ``x.index_select(-1, perm)`` of the same x with an equal
permutation (a permuted layer applies its input permutation as that index op). Their weights are fused
without a copy when they are adjacent views of one storage (``share_storage_`` lays the siblings of a
compressed model out that way: the graph then reads one view spanning them); weights this compile created
(get_attr constants) are concatenated. Anything else stays unfused. Each member but the last must have
no padding rows (out_features a multiple of V), so that the members' outputs are contiguous slices.
Users must accept a column slice (fuse_siblings._slices_ok). Members holding their dense weights (an
unpermuted layer's own, for the op's dense path) fuse with each other: the fused call holds the list of
them, one per member, which its dense path runs as column slices of one output (no concatenation).
Members that store their output rows through a row_index (store_out_permutations) fuse with each other
and with members without one (given the identity), the row indices shifted to each member's slice.
Option ``fuse_siblings`` turns it off.
"""

from __future__ import annotations

import logging
import operator

import torch
from torch import fx

from ..kernels.compressed import LAYOUT_ROWS, _stored, read_spec
from ..kernels.compressed import OP as COMPRESSED_OP
from .context import CompileContext
from .fuse_siblings import _slices_ok
from .graph import PREFIX, constant, finish, fresh_prefix, input_values, op_args, set_op_args
from .lower_linears import LAYER_META

__all__ = ["fuse_compressed", "COMPRESSED_TARGETS"]

logger = logging.getLogger(__name__)

COMPRESSED_TARGETS = (COMPRESSED_OP, torch.ops.vnm.compressed_linear)
_INDEX_SELECT = (torch.index_select, torch.ops.aten.index_select.default)


def _value(node, values: dict[fx.Node, object], gm: fx.GraphModule):
    """The tensor behind a placeholder (its example input) or a get_attr node."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "placeholder":
        v = values.get(node)
    elif node.op == "get_attr":
        v = gm
        for attr in str(node.target).split("."):
            v = getattr(v, attr, None)
    else:
        v = None
    return v if isinstance(v, torch.Tensor) else None


def _index_select(node) -> tuple | None:
    """(x, perm node) of ``x.index_select(-1, perm)`` on the last dim, else None."""
    if not isinstance(node, fx.Node):
        return None
    method = node.op == "call_method" and node.target == "index_select"
    if not (method or (node.op == "call_function" and node.target in _INDEX_SELECT)):
        return None
    if len(node.args) != 3 or node.kwargs:
        return None
    x, dim, perm = node.args
    val = x.meta.get("example_value", x.meta.get("val")) if isinstance(x, fx.Node) else None
    if dim == -1 or (isinstance(val, torch.Tensor) and dim == val.dim() - 1):
        return x, perm
    return None


class _Inputs:
    """Canonical keys of linear inputs: x itself, or (x, a permutation equal to one seen before)."""

    def __init__(self, values, gm) -> None:
        self.values, self.gm = values, gm
        self.perms: list[tuple[fx.Node, torch.Tensor]] = []

    def key(self, x) -> tuple | None:
        sel = _index_select(x)
        if sel is None:
            return (x,)
        base, perm_node = sel
        perm = _value(perm_node, self.values, self.gm)
        if perm is None:
            return (x,)
        for i, (_, seen) in enumerate(self.perms):
            if seen is perm or (seen.shape == perm.shape and seen.device == perm.device and torch.equal(seen, perm)):
                return (base, i)
        self.perms.append((perm_node, perm))
        return (base, len(self.perms) - 1)


def _rows(layout: int, weights: list[torch.Tensor]) -> int:
    return weights[0].shape[0] * (1 if layout == LAYOUT_ROWS else 64)  # tc layouts: 64-row records


def _adjacent(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """One view spanning ``tensors`` when they lie back to back in one storage (rows concatenated)."""
    first = tensors[0]
    ptr = first.untyped_storage().data_ptr()
    offset = first.storage_offset()
    for t in tensors:
        same = t.untyped_storage().data_ptr() == ptr and t.dtype == first.dtype and t.shape[1:] == first.shape[1:]
        if not same or not t.is_contiguous() or t.storage_offset() != offset:
            return None
        offset += t.numel()
    rows = sum(t.shape[0] for t in tensors)
    return first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


def _rows_of(weight: list[torch.Tensor], own: int, spec) -> torch.Tensor:
    """A member's row_index, or the identity one (its stored rows in order, -1 for padding)."""
    if len(weight) > own:
        return weight[own]
    rows = torch.arange(_rows(spec.layout, weight), dtype=torch.int32, device=weight[0].device)
    return rows.masked_fill(rows >= spec.out_features, -1)


def fuse_compressed(gm: fx.GraphModule, ctx: CompileContext) -> bool:
    """Replace groups of sibling vnm::compressed_linear calls with one call. True if the graph changed."""
    graph = gm.graph
    calls = [n for n in graph.nodes if n.op == "call_function" and n.target in COMPRESSED_TARGETS]
    ctx.compressed_calls = ctx.compressed_launches = len(calls)
    if not ctx.options.fuse_siblings or len(calls) < 2:
        return False
    values = input_values(gm, ctx.example_inputs)
    inputs = _Inputs(values, gm)
    groups: dict[tuple, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in COMPRESSED_TARGETS:
            continue
        args = op_args(node)
        x, weights, spec, bias, held = args["x"], args["weight"], args["spec"], args["bias"], args["dense_weights"]
        key = inputs.key(x)
        tensors = [_value(w, values, gm) for w in weights]
        if key is None or any(t is None for t in tensors):
            continue
        s = read_spec(tensors, spec)
        if not _slices_ok(node, s.out_features):
            continue
        groups.setdefault((*key, s.layout, s.v, s.n, s.m, tensors[0].dtype, bias is None, held is None), []).append(
            node
        )
    index = fresh_prefix(gm)
    fused = 0
    for members in groups.values():
        if len(members) > 1 and _fuse(gm, members, values, f"{PREFIX}{index}"):
            index += 1
            fused += 1
    if fused:
        finish(gm)  # drops the members' own constants (weights this compile created, now concatenated)
    ctx.compressed_launches = sum(n.op == "call_function" and n.target in COMPRESSED_TARGETS for n in graph.nodes)
    logger.debug("fuse_compressed: %d fused launches", fused)
    return fused > 0


def _fuse(gm: fx.GraphModule, members: list[fx.Node], values, prefix: str) -> bool:
    graph = gm.graph
    calls = [op_args(node) for node in members]
    weights = [[_value(w, values, gm) for w in call["weight"]] for call in calls]
    specs = [read_spec(w, call["spec"]) for w, call in zip(weights, calls, strict=True)]
    sizes = [s.out_features for s in specs]
    if any(_rows(s.layout, w) != s.out_features for s, w in zip(specs[:-1], weights[:-1], strict=True)):
        return False  # padding rows between members: their outputs would not be contiguous slices
    stacked = []
    own = len(_stored(weights[0], calls[0]["spec"]))  # the layout's tensors; a row_index may follow
    for k in range(own):
        parts = [w[k] for w in weights]
        view = _adjacent(parts)
        if view is None:
            if not all(call["weight"][k].op == "get_attr" for call in calls):
                return False  # model buffers in separate storages: fusing would copy the weights
            view = torch.cat(parts)
        stacked.append(view)
    if any(len(w) > own for w in weights):  # each member's output rows (identity where it has none), shifted
        starts = [sum(sizes[:i]) for i in range(len(weights))]
        parts = [_rows_of(w, own, s) for w, s in zip(weights, specs, strict=True)]
        stacked.append(torch.cat([torch.where(p >= 0, p + start, p) for p, start in zip(parts, starts, strict=True)]))
    first = members[0]
    x = calls[0]["x"]
    biases = [call["bias"] for call in calls]
    with graph.inserting_before(first):
        tensors = [constant(gm, graph, f"{prefix}_w{k}", t) for k, t in enumerate(stacked)]
        bias = None if biases[0] is None else graph.call_function(torch.cat, (biases,))
        call = graph.call_function(COMPRESSED_OP, ())
        held = None if calls[0]["dense_weights"] is None else [d for c in calls for d in c["dense_weights"]]
        set_op_args(call, x=x, weight=tensors, spec=specs[0].with_(out_features=sum(sizes)), bias=bias,
                    dense_weights=held)  # fmt: skip
        parts = graph.call_function(torch.split, (call, sizes, -1))
        outs = [graph.call_function(operator.getitem, (parts, i)) for i in range(len(members))]
    call.meta = dict(first.meta)
    names = [str(node.meta[LAYER_META]) for node in members if LAYER_META in node.meta]
    if names:
        call.meta[LAYER_META] = "+".join(names)  # every member's layer (as fuse_siblings writes it)
    selects = [c["x"] for c in calls[1:]]  # (read before erase_node clears the members' args)
    for node, out in zip(members, outs, strict=True):
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    for sel in selects:  # the siblings' own index ops of x, now unused
        if isinstance(sel, fx.Node) and sel is not x and not sel.users and _index_select(sel) is not None:
            graph.erase_node(sel)
    logger.info("fused %d compressed linears into one launch (%d output features)", len(members), sum(sizes))
    return True
