"""Fixed V:N:M masks during training (TS1) and mask recomputation (TS2, TS3 stage 2).

Two ways to keep pruned weights at zero while a model trains:

* ``MaskGuard`` (hooks; the weights stay plain ``nn.Linear`` parameters): a
  gradient hook zeroes the gradient of every masked weight, and an optimizer
  step post-hook multiplies the weights by their masks again. The second part
  is what makes it hold for *any* optimizer: momentum buffers or Adam moments
  carried over from earlier training, or an optimizer that changes weights
  without a gradient, are undone after every step.
* a parametrization (``srste.py``, ``lora.py``): the forward pass sees
  ``W * M`` by construction and ``merge_`` writes that product back.

Masks are always recomputed inside the permutation groups chosen by
``sparsify_``: scores are permuted by the recorded ``in_perm``/``out_perm``,
pruned with ``vnm_mask`` there, and stored back in original coordinates, so the
mask keeps obeying the pattern in the coordinates the compiler folds in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.weak import WeakIdKeyDictionary

from ..calibration.importance import importance
from ..calibration.observer import CalibrationStats
from ..masks import vnm_mask
from ..sparsify import _unpermute
from ..state import ATTR, LinearSparsity, set_sparsity, sparse_linears

__all__ = [
    "sparse_linears",
    "sparsity_of",
    "dense_weight",
    "apply_masks_",
    "MaskGuard",
    "fix_masks_",
    "recompute_mask",
    "update_masks_",
    "set_mask_",
    "merge_",
    "RecoveryParametrization",
    "is_sharded",
    "mask_like",
]

logger = logging.getLogger(__name__)


class RecoveryParametrization(nn.Module):
    """Base of the weight parametrizations added by recovery training (``merge_`` removes exactly these)."""


def _recovery_parametrized(module: nn.Module) -> bool:
    return parametrize.is_parametrized(module, "weight") and any(
        isinstance(p, RecoveryParametrization) for p in module.parametrizations.weight
    )


def sparsity_of(module: nn.Module) -> LinearSparsity | None:
    """The recorded V:N:M state of ``module``, read without evaluating a parametrized weight."""
    return getattr(module, ATTR, None)


def dense_weight(module: nn.Linear) -> Tensor:
    """The trainable weight tensor underneath any parametrization (``W`` of ``W * M``)."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def _is_dtensor(t: Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` holds DTensor parameters (FSDP2 ``fully_shard``, tensor parallel)."""
    return any(_is_dtensor(p) for p in model.parameters())


# mask -> {(mesh, placements): the mask as a DTensor sharded like the weight}; weak, so a replaced mask drops out.
_SHARDED_MASKS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def mask_like(mask: Tensor, weight: Tensor) -> Tensor:
    """The bool ``mask`` laid out as ``weight`` is: on its device, or, for a DTensor weight (FSDP2
    ``fully_shard``), as a DTensor sharded with the weight's mesh and placements, so that every rank
    multiplies its own shard of the weight by exactly the matching shard of the mask.

    The local shard is cut on each rank without communication (``src_data_rank=None``): every rank
    holds the same full mask (sparsify_ ran on identical weights). The sharded mask is cached per mask.
    """
    if not _is_dtensor(weight):
        return mask.to(weight.device)
    from torch.distributed.tensor import distribute_tensor

    key = (id(weight.device_mesh), tuple(weight.placements))
    cached = _SHARDED_MASKS.get(mask)
    if cached is None:
        cached = _SHARDED_MASKS[mask] = {}
    if key not in cached:
        cached[key] = distribute_tensor(mask, weight.device_mesh, weight.placements, src_data_rank=None)
    return cached[key]


def _mul_mask_(t: Tensor, mask: Tensor) -> None:
    """``t *= mask`` in place; DTensors shard by shard (same sharding: no DTensor dispatch per layer and step)."""
    m = mask_like(mask, t)
    if _is_dtensor(t):
        t.to_local().mul_(m.to_local())
    else:
        t.mul_(m)


@torch.no_grad()
def apply_masks_(model: nn.Module) -> int:
    """Multiply every sparse linear's dense weight by its recorded mask; returns how many were masked.

    Works shard-wise on DTensor (FSDP2) weights: each rank masks its own shard.
    """
    mods = sparse_linears(model)
    for module in mods.values():
        _mul_mask_(dense_weight(module), sparsity_of(module).mask)
    return len(mods)


class MaskGuard:
    """Keeps the masked weights of every sparse linear exactly zero during training.

    A gradient hook on each weight zeroes the masked entries of its gradient,
    and (once an optimizer is attached) a step post-hook re-applies the masks
    after every ``optimizer.step()``, which covers weight decay, momentum and
    optimizer state carried over from dense training. Hooks read the mask
    recorded on the module at call time, so mask updates are picked up.

    On a model sharded with FSDP2 (DTensor weights) gradient hooks on the sharded weights never fire
    (FSDP assigns the reduce-scattered gradient directly): call ``mask_grads()`` after ``backward()``
    and before gradient clipping; ``recover_`` does.

    Use as a context manager or call ``remove()``.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.model = model
        self._handles: list = []
        for module in sparse_linears(model).values():
            w = dense_weight(module)
            if w.requires_grad and not _is_dtensor(w):  # sharded: mask_grads()
                self._handles.append(w.register_hook(_grad_masker(module)))
        if optimizer is not None:
            self.attach(optimizer)
        apply_masks_(model)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Re-apply the masks after every step of ``optimizer``."""
        self._handles.append(optimizer.register_step_post_hook(lambda *_: apply_masks_(self.model)))

    @torch.no_grad()
    def mask_grads(self) -> int:
        """Zero the masked gradient entries of DTensor (sharded) weights, shard-wise; returns how many."""
        n = 0
        for module in sparse_linears(self.model).values():
            w = dense_weight(module)
            if _is_dtensor(w) and w.grad is not None:
                _mul_mask_(w.grad, sparsity_of(module).mask)
                n += 1
        return n

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> MaskGuard:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _grad_masker(module: nn.Linear) -> Callable[[Tensor], Tensor]:
    def hook(grad: Tensor) -> Tensor:
        return grad * sparsity_of(module).mask.to(device=grad.device, dtype=grad.dtype)

    return hook


