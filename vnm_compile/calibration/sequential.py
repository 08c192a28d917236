"""Layer-by-layer calibration: each block of a model calibrated on what the pruned blocks before it produce.

The driver is generic: it finds the model's repeated blocks (the children of
its largest nn.ModuleList holding linears: a transformers model's encoder or
decoder layers), captures the inputs of block 0 by running the model until
block 0 is called (an exception raised in a hook stops it), then for each
block:

1. traces, on the first batch, the order in which its linears are called and
   which of them read the same tensor (q/k/v, gate/up): one *stage* per
   group, in call order;
2. per stage, runs the block on every stored input with a hook on the stage's
   first linear accumulating H = XᵀX (hessian.py; the forward stops there;
   a dict batch's ``attention_mask`` keeps padded tokens out of H),
   and hands the stage to the caller's ``prune_group(names, observer)``, so a
   later stage (o_proj, down_proj) sees the already-pruned earlier ones;
3. runs the pruned block on every input: its outputs are the next block's inputs.

``sequential=False`` calibrates every stage on the dense model's inputs
instead (one pass per block collects every stage's H before anything in it is
pruned, and the next block gets the dense block's outputs), for comparison.

Linears outside the blocks (a pooler, a head) are calibrated at the end with
the whole model on the batches. A model without a ModuleList of linears is
one block whose inputs are the batches themselves.

Only one block's second moments are alive at a time (one per stage in
sequential mode), plus the stored block inputs and outputs (2 x tokens x
hidden; with dense targets the dense model's too and, per block, each stage
leader's dense input until its stage is pruned). Device placement stays with
the caller: ``before_block(index, name, block)`` may move a block onto the
GPU and ``after_block`` move it off (or compress it); stored inputs follow
the block's device.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .groups import InputGroupRecorder
from .hessian import HessianObserver
from .observer import run_batch

__all__ = ["find_blocks", "capture_block_inputs", "run_layerwise", "PruneGroup", "BlockCallback"]

logger = logging.getLogger(__name__)

PruneGroup = Callable[[tuple[str, ...], HessianObserver], None]
BlockCallback = Callable[[int, str, nn.Module], None]
# Keyword arguments that would make a block write into a KV cache on every calibration call.
_CACHE_KWARGS = {"past_key_value": None, "past_key_values": None, "layer_past": None, "use_cache": False}


class _Stop(Exception):
    """Raised in a hook to end a forward pass once the wanted input is seen."""


class _NotCalled(ValueError):
    """The first block was never called during a batch's forward pass."""


@dataclass
class _Call:
    args: tuple
    kwargs: dict


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The repeated blocks of ``model``: children of its largest nn.ModuleList that holds nn.Linear layers.

    Returns ``[("", model)]`` (the whole model, one block) when there is none.
    """
    best, best_size = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if not any(isinstance(m, nn.Linear) for m in module.modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = name, size
    if best is None:
        return [("", model)]
    blocks = model.get_submodule(best)
    return [(f"{best}.{i}", block) for i, block in enumerate(blocks)]


def _to(obj, device: torch.device):
    """``obj`` with every tensor in it (tuples, lists, dicts) moved to ``device``."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _device_of(module: nn.Module) -> torch.device | None:
    for p in module.parameters():
        return p.device
    return None


