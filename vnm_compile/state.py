"""Where sparsify_ records each linear's V:N:M state for the compiler, export and training.

The state is a LinearSparsity on the nn.Linear (attribute ``vnm_sparsity``) whose tensors are also the
module's buffers ``vnm_mask`` (bool), ``vnm_pattern`` (int64 [v, n, m]) and, when present,
``vnm_in_perm`` / ``vnm_out_perm`` / ``vnm_links`` (joint permutations): so ``state_dict()`` /
``load_state_dict()`` (in place or with ``assign=True``), ``torch.save`` / ``torch.load`` and ``copy.deepcopy`` carry it (apex ASP keeps its masks
the same way). torch.compile hands the backend parameters, not modules, so the state is also indexed by
the weight Parameter (weakly); a new Parameter set on the module (``load_state_dict(assign=True)``, a
parameter swap) is indexed again by a global parameter-registration hook, and an unpickled state indexes
the weight it was pickled with.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from .format import VNMWeight
from .pattern import VNMPattern

__all__ = [
    "LinearSparsity",
    "ATTR",
    "BUFFERS",
    "get_sparsity",
    "set_sparsity",
    "clear_sparsity",
    "sparsity_state_dict",
    "load_sparsity_",
    "unique_linears",
    "sparse_linears",
]

ATTR = "vnm_sparsity"
# LinearSparsity field -> the module buffer that holds it
BUFFERS = {"mask": "vnm_mask", "in_perm": "vnm_in_perm", "out_perm": "vnm_out_perm", "links": "vnm_links"}
PATTERN_BUFFER = "vnm_pattern"
_BY_WEIGHT: WeakIdKeyDictionary = WeakIdKeyDictionary()


@dataclass
class LinearSparsity:
    """A linear's V:N:M state: the mask in original coordinates and the permutations
    in which it obeys the pattern (``mask[out_perm][:, in_perm]``).

    ``links`` (int64 [in_linked, out_linked], or None): the input permutation is the output permutation of
    the linears producing x through element-wise ops only, or the output permutation is the input
    permutation of the linear(s) consuming y that way (sparsify_'s joint_permutations): the permuted
    forms (VNMLinear, the compiled graph) then pass the activation between them in permuted order.
    """

    pattern: VNMPattern
    mask: Tensor
    in_perm: Tensor | None = None
    out_perm: Tensor | None = None
    score: str = "abs"
    links: Tensor | None = None

    @property
    def in_linked(self) -> bool:
        return self.links is not None and bool(self.links[0])

    @property
    def out_linked(self) -> bool:
        return self.links is not None and bool(self.links[1])

    def compress(self, weight: Tensor) -> VNMWeight:
        """The weight in the kernels' compressed format, permutations folded in."""
        return VNMWeight.from_dense(weight, self.mask, self.pattern, in_perm=self.in_perm, out_perm=self.out_perm)

    # copy.deepcopy(model) copies the module's _parameters before this attribute (set later), so the
    # copied weight is already in ``memo``: index the copied state under it, or the compiler, which
    # sees weights only, would find no state in a deep-copied model.
    def __deepcopy__(self, memo: dict) -> LinearSparsity:
        new = LinearSparsity(**{f.name: copy.deepcopy(getattr(self, f.name), memo) for f in fields(self)})
        memo[id(self)] = new
        for key in ("_weight", "_module"):
            ref = self.__dict__.get(key)
            old = ref() if ref is not None else None
            copied = memo.get(id(old)) if old is not None else None
            if copied is not None:
                new.__dict__[key] = weakref.ref(copied)
        weight = new.__dict__.get("_weight")
        if weight is not None and weight() is not None:
            _BY_WEIGHT[weight()] = new
        return new

    # Pickled with strong references to its weight and module (the pickler's memo keeps them the very
    # objects the module holds), so that loading indexes the loaded weight again.
    def __getstate__(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k not in ("_weight", "_module")}
        for key in ("_weight", "_module"):
            ref = self.__dict__.get(key)
            state[key + "_strong"] = ref() if ref is not None else None
        return state

    def __setstate__(self, state: dict) -> None:
        weight, module = state.pop("_weight_strong", None), state.pop("_module_strong", None)
        self.__dict__.update(state)
        if module is not None:
            self.__dict__["_module"] = weakref.ref(module)
        if isinstance(weight, Tensor):
            _index(weight, self)


def _index(weight: Tensor, state: LinearSparsity) -> None:
    _BY_WEIGHT[weight] = state
    state.__dict__["_weight"] = weakref.ref(weight)


def _register_buffers(module: nn.Module, state: LinearSparsity) -> None:
    for field, name in BUFFERS.items():
        value = getattr(state, field)
        if value is None:
            module._buffers.pop(name, None)
        else:
            module._buffers[name] = value
    p = state.pattern
    old = module._buffers.get(PATTERN_BUFFER)
    device = state.mask.device
    if old is None or old.tolist() != [p.v, p.n, p.m]:
        module._buffers[PATTERN_BUFFER] = torch.tensor([p.v, p.n, p.m], dtype=torch.int64, device=device)


def set_sparsity(module: nn.Linear, state: LinearSparsity, *, index: bool = True) -> None:
    """Record ``state`` on ``module``: the attribute, its buffers and (``index``) the weight's index entry.

    ``index=False`` leaves the weight alone (a parametrized weight would be evaluated to index it)."""
    setattr(module, ATTR, state)
    state.__dict__["_module"] = weakref.ref(module)
    _register_buffers(module, state)
    if index:
        _index(module.weight, state)


def _sync(module: nn.Module, state: LinearSparsity) -> LinearSparsity:
    """Adopt buffers replaced behind the state's back (``load_state_dict(assign=True)``, ``module.to``)."""
    buffers = module._buffers
    for field, name in BUFFERS.items():
        value = buffers.get(name)
        if value is not None and value is not getattr(state, field):
            setattr(state, field, value)
    pattern = buffers.get(PATTERN_BUFFER)
    if pattern is not None:
        v, n, m = (int(x) for x in pattern.tolist()) if pattern.device.type != "meta" else (0, 0, 0)
        if m and (v, n, m) != (state.pattern.v, state.pattern.n, state.pattern.m):
            state.pattern = VNMPattern(v, n, m)
    return state


def get_sparsity(obj: nn.Module | Tensor) -> LinearSparsity | None:
    """The recorded state of a linear module, or of its weight Parameter."""
    if isinstance(obj, nn.Module):
        state = getattr(obj, ATTR, None)
        if state is None:
            return None
        state.__dict__["_module"] = weakref.ref(obj)
        if "weight" in obj._parameters and obj._parameters["weight"] is not None:
            _index(obj._parameters["weight"], state)  # re-index after a parameter swap
        return _sync(obj, state)
    state = _BY_WEIGHT.get(obj)
    if state is not None:
        ref = state.__dict__.get("_module")
        module = ref() if ref is not None else None
        if module is not None:
            _sync(module, state)
    return state


def _on_parameter(module: nn.Module, name: str, param):
    """Global parameter-registration hook: a new weight of a sparsified linear is indexed to its state."""
    state = module.__dict__.get(ATTR)
    if name == "weight" and state is not None and isinstance(param, Tensor):
        _index(param, state)
    return None


nn.modules.module.register_module_parameter_registration_hook(_on_parameter)


def clear_sparsity(module: nn.Module) -> None:
    """Forget ``module``'s V:N:M state (attribute, buffers, index); its weights stay as they are."""
    state = getattr(module, ATTR, None)
    if state is not None:
        delattr(module, ATTR)
        for name in (*BUFFERS.values(), PATTERN_BUFFER):
            module._buffers.pop(name, None)
        if "weight" in module._parameters:
            _BY_WEIGHT.pop(module._parameters["weight"], None)


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
    present) and ``<module>.vnm_pattern`` (int64 [v, n, m]): the same keys and tensors the model's own
    ``state_dict()`` holds for them. A tensor two layers share (one input permutation for q/k/v) is
    copied for every layer after the first, since safetensors refuses tensors that share memory.
    ``load_sparsity_`` restores it.
    """
    out: dict[str, Tensor] = {}
    seen: set[tuple] = set()
    for name, module in model.named_modules():
        state = get_sparsity(module)
        if state is None:
            continue
        p = state.pattern
        entries = {"vnm_mask": state.mask, "vnm_in_perm": state.in_perm, "vnm_out_perm": state.out_perm,
                   "vnm_links": state.links, "vnm_pattern": torch.tensor([p.v, p.n, p.m], dtype=torch.int64)}  # fmt: skip
        for key, t in entries.items():
            if t is None:
                continue
            sig = (t.device, t.untyped_storage().data_ptr()) if t.device.type != "meta" else (id(t),)
            out[f"{name}.{key}"] = t.clone() if sig in seen else t
            seen.add(sig)
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
        links = state_dict.get(f"{name}.vnm_links")
        if not is_vnm(mask, pattern, in_perm, out_perm):
            raise ValueError(f"saved mask for {name!r} does not obey {pattern}")
        if apply_mask:
            with torch.no_grad():
                module.weight.mul_(mask.to(module.weight.dtype))
        set_sparsity(module, LinearSparsity(pattern, mask, in_perm, out_perm, links=links))
    return names
