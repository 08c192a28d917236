"""Apply a vnm::compressed_linear call's output permutation in the kernel's store, at decode.

A permuted layer runs as ``op(x[..., P_in])[..., P_out^-1]`` (lower_linears; VNMLinear does the same in
eager mode). Inductor fuses the output index op into whatever reads it (a residual add and the next
RMSNorm, rotary, silu * up), but there it is a gather: every element of the consumer waits for a load of
the index, and a consumer that also applies the next layer's input permutation chains two of them (on an
H100 that norm kernel took 8 us where the dense model's takes 3). At decode the op's kernels can instead
store each output row at its place (the op's optional ``row_index``: 2-byte stores of a few tokens, no
extra work), and the index op goes.

Only where every call of the graph is a decode step (a static token count of at most
``kernels.compressed.DECODE_TOKENS``): at prefill a scattered store of a (tokens x features) tile is
uncoalesced, and the op's dense path would reorder the rows of the rebuilt weight. Output index ops that
cancel_permutations removed are gone already; a call whose output has other users keeps its index op.
"""

from __future__ import annotations

import logging

import torch
from torch import fx

from ..kernels.compressed import DECODE_TOKENS, read_spec, row_index
from .context import CompileContext
from .find_linears import _static_tokens
from .fuse_compressed import COMPRESSED_TARGETS, _index_select, _rows, _value
from .graph import PREFIX, constant, finish, fresh_prefix, op_args, set_op_args
from .lower_linears import LAYER_META

__all__ = ["store_out_permutations"]

logger = logging.getLogger(__name__)


def _tokens(x) -> int | None:
    """Rows of x when fixed in the graph, else None (an input index op the passes added has no recorded value:
    its input's shape is read)."""
    while isinstance(x, fx.Node) and "example_value" not in x.meta and "val" not in x.meta and _index_select(x):
        x = _index_select(x)[0]
    return _static_tokens(x)


def store_out_permutations(gm: fx.GraphModule, ctx: CompileContext) -> bool:
    """Move each decode-only compressed call's output index op into its store. True if the graph changed."""
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    values = dict(zip(placeholders, ctx.example_inputs, strict=False))
    sites = {site.name: site for site in ctx.sites}
    index = fresh_prefix(gm)
    moved = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in COMPRESSED_TARGETS or len(node.users) != 1:
            continue
        args = op_args(node)
        if args["dense_weights"] is not None:  # held dense weights are in output order: nothing to move
            continue
        tokens = _tokens(args["x"])
        if tokens is None or tokens > DECODE_TOKENS:
            continue
        user = next(iter(node.users))
        sel = _index_select(user)
        if sel is None or sel[0] is not node:
            continue
        tensors = [_value(w, values, gm) for w in args["weight"]]
        inverse = _value(sel[1], values, gm)
        if any(t is None for t in tensors) or inverse is None:
            continue
        spec = read_spec(tensors, args["spec"])
        out = spec.out_features
        if row_index(tensors, args["spec"]) is not None or inverse.shape != (out,) or inverse.is_floating_point():
            continue
        # y[..., j] = stored[..., inverse[j]]: stored row inverse[j] is output row j
        rows = torch.full((_rows(spec.layout, tensors),), -1, dtype=torch.int32, device=inverse.device)
        rows[inverse.long()] = torch.arange(out, dtype=torch.int32, device=inverse.device)
        with graph.inserting_before(node):
            rows_node = constant(gm, graph, f"{PREFIX}{index}_row_index", rows)
        index += 1
        set_op_args(node, weight=[*args["weight"], rows_node])
        user.replace_all_uses_with(node)
        graph.erase_node(user)
        moved += 1
        site = sites.get(node.meta.get(LAYER_META))  # one layer per call: siblings fuse after this pass
        if site is not None:
            site.out_perm_stored = True
    if moved:
        finish(gm)
    logger.debug("store_out_permutations: %d output permutations applied in the kernels' store", moved)
    return moved > 0