@torch.no_grad()
def capture_block_inputs(model: nn.Module, block: nn.Module, batches: Iterable) -> list[_Call]:
    """The (args, kwargs) each batch hands to ``block``; the model stops there (nothing after it runs)."""
    calls: list[_Call] = []

    def hook(_module, args, kwargs):
        kwargs = {k: _CACHE_KWARGS.get(k, v) for k, v in kwargs.items()}
        calls.append(_Call(tuple(args), kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            before = len(calls)
            with contextlib.suppress(_Stop):
                run_batch(model, batch)
            if len(calls) == before:
                raise _NotCalled("a calibration batch ran through the model without calling its first block")
    finally:
        handle.remove()
    if not calls:
        raise ValueError("no calibration batches: pass at least one batch as data")
    return calls


def _hidden(out):
    """The hidden states in a block's output (a tensor, or the first element of a tuple)."""
    if isinstance(out, (tuple, list)):
        return out[0]
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out


def _run(block: nn.Module, call: _Call):
    device = _device_of(block)
    args, kwargs = (call.args, call.kwargs) if device is None else (_to(call.args, device), _to(call.kwargs, device))
    return block(*args, **kwargs)


def _next_call(call: _Call, out) -> _Call:
    """The next block's input: this block's output in place of its hidden states, other arguments as they were."""
    hidden = _hidden(out)
    if call.args:
        return _Call((hidden,) + call.args[1:], call.kwargs)
    if "hidden_states" in call.kwargs:
        return _Call((), {**call.kwargs, "hidden_states": hidden})
    raise ValueError("cannot tell which argument of the block holds its hidden states")


def _stages(
    block: nn.Module, prefix: str, linears: Mapping[str, nn.Linear], call: _Call, whole_model: bool
) -> list[tuple[str, ...]]:
    """Groups of the block's selected linears that read one tensor, in the order they are first called."""
    names = {id(m): n for n, m in linears.items()}
    order: list[str] = []

    def record(module, _args):
        name = names.get(id(module))
        if name is not None and name not in order:
            order.append(name)

    def select(_name, module):
        return id(module) in names

    handles = [m.register_forward_pre_hook(record) for m in linears.values()]
    try:
        with InputGroupRecorder(block, select) as rec:
            run_batch(block, call.args[0]) if whole_model else _run(block, call)
    finally:
        for h in handles:
            h.remove()
    full = (lambda rel: rel) if whole_model else (lambda rel: f"{prefix}.{rel}")
    group_of = {}
    for group in rec.groups():
        members = tuple(full(n) for n in group)
        for n in members:
            group_of[n] = members
    missing = [n for n in linears if n not in order]
    if missing:
        logger.warning("%d selected linears of %s were not called on the first batch: %s", len(missing),
                       prefix or "the model", missing[:5])  # fmt: skip
    stages, done = [], set()
    for n in order:
        if n in done:
            continue
        group = tuple(m for m in group_of.get(n, (n,)) if m in linears)
        group = tuple(sorted(group, key=order.index))
        done.update(group)
        stages.append(group)
    return stages


def _token_mask(batch) -> Tensor | None:
    """A batch's attention mask (dict batches of transformers models): padded tokens stay out of H."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    return mask if isinstance(mask, Tensor) and mask.dim() == 2 else None


def _collect(
    block: nn.Module,
    calls: list[_Call],
    leaders: Mapping[str, nn.Linear],
    whole_model: bool,
    stop: bool,
    token_masks: list[Tensor | None],
) -> tuple[dict[str, HessianObserver], list]:
    """Run ``block`` on every call with an H observer on each leader; returns (observers, outputs or [])."""
    observers = {name: HessianObserver(m.in_features, name) for name, m in leaders.items()}
    current: list[Tensor | None] = [None]  # the token mask of the call being run

    def make_hook(obs: HessianObserver):
        def hook(_module, args):
            obs.add_batch(args[0], current[0])
            if stop:
                raise _Stop

        return hook

    if len(token_masks) != len(calls):
        raise ValueError(f"{len(calls)} calls but {len(token_masks)} token masks")
    handles = [m.register_forward_pre_hook(make_hook(observers[n])) for n, m in leaders.items()]

    def before(i: int) -> None:
        current[0] = token_masks[i]

    return observers, _run_hooked(block, calls, handles, whole_model, not stop, before)


def _run_hooked(
    block: nn.Module, calls: list[_Call], handles: list, whole_model: bool, keep_outputs: bool, before
) -> list:
    """Run ``block`` on each call (``before(i)`` first; a hook raising _Stop ends that call early),
    remove the hooks ``handles`` afterwards, and return the outputs if ``keep_outputs`` (else [])."""
    outputs = []
    try:
        for i, call in enumerate(calls):
            before(i)
            try:
                out = run_batch(block, call.args[0]) if whole_model else _run(block, call)
            except _Stop:
                continue
            if keep_outputs:
                outputs.append(out)
    finally:
        for h in handles:
            h.remove()
    return outputs


def _dense_inputs(
    block: nn.Module,
    dense_calls: list[_Call],
    leaders: Mapping[str, nn.Linear],
    whole_model: bool,
    want_outputs: bool,
) -> tuple[dict[str, list[Tensor | None]], list]:
    """One pass of the still-dense ``block`` over the dense model's inputs: per leader, its input on each
    call (None where it is not called; the first call of a forward counts), and the block's outputs if
    ``want_outputs`` (else the pass stops once every leader has been seen)."""
    seen: dict[str, list[Tensor | None]] = {name: [] for name in leaders}

    def make_hook(name: str):
        def hook(_module, args):
            got = seen[name]
            if got[-1] is None:
                got[-1] = args[0].detach().clone()  # later ops of the block may write into it in place
                if not want_outputs and all(v[-1] is not None for v in seen.values()):
                    raise _Stop

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in leaders.items()]

    def before(_i: int) -> None:
        for got in seen.values():
            got.append(None)

    return seen, _run_hooked(block, dense_calls, handles, whole_model, want_outputs, before)


def _collect_pairs(
    block: nn.Module,
    calls: list[_Call],
    leader: tuple[str, nn.Linear],
    dense_inputs: list[Tensor | None],
    whole_model: bool,
    token_masks: list[Tensor | None],
) -> HessianObserver:
    """One observer fed, call by call, the leader's input in ``block`` (pruned so far) and the dense
    block's input of the leader for the same tokens (``_dense_inputs``)."""
    name, module = leader
    obs = HessianObserver(module.in_features, name)
    seen: list[Tensor] = []

    def hook(_module, args):
        seen.append(args[0])
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        for call, dense, token_mask in zip(calls, dense_inputs, token_masks, strict=True):
            with contextlib.suppress(_Stop):
                run_batch(block, call.args[0]) if whole_model else _run(block, call)
            if not seen and dense is None:
                continue  # the leader is not called on this input (as _collect)
            if not seen or dense is None:
                raise RuntimeError(f"{name} was called in only one of the pruned and the dense block")
            obs.add_pair(seen.pop(), dense, token_mask)
    finally:
        handle.remove()
    return obs


@torch.no_grad()
def run_layerwise(
    model: nn.Module,
    batches: Iterable,
    linears: Mapping[str, nn.Linear],
    prune_group: PruneGroup,
    *,
    sequential: bool = True,
    before_block: BlockCallback | None = None,
    after_block: BlockCallback | None = None,
    progress: bool = True,
    dense_target: bool = False,
) -> None:
    """Calibrate and prune ``linears`` of ``model`` block by block (module docstring).

    Args:
        model: the model; its blocks are found by ``find_blocks``.
        batches: calibration batches (dict -> **kwargs, tuple -> *args, else the one argument).
        linears: the linears to prune, by name in ``model``; other linears run unchanged.
        prune_group: called once per group of linears reading one input, with their names
            and the HessianObserver of that input; it prunes them in place.
        sequential: calibrate on the pruned model's activations (True) or the dense model's (False).
        before_block, after_block: ``(index, name, block)`` callbacks around each block
            (e.g. move it to the GPU and back, or compress it).
        progress: tqdm bar over the blocks.
        dense_target: (sequential only) also run each block, before it is pruned, on the dense model's
            inputs, so each observer holds the pruned and the dense activations of the same tokens
            (``HessianObserver.add_pair``): the layer can then be fitted to the dense model's
            outputs. Costs one dense forward pass per block (run before the block is pruned) and,
            until its stage is pruned, each stage leader's dense input for every token.
    """
    from tqdm.auto import tqdm

    batches = list(batches)
    if not batches:
        raise ValueError("no calibration batches: pass at least one batch as data")
    blocks = find_blocks(model)
    calls = None
    if blocks[0][1] is not model:
        try:
            calls = capture_block_inputs(model, blocks[0][1], batches)
        except _NotCalled:  # e.g. a ModuleList of ModuleDicts: its entries are containers, not called blocks
            logger.info("%s is never called as a module; calibrating the whole model as one block", blocks[0][0])
            blocks = [("", model)]
    whole_model = blocks[0][1] is model
    token_masks = [_token_mask(b) for b in batches]
    if whole_model:
        calls = [_Call((b,), {}) for b in batches]
    inside = {n for n in linears for b, _ in blocks if whole_model or n.startswith(b + ".")}
    rest = {n: m for n, m in linears.items() if n not in inside}
    dense_target = dense_target and sequential
    dense_calls = list(calls) if dense_target else None
    if rest and not sequential:  # dense-input mode: their H comes from the dense model, before anything is pruned
        rest_obs = _collect_rest(model, batches, rest, progress)
    for index, (name, block) in enumerate(tqdm(blocks, desc="prune blocks", disable=not progress, leave=False)):
        if before_block is not None:
            before_block(index, name, block)
        own = {n: m for n, m in linears.items() if whole_model or n.startswith(name + ".")}
        stages = _stages(block, name, own, calls[0], whole_model) if own else []
        if sequential:
            last = index == len(blocks) - 1
            if dense_target and stages:  # the dense block's side, once per block, before anything in it is pruned
                leaders = {s[0]: own[s[0]] for s in stages}
                dense_in, dense_outputs = _dense_inputs(block, dense_calls, leaders, whole_model, not last)
            elif dense_target and not last:
                dense_outputs = [_run(block, c) for c in dense_calls]
            if dense_target and not last:  # the dense model's inputs of the next block
                dense_calls = [_next_call(c, o) for c, o in zip(dense_calls, dense_outputs, strict=True)]
                del dense_outputs
            for stage in stages:
                if dense_target:
                    leader = (stage[0], own[stage[0]])
                    obs = _collect_pairs(block, calls, leader, dense_in.pop(stage[0]), whole_model, token_masks)
                else:
                    obs = _collect(block, calls, {stage[0]: own[stage[0]]}, whole_model, True, token_masks)[0][stage[0]]
                prune_group(stage, obs)
                del obs
            # (the last block's outputs stand in for the blocks when the linears after them are calibrated)
            outputs = [] if last and not rest else [_run(block, c) for c in calls]
        else:
            leaders = {s[0]: own[s[0]] for s in stages}
            observers, outputs = _collect(block, calls, leaders, whole_model, False, token_masks)
            for stage in stages:
                prune_group(stage, observers.pop(stage[0]))
        if index < len(blocks) - 1:
            calls = [_next_call(c, o) for c, o in zip(calls, outputs, strict=True)]
        if after_block is not None:
            after_block(index, name, block)
    if rest:
        if sequential:
            rest_obs = _collect_rest(model, batches, rest, progress, None if whole_model else (blocks, outputs))
        for group, obs in rest_obs:
            prune_group(group, obs)


class _Replay(nn.Module):
    """Stands in for a block: returns the given outputs, one per call, in order (the block does not run)."""

    def __init__(self, outputs: list) -> None:
        super().__init__()
        self._outputs = iter(outputs)

    def forward(self, *_args, **_kwargs):
        out = next(self._outputs, None)
        if out is None:
            raise RuntimeError("a block stand-in was called more often than the block's recorded outputs")
        return out


@contextlib.contextmanager
def _standing_in(model: nn.Module, blocks: list[tuple[str, nn.Module]], outputs: list):
    """Every block of ``model`` replaced by a ``_Replay`` of ``outputs`` (the last block's), restored after."""
    saved = []
    try:
        for name, block in blocks:
            parent, _, key = name.rpartition(".")
            parent = model.get_submodule(parent)
            saved.append((parent, key, block))
            setattr(parent, key, _Replay(outputs))
        yield
    finally:
        for parent, key, block in saved:
            setattr(parent, key, block)


def _collect_replayed(model, calls, leaders, token_masks, blocks, outputs) -> dict[str, HessianObserver] | None:
    """The observers of ``_collect`` over the whole model with its blocks replaced by the last block's
    ``outputs``, or None unless that gives the first batch's H exactly as the whole model does."""
    first = _collect(model, calls[:1], leaders, True, False, token_masks[:1])[0]
    try:
        with _standing_in(model, blocks, outputs[:1]):
            replayed = _collect(model, calls[:1], leaders, True, False, token_masks[:1])[0]
        for name, obs in first.items():
            ref, got = obs.hessian, replayed[name].hessian
            if (ref is None) != (got is None) or (ref is not None and not torch.allclose(got, ref, 1e-5, 1e-7)):
                logger.info("the linears after the blocks see other inputs with the blocks replayed; running them all")
                return None
        with _standing_in(model, blocks, outputs):
            return _collect(model, calls, leaders, True, False, token_masks)[0]
    except (RuntimeError, TypeError, AttributeError, IndexError, KeyError, ValueError) as e:
        logger.info("replaying the blocks' outputs failed (%s); running them all", e)
        return None


def _collect_rest(
    model: nn.Module,
    batches: list,
    rest: Mapping[str, nn.Linear],
    progress: bool,
    replay: tuple[list[tuple[str, nn.Module]], list] | None = None,
) -> list:
    """(group, observer) for the linears outside the blocks, from whole-model passes over the batches.

    ``replay`` = (the blocks, the last block's outputs on every batch): the blocks are replaced by
    those outputs, so only the model's code before and after them runs, when that gives the first
    batch's H exactly as the whole model does (not, e.g., for a model that changes its hidden
    states between blocks or reads its blocks' attributes, which run in full).
    """
    stages = _stages(model, "", rest, _Call((batches[0],), {}), whole_model=True)
    leaders = {s[0]: rest[s[0]] for s in stages}
    calls = [_Call((b,), {}) for b in batches]
    token_masks = [_token_mask(b) for b in batches]
    observers = None if replay is None else _collect_replayed(model, calls, leaders, token_masks, *replay)
    if observers is None:
        observers, _ = _collect(model, calls, leaders, True, False, token_masks)
    return [(s, observers[s[0]]) for s in stages]
