"""Where sparsify_ records each linear's V:N:M state for the compiler, export and training.

The state sits on the nn.Linear as the plain attribute ``vnm_sparsity`` (not a
buffer: the model's state_dict keeps its keys) and in a weak index keyed by the
weight Parameter, because torch.compile hands parameters, not modules, to the
backend.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from .format import VNMWeight
from .pattern import VNMPattern

__all__ = ["LinearSparsity", "ATTR", "get_sparsity", "set_sparsity", "clear_sparsity"]

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


def set_sparsity(module: nn.Linear, state: LinearSparsity) -> None:
    setattr(module, ATTR, state)
    _BY_WEIGHT[module.weight] = state


def get_sparsity(obj: nn.Module | Tensor) -> LinearSparsity | None:
    """The recorded state of a linear module, or of its weight Parameter."""
    if isinstance(obj, nn.Module):
        state = getattr(obj, ATTR, None)
        if state is not None and getattr(obj, "weight", None) is not None:
            _BY_WEIGHT[obj.weight] = state  # re-index after deepcopy / parameter swap
        return state
    return _BY_WEIGHT.get(obj)


def clear_sparsity(module: nn.Module) -> None:
    state = getattr(module, ATTR, None)
    if state is not None:
        delattr(module, ATTR)
        _BY_WEIGHT.pop(module.weight, None)
