"""FX helpers the passes share: the arguments of a vnm op call by name, and graph constants (the
buffers a pass adds under ``PREFIX``, found again, named afresh and dropped once unread).

A pass reads and rewrites a vnm op call's arguments by the names in the op's schema (``op_args`` /
``set_op_args``), never by position. vnm::linear and vnm::hybrid_linear take their weight as one bundle
(``weight``: tensors, ``spec``: ints); ``op_weight`` / ``set_op_weight`` read and write it as a
``kernels.op_weight.OpWeight`` whose tensors are the graph nodes that hold them, and ``call_op`` adds
such a call, so a new layout touches OpWeight and the passes that use it, nothing else.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from ..kernels.op_weight import OpWeight

__all__ = [
    "PREFIX",
    "op_args",
    "set_op_args",
    "op_weight",
    "set_op_weight",
    "call_op",
    "attr_tensor",
    "input_values",
    "constant",
    "fresh_prefix",
    "drop_unused_buffers",
    "finish",
]

PREFIX = "_vnm"  # names of the buffers the passes add: f"{PREFIX}{index}_..."


def _schema_args(node: fx.Node):
    target = node.target
    if isinstance(target, torch._ops.OpOverloadPacket):  # torch.ops.vnm.linear: its one overload
        target = target.default
    schema = getattr(target, "_schema", None)
    if schema is None:
        raise TypeError(f"{node.format_node()} does not call an operator with a schema")
    return schema.arguments


def op_args(node: fx.Node) -> dict[str, Any]:
    """Every argument of the op call ``node`` by its schema name, defaults filled in."""
    out = {}
    for i, arg in enumerate(_schema_args(node)):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        else:
            out[arg.name] = arg.default_value if arg.has_default_value() else None
    return out


def set_op_args(node: fx.Node, **changes: Any) -> None:
    """Rewrite the named arguments of the op call ``node`` (others kept). The call is written
    positionally up to the last argument that differs from its default."""
    args = _schema_args(node)
    names = {a.name for a in args}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise TypeError(
            f"{node.target} has no argument {', '.join(unknown)}; it takes {', '.join(a.name for a in args)}"
        )
    values = {**op_args(node), **changes}
    last = 0
    for i, arg in enumerate(args):
        if i < len(node.args) or not arg.has_default_value() or not _is_default(values[arg.name], arg.default_value):
            last = i + 1
    node.args = tuple(values[a.name] for a in args[:last])
    node.kwargs = {}


def op_weight(node: fx.Node) -> OpWeight:
    """The weight of the vnm::linear / vnm::hybrid_linear call ``node``, its tensors as graph nodes."""
    args = op_args(node)
    return OpWeight.unpack(list(args["weight"]), args["spec"])


def set_op_weight(node: fx.Node, weight: OpWeight) -> None:
    """Make the vnm::linear / vnm::hybrid_linear call ``node`` take ``weight`` (x, bias and the dense
    weights kept)."""
    tensors, spec = weight.pack()
    set_op_args(node, weight=tensors, spec=spec)


def call_op(graph: fx.Graph, x: Any, weight: OpWeight, bias: Any, dense_weights: list | None = None) -> fx.Node:
    """A vnm::linear call on ``weight`` (graph nodes), or vnm::hybrid_linear with ``dense_weights``
    (``weight.max_sparse_tokens`` set), at the graph's insertion point."""
    from ..kernels.vnm_linear import HYBRID_OP, OP

    tensors, spec = weight.pack()
    if dense_weights is None:
        return graph.call_function(OP, (x, tensors, spec, bias))
    return graph.call_function(HYBRID_OP, (x, list(dense_weights), tensors, spec, bias))


def _is_default(value: Any, default: Any) -> bool:
    if value is None or default is None or isinstance(value, fx.Node):
        return value is default
    return type(value) is type(default) and value == default


def attr_tensor(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node reads, else None."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value = getattr(gm, node.target, None)
    return value if isinstance(value, torch.Tensor) else None


def input_values(gm: fx.GraphModule, example_inputs) -> dict[fx.Node, Any]:
    """Each placeholder of ``gm`` with its example input (``CompileContext.example_inputs``), in order."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return dict(zip(placeholders, example_inputs, strict=False))


def constant(gm: fx.GraphModule, graph: fx.Graph, name: str, tensor: torch.Tensor) -> fx.Node:
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


def fresh_prefix(gm: fx.GraphModule) -> int:
    """The first index whose ``_vnm<index>_`` names no buffer of ``gm`` holds yet."""
    taken = {name for name, _ in gm.named_buffers()} | set(gm.__dict__)
    index = 0
    while any(name.startswith(f"{PREFIX}{index}_") for name in taken):
        index += 1
    return index


def drop_unused_buffers(gm: fx.GraphModule) -> None:
    """Erase get_attr nodes left without users and the buffers no node reads any more."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users and str(node.target).startswith(PREFIX):
            graph.erase_node(node)
    read = {node.target for node in graph.nodes if node.op == "get_attr"}
    sources = getattr(gm, "_param_name_to_source", None)
    for name in [b for b, _ in gm.named_buffers() if b.startswith(PREFIX) and b not in read]:
        delattr(gm, name)
        if isinstance(sources, dict):
            sources.pop(name, None)


def finish(gm: fx.GraphModule) -> None:
    """After a pass rewrote ``gm``: drop the constants nothing reads, check the graph, regenerate its code."""
    drop_unused_buffers(gm)
    gm.graph.lint()
    gm.recompile()
