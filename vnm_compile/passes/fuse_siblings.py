"""Fuse sibling V:N:M linears (the same input, the same pattern) into one vnm::linear launch.

At decode each vnm::linear is a short memory-bound kernel (7-16 us on an H100
for Llama-2-7B shapes) of which a fixed part is launch and ramp-up. q/k/v read
the same activation, as do gate/up: one launch over their compressed weights
stacked along the output rows (``format.cat_rows``) does the same work with one
fixed cost instead of three. Each layer's output becomes a column slice of the
fused output (``torch.split``: views, no copy); biases are concatenated in the
graph (``torch.cat`` of the bias inputs, so they stay trainable and current).

A group is fused only when nothing can tell the difference:

- every member is a vnm::linear on compressed buffers of this graph (of a
  weight called once: a shared weight keeps its own launches), or
  every member a vnm::hybrid_linear with the same token limit (its dense
  branch then runs one GEMM per member weight into the column slices of one
  output), with the same x node, pattern, dtypes, and all or none with a
  bias defined before the first member;
- no output is a graph output and no user would break on a strided slice:
  ``view`` must not merge the output features with another dim (checked on the
  view's recorded output shape), and no in-place op or ``as_strided`` uses it.

Memory: the members' compressed tensors are dropped from the graph, and the
compression cache (fold_permutations) is pointed at views into the fused
tensors, so the weights are held once; a recompile that fuses the same members
again reuses the fused tensors.

Option ``fuse_siblings`` (default True) turns the pass off.
"""

from __future__ import annotations

import logging
import operator

import torch
from torch import fx
from torch.utils.weak import WeakIdKeyDictionary

from ..format import VNMWeight, cat_rows
from ..kernels.op_weight import OpWeight
from ..kernels.vnm_linear import HYBRID_OP, OP
from .context import CompileContext, LinearSite
from .fold_permutations import rebind
from .graph import PREFIX, attr_tensor, call_op, constant, finish, fresh_prefix, op_args, op_weight
from .lower_linears import LAYER_META

__all__ = ["fuse_siblings"]

logger = logging.getLogger(__name__)

# first member's compressed weight -> (the members' compressed weights, their fused weight)
_FUSED: WeakIdKeyDictionary = WeakIdKeyDictionary()

_VIEW_TARGETS = (torch.Tensor.view, torch.ops.aten.view.default)
_INPLACE = (operator.iadd, operator.isub, operator.imul, operator.itruediv, torch.Tensor.as_strided, torch.as_strided)


_HELD = ("expanded", "rows_values", "tc_records")  # OpWeight fields of the copies later passes attach


def _group_key(gm: fx.GraphModule, node: fx.Node) -> tuple | None:
    """What siblings must share, or None when ``node`` cannot be fused at all."""
    args, w = op_args(node), op_weight(node)
    if any(getattr(w, name) is not None for name in _HELD) or node.meta.get(LAYER_META) is None:
        return None  # expanded / interleaved / packed copies are attached after fusion
    tensors = [attr_tensor(gm, a) for a in (w.values, w.columns, w.meta)]
    if any(t is None for t in tensors) or (w.row_index is not None and attr_tensor(gm, w.row_index) is None):
        return None
    bias = args["bias"]
    if (bias is not None and not isinstance(bias, fx.Node)) or not _slices_ok(node, w.out_features):
        return None
    # hybrid_linear's dense weights: the model's Parameters (graph inputs) or masked copies (get_attr)
    if not all(isinstance(d, fx.Node) and d.op in ("placeholder", "get_attr") for d in args.get("dense_weights", ())):
        return None
    vals, cols, _ = tensors
    return (node.target, w.max_sparse_tokens, args["x"], w.v, w.n, w.m, vals.dtype, vals.device, vals.shape[1],
            cols.dtype, bias is None)  # fmt: skip


def _slices_ok(node: fx.Node, out_features: int) -> bool:
    """Whether every user of ``node`` accepts a column slice of a wider output in its place."""
    for user in node.users:
        if user.op == "output":
            return False  # the caller would get a strided tensor where eager returns a contiguous one
        name = user.target if user.op == "call_method" else getattr(user.target, "__name__", "")
        if user.target in _INPLACE or (isinstance(name, str) and (name.endswith("_") or name == "as_strided")):
            return False
        if (user.op == "call_method" and user.target == "view") or user.target in _VIEW_TARGETS:
            value = user.meta.get("example_value")
            if not isinstance(value, torch.Tensor) or not _splits_features(value.shape, out_features):
                return False
    return True


def _splits_features(shape, out_features: int) -> bool:
    """A view of a (..., out_features) column slice is legal iff trailing dims of the result hold
    exactly the output features (the leading dims are reshaped among themselves)."""
    prod = 1
    for d in reversed(shape):
        if not isinstance(d, int):
            return False
        prod *= d
        if prod >= out_features:
            return prod == out_features
    return False


