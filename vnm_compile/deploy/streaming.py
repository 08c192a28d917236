"""Prune and compress a model block by block, for models whose dense weights do not fit the GPU.

The dense model stays where it is (CPU memory, or tensors memory-mapped from safetensors); the layer-by-layer
driver (calibration/sequential.py) takes one block (decoder layer) at a time: the block moves to the GPU,
is calibrated on what the already-processed blocks produce, pruned (with permutations), compressed, and
only its compressed form stays on the GPU. Peak GPU memory: the compressed blocks so far, one dense block,
its second moments and the calibration activations.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from ..linears import linear_like_modules
from ..sparsify import LayerReport, SparsifyReport, VNMConfig, _convert_conv1ds, _out_in, eligible_linears
from ..state import sparse_linears
from .convert import compress_

__all__ = ["sparsify_and_compress_"]

log = logging.getLogger(__name__)


@torch.no_grad()
def sparsify_and_compress_(
    model: nn.Module,
    config: VNMConfig,
    data: Iterable,
    *,
    device: torch.device | str = "cuda",
    progress: bool = True,
) -> SparsifyReport:
    """Prune ``model`` **in place** block by block on ``device`` and compress each block as it is done.

    Every eligible linear is calibrated on what the pruned blocks before it produce (the second moments of its
    input: RIA/Wanda norms are their diagonal; ``score="obs"`` and ``reconstruct=True`` use them whole), pruned
    to ``config.pattern`` and compressed (``compress_``); the rest of the model (embeddings, norms, heads)
    moves to ``device`` after the last block. Returns sparsify_'s report.
    """
    from ..calibration.second_order import sparsify_second_order
    from ..calibration.sequential import find_blocks

    if data is None:
        raise ValueError("sparsify_and_compress_ calibrates block by block: pass data=<calibration batches>")
    device = torch.device(device)
    eligible, skipped = eligible_linears(model, config)
    if not eligible:
        raise ValueError(f"sparsify_and_compress_: no linear of the model is eligible ({len(skipped)} skipped)")
    reports = {name: LayerReport(name, _out_in(m)) for name, m in linear_like_modules(model)}
    for name, why in skipped.items():
        reports[name].skipped = why
    _convert_conv1ds(model, eligible, reports)  # as sparsify_: the layer-by-layer driver takes nn.Linear layers
    last = len(find_blocks(model)) - 1

    def before(index: int, name: str, block: nn.Module) -> None:
        block.to(device)

    def after(index: int, name: str, block: nn.Module) -> None:
        if sparse_linears(block):
            compress_(block, progress=False)
        if index == last:
            model.to(device)  # what is left outside the blocks (small): embeddings, norms, heads
        log.debug("block %d (%s) compressed on %s", index, name, device)

    sparsify_second_order(model, config, data, eligible, reports, progress, before_block=before, after_block=after)
    model.to(device)
    if sparse_linears(model):  # linears outside the blocks, pruned after them
        compress_(model, progress=False)
    report = SparsifyReport(config, list(reports.values()))
    log.info("%s", report.summary())
    return report
