"""Cancel an output permutation against the next layer's input permutation (joint permutations).

With ``permutations="index"`` each permuted layer runs as ``op(x[..., P_in])[..., P_out^-1]``
(lower_linears). In an MLP, ``down(act(gate(x)) * up(x))`` or ``fc2(act(fc1(x)))``, the ops between the
producers' outputs and the consumer's input act on each channel alone. When the producers' output
permutation equals the consumer's input permutation P (sparsify_'s joint_permutations records them so),
``(f(y[..., P^-1]))[..., P] == f(y)`` for every such f: both index ops go, the producers' outputs stay
in P order and the consumer reads them as they are. A producer's bias, added after its output index op,
is then gathered in P order instead (``bias[P]``, a parameter-sized index op inductor fuses into the add).

The pass checks the graph itself and never trusts the recorded links: the region between the consumer's
input index op and the producers' output index ops must hold only element-wise ops (calibration/chains.py's
list) whose other operands broadcast along the channels, no node of it may be used outside it, and every
producer's output permutation must equal the consumer's input permutation. Anything else keeps its
index ops (still correct, one fused gather more).
"""

from __future__ import annotations

import logging

import torch
from torch import fx

from ..calibration.chains import ELEMENTWISE
from .context import CompileContext, LinearSite
from .graph import PREFIX, constant, finish, fresh_prefix
from .lower_linears import PERM_META

__all__ = ["cancel_permutations"]

logger = logging.getLogger(__name__)

_MAX_REGION = 64  # nodes between producers and consumer: an MLP has a handful


def _name(node: fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        return getattr(node.target, "__name__", "")
    return ""


def _value(node):
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None


def _broadcast(arg) -> bool:
    """An operand that is the same for every channel: a Python scalar, or a tensor of last dim 1 / 0-d."""
    if isinstance(arg, (int, float, bool, torch.dtype, torch.device, str)) or arg is None:
        return True
    val = _value(arg)
    return isinstance(val, torch.Tensor) and (val.dim() == 0 or val.shape[-1] == 1)


def _region(h: fx.Node, width: int) -> tuple[set[fx.Node], list[fx.Node]] | None:
    """The element-wise nodes from which ``h`` is computed, back to the producers' output nodes
    (tagged "out" / "bias"); None when anything else is on the way."""
    region: set[fx.Node] = set()
    leaves: list[fx.Node] = []
    todo = [h]
    while todo:
        node = todo.pop()
        if node in region or node in leaves:
            continue
        tag = node.meta.get(PERM_META)
        if tag is not None and tag[0] in ("out", "bias"):
            leaves.append(node)
            continue
        val = _value(node)
        if _name(node) not in ELEMENTWISE or not isinstance(val, torch.Tensor) or val.shape[-1:] != (width,):
            return None
        region.add(node)
        if len(region) > _MAX_REGION:
            return None
        for arg in [*node.args, *node.kwargs.values()]:
            if isinstance(arg, fx.Node) and not _broadcast(arg):
                todo.append(arg)
            elif isinstance(arg, (list, tuple)) and any(isinstance(a, fx.Node) for a in arg):
                return None
    return region, leaves


def _perm(gm: fx.GraphModule, select: fx.Node) -> torch.Tensor | None:
    node = select.args[2]
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    return getattr(gm, str(node.target), None)


def _out_perm(site: LinearSite | None) -> torch.Tensor | None:
    return None if site is None or site.state is None else site.state.out_perm


def cancel_permutations(gm: fx.GraphModule, ctx: CompileContext) -> bool:
    """Drop output/input index-op pairs that cancel across element-wise ops. True if the graph changed."""
    graph = gm.graph
    sites = {s.name: s for s in ctx.sites}
    selects = [n for n in graph.nodes if (n.meta.get(PERM_META) or ("",))[0] == "in"]
    index = fresh_prefix(gm)
    cancelled = 0
    for select in selects:
        h, perm = select.args[0], _perm(gm, select)
        if perm is None or not isinstance(h, fx.Node):
            continue
        found = _region(h, perm.numel())
        if found is None or not found[1]:
            continue
        region, leaves = found
        producers = [sites.get(leaf.meta[PERM_META][1]) for leaf in leaves]
        outs = [_out_perm(p) for p in producers]
        if any(o is None or o.shape != perm.shape or not torch.equal(o.to(perm.device), perm) for o in outs):
            continue
        inside = region | set(leaves) | {select}
        if any(u not in inside for n in region | set(leaves) for u in n.users):
            continue  # an intermediate is used elsewhere (in original order)
        # 1. the producers' outputs stay in P order (a bias is gathered to P order)
        dead = [select]
        for leaf in leaves:
            if leaf.meta[PERM_META][0] == "out":
                leaf.replace_all_uses_with(leaf.args[0])
                dead.append(leaf)
            else:  # ("bias", layer): add(index_select(y, -1, inv), bias)
                y_sel, bias = leaf.args
                with graph.inserting_before(leaf):
                    p = constant(gm, graph, f"{PREFIX}{index}_bias_perm", perm)
                    index += 1
                    gathered = graph.call_function(torch.index_select, (bias, 0, p))
                leaf.args = (y_sel.args[0], gathered)
                leaf.meta.pop(PERM_META)
                dead.append(y_sel)
        # 2. the consumer reads them as they are
        select.replace_all_uses_with(h)
        for node in dead:  # the index ops and their permutation constants
            attr = node.args[2]
            graph.erase_node(node)
            if isinstance(attr, fx.Node) and attr.op == "get_attr" and not attr.users:
                graph.erase_node(attr)
        consumers = [sites[n] for n in sites[select.meta[PERM_META][1]].in_perm_readers if n in sites]
        names = tuple(p.name for p in producers if p is not None)
        for c in consumers:
            c.in_perm_cancelled = names
        for p in producers:
            p.out_perm_cancelled = tuple(c.name for c in consumers)
        cancelled += 1
    if cancelled:
        finish(gm)
    logger.debug("cancel_permutations: %d output/input permutation pairs cancelled", cancelled)
    return cancelled > 0
