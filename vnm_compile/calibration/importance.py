"""Importance scores for pruning: ABS, Wanda and RIA (docs/design.md)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["importance", "SCORES"]

SCORES = ("abs", "wanda", "ria")


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    # An all-zero row or column has no importance to share out: score 0, not NaN.
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(num.dtype).tiny), torch.zeros((), dtype=num.dtype))


def importance(
    weight: Tensor,
    method: str,
    act_norm: Tensor | None = None,
    alpha: float = 0.5,
) -> Tensor:
    """Score every weight of a linear layer (out, in); float32 result.

    Args:
        weight: the (out_features, in_features) weight.
        method: "abs" (|W|), "wanda" (|W_ij| * ||X_j||) or
            "ria" ((|W_ij| / sum_i |W_ij| + |W_ij| / sum_j |W_ij|) * ||X_j|| ** alpha).
        act_norm: per-input-channel L2 norm of the activations, shape (in,);
            required by "wanda" and "ria".
        alpha: RIA's exponent on the activation norm.
    """
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor, got {getattr(weight, 'shape', type(weight))}")
    if method not in SCORES:
        raise ValueError(f"unknown importance method {method!r}; choose one of {SCORES}")
    w = weight.detach().abs().float()
    if method == "abs":
        return w
    if act_norm is None:
        raise ValueError(f"importance method {method!r} needs act_norm (run calibrate() first, or use 'abs')")
    if act_norm.dim() != 1 or act_norm.numel() != weight.shape[1]:
        raise ValueError(
            f"act_norm must have shape ({weight.shape[1]},) (one per input channel), got {tuple(act_norm.shape)}"
        )
    norm = act_norm.detach()
    if norm.is_meta or weight.is_meta:
        raise ValueError("importance: weight or act_norm is on the meta device (no data); load the weights first")
    if not bool(torch.isfinite(norm).all()) or bool((norm < 0).any()):
        raise ValueError("act_norm must be finite and non-negative")
    scores = _scores(w, norm.float().to(w.device), method, alpha)
    if not bool(torch.isfinite(scores).all()):
        # Huge activations (act_norm near or past float32's range): a layer's mask depends only on the
        # ratios of its scores, and both scores scale with act_norm (** alpha), so rescale it to max 1.
        top = norm.max()
        scaled = (norm.double() / top).float() if top > 0 else norm.float()
        scores = _scores(w, scaled.to(w.device), method, alpha)
    return scores


def _scores(w: Tensor, norm: Tensor, method: str, alpha: float) -> Tensor:
    if method == "wanda":
        return w * norm
    relative = _safe_div(w, w.sum(0, keepdim=True)) + _safe_div(w, w.sum(1, keepdim=True))
    return relative * norm.pow(alpha)
