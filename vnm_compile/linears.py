"""What counts as a linear layer: ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2 and its family).

transformers' ``Conv1D`` is a linear whose weight is stored transposed, (in, out), and
whose forward is ``addmm(bias, x, weight)``. sparsify_ converts each one it prunes into a
:class:`Conv1DLinear`: an ``nn.Linear`` (weight (out, in)) whose ``state_dict`` still reads and
writes the transposed (in, out) weight, so checkpoints keep transformers' layout while
calibration, the compiler, export and recovery see a plain linear. Calibration observes
both kinds directly (a Conv1D's input is (..., in) like a linear's).

transformers is not imported: a Conv1D is recognised by its class name and module.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

__all__ = ["is_conv1d", "is_linear_like", "in_features_of", "linear_like_modules", "Conv1DLinear", "to_linear"]


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (any transformers version), not for a Conv1DLinear."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers") and hasattr(module, "nf")


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def in_features_of(module: nn.Module) -> int:
    """Input features of an nn.Linear or a Conv1D (weight (in, out))."""
    return int(module.weight.shape[0]) if is_conv1d(module) else int(module.in_features)


def linear_like_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every nn.Linear and Conv1D of ``model`` once, under its first name, in model order."""
    seen: set[int] = set()
    for name, module in model.named_modules():
        if is_linear_like(module) and id(module) not in seen:
            seen.add(id(module))
            yield name, module


class Conv1DLinear(nn.Linear):
    """An nn.Linear converted from a transformers Conv1D; its state_dict keeps Conv1D's (in, out) weight.

    ``nf``/``nx`` (output/input features) are kept for code that reads them.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.register_state_dict_post_hook(_save_transposed)
        self.register_load_state_dict_pre_hook(_load_transposed)

    @property
    def nf(self) -> int:
        return self.out_features

    @property
    def nx(self) -> int:
        return self.in_features


def _save_transposed(module: Conv1DLinear, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    key = prefix + "weight"
    if isinstance(state_dict.get(key), Tensor) and state_dict[key].dim() == 2:
        state_dict[key] = state_dict[key].detach().t().contiguous()


def _load_transposed(module: Conv1DLinear, state_dict: dict, prefix: str, *args) -> None:
    key = prefix + "weight"
    w = state_dict.get(key)
    if isinstance(w, Tensor) and w.dim() == 2 and tuple(w.shape) == (module.in_features, module.out_features):
        state_dict[key] = w.t()


def to_linear(conv: nn.Module) -> Conv1DLinear:
    """A Conv1DLinear computing what the transformers Conv1D ``conv`` computes (its weight transposed, copied)."""
    if not is_conv1d(conv):
        raise TypeError(f"expected a transformers Conv1D, got {type(conv).__name__}")
    w = conv.weight
    bias = getattr(conv, "bias", None)
    with torch.device("meta"):
        lin = Conv1DLinear(w.shape[0], w.shape[1], bias=bias is not None)
    lin.weight = nn.Parameter(w.detach().t().contiguous(), requires_grad=w.requires_grad)
    if bias is not None:
        lin.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach())
    lin.train(conv.training)
    return lin
