"""Keep layers dense on a device without fast V:N:M kernels (the CPU), unless forced.

Off CUDA, vnm::linear runs a reference (rebuild the dense weight, then matmul) or, under
``TRITON_INTERPRET=1``, the interpreted Triton kernels: correct, but far slower than a dense
matmul (35x at one token on 4096x4096, 64:2:8). There each eligible layer runs its masked
weight as a dense matmul instead, and the report says why: a weight sparsify_ pruned is masked
already; one pruned at compile time (the ``pattern`` option) gets a masked copy as a constant
of the graph, so the compiled function is the sparsified one either way. The option
``force_sparse=True`` lowers them anyway (tests of the kernels and of the lowering itself).
"""

from __future__ import annotations

import logging

import torch
from torch import fx

from .context import CompileContext, LinearSite
from .graph import constant

__all__ = ["keep_dense_off_gpu", "REASON"]

logger = logging.getLogger(__name__)

REASON = (
    "no fast V:N:M kernels on {device} (the reference path is slower than dense): runs the masked weights "
    "as a dense matmul{copy}; option force_sparse=True lowers it anyway"
)


def _use_masked_copy(gm: fx.GraphModule, site: LinearSite, index: int) -> None:
    """Point every call of ``site`` at a masked copy of its weight (a buffer of ``gm``)."""
    with torch.no_grad():
        masked = site.weight.detach() * site.state.mask.to(site.weight.device, torch.bool)
    with gm.graph.inserting_before(site.nodes[0]):
        node = constant(gm, gm.graph, f"_vnm_masked{index}", masked)
    for call in site.nodes:
        if len(call.args) > 1:
            call.args = (call.args[0], node, *call.args[2:])
        else:
            call.kwargs = {**call.kwargs, "weight": node}
    site.masked_copy = True


def keep_dense_off_gpu(gm: fx.GraphModule, ctx: CompileContext) -> bool:
    """Mark every to-be-lowered site off CUDA dense (unless ``force_sparse``); True if the graph changed."""
    if ctx.options.force_sparse:
        return False
    copies = 0
    for site in ctx.to_lower():
        device = site.weight.device
        if device.type == "cuda":
            continue
        note = ""
        if site.state is not None and site.origin != "recorded":
            index = 0
            while hasattr(gm, f"_vnm_masked{index}"):
                index += 1
            _use_masked_copy(gm, site, index)
            copies += 1
            note = f" (a masked copy: pruned at compile time to {site.state.pattern})"
        ctx.keep_dense(site, REASON.format(device=device.type, copy=note))
    if copies:
        gm.graph.lint()
        gm.recompile()
    logger.debug("keep_dense_off_gpu: %d layers kept dense, %d on masked copies", len(ctx.sites), copies)
    return copies > 0
