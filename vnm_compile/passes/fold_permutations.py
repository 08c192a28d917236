"""Fold every channel permutation into the compressed weight, so none stays in the graph.

A recorded LinearSparsity keeps the mask in original coordinates plus the
permutations in which it obeys the pattern. The eager model never runs a
permutation; the compiled one must not either: the input permutation becomes
the absolute column indices the kernel gathers with (``VNMWeight.columns``)
and the output permutation becomes the row store (``VNMWeight.row_index``),
so every layer reads and writes original channel order and its neighbours
(LayerNorm, residual adds, dense linears) need no change. The pass builds the
compressed weights (cached per weight version) and checks that no
permutation op feeds or follows a lowered linear.
"""

from __future__ import annotations

import logging

import torch
from torch import fx
from torch.utils.weak import WeakIdKeyDictionary

from ..format import VNMWeight
from ..state import LinearSparsity
from .context import CompileContext

__all__ = ["fold_permutations", "permutation_nodes", "PERMUTATION_TARGETS", "compress", "rebind"]

logger = logging.getLogger(__name__)

# Ops that reorder channels with an index tensor (what an unfolded permutation would look like).
PERMUTATION_TARGETS = (
    torch.index_select,
    torch.ops.aten.index_select.default,
    torch.ops.aten.index.Tensor,
    torch.gather,
    torch.ops.aten.gather.default,
)

# weight Parameter -> (weight version, state, compressed): recompiles (new shapes) reuse the compression.
_COMPRESSED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def permutation_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Nodes that permute channels with an index tensor (``index_select``, ``gather``, ``x[..., idx]``)."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in PERMUTATION_TARGETS:
            out.append(n)
        elif n.op == "call_function" and getattr(n.target, "__name__", "") == "getitem":
            index = n.args[1] if len(n.args) > 1 else None
            items = index if isinstance(index, tuple) else (index,)
            if any(isinstance(i, fx.Node) and isinstance(i.meta.get("example_value"), torch.Tensor) for i in items):
                out.append(n)
    return out


def compress(weight: torch.Tensor, state: LinearSparsity, *, permuted: bool = False) -> VNMWeight:
    """``state.compress(weight)`` with both permutations folded in, cached while the weight is unchanged;
    ``permuted``: instead the weight in the coordinates in which it obeys the pattern,
    ``weight[out_perm][:, in_perm]`` (no permutation in the compressed weight: the graph applies them)."""
    hit = _COMPRESSED.get(weight)
    if hit is not None and hit[0] == weight._version and hit[1] is state and hit[3] == permuted:
        return hit[2]
    with torch.no_grad():
        if permuted:
            w, mask = weight.detach(), state.mask.to(weight.device)
            if state.out_perm is not None:
                w, mask = w[state.out_perm.to(w.device)], mask[state.out_perm.to(w.device)]
            if state.in_perm is not None:
                w, mask = w[:, state.in_perm.to(w.device)], mask[:, state.in_perm.to(w.device)]
            packed = VNMWeight.from_dense(w, mask, state.pattern)
        else:
            packed = state.compress(weight.detach())
    _COMPRESSED[weight] = (weight._version, state, packed, permuted)
    return packed


def rebind(weight: torch.Tensor, state: LinearSparsity, old: VNMWeight, new: VNMWeight) -> None:
    """Cache ``new`` (the same compressed weight, e.g. views into a fused copy) in place of ``old``."""
    hit = _COMPRESSED.get(weight)
    if hit is not None and hit[1] is state and hit[2] is old:
        _COMPRESSED[weight] = (hit[0], state, new, hit[3])


def fold_permutations(gm: fx.GraphModule, ctx: CompileContext) -> bool:
    """Build each to-be-lowered site's compressed weight with its permutations folded in (no graph change)."""
    folded = 0
    for site in ctx.to_lower():
        if site.state is None:
            continue
        try:
            site.compressed = compress(site.weight, site.state, permuted=site.index_perms)
        except ValueError as e:
            ctx.keep_dense(site, f"cannot compress: {e}")
            continue
        folded += not site.index_perms and (site.state.in_perm is not None or site.state.out_perm is not None)
    stray = [n.name for n in permutation_nodes(gm) if any(_touches(n, s.nodes) for s in ctx.to_lower())]
    if stray:
        logger.warning("permutation ops next to lowered linears were not folded: %s", stray)
    logger.debug("fold_permutations: %d permuted layers folded into column indices / row store", folded)
    return False


def _touches(node: fx.Node, linears: list[fx.Node]) -> bool:
    return any(node in lin.all_input_nodes or lin in node.users for lin in linears)
