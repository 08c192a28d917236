"""Second moments of a layer's input, H = XᵀX, for second-order pruning.

One ``HessianObserver`` serves every linear that reads the same input tensor
(q/k/v, gate/up): H depends on the input only. It streams: each forward call
adds ``xᵀx`` of its tokens in float32 on the device the activations live on,
so memory is one (in, in) matrix per observed input (a 14336-wide input is an
822 MB matrix), whatever the number of calibration tokens.

``damped_hessian`` makes H safe to factor: dead channels (never active, so
their diagonal is 0) and duplicated channels (a singular H) are handled by the
dampening λ·I with λ = ``damp`` x mean(diag H), which regularises the solution
towards the original weights in directions the data does not see.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

__all__ = ["HessianObserver", "damped_hessian"]

logger = logging.getLogger(__name__)


class HessianObserver:
    """Running H = Σ xᵀx (float32) and token count of one input.

    Args:
        in_features: the input width.
        name: the layer (or group) name used in error messages.
    """

    def __init__(self, in_features: int, name: str = "layer") -> None:
        self.in_features = in_features
        self.name = name
        self.hessian: Tensor | None = None
        self.tokens = 0
        # add_pair only: Σ xᵀx_dense and Σ x_denseᵀx_dense (float32).
        self.cross: Tensor | None = None
        self.dense_hessian: Tensor | None = None

    def add_batch(self, x: Tensor, token_mask: Tensor | None = None) -> None:
        """Add the activations ``x`` (..., in_features) of one forward call.

        ``token_mask`` (bool, ``x.shape[:-1]``, e.g. a batch's attention mask) leaves
        out the tokens it marks False (padding); a mask of another shape is ignored.
        """
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{self.name}: expected activations with {self.in_features} features, got shape {tuple(x.shape)}"
            )
        flat = x.detach().reshape(-1, self.in_features)
        if token_mask is not None and tuple(token_mask.shape) == tuple(x.shape[:-1]):
            flat = flat[token_mask.reshape(-1).to(device=flat.device, dtype=torch.bool)]
        flat = flat.float()
        if self.hessian is None:
            self.hessian = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=flat.device)
        self.hessian.addmm_(flat.T, flat.to(self.hessian.device))
        if not _finite_diagonal(self.hessian):
            raise ValueError(
                f"{self.name}: its input activations contain NaN or Inf (or values whose squares overflow "
                "float32); check the model (or the layers pruned before it) and the calibration inputs"
            )
        self.tokens += flat.shape[0]

    def add_pair(self, x: Tensor, x_dense: Tensor, token_mask: Tensor | None = None) -> None:
        """Add the pruned model's activations ``x`` and the dense model's ``x_dense`` for the same tokens.

        Besides H = Σ xᵀx this accumulates the cross moment Σ xᵀx_dense and the
        dense second moment Σ x_denseᵀx_dense, so that the layer can be fitted to
        the dense model's outputs (dense_target.py).
        """
        if tuple(x_dense.shape) != tuple(x.shape):
            raise ValueError(
                f"{self.name}: the dense model's activations have shape {tuple(x_dense.shape)}, "
                f"the pruned model's {tuple(x.shape)}"
            )
        flat = x.detach().reshape(-1, self.in_features)
        dense = x_dense.detach().reshape(-1, self.in_features)
        if token_mask is not None and tuple(token_mask.shape) == tuple(x.shape[:-1]):
            keep = token_mask.reshape(-1).to(device=flat.device, dtype=torch.bool)
            flat, dense = flat[keep], dense[keep]
        self.add_batch(flat)
        dense = dense.float().to(self.hessian.device)
        if self.cross is None:
            self.cross = torch.zeros_like(self.hessian)
            self.dense_hessian = torch.zeros_like(self.hessian)
        self.cross.addmm_(flat.float().to(dense.device).T, dense)
        self.dense_hessian.addmm_(dense.T, dense)
        if not _finite_diagonal(self.dense_hessian):  # (the cross moment's entries are bounded by H's and this one's)
            raise ValueError(f"{self.name}: the dense model's input activations contain NaN or Inf")


def _finite_diagonal(h: Tensor) -> bool:
    """Whether the diagonal of a second moment H = Σ xᵀx is finite: O(in), instead of a pass over the
    activations or all of H. A NaN or Inf activation x_tj makes H_jj = Σ x_tj² NaN or Inf, and it stays so
    in every later sum (its terms are never negative), as does a square that overflows; every other entry
    is bounded by the diagonal, |H_jk| <= sqrt(H_jj H_kk) (Cauchy-Schwarz), up to rounding at the very top
    of the float32 range."""
    return bool(torch.isfinite(h.diagonal()).all())


def damped_hessian(hessian: Tensor, damp: float = 0.01, name: str = "layer") -> Tensor:
    """H + λ·I in float32 (float64 for a float64 H) with λ = ``damp`` x mean(diag H) (1 when H is all zeros).

    Also warns when H has fewer calibration tokens behind it than its width
    would need to be full rank; that case relies on the dampening.
    """
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"{name}: H must be a square matrix, got shape {tuple(hessian.shape)}")
    if not _finite_diagonal(hessian):
        raise ValueError(f"{name}: H contains NaN or Inf (overflow in the calibration activations?)")
    h = hessian.to(torch.promote_types(hessian.dtype, torch.float32), copy=True)
    diag = h.diagonal()
    dead = diag <= 0
    mean = float(diag.mean()) if h.numel() else 0.0
    lam = damp * mean if mean > 0 else 1.0
    # A dead channel (diagonal 0) gets λ like every other channel: the data says nothing about it,
    # so the solution keeps its weights where the mask keeps them.
    if bool(dead.any()):
        logger.debug("%s: %d of %d input channels were never active", name, int(dead.sum()), h.shape[0])
    diag.add_(lam)
    return h
