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

Attention (v_proj -> o_proj, joint per-head permutations, calibration/attention.py): between the value
projection's output index op and the output projection's input index op lie data movement (view, reshape,
transpose, expand, contiguous ...) and one attention op that mixes tokens only (scaled_dot_product_attention
with the tensor as its value, or matmul with it as the second operand). Only for a recorded link (the
producer ``out_linked``, the consumer ``in_linked``) the pass proves on the graph, with the example shapes,
that dropping both index ops gives the consumer what it read before: integer labels (each element's flat
index) run through the data movement on both sides of the attention op, and (1) the value operand's channels
must move only along its last dim, the same way for every token (a per-(batch, head) permutation that
attention commutes with), (2) the consumer's input channels must then be that permutation, read through
its input permutation. Casts are followed (element-wise); a second use (a KV cache returned from the graph),
an element-wise op with another tensor (a gate), or anything else keeps the index ops.
"""

from __future__ import annotations

import logging
import operator

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
        index = _cancel(gm, select, h, leaves, producers, sites, index)
        cancelled += 1
    for select in selects:  # attention: v_proj's output permutation against o_proj's input one, per head
        if getattr(select, "_erased", False) or not isinstance(select.args[0], fx.Node):
            continue
        found = _attention_region(gm, select, sites)
        if found is not None:
            index = _cancel(gm, select, select.args[0], [found[0]], [found[1]], sites, index)
            cancelled += 1
    if cancelled:
        finish(gm)
    logger.debug("cancel_permutations: %d output/input permutation pairs cancelled", cancelled)
    return cancelled > 0


def _cancel(gm: fx.GraphModule, select: fx.Node, h: fx.Node, leaves, producers, sites, index: int) -> int:
    """Drop the consumer's input index op ``select`` and the producers' output ones (``leaves``, one per
    producer, in the same order); returns the next free constant index."""
    graph = gm.graph
    # 1. the producers' outputs stay in their permuted order (a bias is gathered to that order)
    dead = [select]
    for leaf, producer in zip(leaves, producers, strict=True):
        if leaf.meta[PERM_META][0] == "out":
            leaf.replace_all_uses_with(leaf.args[0])
            dead.append(leaf)
        else:  # ("bias", layer): add(index_select(y, -1, inv), bias)
            y_sel, bias = leaf.args
            with graph.inserting_before(leaf):
                p = constant(gm, graph, f"{PREFIX}{index}_bias_perm", _out_perm(producer))
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
    return index


# ---------------------------------------------------------------------------
# attention (module docstring, last paragraph)

# data movement: every output element is one input element (a reshape is given by its output shape)
_RESHAPES = frozenset({"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as"})
_MOVES = frozenset({"transpose", "permute", "unsqueeze", "squeeze", "expand", "getitem", "contiguous", "clone",
                    "detach", "movedim", "swapaxes", "t"})  # fmt: skip
_CASTS = frozenset({"to", "float", "half", "bfloat16", "double"})  # element-wise: the same element, rounded
_ATTENTION = {"scaled_dot_product_attention": 2, "matmul": 1, "bmm": 1}  # op -> position of the value operand
_MAX_ATTENTION_REGION = 32


def _op_name(node: fx.Node) -> str:
    if node.op == "call_function" and node.target is operator.getitem:
        return "getitem"
    if node.op == "call_function" and node.target is operator.matmul:
        return "matmul"
    return _name(node)


def _value_arg(node: fx.Node):
    """The attention op's value operand (the tensor whose channels it keeps), or None."""
    pos = _ATTENTION[_op_name(node)]
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get("value" if pos == 2 else "other")


def _concrete(shape) -> tuple[int, ...] | None:
    """A (possibly symbolic) shape as ints, symbolic sizes at their example values; None if unknown."""
    out = []
    for s in shape:
        if isinstance(s, torch.SymInt):
            s = getattr(s.node, "hint", None)
        if not isinstance(s, int):
            return None
        out.append(int(s))
    return tuple(out)


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    val = _value(node)
    return _concrete(val.shape) if isinstance(val, torch.Tensor) else None


def _resolve(arg):
    """A non-tensor argument with graph nodes replaced by their example values (symbolic ints at their hints)."""
    if isinstance(arg, fx.Node):
        val = _value(arg)
        if isinstance(val, torch.SymInt):
            val = getattr(val.node, "hint", None)
        if not isinstance(val, int):
            raise _NotProven
        return val
    if isinstance(arg, slice):
        return slice(_resolve(arg.start), _resolve(arg.stop), _resolve(arg.step))
    if isinstance(arg, (list, tuple)):
        return type(arg)(_resolve(a) for a in arg)
    if arg is None or arg is Ellipsis or isinstance(arg, (int, bool)):
        return arg
    raise _NotProven


class _NotProven(Exception):
    pass


def _move(node: fx.Node, labels: torch.Tensor) -> torch.Tensor:
    """Run the data movement ``node`` on integer labels instead of its input."""
    out_shape = _shape(node)
    if out_shape is None:
        raise _NotProven
    name = _op_name(node)
    if name in _RESHAPES:
        moved = labels.reshape(out_shape)
    elif name == "expand":
        moved = labels.expand(out_shape)
    elif name in ("contiguous", "clone", "detach") or name in _CASTS:
        moved = labels
    elif name == "getitem":
        moved = labels[_resolve(node.args[1])]
    else:
        args, kwargs = _resolve(tuple(node.args[1:])), {k: _resolve(v) for k, v in node.kwargs.items()}
        moved = getattr(labels, name)(*args, **kwargs)
    if tuple(moved.shape) != out_shape:
        raise _NotProven
    return moved


