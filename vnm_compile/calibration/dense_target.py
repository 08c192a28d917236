"""Fitting a layer to the dense model's outputs from the pruned model's inputs.

Sequential calibration gives layer l the inputs X that the already-pruned
layers before it produce, but the layer's job is still the dense model's
output W X_d (X_d: the dense model's inputs for the same tokens). The
objective ``||W X_dᵀ - Ŵ Xᵀ||²`` expands, per row, with H = XᵀX and the cross
moment C = XᵀX_d (``HessianObserver.add_pair``), to

    ŵ H ŵᵀ - 2 ŵ C wᵀ + const = (ŵ - w') H (ŵ - w')ᵀ + const,   w' = w Cᵀ H⁻¹,

so the usual pruning of a weight against H applies unchanged to W' = W Cᵀ H⁻¹,
the dense weight that best maps the pruned inputs to the dense outputs: it
absorbs the error of the layers before (the asymmetric calibration of GPTQ's
successors). The dampening λ = damp x mean(diag H) pulls W' towards W:
W' = W (C + λI)ᵀ (H + λI)⁻¹.

With a bias, the moments are centred (H - n·μμᵀ, C - n·μμ_dᵀ, ...), and the
bias takes W μ_d - Ŵ μ: the joint optimum of weights and bias.

References: Li et al., "GPTAQ: Efficient Finetuning-Free Quantization for
Asymmetric Calibration" (ICML 2025).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .hessian import HessianObserver, damped_hessian

__all__ = ["DenseTarget", "dense_target"]


@dataclass
class DenseTarget:
    """The moments of one input, in float64, centred when ``centred``.

    ``hessian`` = Σ xᵀx, ``cross`` = Σ xᵀx_d, ``dense`` = Σ x_dᵀx_d (pruned x, dense x_d);
    ``reference``: Σ x_dᵀx_d uncentred (the error's denominator, the dense outputs' energy);
    ``mean`` / ``dense_mean``: μ and μ_d (None uncentred).
    """

    hessian: Tensor
    cross: Tensor
    dense: Tensor
    reference: Tensor
    mean: Tensor | None = None
    dense_mean: Tensor | None = None

    @property
    def centred(self) -> bool:
        return self.mean is not None

    def fit(self, weight: Tensor, damp: float, name: str = "layer") -> Tensor:
        """W' = W (C + λI)ᵀ (H + λI)⁻¹ in float32: the dense weight that best maps the pruned inputs to
        the dense outputs (λ = damp x mean(diag H), retried with more if H + λI cannot be factored)."""
        w = weight.detach().double()
        h_d = damped_hessian(self.hessian.float(), damp, name).double()
        lam = h_d.diagonal() - self.hessian.diagonal()
        rhs = (self.cross + torch.diag(lam)) @ w.T
        for _ in range(5):
            low, info = torch.linalg.cholesky_ex(h_d)
            if int(info) == 0:
                return torch.cholesky_solve(rhs, low).T.float()
            h_d = h_d + float(lam.mean()) * 9 * torch.eye(h_d.shape[0], dtype=h_d.dtype, device=h_d.device)
        return weight.detach().float()  # cannot be factored: keep the weight (the plain sequential objective)

    def bias_shift(self, weight: Tensor, new: Tensor) -> Tensor | None:
        """W μ_d - Ŵ μ (float32), the bias change of the joint optimum; None when uncentred."""
        if self.mean is None:
            return None
        return (weight.double() @ self.dense_mean - new.double() @ self.mean).float()

    def error(self, weight: Tensor, new: Tensor) -> float:
        """``||W X_dᵀ - Ŵ Xᵀ (+ bias shift)||² / ||W X_dᵀ||²`` on the calibration data (uncentred denominator)."""
        w, v = weight.double(), new.double()
        num = (v @ self.hessian * v).sum() - 2 * (v @ self.cross * w).sum() + (w @ self.dense * w).sum()
        den = (w @ self.reference * w).sum()
        return max(float(num), 0.0) / float(den) if float(den) > 0 else 0.0


def dense_target(obs: HessianObserver, centre: bool) -> DenseTarget:
    """The (centred when ``centre``) moments of an observer fed by ``add_pair``."""
    if obs.cross is None:
        raise ValueError(f"{obs.name}: no dense activations (the observer was not fed by add_pair)")
    h, c, d = obs.hessian.double(), obs.cross.double(), obs.dense_hessian.double()
    if not centre or obs.tokens == 0:
        return DenseTarget(h, c, d, d)
    n = obs.tokens
    mu, mu_d = obs.sum.double().to(h.device) / n, obs.dense_sum.double().to(h.device) / n
    centred = (h - n * torch.outer(mu, mu), c - n * torch.outer(mu, mu_d), d - n * torch.outer(mu_d, mu_d))
    return DenseTarget(*centred, d, mu, mu_d)
