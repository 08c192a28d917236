"""Where sparsify_ records each linear's V:N:M state for the compiler, export and training.

The state sits on the nn.Linear as the plain attribute ``vnm_sparsity`` (not a
buffer: the model's state_dict keeps its keys) and in a weak index keyed by the
weight Parameter, because torch.compile hands parameters, not modules, to the
backend.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, fields

from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from .format import VNMWeight
from .pattern import VNMPattern

__all__ = [
    "LinearSparsity",
    "ATTR",
    "get_sparsity",
    "set_sparsity",
    "clear_sparsity",
    "sparsity_state_dict",
    "load_sparsity_",
    "unique_linears",
    "sparse_linears",
]

ATTR = "vnm_sparsity"
_BY_WEIGHT: WeakIdKeyDictionary = WeakIdKeyDictionary()


@dataclass
class LinearSparsity:
    """A linear's V:N:M state: the mask in original coordinates and the permutations
    in which it obeys the pattern (``mask[out_perm][:, in_perm]``)."""

    pattern: VNMPattern
    mask: Tensor
    in_perm: Tensor | None = None
    out_perm: Tensor | None = None
    score: str = "abs"

    def compress(self, weight: Tensor) -> VNMWeight:
        """The weight in the kernels' compressed format, permutations folded in."""
        return VNMWeight.from_dense(weight, self.mask, self.pattern, in_perm=self.in_perm, out_perm=self.out_perm)

    # copy.deepcopy(model) copies the module's _parameters before this attribute (set later), so the
    # copied weight is already in ``memo``: index the copied state under it, or the compiler, which
    # sees weights only, would find no state in a deep-copied model.
    def __deepcopy__(self, memo: dict) -> LinearSparsity:
        new = LinearSparsity(**{f.name: copy.deepcopy(getattr(self, f.name), memo) for f in fields(self)})
        memo[id(self)] = new
        ref = self.__dict__.get("_weight")
        old = ref() if ref is not None else None
        copied = memo.get(id(old)) if old is not None else None
        if isinstance(copied, Tensor):
            _index(copied, new)
        return new

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_weight"}  # a weakref does not pickle


def _index(weight: Tensor, state: LinearSparsity) -> None:
    _BY_WEIGHT[weight] = state
    state.__dict__["_weight"] = weakref.ref(weight)


def set_sparsity(module: nn.Linear, state: LinearSparsity) -> None:
    setattr(module, ATTR, state)
    _index(module.weight, state)


def get_sparsity(obj: nn.Module | Tensor) -> LinearSparsity | None:
    """The recorded state of a linear module, or of its weight Parameter."""
    if isinstance(obj, nn.Module):
        state = getattr(obj, ATTR, None)
        if state is not None and getattr(obj, "weight", None) is not None:
            _index(obj.weight, state)  # re-index after a parameter swap
        return state
    return _BY_WEIGHT.get(obj)


def clear_sparsity(module: nn.Module) -> None:
    state = getattr(module, ATTR, None)
    if state is not None:
        delattr(module, ATTR)
        _BY_WEIGHT.pop(module.weight, None)


def unique_linears(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """Every nn.Linear of ``model`` once, under its first name (a shared module is listed once)."""
    seen: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and id(module) not in seen:
            seen.add(id(module))
            yield name, module


def sparse_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The nn.Linear modules with a recorded V:N:M state, by first name.

    Reads the attribute only: a parametrized weight (recovery training) is not evaluated.
    """
    return {name: m for name, m in unique_linears(model) if getattr(m, ATTR, None) is not None}


def sparsity_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Every recorded linear's mask, permutations and pattern as plain tensors (safetensors-friendly).

    Keys: ``<module>.vnm_mask`` (bool), ``<module>.vnm_in_perm`` / ``.vnm_out_perm`` (int64, when
    present) and ``<module>.vnm_pattern`` (int64 [v, n, m]). Save it beside the model's own
    state_dict; ``load_sparsity_`` restores it.
    """
    import torch

    out: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        state = getattr(module, ATTR, None)
        if state is None:
            continue
        out[f"{name}.vnm_mask"] = state.mask
        out[f"{name}.vnm_pattern"] = torch.tensor([state.pattern.v, state.pattern.n, state.pattern.m])
        if state.in_perm is not None:
            out[f"{name}.vnm_in_perm"] = state.in_perm
        if state.out_perm is not None:
            out[f"{name}.vnm_out_perm"] = state.out_perm
    return out


def load_sparsity_(model: nn.Module, state_dict: dict[str, Tensor], *, apply_mask: bool = True) -> list[str]:
    """Restore what sparsity_state_dict saved onto ``model`` **in place**; returns the module names restored.

    With ``apply_mask`` the weights are multiplied by their masks (a no-op for weights saved after
    sparsify_). Unknown module names or shape mismatches raise ValueError.
    """
    import torch

    from .masks import is_vnm

    modules = dict(model.named_modules())
    names = sorted({k.rsplit(".vnm_", 1)[0] for k in state_dict if ".vnm_" in k})
    for name in names:
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"sparsity state names {name!r}, which is not an nn.Linear of this model")
        mask = state_dict[f"{name}.vnm_mask"].to(device=module.weight.device, dtype=torch.bool)
        if mask.shape != module.weight.shape:
            raise ValueError(
                f"mask for {name!r} has shape {tuple(mask.shape)}, weight has {tuple(module.weight.shape)}"
            )
        pattern = VNMPattern(*(int(x) for x in state_dict[f"{name}.vnm_pattern"].tolist()))
        in_perm = state_dict.get(f"{name}.vnm_in_perm")
        out_perm = state_dict.get(f"{name}.vnm_out_perm")
        if not is_vnm(mask, pattern, in_perm, out_perm):
            raise ValueError(f"saved mask for {name!r} does not obey {pattern}")
        if apply_mask:
            with torch.no_grad():
                module.weight.mul_(mask.to(module.weight.dtype))
        set_sparsity(module, LinearSparsity(pattern, mask, in_perm, out_perm))
    return names
