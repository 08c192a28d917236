"""Apply a vnm::compressed_linear call's permutations inside its kernels, at decode: the output permutation
in the kernel's store (``store_out_permutations``) and, at a few tokens, the input permutation in its column
indices (``fold_in_permutations``, up to ``FOLD_TOKENS``).

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

The input permutation ``x[..., P_in]`` is an index op that inductor fuses into the op producing x (the
RMSNorm, the residual add), where it is a gather too: an H100 RMSNorm with it took 5-7 us at one token
against 2-3 us without. On the sparse-tensor-core packing it can instead go into the kernels' column
indices (``P_in[columns]``: each kept column read at its place in the original x, ``LAYOUT_TC_FOLDED``).
Measured per layer on the H100 (``benchmarks/results/nvidia-h100-80gb-hbm3/row_store.md`` and
``row_store_small.md``, Llama-3-8B shapes, 64:2:8 and 64:2:5): at 1, 2 and 4 tokens the decode kernel is as
fast on those absolute columns as on local ones and every layer gains over "index op + kernel" (1.02-1.30x);
at 8 tokens down_proj loses (0.88x / 0.69x), at 16 tokens most layers lose 1.5-3x (the kernel's x^T tiles
then gather from scattered sectors). So only graphs whose every call is at most ``FOLD_TOKENS`` tokens fold,
after sibling fusion (one folded copy of the columns per fused call: 32 int16 per 64 rows and k-step, about
2.7 % of a 64:2:8 weight's bytes, held beside the local columns the model's other graphs read).
"""

from __future__ import annotations

import logging

import torch
from torch import fx

from ..kernels.compressed import DECODE_TOKENS, LAYOUT_TC, LAYOUT_TC_COMPACT, LAYOUT_TC_FOLDED, read_spec, row_index
from .context import CompileContext
from .find_linears import _static_tokens
from .fuse_compressed import COMPRESSED_TARGETS, _index_select, _rows, _value
from .graph import PREFIX, constant, finish, fresh_prefix, input_values, op_args, set_op_args
from .lower_linears import LAYER_META

__all__ = ["store_out_permutations", "fold_in_permutations", "FOLD_TOKENS"]

logger = logging.getLogger(__name__)

FOLD_TOKENS = 4  # fold input permutations in graphs of at most this many tokens per call (module docstring)


def _tokens(x) -> int | None:
    """Rows of x when fixed in the graph, else None (an input index op the passes added has no recorded value:
    its input's shape is read)."""
    while isinstance(x, fx.Node) and "example_value" not in x.meta and "val" not in x.meta and _index_select(x):
        x = _index_select(x)[0]
    return _static_tokens(x)


def _sites_of(node: fx.Node, sites: dict) -> list:
    """The LinearSites of the layers a vnm op call computes (``LAYER_META``: "name", or "a+b" once fused)."""
    return [sites[name] for name in str(node.meta.get(LAYER_META, "")).split("+") if name in sites]


def store_out_permutations(gm: fx.GraphModule, ctx: CompileContext) -> bool:
    """Move each decode-only compressed call's output index op into its store. True if the graph changed."""
    graph = gm.graph
    values = input_values(gm, ctx.example_inputs)
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
        for site in _sites_of(node, sites):  # one layer per call: siblings fuse after this pass
            site.out_perm_stored = True
    if moved:
        finish(gm)
    logger.debug("store_out_permutations: %d output permutations applied in the kernels' store", moved)
    return moved > 0


def folded_columns(columns: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """The sparse-TC packing's kept columns (int16 read as unsigned) of a weight in permuted coordinates,
    as absolute input features of x before its permutation ``x[..., perm]``: ``perm[columns]``."""
    absolute = perm.to(device=columns.device, dtype=torch.int64)[columns.to(torch.int64) & 0xFFFF]
    return torch.where(absolute >= 1 << 15, absolute - (1 << 16), absolute).to(torch.int16)


def fold_in_permutations(gm: fx.GraphModule, ctx: CompileContext) -> bool:
    """Fold the input index op of each compressed call of at most FOLD_TOKENS tokens into its columns. True if
    the graph changed."""
    graph = gm.graph
    values = input_values(gm, ctx.example_inputs)
    sites = {site.name: site for site in ctx.sites}
    index = fresh_prefix(gm)
    folded = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in COMPRESSED_TARGETS:
            continue
        args = op_args(node)
        sel = _index_select(args["x"])
        tokens = _tokens(args["x"])
        if sel is None or args["dense_weights"] is not None or tokens is None or tokens > FOLD_TOKENS:
            continue
        tensors = [_value(w, values, gm) for w in args["weight"]]
        perm = _value(sel[1], values, gm)
        if any(t is None for t in tensors) or perm is None or perm.is_floating_point():
            continue
        spec = read_spec(tensors, args["spec"])
        source = sel[0].meta.get("example_value", sel[0].meta.get("val")) if isinstance(sel[0], fx.Node) else None
        width = source.shape[-1] if isinstance(source, torch.Tensor) else None
        if spec.layout not in (LAYOUT_TC, LAYOUT_TC_COMPACT) or perm.shape != (width,):
            continue  # (a permutation of x's own width: folded columns stay below the kernels' 65536 limit)
        with graph.inserting_before(node):
            columns = constant(gm, graph, f"{PREFIX}{index}_folded_columns", folded_columns(tensors[1], perm))
        index += 1
        select = args["x"]
        set_op_args(node, x=sel[0], weight=[args["weight"][0], columns, *args["weight"][2:]],
                    spec=spec.with_(layout=LAYOUT_TC_FOLDED))  # fmt: skip
        if not select.users:
            graph.erase_node(select)
        folded += 1
        for site in _sites_of(node, sites):  # every member of a fused call
            site.in_perm_folded = True
    if folded:
        finish(gm)
    logger.debug("fold_in_permutations: %d input permutations folded into the kernels' columns", folded)
    return folded > 0
