"""Finding linears whose outputs reach the next linear through element-wise ops only (MLP chains).

In a gated MLP, ``down_proj(act(gate_proj(x)) * up_proj(x))``, and in a plain one, ``fc2(act(fc1(x)))``,
every op between the producers (gate/up, fc1) and the consumer (down, fc2) acts on each channel alone.
Permuting the producers' output channels by P and the consumer's input channels by the same P then leaves
the function unchanged, so one permutation chosen for both sides costs no index op at run time: the
producers write their output in P order and the consumer reads it as it is (sparsify_'s
``joint_permutations``; the backend's cancel_permutations pass and VNMLinear skip both index ops).

Found by tracing, as the input groups are (groups.py): a TorchFunctionMode follows the tensors of one
forward pass. Outputs of ``F.linear`` calls of known linears are chain tensors; an element-wise op whose
tensor operands are chain tensors or broadcast along the channels (last dim 1, or one element) makes a
chain tensor with the union of their producers; any other use of a chain tensor (a reshape, a norm, a
chunk along the channels, a per-channel scale, a linear that is not selected) disqualifies its
producers. A linear reading a chain tensor is that chain's consumer. Only uses through torch functions
are seen: an MLP whose intermediate leaves through Python (a returned hidden state) is not caught; such a
model should not pass ``joint_permutations`` (the compiled path checks the graph itself and then keeps the
index ops).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..linears import linear_like_modules

__all__ = ["ChainRecorder", "find_chains", "ELEMENTWISE"]

logger = logging.getLogger(__name__)

# Torch functions (by __name__) that act on each channel alone, given operands broadcast along the channels.
ELEMENTWISE = frozenset(
    [
        "gelu",
        "silu",
        "relu",
        "relu6",
        "leaky_relu",
        "elu",
        "selu",
        "celu",
        "mish",
        "softplus",
        "hardswish",
        "hardsigmoid",
        "hardtanh",
        "sigmoid",
        "tanh",
        "logsigmoid",
        "erf",
        "erfc",
        "exp",
        "expm1",
        "log",
        "log1p",
        "sqrt",
        "rsqrt",
        "square",
        "abs",
        "neg",
        "reciprocal",
        "sin",
        "cos",
        "clamp",
        "clamp_min",
        "clamp_max",
        "mul",
        "add",
        "sub",
        "div",
        "true_divide",
        "pow",
        "where",
        "dropout",
        "alpha_dropout",
        "to",
        "float",
        "half",
        "bfloat16",
        "double",
        "type_as",
        "contiguous",
        "clone",
        "detach",
        "__mul__",
        "__rmul__",
        "__add__",
        "__radd__",
        "__sub__",
        "__rsub__",
        "__truediv__",
        "__rtruediv__",
        "__pow__",
        "__rpow__",
        "__neg__",
        "__abs__",
        "mul_",
        "add_",
        "sub_",
        "div_",
        "relu_",
        "gelu_",
        "silu_",
        "tanh_",
        "sigmoid_",
        "clamp_",
    ]
)
_LINEAR = torch.nn.functional.linear
_IGNORED = frozenset(
    {"__get__", "__set__", "size", "dim", "numel", "__len__", "is_floating_point", "_set_grad_enabled"}
)


def _tensors(obj, out: list[Tensor]) -> list[Tensor]:
    if isinstance(obj, Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _tensors(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _tensors(o, out)
    return out


class ChainRecorder(TorchFunctionMode):
    """Context manager: records chains producer linears -> element-wise ops -> consumer linear(s).

    Example::

        with ChainRecorder(model) as rec:
            model(**batch)
        rec.chains()  # [(("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)), ...]
    """

    def __init__(self, model: nn.Module, filter_fn: Callable[[str, nn.Module], bool] | None = None) -> None:
        super().__init__()
        self._by_weight: dict[int, str] = {}
        for name, module in linear_like_modules(model):
            if filter_fn is None or filter_fn(name, module):
                self._by_weight.setdefault(id(module.weight), name)
        self._roots: dict[int, tuple[weakref.ref, frozenset[str]]] = {}  # chain tensor id -> producers
        self._consumers: dict[frozenset[str], list[str]] = {}
        self._escaped: set[str] = set()
        self._width: dict[str, int] = {}

    def _producers(self, t: Tensor) -> frozenset[str] | None:
        hit = self._roots.get(id(t))
        return hit[1] if hit is not None and hit[0]() is t else None

    def _mark(self, t: Tensor, roots: frozenset[str]) -> None:
        self._roots[id(t)] = (weakref.ref(t), roots)
        if len(self._roots) > 4096:  # drop entries of freed tensors
            self._roots = {k: v for k, v in self._roots.items() if v[0]() is not None}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in _IGNORED:
            return out
        inputs = _tensors(args, []) + _tensors(kwargs, [])
        chained = [(t, r) for t in inputs if (r := self._producers(t)) is not None]
        if func is _LINEAR:
            x, weight = args[0] if args else kwargs.get("input"), args[1] if len(args) > 1 else kwargs.get("weight")
            layer = self._by_weight.get(id(weight))
            roots = self._producers(x) if isinstance(x, Tensor) else None
            if roots is not None:
                if layer is None or any(r is not roots for t, r in chained if t is not x):
                    self._escaped |= roots
                elif layer not in self._consumers.setdefault(roots, []):
                    self._consumers[roots].append(layer)
            if layer is not None and isinstance(out, Tensor):
                self._mark(out, frozenset((layer,)))
                self._width[layer] = out.shape[-1]
            return out
        if not chained:
            return out
        roots = frozenset().union(*(r for _, r in chained))
        width = chained[0][0].shape[-1] if chained[0][0].dim() else 0
        broadcast = all(
            self._producers(t) is not None or t.dim() == 0 or t.shape[-1] == 1 or t.numel() == 1 for t in inputs
        )
        same = all(t.dim() and t.shape[-1] == width for t, _ in chained)
        if name in ELEMENTWISE and broadcast and same and isinstance(out, Tensor) and out.shape[-1:] == (width,):
            self._mark(out, roots)
        else:
            self._escaped |= roots
        return out

    def chains(self) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
        """(producers, consumers) pairs: the producers' outputs reach only the consumers, through element-wise
        ops; every producer belongs to one chain. Producers and consumers in model (call) order."""
        owner: dict[str, int] = {}
        found = []
        for roots, consumers in self._consumers.items():
            if roots & self._escaped or not consumers:
                continue
            widths = {self._width.get(p) for p in roots}
            if len(widths) != 1:
                continue
            order = {n: i for i, n in enumerate(self._width)}
            found.append((tuple(sorted(roots, key=order.__getitem__)), tuple(consumers)))
            for p in roots:
                owner[p] = owner.get(p, 0) + 1
        # a producer reaching two different consumer sets (through two root sets) is in no chain
        return [c for c in found if all(owner[p] == 1 for p in c[0]) and not set(c[1]) & {p for p in owner}]


@torch.no_grad()
def find_chains(
    model: nn.Module, batch, *, filter_fn: Callable[[str, nn.Module], bool] | None = None
) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """Run ``model`` on one example batch and return its chains ``(producers, consumers)`` (module docstring)."""
    from .observer import run_batch

    with ChainRecorder(model, filter_fn) as rec:
        run_batch(model, batch)
    chains = rec.chains()
    logger.info("found %d chains of linears joined by element-wise ops", len(chains))
    return chains