def _fusible(members: list[fx.Node], order: dict[fx.Node, int], sites: dict[str, LinearSite], gm) -> list[fx.Node]:
    """The members that can share one launch, in graph order: each with a weight of its own called
    once (a shared weight's other calls would keep its unfused buffers alive: the weight held twice),
    compressed by this compile, and a bias defined before the first member."""
    members = sorted(members, key=order.__getitem__)
    first = order[members[0]]
    kept, seen = [], set()
    for node in members:
        site = sites.get(node.meta[LAYER_META])
        bias = op_args(node)["bias"]
        if (
            site is None
            or site.compressed is None
            or site.compressed.values is not attr_tensor(gm, op_weight(node).values)
        ):
            continue
        if len(site.nodes) != 1 or id(site) in seen or (bias is not None and order.get(bias, first) >= first):
            continue
        seen.add(id(site))
        kept.append(node)
    return kept if len(kept) > 1 else []


def _fused_weight(members: list[VNMWeight]) -> VNMWeight:
    hit = _FUSED.get(members[0])
    if hit is not None and len(hit[0]) == len(members) and all(a is b for a, b in zip(hit[0], members, strict=True)):
        return hit[1]
    return cat_rows(members)


def _share_storage(sites: list[LinearSite], fused: VNMWeight) -> None:
    """Point the compression cache at views into ``fused`` (the weights held once) and remember the fusion."""
    views, row0 = [], 0
    v = fused.block_rows
    for site in sites:
        w = site.compressed
        rows = w.values.shape[0]
        view = VNMWeight(
            fused.values[row0 : row0 + rows],
            fused.columns[row0 // v : (row0 + rows) // v],
            fused.meta[row0 : row0 + rows],
            w.row_index,
            w.pattern,
            w.shape,
        )
        row0 += rows
        if site.state is not None:
            rebind(site.weight, site.state, w, view)
        site.compressed = view
        views.append(view)
    _FUSED[views[0]] = (tuple(views), fused)


def fuse_siblings(gm: fx.GraphModule, ctx: CompileContext) -> bool:
    """Replace groups of sibling vnm::linear calls with one call on stacked weights. True if the graph changed."""
    if not ctx.options.fuse_siblings:
        return False
    graph = gm.graph
    order = {node: i for i, node in enumerate(graph.nodes)}
    groups: dict[tuple, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target in (OP, HYBRID_OP):
            key = _group_key(gm, node)
            if key is not None:
                groups.setdefault(key, []).append(node)
    sites = {s.name: s for s in ctx.sites}
    index = fresh_prefix(gm)
    launches = 0
    for candidates in groups.values():
        members = _fusible(candidates, order, sites, gm)
        if members:
            _fuse(gm, members, [sites[node.meta[LAYER_META]] for node in members], f"{PREFIX}{index}")
            index += 1
            launches += 1
    if launches:
        finish(gm)
    logger.debug("fuse_siblings: %d fused launches", launches)
    return launches > 0


def _fuse(gm: fx.GraphModule, members: list[fx.Node], sites: list[LinearSite], prefix: str) -> None:
    graph = gm.graph
    names = tuple(site.name for site in sites)
    fused = _fused_weight([site.compressed for site in sites])
    _share_storage(sites, fused)
    for site in sites:
        site.fused_with = names
    first = members[0]
    first_args = op_args(first)
    sizes = [op_weight(node).out_features for node in members]
    with graph.inserting_before(first):
        weight = OpWeight.from_vnm(fused, max_sparse_tokens=op_weight(first).max_sparse_tokens).map_tensors(
            lambda name, t: constant(gm, graph, f"{prefix}_{name}", t)
        )
        biases = [op_args(node)["bias"] for node in members]
        bias = None if biases[0] is None else graph.call_function(torch.cat, (biases,))
        dense = None
        if first.target is HYBRID_OP:
            # the dense branch's weights, one per member in row order; a masked copy (get_attr) may be
            # defined after the first member: read it again here
            dense = [w if w.op == "placeholder" else graph.get_attr(w.target) for node in members
                     for w in op_args(node)["dense_weights"]]  # fmt: skip
        call = call_op(graph, first_args["x"], weight, bias, dense)
        call.meta[LAYER_META] = "+".join(names)
        parts = graph.call_function(torch.split, (call, sizes, -1))
        outs = [graph.call_function(operator.getitem, (parts, i)) for i in range(len(members))]
    for node, out in zip(members, outs, strict=True):
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    logger.info("fused %s into one vnm::linear launch (%d output features)", ", ".join(names), sum(sizes))
