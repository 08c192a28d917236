"""SR-STE dynamic masks (TS2; Zhou et al., "Learning N:M fine-grained structured sparse neural networks from
scratch", ICLR 2021, eq. 5, applied to V:N:M as in the paper's section 3).

The layer computes with ``W * M_t``. The dense weight ``W`` receives the
straight-through gradient of the masked weight plus a decay on the weights the
mask currently removes:

    dL/dW = dL/d(W * M_t) + lambda * (not M_t) * W

so pruned weights shrink unless their gradient keeps them alive, and the mask
is recomputed from ``W`` every K steps (``masking.update_masks_``; rare updates
train better, paper Table 1).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .masking import RecoveryParametrization, sparse_linears, sparsity_of

__all__ = ["SRSTEWeight", "srste_", "srste_grad"]


def srste_grad(grad: Tensor, weight: Tensor, mask: Tensor, lam: float) -> Tensor:
    """The SR-STE gradient of the dense weight: straight-through ``grad`` plus ``lam * (not mask) * weight``."""
    return grad + lam * (~mask).to(weight.dtype) * weight


class _SRSTEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: Tensor, mask: Tensor, lam: float) -> Tensor:
        ctx.save_for_backward(weight, mask)
        ctx.lam = lam
        return weight * mask.to(weight.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, mask = ctx.saved_tensors
        return srste_grad(grad, weight, mask, ctx.lam), None, None


class SRSTEWeight(RecoveryParametrization):
    """Weight parametrization ``W -> W * M`` with the SR-STE backward; ``mask`` is a bool buffer."""

    def __init__(self, mask: Tensor, lam: float = 2e-4) -> None:
        super().__init__()
        if not lam >= 0:
            raise ValueError(f"SR-STE lambda must be >= 0, got {lam}")
        self.register_buffer("mask", mask.detach().clone().bool())
        self.lam = float(lam)

    def forward(self, weight: Tensor) -> Tensor:
        return _SRSTEFunction.apply(weight, self.mask, self.lam)

    def extra_repr(self) -> str:
        return f"lambda={self.lam}"


def srste_(model: nn.Module, lam: float = 2e-4) -> int:
    """Parametrize every sparse linear's weight with ``SRSTEWeight`` (in place); returns how many.

    The dense weight underneath keeps training; ``update_masks_(model, ...)``
    recomputes the masks and ``merge_(model)`` leaves plain ``W * M`` weights.
    """
    mods = sparse_linears(model)
    if not mods:
        raise ValueError("the model has no sparsified linears: call vnm_compile.sparsify_(model, ...) first")
    for module in mods.values():
        mask = sparsity_of(module).mask.to(module.weight.device)
        parametrize.register_parametrization(module, "weight", SRSTEWeight(mask, lam))
    return len(mods)
