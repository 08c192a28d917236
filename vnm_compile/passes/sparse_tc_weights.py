"""Pass 8 (option ``sparse_tensor_cores``, experimental): hold each lowered weight packed for the
sparse tensor cores and let the op switch to the mma.sp kernel from a token count up.

For every vnm::linear / vnm::hybrid_linear call on constant compressed tensors whose pattern the
mma.sp kernels take (n = 2, V a multiple of 64, fp16/bf16 activations, fewer than 65536 input
features), ``kernels.sparse_tc.pack_sparse_tc`` of the weight becomes graph constants (the records:
values and metadata in fragment order, the kept columns' indices, the dense kernel's x^T row order)
passed as the op's ``tc_*`` arguments, with ``tc_min_tokens`` = the option's value. At run time, on
CUDA, an input with at least that many rows runs the mma.sp kernel (kernels/sparse_tc.py); fewer
rows run what they ran before (the Triton kernels, or dense above a hybrid layer's token limit).
Memory: about the compressed bytes once more.

The option does not change which layers are lowered: that is still the measured table's call
(find_linears), which does not include the mma.sp kernels yet. Measured on an H200 (x^T given,
benchmarks/results/nvidia-h200/sparse_tc.md): 1.12-1.40x over cuBLAS at 64:2:8 on Llama-2-7B shapes
at 2048-8192 tokens, but slower than cuBLAS at 64:2:5; the token count from which it pays is not
measured yet, so there is no default.
"""

from __future__ import annotations

import logging

import torch
from torch import fx

from ..format import VNMWeight
from ..kernels.sparse_tc import pack_sparse_tc
from ..kernels.vnm_linear import sparse_tc_args
from ..pattern import VNMPattern
from .context import CompileContext
from .expand_weights import LayerTensors, attach_constants

__all__ = ["sparse_tc_weights"]

logger = logging.getLogger(__name__)

_NAMES = ("tc_records", "tc_columns", "tc_rows", "tc_mode", "tc_min_tokens")


def _packed(min_tokens: int):
    def build(layer: LayerTensors, dtype: torch.dtype):
        if dtype not in (torch.float16, torch.bfloat16) or layer.v % 64 or not 0 < layer.in_features < 1 << 16:
            return None
        if layer.values.dtype != dtype:
            return None  # the kernels multiply in the weight's dtype, which must be x's
        w = VNMWeight(
            layer.values, layer.columns, layer.meta, layer.row_index, VNMPattern(layer.v, 2, layer.m),
            (layer.out_features, layer.in_features),
        )  # fmt: skip
        return (*sparse_tc_args(pack_sparse_tc(w)), min_tokens)

    return build


def sparse_tc_weights(gm: fx.GraphModule, ctx: CompileContext) -> bool:
    """Pass the packed weights to every vnm op call that can use them. True if the graph changed."""
    min_tokens = ctx.options.sparse_tensor_cores
    if min_tokens is None:
        return False
    added = attach_constants(gm, ctx, f"tc{min_tokens}", _NAMES, _packed(min_tokens), "tc_bytes")
    logger.debug("sparse_tc_weights: packed weights passed to %d vnm op calls", added)
    return added > 0