def fix_masks_(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> MaskGuard:
    """Fixed-mask training (TS1) for a custom loop: ``guard = fix_masks_(model, opt)``; ``guard.remove()`` at the end."""
    if not sparse_linears(model):
        raise ValueError("the model has no sparsified linears: call vnm_compile.sparsify_(model, ...) first")
    return MaskGuard(model, optimizer)


def recompute_mask(
    weight: Tensor, state: LinearSparsity, score: str, act_norm: Tensor | None = None, alpha: float = 0.5
) -> Tensor:
    """A fresh V:N:M mask (original coordinates) for ``weight``, chosen inside the state's permutation groups.

    Steps: 1. score the weight; 2. permute the scores by ``out_perm``/``in_perm``;
    3. S_{V:N:M} there; 4. map the mask back to original coordinates.
    """
    scores = importance(weight, score, act_norm, alpha)
    if state.out_perm is not None:
        scores = scores[state.out_perm.to(scores.device)]
    if state.in_perm is not None:
        scores = scores[:, state.in_perm.to(scores.device)]
    mask_p = vnm_mask(scores, state.pattern)
    in_perm = None if state.in_perm is None else state.in_perm.to(mask_p.device)
    out_perm = None if state.out_perm is None else state.out_perm.to(mask_p.device)
    return _unpermute(mask_p, in_perm, out_perm).to(state.mask.device)


def set_mask_(module: nn.Linear, mask: Tensor) -> None:
    """Record a new mask for ``module`` (state and any recovery parametrization), keeping the permutations."""
    state = sparsity_of(module)
    if state is None:
        raise ValueError("the module has no recorded V:N:M state")
    if mask.shape != state.mask.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool of shape {tuple(state.mask.shape)}, got {mask.dtype} {tuple(mask.shape)}")
    # index=False: indexing would evaluate a parametrized weight.
    set_sparsity(module, replace(state, mask=mask), index=False)
    if _recovery_parametrized(module):
        for p in module.parametrizations.weight:
            if isinstance(p, RecoveryParametrization) and isinstance(getattr(p, "mask", None), Tensor):
                p.mask.copy_(mask)


@torch.no_grad()
def update_masks_(
    model: nn.Module,
    score: str | None = None,
    stats: CalibrationStats | None = None,
    alpha: float = 0.5,
    weight_fn: Callable[[nn.Linear], Tensor] | None = None,
) -> dict[str, float]:
    """Recompute every sparse linear's mask from its current weights; returns the fraction of kept weights that moved.

    Args:
        model: a model sparsified by ``sparsify_`` (possibly carrying recovery parametrizations).
        score: "abs", "wanda" or "ria"; None uses the score each layer was pruned with.
        stats: calibration statistics (act norms by module name) for "wanda"/"ria".
        alpha: RIA's exponent.
        weight_fn: the weight to score (default: the dense weight under any parametrization;
            three-stage LoRA passes W + scale * BA).
    """
    changed: dict[str, float] = {}
    for name, module in sparse_linears(model).items():
        state = sparsity_of(module)
        method = score or state.score
        norm = None
        if method != "abs":
            if stats is None or name not in stats:
                raise ValueError(f"score {method!r} needs calibration statistics for layer {name!r}: pass stats=")
            norm = stats.act_norm(name)
        w = weight_fn(module) if weight_fn is not None else dense_weight(module)
        mask = recompute_mask(w, state, method, norm, alpha)
        changed[name] = float((mask & ~state.mask).sum()) / max(1, int(state.mask.sum()))
        set_mask_(module, mask)
    logger.debug("masks recomputed: mean fraction moved %.4f", sum(changed.values()) / max(1, len(changed)))
    return changed


@torch.no_grad()
def merge_(model: nn.Module) -> int:
    """Fold every recovery parametrization into plain weights and re-record the V:N:M state.

    A parametrized weight is replaced by its current value (``W * M`` for SR-STE,
    ``(W + scale * BA) * M`` for LoRA) multiplied once more by the mask, so the
    result obeys the pattern exactly whatever the parametrization computed;
    ``torch.compile(..., backend="vnm")`` can then lower the linears. Returns the
    number of sparse linears.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear) and _recovery_parametrized(module):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    mods = sparse_linears(model)
    for module in mods.values():
        state = sparsity_of(module)
        _mul_mask_(module.weight, state.mask)
        set_sparsity(module, state)  # re-index the (possibly new) weight Parameter
    return len(mods)
