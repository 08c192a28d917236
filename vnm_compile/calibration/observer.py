"""Activation statistics for importance scores.

Forward pre-hooks on every nn.Linear accumulate, per input channel, the sum of
squares of the activations and the token count (no activations are kept), so
calibration streams over any number of batches in constant memory.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..linears import in_features_of, linear_like_modules

__all__ = ["ChannelObserver", "CalibrationStats", "calibrate", "observe_linears", "run_batch"]

logger = logging.getLogger(__name__)


class ChannelObserver:
    """Running per-input-channel sum of squares and token count of one layer's input."""

    def __init__(self, in_features: int) -> None:
        self.in_features = in_features
        self.sum_sq: Tensor | None = None
        self.tokens = 0

    def add_batch(self, x: Tensor) -> None:
        """Add the activations ``x`` (..., in_features) of one forward call."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected activations with {self.in_features} features, got shape {tuple(x.shape)}")
        if x.is_meta:
            raise ValueError("activations are on the meta device (no data): load the model's weights first")
        # (an explicit row count: reshape(-1, 0) is ambiguous for a layer with no input features)
        flat = x.detach().reshape(math.prod(x.shape[:-1]), self.in_features)
        # float64 sums: squares of large fp32 activations (> 1.8e19) overflow float32
        sq = flat.double().square().sum(0)
        # A NaN or Inf activation makes its channel's sum NaN or Inf (the squares of finite float32 values
        # cannot overflow float64), so checking the (in,) sums finds it without a pass over the activations.
        if not bool(torch.isfinite(sq).all()):
            raise ValueError("activations contain NaN or Inf; check the model and calibration inputs")
        self.sum_sq = sq if self.sum_sq is None else self.sum_sq + sq.to(self.sum_sq.device)
        self.tokens += flat.shape[0]

    def act_norm(self) -> Tensor:
        """L2 norm of each input channel over all tokens seen (float32, or float64 where float32 overflows)."""
        if self.sum_sq is None:
            raise ValueError("the observer has seen no activations")
        norm = self.sum_sq.sqrt()
        return norm.float() if bool(norm.max() <= torch.finfo(torch.float32).max) else norm


@dataclass
class CalibrationStats:
    """Per-layer activation statistics, by module name."""

    observers: dict[str, ChannelObserver] = field(default_factory=dict)
    batches: int = 0
    # Linears that read the same input tensor (traced during calibrate(); see groups.py).
    input_groups: list[tuple[str, ...]] = field(default_factory=list)
    # (producers, consumers): linears joined by element-wise ops only (traced on the first batch; chains.py).
    chains: list[tuple[tuple[str, ...], tuple[str, ...]]] = field(default_factory=list)
    # attention value/output pairs (v_proj -> o_proj) with their head structure, proven on the first batch
    # (attention.py's AttentionLink)
    attention: list = field(default_factory=list)

    def __contains__(self, name: str) -> bool:
        obs = self.observers.get(name)
        return obs is not None and obs.tokens > 0

    def names(self) -> list[str]:
        return [n for n in self.observers if n in self]

    def act_norm(self, name: str) -> Tensor:
        """Per-input-channel L2 norm of the activations of the linear ``name``."""
        if name not in self.observers:
            raise KeyError(f"no calibration statistics for layer {name!r}; known: {sorted(self.observers)[:8]}...")
        if self.observers[name].tokens == 0:
            raise KeyError(f"layer {name!r} was never called during calibration")
        return self.observers[name].act_norm()

    def tokens(self, name: str) -> int:
        return self.observers[name].tokens if name in self.observers else 0


@contextlib.contextmanager
def observe_linears(
    model: nn.Module, filter_fn: Callable[[str, nn.Module], bool] | None = None
) -> Iterator[dict[str, ChannelObserver]]:
    """Attach a ChannelObserver to every (selected) nn.Linear or transformers Conv1D; hooks are always removed."""
    observers: dict[str, ChannelObserver] = {}
    handles = []
    try:
        for name, module in linear_like_modules(model):
            if filter_fn is not None and not filter_fn(name, module):
                continue
            obs = observers[name] = ChannelObserver(in_features_of(module))
            handles.append(module.register_forward_pre_hook(functools.partial(_observe, name, obs)))
        yield observers
    finally:
        for h in handles:
            h.remove()


def _observe(name: str, obs: ChannelObserver, _module: nn.Module, args: tuple) -> None:
    if not args or not isinstance(args[0], Tensor):
        raise ValueError(f"calibration: layer {name!r} was called without a tensor input")
    try:
        obs.add_batch(args[0])
    except ValueError as e:
        raise ValueError(f"calibration: layer {name!r}: {e}") from e


def run_batch(model: nn.Module, batch) -> object:
    """Call ``model`` on a batch: a dict as **kwargs, a tuple/list as *args, else the one argument."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def calibrate(
    model: nn.Module,
    batches: Iterable,
    *,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
    progress: bool = True,
) -> CalibrationStats:
    """Run ``model`` on each batch under no_grad and collect input statistics of every nn.Linear.

    Args:
        model: any nn.Module; it is not changed (hooks are removed afterwards).
        batches: an iterable of inputs (dict -> **kwargs, tuple -> *args, else one argument).
        filter_fn: ``(name, module) -> bool`` selecting the linears to observe.
        progress: show a tqdm progress bar.
    Returns:
        CalibrationStats with ``act_norm(name)`` per observed layer.
    """
    from tqdm.auto import tqdm

    from .attention import find_attention_links
    from .chains import ChainRecorder
    from .groups import InputGroupRecorder

    stats = CalibrationStats()
    with observe_linears(model, filter_fn) as observers, InputGroupRecorder(model, filter_fn) as rec, torch.no_grad():
        if not observers:
            raise ValueError("the model has no nn.Linear (or Conv1D) layers to calibrate (or filter_fn selected none)")
        total = len(batches) if hasattr(batches, "__len__") else None
        for i, batch in enumerate(tqdm(batches, total=total, desc="calibrate", disable=not progress, leave=False)):
            if batch is None:
                raise ValueError(f"calibration batch {i} is None: pass tensors, tuples or dicts of the model's inputs")
            run_batch(model, batch)
            stats.batches += 1
            if i == 0:
                first = batch
    if stats.batches == 0:
        raise ValueError("calibrate() got no batches: pass at least one calibration batch")
    stats.observers = observers
    stats.input_groups = rec.groups()
    # one more pass over the first batch, without the hooks above (their ops would count as uses)
    with ChainRecorder(model, filter_fn) as chains, torch.no_grad():
        run_batch(model, first)
    stats.chains = chains.chains()
    stats.attention = find_attention_links(model, first, filter_fn=filter_fn)
    unseen = [n for n, o in observers.items() if o.tokens == 0]
    if unseen:
        logger.warning("%d linear layers were never called during calibration: %s", len(unseen), unseen[:5])
    logger.info("calibrated %d linear layers on %d batches", len(observers) - len(unseen), stats.batches)
    return stats
