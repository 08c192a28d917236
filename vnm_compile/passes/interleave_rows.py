"""Pass 7 (option ``interleave_rows``): hold each lowered weight's values and metadata a second
time, row-interleaved for the decode kernel.

For every vnm::linear / vnm::hybrid_linear call on constant compressed tensors with n = 2 and V
divisible by 4, ``kernels.vnm_triton.interleave_rows`` (R = 4, 8 or 16 rows of a group contiguous,
one metadata word per R rows; R chosen by the layer's height) becomes two more constants, passed as
the op's ``rows_values`` / ``rows_meta``. At 1-4 tokens the autotuner then also times the decode
kernel on that layout (H100, Llama-2-7B shapes, 1 token: 64:2:8 up to 1.2x faster than on the
row-major layout; benchmarks/results/<gpu>/decode_layout.md). Memory: the compressed values and
metadata once more. Other token counts read the row-major tensors, so both are kept.
"""

from __future__ import annotations

import logging

from torch import fx

from ..kernels.vnm_triton import default_interleave
from ..kernels.vnm_triton import interleave_rows as _interleave
from .context import CompileContext
from .expand_weights import LayerTensors, attach_constants

__all__ = ["interleave_rows"]

logger = logging.getLogger(__name__)


def _interleaved(layer: LayerTensors, dtype):
    r = default_interleave(layer.values.shape[0], layer.v)
    return _interleave(layer.values, layer.meta, layer.v, r) if r else None


def interleave_rows(gm: fx.GraphModule, ctx: CompileContext) -> bool:
    """Pass the row-interleaved copies to every vnm op call that can use them. True if the graph changed."""
    if not ctx.options.interleave_rows:
        return False
    added = attach_constants(gm, ctx, "rows", ("rows_values", "rows_meta"), _interleaved, "interleaved_bytes")
    logger.debug("interleave_rows: row-interleaved copies passed to %d vnm op calls", added)
    return added > 0
