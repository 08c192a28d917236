"""Prune, at compile time, the linears that carry no recorded V:N:M state.

With ``options={"pattern": ...}`` a layer that sparsify_ never touched gets a
mask here: ABS from the weights alone, or Wanda/RIA from activation norms that
are collected by running the calibration batches through the captured graph
(an FX interpreter that observes every linear's input). The user's model is
never changed: the mask lives only in this compile's LinearSparsity and the
compressed weight built from it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, fx
from torch.utils.weak import WeakIdKeyDictionary

from ..calibration.importance import importance
from ..calibration.observer import CalibrationStats, ChannelObserver
from ..masks import vnm_mask
from ..state import LinearSparsity
from .context import CompileContext, LinearSite, placeholder_source, source_name

__all__ = ["prune_linears", "graph_act_norms"]

logger = logging.getLogger(__name__)

# weight Parameter -> (key, state): a recompile (new input shapes) reuses the ABS mask of the first compile.
_PRUNED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def prune_linears(gm: fx.GraphModule, ctx: CompileContext) -> bool:
    """Give every to-be-lowered site without state a mask from ``ctx.options`` (no graph change)."""
    opts = ctx.options
    todo = [s for s in ctx.to_lower() if s.state is None]
    if not todo:
        return False
    norms = _act_norms(gm, ctx, todo) if opts.score != "abs" else {}
    for site in todo:
        norm = norms.get(site.name)
        if opts.score != "abs" and norm is None:
            ctx.keep_dense(site, f"no calibration data for {opts.score} (layer not reached by the batches)")
            continue
        key = (site.weight._version, opts.pattern, opts.score)
        hit = _PRUNED.get(site.weight) if opts.score == "abs" else None
        if hit is not None and hit[0] == key:
            site.state = hit[1]
        else:
            with torch.no_grad():
                scores = importance(site.weight, opts.score, norm, opts.alpha)
                mask = vnm_mask(scores, opts.pattern)
            site.state = LinearSparsity(opts.pattern, mask, None, None, opts.score)
            if opts.score == "abs":
                _PRUNED[site.weight] = (key, site.state)
        site.origin = f"compile ({opts.score})"
    logger.debug("prune_linears: pruned %d linears at %s (%s)", len(todo), opts.pattern, opts.score)
    return False


def _act_norms(gm: fx.GraphModule, ctx: CompileContext, sites: list[LinearSite]) -> dict[str, Tensor]:
    cal = ctx.options.calibration
    if isinstance(cal, CalibrationStats):
        return {s.name: cal.act_norm(s.name) for s in sites if s.name in cal}
    return graph_act_norms(gm, ctx.example_inputs, cal, sites)


class _Observe(fx.Interpreter):
    """Runs the graph and feeds every observed linear call's input to its layer's ChannelObserver."""

    def __init__(self, gm: fx.GraphModule, observers: dict[fx.Node, ChannelObserver]) -> None:
        super().__init__(gm)
        self.observers = observers

    def run_node(self, n: fx.Node) -> Any:
        if n in self.observers:
            x = self.env[n.args[0]] if isinstance(n.args[0], fx.Node) else n.args[0]
            self.observers[n].add_batch(x)
        return super().run_node(n)


@torch.no_grad()
def graph_act_norms(
    gm: fx.GraphModule, example_inputs: list[Any], batches, sites: list[LinearSite]
) -> dict[str, Tensor]:
    """Per-input-channel activation norms of ``sites``, from the calibration batches run through ``gm``."""
    observers = {s.name: ChannelObserver(s.shape[1]) for s in sites}
    by_node = {node: observers[s.name] for s in sites for node in s.nodes}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    roots = _input_roots(placeholders)
    for i, batch in enumerate(batches):
        args = _graph_args(placeholders, example_inputs, roots, batch, i)
        try:
            _Observe(gm, by_node).run(*args)
        except (RuntimeError, ValueError, IndexError) as e:
            raise ValueError(
                f"calibration batch {i} could not run through the captured graph ({e}); calibration batches "
                "must be called like the compiled model and, for a statically captured graph, have its input shapes"
            ) from e
    return {name: obs.act_norm() for name, obs in observers.items() if obs.tokens > 0}


def _source(node: fx.Node):
    return placeholder_source(node)


def _root_local(source) -> str | None:
    from torch._dynamo.source import LocalSource

    while source is not None and not isinstance(source, LocalSource):
        source = getattr(source, "base", None)
    return None if source is None else source.local_name


def _is_state(source) -> bool:
    name = source_name(source) or ""
    return "_parameters" in name or "_buffers" in name or "['self']" in name


def _input_roots(placeholders: list[fx.Node]) -> list[str]:
    """The model's arguments, in the order the graph first reads them (tuple batches map onto these)."""
    roots: list[str] = []
    for p in placeholders:
        src = _source(p)
        root = _root_local(src)
        if root is not None and not _is_state(src) and root not in roots:
            roots.append(root)
    return roots


def _resolve(source, env: dict[str, Any]):
    """Evaluate a Dynamo Source against the batch's arguments (locals, items, attributes, sizes)."""
    from torch._dynamo import source as S

    if isinstance(source, S.LocalSource):
        return env[source.local_name]
    base = _resolve(source.base, env)
    if isinstance(source, (S.GetItemSource, S.DictGetItemSource)):
        return base[source.index]
    if isinstance(source, S.AttrSource):
        return getattr(base, source.member)
    if isinstance(source, S.TensorPropertySource):
        prop = source.prop.name.lower()
        if prop == "size":
            return base.size(source.idx)
        if prop == "stride":
            return base.stride(source.idx)
        return base.storage_offset()
    raise ValueError(f"cannot read graph input {source} from a calibration batch")


def _graph_args(placeholders, example_inputs, roots: list[str], batch, index: int) -> list[Any]:
    items = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
    if isinstance(batch, dict):
        env = {"kwargs": batch, **batch}  # **kwargs forwards read L['kwargs'][...]
    elif roots == ["args"]:  # a forward(*args) wrapper reads L['args'][i]
        env = {"args": items}
    else:
        if len(items) != len(roots):
            raise ValueError(
                f"calibration batch {index} has {len(items)} positional inputs but the graph reads {len(roots)} "
                f"({roots}); pass batches as dicts of the model's keyword arguments"
            )
        env = dict(zip(roots, items, strict=True))
    args = []
    for p, example in zip(placeholders, example_inputs, strict=False):
        src = _source(p)
        root = _root_local(src)
        if root is not None and root in env and not _is_state(src):
            try:
                args.append(_resolve(src, env))
            except (KeyError, IndexError, AttributeError) as e:
                raise ValueError(f"calibration batch {index}: cannot read graph input {p.name} ({e})") from e
        else:
            args.append(example)
    return args
