"""Finding the linears that read the same tensor (q/k/v, gate/up, fc layers fed by one LayerNorm).

Such layers must share one input permutation (docs/design.md, "Channel permutation").
They are found by tracing, not by names: forward pre-hooks record the identity
of each nn.Linear's input tensor while the model runs on real batches, and
layers that were handed the very same tensor object are joined (union-find).

Identity is the Python tensor object, checked through a weak reference so that
an id reused after a tensor is freed never joins unrelated layers. Two
different view objects of one storage count as different inputs (a missed
group only costs mask quality, never correctness: masks are stored in
original coordinates whatever the grouping).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..linears import linear_like_modules

__all__ = ["InputGroupRecorder", "find_input_groups"]

logger = logging.getLogger(__name__)


class InputGroupRecorder:
    """Context manager: hooks every (selected) nn.Linear and joins layers that read the same tensor.

    Example::

        with InputGroupRecorder(model) as rec:
            model(**batch)
        rec.groups()  # [("encoder.layer.0.attention.self.query", "...key", "...value"), ...]
    """

    def __init__(self, model: nn.Module, filter_fn: Callable[[str, nn.Module], bool] | None = None) -> None:
        self.model = model
        self.filter_fn = filter_fn
        self._parent: dict[str, str] = {}
        self._last_seen: dict[int, tuple[weakref.ref, str]] = {}
        self._handles: list = []

    # union-find over layer names
    def _find(self, name: str) -> str:
        while self._parent[name] != name:
            self._parent[name] = self._parent[self._parent[name]]
            name = self._parent[name]
        return name

    def _union(self, a: str, b: str) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra != rb:
            self._parent[rb] = ra

    def _hook(self, name: str, args: tuple) -> None:
        if not args or not isinstance(args[0], Tensor):
            return
        x = args[0]
        seen = self._last_seen.get(id(x))
        if seen is not None and seen[0]() is x:
            self._union(seen[1], name)
        else:
            self._last_seen[id(x)] = (weakref.ref(x), name)
        if len(self._last_seen) > 4096:  # drop entries of freed tensors
            self._last_seen = {k: v for k, v in self._last_seen.items() if v[0]() is not None}

    def __enter__(self) -> InputGroupRecorder:
        # a shared module is recorded under its first name, as sparsify_ does
        for name, module in linear_like_modules(self.model):
            if self.filter_fn is not None and not self.filter_fn(name, module):
                continue
            self._parent.setdefault(name, name)
            self._handles.append(module.register_forward_pre_hook(lambda _m, args, name=name: self._hook(name, args)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last_seen.clear()

    def groups(self) -> list[tuple[str, ...]]:
        """Groups of two or more layers that read the same tensor, in model order."""
        by_root: dict[str, list[str]] = {}
        for name in self._parent:  # insertion order = model order
            by_root.setdefault(self._find(name), []).append(name)
        return [tuple(g) for g in by_root.values() if len(g) > 1]


@torch.no_grad()
def find_input_groups(
    model: nn.Module, batch, *, filter_fn: Callable[[str, nn.Module], bool] | None = None
) -> list[tuple[str, ...]]:
    """Run ``model`` on one example batch and return the groups of linears that read the same tensor.

    Args:
        model: any nn.Module (not changed; hooks are removed).
        batch: one input (dict -> **kwargs, tuple -> *args, else the one argument).
        filter_fn: ``(name, module) -> bool`` selecting the linears to consider.
    """
    from .observer import run_batch

    with InputGroupRecorder(model, filter_fn) as rec:
        run_batch(model, batch)
    groups = rec.groups()
    logger.info("found %d groups of linears reading the same input", len(groups))
    return groups
