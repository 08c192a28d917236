"""LoRA for sparse models that stays V:N:M through the merge (three-stage LoRA, TS3).

LoRA is added as a weight parametrization, not by replacing or patching the
user's modules: the linear computes with ``(W + scale * B @ A) * M`` (``M``
the recorded V:N:M mask, or no mask for dense linears / while the mask is
disabled in stage 1), ``scale = alpha / rank``. ``W`` is frozen; only ``A`` and
``B`` train. Merging writes ``(W + scale * B @ A) * M`` into the plain weight,
so the merged model obeys the pattern exactly (merging ``BA`` into a pruned
weight without the mask would fill the pruned positions).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .masking import RecoveryParametrization, dense_weight, merge_, sparse_linears, sparsity_of

__all__ = ["LoRAWeight", "LoRAHandle", "lora_", "lora_weight"]


class LoRAWeight(RecoveryParametrization):
    """Weight parametrization ``W -> (W + scale * B @ A) * M``; ``B`` starts at zero so the model is unchanged."""

    def __init__(
        self,
        out_features: int,
        in_features: int,
        rank: int = 16,
        alpha: float = 32.0,
        mask: Tensor | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if not alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {alpha}")
        self.rank, self.alpha, self.scale = rank, float(alpha), float(alpha) / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear / the LoRA reference code
        if mask is not None:
            if mask.shape != (out_features, in_features):
                raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {(out_features, in_features)}")
            self.register_buffer("mask", mask.detach().clone().bool().to(device))
        else:
            self.mask = None
        # Stage 1 of three-stage LoRA trains densely (M = 1); set by the trainer from the schedule.
        self.mask_enabled = True

    def delta(self) -> Tensor:
        return self.scale * (self.lora_B @ self.lora_A)

    def forward(self, weight: Tensor) -> Tensor:
        w = weight + self.delta().to(weight.dtype)
        if self.mask is not None and self.mask_enabled:
            w = w * self.mask.to(w.dtype)
        return w

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, masked={self.mask is not None}"


def lora_weight(module: nn.Linear) -> Tensor:
    """``W + scale * B @ A`` of a LoRA-parametrized linear (no mask): what stage 2 scores."""
    w = dense_weight(module)
    for p in module.parametrizations.weight:
        if isinstance(p, LoRAWeight):
            return w + p.delta().to(w.dtype)
    raise ValueError("the module carries no LoRAWeight parametrization")


class LoRAHandle:
    """What ``lora_`` changed: the LoRA parametrizations, and the parameters it froze (restored by ``merge``)."""

    def __init__(self, model: nn.Module, adapters: dict[str, LoRAWeight], frozen: list[nn.Parameter]) -> None:
        self.model, self.adapters, self._frozen = model, adapters, frozen

    def parameters(self) -> list[nn.Parameter]:
        """The trainable LoRA parameters (A and B of every adapter)."""
        return [p for a in self.adapters.values() for p in (a.lora_A, a.lora_B)]

    def set_mask_enabled(self, enabled: bool) -> None:
        for a in self.adapters.values():
            a.mask_enabled = enabled

    def merge(self) -> int:
        """Fold ``(W + scale * BA) * M`` into plain weights, re-record the V:N:M state, unfreeze what lora_ froze."""
        n = merge_(self.model)
        for p in self._frozen:
            p.requires_grad_(True)
        self._frozen = []
        return n


def lora_(
    model: nn.Module,
    rank: int = 16,
    alpha: float = 32.0,
    *,
    targets: str = "all",
    freeze: bool = True,
) -> LoRAHandle:
    """Add a LoRA adapter to every linear (``targets="all"``) or every sparse linear (``"sparse"``), in place.

    Sparse linears get their recorded mask (kept in sync by ``update_masks_``);
    with ``freeze`` every other parameter of the model stops training until
    ``handle.merge()``.
    """
    if targets not in ("all", "sparse"):
        raise ValueError(f"targets must be 'all' or 'sparse', got {targets!r}")
    sparse = {id(m) for m in sparse_linears(model).values()}
    if not sparse:
        raise ValueError("the model has no sparsified linears: call vnm_compile.sparsify_(model, ...) first")
    frozen = [p for p in model.parameters() if p.requires_grad] if freeze else []
    for p in frozen:
        p.requires_grad_(False)
    adapters: dict[str, LoRAWeight] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or id(module) in seen:
            continue
        seen.add(id(module))
        if targets == "sparse" and id(module) not in sparse:
            continue
        w = module.weight
        mask = sparsity_of(module).mask if id(module) in sparse else None
        adapter = LoRAWeight(module.out_features, module.in_features, rank, alpha, mask, dtype=w.dtype, device=w.device)
        parametrize.register_parametrization(module, "weight", adapter)
        adapters[name] = adapter
    return LoRAHandle(model, adapters, frozen)
