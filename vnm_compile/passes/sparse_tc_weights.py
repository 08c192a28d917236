"""Pass 8 (option ``sparse_tensor_cores``, default "auto": on a GPU where the kernels run): hold each
lowered weight packed for the sparse tensor cores and let the op switch to the mma.sp kernels at the
token counts where they win.

find_linears set, per layer, from how many tokens the sparse tensor cores run it
(``LinearSite.tc_min_tokens``: the option's count, or with True the measured table's,
dispatch.sparse_tc_token_floor) and, with True, at which few-token counts their decode kernel does
(``LinearSite.tc_decode``, dispatch.sparse_tc_decode_window). For every vnm::linear /
vnm::hybrid_linear call on constant compressed tensors whose layers have either (for a fused launch:
the largest floor, the common decode counts of its members), ``kernels.sparse_tc.pack_sparse_tc`` of
the weight becomes graph constants (the records: values and metadata in fragment order, the kept
columns' indices, the dense kernel's x^T row order) passed as the ``tc_*`` fields of the op's weight,
with those counts as ``tc_min_tokens`` / ``tc_decode_min`` / ``tc_decode_max``. At run time, on CUDA, an input of
those many rows runs the mma.sp kernels (kernels/sparse_tc.py); other row counts run what they ran
before (the Triton kernels, or dense above a hybrid layer's token limit). Memory: about the compressed
bytes once more.

Measured on an H200 through the op (benchmarks/results/nvidia-h200/linear.md), Llama-2-7B shapes: the
GEMM (there the wgmma.sp kernel) 1.18-1.41x over cuBLAS at 64:2:8 and 1.86-2.52x at 64:2:16 at 2048-8192
tokens (transpose of x included; slower than cuBLAS at 64:2:5), the decode kernel 2.13-2.63x at 4 tokens
at 64:2:8 where the Triton kernels give 0.62-0.75x.
"""

from __future__ import annotations

import logging

import torch
from torch import fx

from ..format import VNMWeight
from ..kernels.op_weight import sparse_tc_args
from ..kernels.sparse_tc import pack_sparse_tc, unsupported
from ..pattern import VNMPattern
from .context import CompileContext
from .expand_weights import LayerTensors, attach_constants
from .lower_linears import LAYER_META

__all__ = ["sparse_tc_weights"]

logger = logging.getLogger(__name__)

_NAMES = ("tc_records", "tc_columns", "tc_rows", "tc_mode", "tc_min_tokens", "tc_decode_min", "tc_decode_max")


def _packed(layer: LayerTensors, dtype: torch.dtype):
    pattern = VNMPattern(layer.v, 2, layer.m)
    if layer.in_features <= 0 or unsupported(pattern, dtype, layer.in_features) is not None:
        return None
    if layer.values.dtype != dtype:
        return None  # the kernels multiply in the weight's dtype, which must be x's
    w = VNMWeight(
        layer.values, layer.columns, layer.meta, layer.row_index, pattern, (layer.out_features, layer.in_features)
    )
    return (*sparse_tc_args(pack_sparse_tc(w)), 0, 0, 0)  # the token counts: per call


def sparse_tc_weights(gm: fx.GraphModule, ctx: CompileContext) -> bool:
    """Pass the packed weights to every vnm op call that can use them. True if the graph changed."""
    if all(s.tc_min_tokens is None and s.tc_decode is None for s in ctx.sites):
        return False  # the option off, or no layer the sparse tensor cores are expected to win
    sites = {s.name: s for s in ctx.sites}

    def token_counts(node: fx.Node) -> dict | None:
        """For a fused launch: the sparse tensor cores run only where they win for every member."""
        members = [sites.get(n) for n in str(node.meta.get(LAYER_META, "")).split("+")]
        floors = [s.tc_min_tokens if s is not None else None for s in members]
        windows = [s.tc_decode if s is not None else None for s in members]
        floor = 0 if None in floors else max(floors)
        lo, hi = (0, 0) if None in windows else (max(w[0] for w in windows), min(w[1] for w in windows))
        if lo > hi:
            lo = hi = 0
        if not floor and not lo:
            return None
        return {"tc_min_tokens": floor, "tc_decode_min": lo, "tc_decode_max": hi}

    added = attach_constants(gm, ctx, "tc", _NAMES, _packed, "tc_bytes", token_counts)
    logger.debug("sparse_tc_weights: packed weights passed to %d vnm op calls", added)
    return added > 0