def _chain(h: fx.Node) -> tuple[list[fx.Node], fx.Node, list[fx.Node], fx.Node] | None:
    """Walk back from ``h``: data movement, one attention op (entered through its value operand), data
    movement, a producer's output index op. Returns (moves after attention, the attention op, moves before
    it, the leaf), each list in graph order; None if anything else is on the way."""
    after: list[fx.Node] = []
    before: list[fx.Node] = []
    attention = None
    node = h
    for _ in range(_MAX_ATTENTION_REGION):
        tag = node.meta.get(PERM_META)
        if tag is not None and tag[0] in ("out", "bias"):
            return (after[::-1], attention, before[::-1], node) if attention is not None else None
        name = _op_name(node)
        if node.op not in ("call_function", "call_method"):
            return None
        if name in _ATTENTION:
            if attention is not None:
                return None
            attention, nxt = node, _value_arg(node)
        elif name in _RESHAPES or name in _MOVES or name in _CASTS:
            nxt = node.args[0] if node.args else None
            others = [*node.args[1:], *node.kwargs.values()]
            if any(isinstance(_value(a), torch.Tensor) for a in others if isinstance(a, fx.Node)):
                return None  # view_as / reshape_as / expand_as on another tensor: not followed
            (before if attention is not None else after).append(node)
        else:
            return None
        if not isinstance(nxt, fx.Node):
            return None
        node = nxt
    return None


def _attention_region(gm: fx.GraphModule, select: fx.Node, sites: dict[str, LinearSite]):
    """(leaf, producer site) when the consumer's input index op ``select`` and a producer's output one
    cancel across attention (module docstring); None otherwise."""
    consumer = sites.get(select.meta[PERM_META][1])
    p_o = _perm(gm, select)
    if consumer is None or consumer.state is None or not consumer.state.in_linked or p_o is None:
        return None
    found = _chain(select.args[0])
    if found is None:
        return None
    after, attention, before, leaf = found
    producer = sites.get(leaf.meta[PERM_META][1])
    p_v = _out_perm(producer)
    if p_v is None or not producer.state.out_linked:
        return None
    chain = [leaf, *before, attention, *after]
    if any(u not in {*chain, select} for n in chain for u in n.users):
        return None  # a second use (e.g. a KV cache returned from the graph) sees the original order
    try:
        ok = _proven(attention, before, after, leaf, p_v.cpu(), p_o.cpu())
    except (_NotProven, RuntimeError, TypeError, ValueError, IndexError):
        ok = False
    if not ok:
        logger.debug("cancel_permutations: %s -> %s across attention not proven; index ops kept", producer.name,
                     consumer.name)  # fmt: skip
        return None
    return leaf, producer


def _leaf_shape(leaf: fx.Node, before: list[fx.Node], channels: int) -> tuple[int, ...] | None:
    """The producer's output shape: from its example value, or (lower_linears' index ops carry none) as
    (rows, channels) when the first op after it is a reshape, which reads it in flat order anyway."""
    shape = _shape(leaf)
    if shape is not None:
        return shape
    first = _shape(before[0]) if before and _op_name(before[0]) in _RESHAPES else None
    if first is None or torch.Size(first).numel() % channels:
        return None
    return (torch.Size(first).numel() // channels, channels)


def _proven(attention: fx.Node, before, after, leaf: fx.Node, p_v: torch.Tensor, p_o: torch.Tensor) -> bool:
    """Labels through the graph: True when dropping both index ops leaves the consumer's input unchanged."""
    c_v, out_shape = p_v.numel(), _shape(attention)
    leaf_shape = _leaf_shape(leaf, before, c_v)
    if leaf_shape is None or out_shape is None or leaf_shape[-1] != c_v:
        return False
    # 1. value side: each element of the value operand is the leaf element of this flat index
    labels = torch.arange(int(torch.Size(leaf_shape).numel())).view(leaf_shape)
    for node in before:
        labels = _move(node, labels)
    if labels.dim() < 2:
        return False
    channel, pos = labels % c_v, labels // c_v
    if not bool((pos == pos[..., :1]).all()):
        return False  # channels must move along the last dim only
    # after the cancel, value element (.., s, j) holds leaf channel p_v[channel]: it must be the element
    # (.., s, sigma(j)) of the original order, with sigma the same for every token s
    srt, order = channel.sort(-1)
    target = p_v[channel]
    at = torch.searchsorted(srt.contiguous(), target.contiguous()).clamp_max(srt.shape[-1] - 1)
    if not bool((srt.gather(-1, at) == target).all()):
        return False
    sigma = order.gather(-1, at)
    if not bool((sigma == sigma[..., :1, :]).all()):
        return False
    sigma = sigma[..., :1, :]
    # 2. the attention op: output (.., t, j) mixes value (.., s, j) over s; its batch dims broadcast
    if _op_name(attention) == "scaled_dot_product_attention" and sigma.dim() >= 3:
        heads_q, heads_kv = out_shape[-3], sigma.shape[-3]
        if heads_q != heads_kv:  # enable_gqa: query head h reads kv head h // n_rep
            if not attention.kwargs.get("enable_gqa", False) or heads_q % heads_kv:
                return False
            sigma = sigma.repeat_interleave(heads_q // heads_kv, dim=-3)
    d = out_shape[-1]
    if sigma.shape[-1] != d:
        return False
    sigma = sigma.expand(out_shape).reshape(-1)
    # 3. output side: the consumer's input element (.., k) is this flat element of the attention output
    labels = torch.arange(sigma.numel()).view(out_shape)
    for node in after:
        labels = _move(node, labels)
    if labels.shape[-1] != p_o.numel():
        return False
    # before: consumer channel k read labels[.., p_o[k]]; after: labels[.., k] with the value permuted
    return bool((labels[..., p_o] == labels // d * d + sigma[labels]).all())
