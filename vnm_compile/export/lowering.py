"""Swap sparsified nn.Linear layers for modules that call vnm::linear, on a copy of the model.

Exporters (ONNX, torch-tensorrt) trace the copy: every V:N:M linear then shows
up as one ``torch.ops.vnm.linear`` call whose compressed tensors are buffers,
and the dense weight is not part of the traced program at all. The user's
model is never changed: the copy shares every parameter and buffer (no extra
memory for the dense layers) and only its module tree is new.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import Tensor, nn

from ..format import VNMWeight
from ..kernels.vnm_linear import vnm_linear
from ..state import ATTR, get_sparsity, sparse_linears

__all__ = ["VNMLinearExport", "sparse_linears", "lowered_copy"]

logger = logging.getLogger(__name__)


class VNMLinearExport(nn.Module):
    """``y = x @ W^T + b`` from a V:N:M-compressed W (buffers), through torch.ops.vnm.linear."""

    def __init__(self, weight: VNMWeight, bias: Tensor | None) -> None:
        super().__init__()
        self.pattern = weight.pattern
        self.shape = weight.shape
        self.register_buffer("values", weight.values.detach())
        self.register_buffer("columns", weight.columns)
        self.register_buffer("meta", weight.meta)
        self.register_buffer("row_index", weight.row_index)
        self.register_buffer("bias", None if bias is None else bias.detach())

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def out_features(self) -> int:
        return self.shape[0]

    def compressed(self) -> VNMWeight:
        return VNMWeight(self.values, self.columns, self.meta, self.row_index, self.pattern, self.shape)

    def forward(self, x: Tensor) -> Tensor:
        return vnm_linear(x, self.compressed(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, pattern={self.pattern}"


def _compress(name: str, module: nn.Linear) -> VNMWeight:
    state = get_sparsity(module)
    weight = module.weight.detach()
    if state.mask.shape != weight.shape:
        raise ValueError(f"{name}: recorded mask has shape {tuple(state.mask.shape)}, weight {tuple(weight.shape)}")
    outside = int(torch.count_nonzero(weight * ~state.mask.to(weight.device, torch.bool)))
    if outside:
        logger.warning(
            "%s: %d non-zero weights lie outside the recorded V:N:M mask (trained after sparsify_?); "
            "the export keeps weight * mask",
            name,
            outside,
        )
    return state.compress(weight)


@torch.no_grad()
def lowered_copy(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` whose sparsified linears are :class:`VNMLinearExport` modules.

    Returns:
        (copy, names of the swapped linears). The copy shares the parameters and
        buffers of ``model``; ``model`` itself is not modified.
    """
    targets = sparse_linears(model)
    memo: dict[int, object] = {}
    for t in [*model.parameters(), *model.buffers()]:
        memo[id(t)] = t
    for module in model.modules():
        state = getattr(module, ATTR, None)
        if state is not None:
            memo[id(state)] = state  # the masks are not copied either
    clone = copy.deepcopy(model, memo)

    # Build each replacement once (a shared linear stays shared), then rewire every name.
    replacement: dict[int, VNMLinearExport] = {}
    for name, module in targets.items():
        replacement[id(module)] = VNMLinearExport(_compress(name, module), module.bias)
    from ..deploy.convert import compressed_linears  # compressed models (compress_) export the same op

    for module in compressed_linears(model).values():
        replacement[id(module)] = VNMLinearExport(module.folded_weight(), module.bias)
    if id(model) in replacement:  # the model is itself one sparsified linear
        return replacement[id(model)], [""]
    originals = dict(model.named_modules(remove_duplicate=False))
    swapped: list[str] = []
    for name, _module in list(clone.named_modules(remove_duplicate=False)):
        original = originals.get(name)
        if name == "" or original is None or id(original) not in replacement:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = clone.get_submodule(parent_name) if parent_name else clone
        setattr(parent, child, replacement[id(original)])
        swapped.append(name)
    logger.debug("lowered %d V:N:M linears for export", len(swapped))
    return clone, swapped
