"""Pass 8 (option ``sparse_tensor_cores``, experimental): hold each lowered weight packed for the
sparse tensor cores and let the op switch to the mma.sp kernel from a token count up.

find_linears set, per layer, from how many tokens the sparse tensor cores run it
(``LinearSite.tc_min_tokens``: the option's count, or with True the measured table's,
dispatch.sparse_tc_token_floor). For every vnm::linear / vnm::hybrid_linear call on constant
compressed tensors whose layers all have one (for a fused launch: the largest of its members'),
``kernels.sparse_tc.pack_sparse_tc`` of the weight becomes graph constants (the records: values and
metadata in fragment order, the kept columns' indices, the dense kernel's x^T row order) passed as the
op's ``tc_*`` arguments, with that count as ``tc_min_tokens``. At run time, on CUDA, an input with at
least that many rows runs the mma.sp kernel (kernels/sparse_tc.py); fewer rows run what they ran
before (the Triton kernels, or dense above a hybrid layer's token limit). Memory: about the compressed
bytes once more.

Measured on an H200 (x^T given, benchmarks/results/nvidia-h200/sparse_tc.md): 1.12-1.40x over cuBLAS at
64:2:8 on Llama-2-7B shapes at 2048-8192 tokens, slower than cuBLAS at 64:2:5.
"""

from __future__ import annotations

import logging

import torch
from torch import fx

from ..format import VNMWeight
from ..kernels.sparse_tc import pack_sparse_tc, unsupported
from ..kernels.vnm_linear import sparse_tc_args
from ..pattern import VNMPattern
from .context import CompileContext
from .expand_weights import LayerTensors, attach_constants
from .lower_linears import LAYER_META

__all__ = ["sparse_tc_weights"]

logger = logging.getLogger(__name__)

_NAMES = ("tc_records", "tc_columns", "tc_rows", "tc_mode", "tc_min_tokens")


def _packed(layer: LayerTensors, dtype: torch.dtype):
    pattern = VNMPattern(layer.v, 2, layer.m)
    if layer.in_features <= 0 or unsupported(pattern, dtype, layer.in_features) is not None:
        return None
    if layer.values.dtype != dtype:
        return None  # the kernels multiply in the weight's dtype, which must be x's
    w = VNMWeight(
        layer.values, layer.columns, layer.meta, layer.row_index, pattern, (layer.out_features, layer.in_features)
    )
    return (*sparse_tc_args(pack_sparse_tc(w)), 0)  # tc_min_tokens: per call


def sparse_tc_weights(gm: fx.GraphModule, ctx: CompileContext) -> bool:
    """Pass the packed weights to every vnm op call that can use them. True if the graph changed."""
    if ctx.options.sparse_tensor_cores is None:
        return False
    sites = {s.name: s for s in ctx.sites}

    def min_tokens(node: fx.Node) -> dict | None:
        counts = [sites[n].tc_min_tokens if n in sites else None for n in str(node.meta.get(LAYER_META, "")).split("+")]
        return None if None in counts else {"tc_min_tokens": max(counts)}

    added = attach_constants(gm, ctx, "tc", _NAMES, _packed, "tc_bytes", min_tokens)
    logger.debug("sparse_tc_weights: packed weights passed to %d vnm op calls", added)
    return added > 0
