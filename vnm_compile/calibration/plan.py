"""One pattern per layer under one global budget (issue 29): ``plan_patterns``.

``select_pattern`` picks one V:N:M for the whole model. Layers differ: a wide MLP projection may gain
1.8x at 64:2:8 while a small attention projection loses at every pattern, and pruning one layer may cost
more accuracy than pruning another. Given

* the measured speed-up of each candidate pattern per layer shape and token count (a ``vnm bench``
  linear.json or a shipped dispatch table, a ``{((out, in), pattern, tokens): speed-up}`` dict, a
  ``speedups.json`` ``{pattern: speed-up}``, or a function),
* the user's token mix: how often each token count runs (decode steps at batch b, prefill lengths),
* an accuracy cost per layer and pattern (``layer_costs``: importance lost, or the relative output error
  from second moments; any non-negative number that adds up over layers),

``plan_patterns`` picks one pattern (or dense) per layer to reach a target speed-up at the least total
cost, or the most speed within a total cost.

The time model. A layer (out x in) at t tokens takes dense time ``dense_time(out, in, t)``, by default the
roofline max(weight bytes / bandwidth, FLOPs / peak) in units of one weight read: out * in * max(1, t /
RIDGE_TOKENS) (H100 SXM fp16: 990 TFLOP/s / 3.35 TB/s = 295 tokens). With pattern p it takes dense /
speed-up(p, t), or the dense time where that speed-up is below ``min_speedup`` (the compiled model runs
such token counts dense). The layer's time over the mix is sum_t w_t * time_t; the model's is the sum over
layers, plus ``other_fraction`` of the dense model's time that no linear holds (attention, norms),
which no pattern shortens. Speed-up = dense model time / planned model time.

The algorithm (a multiple-choice knapsack, solved greedily on convex hulls):

1. per layer, the options (dense: time saved 0, cost 0; each pattern: time saved, cost); options that
   save no time, or that another option beats on both, are dropped;
2. per layer, the lower convex hull of cost against time saved: the upgrades dense -> p1 -> p2 ... each
   with its marginal cost per unit of time saved, increasing along the hull;
3. all layers' upgrades sorted by that marginal cost, cheapest first (within a layer in hull order);
4. a speed-up target takes upgrades in that order until the planned time meets it (a ValueError names
   the fastest reachable speed-up when none does); a cost budget takes every upgrade that still fits,
   in the same order (an upgrade that does not fit ends that layer's upgrades).

This is the LP relaxation's order: optimal at every hull point it passes and off by at most the last
upgrade taken (a layer's one step) elsewhere. Options inside a layer's hull (never the cheapest way to
save their time) are never chosen.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

from ..pattern import VNMPattern, as_pattern

__all__ = [
    "plan_patterns",
    "PatternPlan",
    "LayerPlan",
    "layer_costs",
    "speed_model",
    "save_layer_costs",
    "load_layer_costs",
    "RIDGE_TOKENS",
]

# A pattern runs at a token count only where it is at least this much faster (kernels.dispatch.MIN_SPEEDUP;
# not imported: that would load the kernels package).
MIN_SPEEDUP = 1.1
# Tokens at which a dense fp16 GEMM turns from memory- to compute-bound (H100 SXM: 990 TFLOP/s / 3.35 TB/s).
RIDGE_TOKENS = 295

SpeedFn = Callable[[int, int, VNMPattern, int], "float | None"]


def roofline_time(out_features: int, in_features: int, tokens: int) -> float:
    """Dense time of one layer in units of one weight read: out * in * max(1, tokens / RIDGE_TOKENS)."""
    return out_features * in_features * max(1.0, tokens / RIDGE_TOKENS)


def speed_model(speed) -> SpeedFn:
    """A function (out, in, pattern, tokens) -> speed-up over dense (None: not measured) from any of:

    * a linear.json / dispatch table (``{"records": [...]}``): the nearest measured shape, token count
      and pattern, as the dispatcher reads it (kernels.dispatch), the faster of the Triton kernels and
      the sparse tensor cores where both were measured;
    * ``{((out, in), pattern, tokens): speed-up}``: the same nearest lookup over those points;
    * ``{pattern: speed-up}`` (speedups.json): that speed-up for every shape and token count;
    * a function (out, in, pattern, tokens) -> speed-up or None.
    """
    if callable(speed):
        return speed
    if not isinstance(speed, Mapping) or not speed:
        raise ValueError(f"speed must be a non-empty table or a function, got {type(speed).__name__}")
    if "records" in speed:
        return _table_speed(speed)
    keys = list(speed)
    if all(isinstance(k, tuple) for k in keys):
        records: dict[tuple[int, int, int], dict[str, float]] = {}
        for key, value in speed.items():
            if len(key) != 3 or len(key[0]) != 2:
                raise ValueError(f"speed keys must be ((out, in), pattern, tokens), got {key!r}")
            (out, inp), pattern, tokens = key
            _check_speedup(key, value)
            records.setdefault((int(out), int(inp), int(tokens)), {})[str(as_pattern(pattern))] = 1.0 / value
        table = {"records": [{"out_features": o, "in_features": i, "tokens": t, "dense_us": 1.0, "vnm_us": us}
                             for (o, i, t), us in records.items()]}  # fmt: skip
        return _table_speed(table)
    flat = {}
    for key, value in speed.items():
        _check_speedup(key, value)
        flat[as_pattern(key)] = float(value)
    return lambda out, inp, pattern, tokens: flat.get(pattern)


def _check_speedup(key, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"speed-up of {key!r} must be a positive finite number, got {value!r}")


def _table_speed(table: Mapping) -> SpeedFn:
    """The faster of the Triton kernels and the sparse tensor cores (measured as ``vnm_tc_us``; the compiler
    uses them by default for n = 2 and V a multiple of 64) at the nearest measured shape, tokens and pattern."""
    from ..kernels.dispatch import _log_dist, _speedups_by_tokens

    def speed(out: int, inp: int, pattern: VNMPattern, tokens: int) -> float | None:
        kernels = [False] + [True] * (pattern.n == 2 and not pattern.is_nm and pattern.v % 64 == 0)
        best = None
        for tc in kernels:
            by_tokens = _speedups_by_tokens(table, out, inp, pattern, tc=tc)
            if by_tokens:
                s = by_tokens[min(by_tokens, key=lambda t: _log_dist(t, tokens))]
                best = s if best is None else max(best, s)
        return best

    return speed


@dataclass
class LayerPlan:
    """One layer's choice: its pattern (None: dense), expected time and accuracy cost."""

    name: str
    shape: tuple[int, int]
    pattern: VNMPattern | None
    dense_time: float  # over the token mix, in roofline units (see the module docstring)
    time: float
    cost: float
    note: str = ""

    @property
    def speedup(self) -> float:
        return self.dense_time / self.time


@dataclass
class PatternPlan:
    """The chosen pattern per layer and what the plan expects: ``layer_patterns`` feeds VNMConfig."""

    layers: list[LayerPlan]
    dense_time: float  # the whole model's, ``other_fraction`` included
    time: float
    target_speedup: float | None = None
    max_cost: float | None = None
    token_mix: dict[int, float] = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        return self.dense_time / self.time

    @property
    def cost(self) -> float:
        return sum(r.cost for r in self.layers)

    @property
    def layer_patterns(self) -> dict[str, str]:
        """{layer name: pattern or "dense"}, for ``VNMConfig(layer_patterns=...)``."""
        return {r.name: "dense" if r.pattern is None else str(r.pattern) for r in self.layers}

    def __getitem__(self, name: str) -> LayerPlan:
        for r in self.layers:
            if r.name == name:
                return r
        raise KeyError(name)

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for r in self.layers:
            key = "dense" if r.pattern is None else str(r.pattern)
            counts[key] = counts.get(key, 0) + 1
        goal = (
            f"target {self.target_speedup:g}x" if self.target_speedup is not None else f"cost budget {self.max_cost:g}"
        )
        mix = ", ".join(f"{t} tokens x{w:g}" for t, w in self.token_mix.items())
        return f"{goal} at {mix}: expected {self.speedup:.3f}x, total cost {self.cost:.4g}; " + ", ".join(
            f"{n} {p}" for p, n in counts.items()
        )

    def table(self) -> str:
        head = f"{'layer':<48} {'shape':>12} {'pattern':>9} {'speed-up':>9} {'cost':>9}  note"
        lines = [head, "-" * len(head)]
        for r in self.layers:
            pattern = "dense" if r.pattern is None else str(r.pattern)
            lines.append(f"{r.name:<48} {f'{r.shape[0]}x{r.shape[1]}':>12} {pattern:>9} {r.speedup:>9.3f} "
                         f"{r.cost:>9.4g}  {r.note}")  # fmt: skip
        return "\n".join(lines + [self.summary()])

    def __str__(self) -> str:
        return self.table()


@dataclass
class _Option:
    pattern: VNMPattern | None
    saved: float  # time saved vs dense over the mix
    cost: float


def _hull(options: list[_Option]) -> list[_Option]:
    """The lower convex hull of cost against time saved, from dense (0, 0) up (step 2 of the docstring)."""
    hull = [_Option(None, 0.0, 0.0)]
    for o in sorted((o for o in options if o.saved > 0), key=lambda o: (o.saved, o.cost)):
        while len(hull) > 1 and hull[-1].cost >= o.cost:  # saves less for as much: dominated by o
            hull.pop()
        if o.saved == hull[-1].saved:  # saves as much for more (the cheaper came first)
            continue
        while len(hull) >= 2:  # the last point on or above the segment to o is not on the lower hull
            a, b = hull[-2], hull[-1]
            if (b.cost - a.cost) * (o.saved - a.saved) >= (o.cost - a.cost) * (b.saved - a.saved):
                hull.pop()
            else:
                break
        hull.append(o)
    return hull


def plan_patterns(
    layers: nn.Module | Mapping[str, tuple[int, int]],
    speed,
    accuracy_cost: Mapping[str, Mapping[VNMPattern | str, float]],
    *,
    target_speedup: float | None = None,
    max_cost: float | None = None,
    token_mix: Mapping[int, float] | None = None,
    other_fraction: float = 0.0,
    dense_time: Callable[[int, int, int], float] = roofline_time,
    min_speedup: float = MIN_SPEEDUP,
) -> PatternPlan:
    """Choose one pattern (or dense) per layer under one global budget (module docstring: time model, algorithm).

    Args:
        layers: the model (its nn.Linear layers, (out, in) from their weights) or ``{name: (out, in)}``.
        speed: measured speed-ups (``speed_model`` lists the accepted forms).
        accuracy_cost: ``{layer: {pattern: cost}}`` (``layer_costs``); a layer's candidates are the patterns
            listed for it; layers not listed stay dense. Costs must be >= 0 (dense costs 0).
        target_speedup: the speed-up the model must reach, at the least total cost; or
        max_cost: the total cost allowed, for the most speed (exactly one of the two).
        token_mix: ``{tokens: weight}``, how often each token count runs (default ``{1: 1}``, decode at
            batch 1); e.g. ``{1: 256, 2048: 1}``: 256 decode steps per 2048-token prefill.
        other_fraction: the dense model's time share outside these linears (attention, norms): 0..1.
        dense_time: (out, in, tokens) -> the dense layer's time (default: the roofline, roofline_time).
        min_speedup: at a token count where a pattern's speed-up is below this, the layer runs dense there
            (the compiled model's hybrid dispatch: kernels.dispatch.MIN_SPEEDUP), so it counts as 1.

    Raises:
        ValueError: on bad arguments, or when no choice reaches ``target_speedup`` (naming the fastest).
    """
    if (target_speedup is None) == (max_cost is None):
        raise ValueError("plan_patterns needs exactly one budget: target_speedup=... or max_cost=...")
    if target_speedup is not None and not (math.isfinite(target_speedup) and target_speedup > 0):
        raise ValueError(f"target_speedup must be a positive number, got {target_speedup!r}")
    if max_cost is not None and not (math.isfinite(max_cost) and max_cost >= 0):
        raise ValueError(f"max_cost must be a number >= 0, got {max_cost!r}")
    if not 0 <= other_fraction < 1:
        raise ValueError(f"other_fraction must be in [0, 1), got {other_fraction!r}")
    mix = _token_mix(token_mix)
    shapes = _shapes(layers)
    unknown = [n for n in accuracy_cost if n not in shapes]
    if unknown:
        raise ValueError(f"accuracy_cost names {len(unknown)} layer(s) the model does not have: {unknown[:3]}")
    speedup = speed_model(speed)
    # 1. Options per layer, 2. their hulls.
    plans, hulls = [], {}
    for name, (out, inp) in shapes.items():
        base = sum(w * dense_time(out, inp, t) for t, w in mix.items())
        options, skipped = [], []
        for key, cost in accuracy_cost.get(name, {}).items():
            pattern = as_pattern(key)
            if not (isinstance(cost, (int, float)) and math.isfinite(cost) and cost >= 0):
                raise ValueError(f"accuracy_cost[{name!r}][{key!r}] must be a number >= 0, got {cost!r}")
            speeds = [speedup(out, inp, pattern, t) for t in mix]
            if any(s is None or not s > 0 for s in speeds):
                skipped.append(str(pattern))
                continue
            speeds = [s if s >= min_speedup else 1.0 for s in speeds]  # dense where it loses
            time = sum(w * dense_time(out, inp, t) / s for (t, w), s in zip(mix.items(), speeds, strict=True))
            options.append(_Option(pattern, base - time, float(cost)))
        note = "no accuracy cost given" if name not in accuracy_cost else ""
        if skipped:
            note = f"no measured speed-up for {', '.join(skipped)}"
        plans.append(LayerPlan(name, (out, inp), None, base, base, 0.0, note))
        hulls[name] = _hull(options)
    linear_time = sum(p.dense_time for p in plans)
    other = linear_time * other_fraction / (1 - other_fraction)
    total_dense = linear_time + other
    # 3. Every upgrade, cheapest per unit of time saved first (within a layer in hull order).
    index = {p.name: i for i, p in enumerate(plans)}
    upgrades = []
    for name, hull in hulls.items():
        for step, (a, b) in enumerate(zip(hull, hull[1:], strict=False)):
            upgrades.append(((b.cost - a.cost) / (b.saved - a.saved), step, index[name], name, b))
    upgrades.sort(key=lambda u: u[:3])
    # 4. Take them until the budget says stop.
    time, cost, blocked = total_dense, 0.0, set()
    chosen: dict[str, _Option] = {}
    for _, _, _, name, option in upgrades:
        if target_speedup is not None and total_dense / time >= target_speedup:
            break
        if name in blocked:
            continue
        before = chosen.get(name, _Option(None, 0.0, 0.0))
        if max_cost is not None and cost + option.cost - before.cost > max_cost * (1 + 1e-12):
            blocked.add(name)
            continue
        chosen[name] = option
        time -= option.saved - before.saved
        cost += option.cost - before.cost
    if target_speedup is not None and total_dense / time < target_speedup * (1 - 1e-12):
        raise ValueError(
            f"no per-layer choice reaches speed-up {target_speedup:g} at this token mix: the fastest plan "
            f"gives {total_dense / time:.3f}x (other_fraction={other_fraction:g}; layers without a measured "
            "win stay dense)"
        )
    for p in plans:
        if p.name in chosen:
            o = chosen[p.name]
            p.pattern, p.time, p.cost = o.pattern, p.dense_time - o.saved, o.cost
    return PatternPlan(plans, total_dense, time, target_speedup, max_cost, dict(mix))


def _token_mix(token_mix: Mapping[int, float] | None) -> dict[int, float]:
    mix = {1: 1.0} if token_mix is None else dict(token_mix)
    if not mix:
        raise ValueError("token_mix is empty: give {tokens: weight}, e.g. {1: 256, 2048: 1}")
    for t, w in mix.items():
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise ValueError(f"token_mix keys must be token counts >= 1, got {t!r}")
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
            raise ValueError(f"token_mix[{t}] must be a weight >= 0, got {w!r}")
    if not any(mix.values()):
        raise ValueError("token_mix weights are all 0")
    return {int(t): float(w) for t, w in sorted(mix.items())}


def _shapes(layers) -> dict[str, tuple[int, int]]:
    if isinstance(layers, nn.Module):
        from ..linears import is_conv1d, linear_like_modules

        shapes = {}
        for name, m in linear_like_modules(layers):
            w = m.weight
            shapes[name] = (int(w.shape[1]), int(w.shape[0])) if is_conv1d(m) else (int(w.shape[0]), int(w.shape[1]))
        return shapes
    if not isinstance(layers, Mapping):
        raise ValueError(f"layers must be an nn.Module or {{name: (out, in)}}, got {type(layers).__name__}")
    return {str(n): (int(s[0]), int(s[1])) for n, s in layers.items()}


def layer_costs(
    model: nn.Module,
    patterns: Sequence[VNMPattern | str],
    config=None,
    stats=None,
    *,
    data=None,
    metric: str = "auto",
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """The accuracy cost of each pattern for each layer ``sparsify_`` would prune: ``{layer: {pattern: cost}}``.

    Prunes a copy of ``model`` per pattern with ``config`` (default ``VNMConfig()``: RIA + permutations)
    and reads each layer's report. ``metric``: "importance" (1 - importance kept, by the config's score),
    "error" (the relative output error tr(dW H dWᵀ) / tr(W H Wᵀ) on the calibration data: configs with
    second moments, which need ``data``), "auto" (error where the config has second moments, else
    importance). A relative error per layer: it does not weigh how much each layer matters to the
    model's output; scale the numbers (e.g. by a measured sensitivity) where that is known.
    Memory: one copy of the model at a time.
    """
    from ..sparsify import VNMConfig, sparsify_

    config = config or VNMConfig()
    if metric not in ("auto", "importance", "error"):
        raise ValueError(f"metric must be 'auto', 'importance' or 'error', got {metric!r}")
    if metric == "auto":
        metric = "error" if config.needs_second_moments else "importance"
    if metric == "error" and not config.needs_second_moments:
        raise ValueError("metric='error' needs a config with second moments (score='obs' or reconstruct=True)")
    costs: dict[str, dict[str, float]] = {}
    for key in patterns:
        pattern = as_pattern(key)
        pruned = copy.deepcopy(model)
        report = sparsify_(pruned, config.for_pattern(pattern), stats, data=data, progress=progress)
        for r in report.sparsified:
            value = r.error if metric == "error" else 1.0 - r.importance_kept
            costs.setdefault(r.name, {})[str(pattern)] = max(0.0, float(value))
        del pruned
    return costs


def save_layer_costs(path, layers: nn.Module | Mapping[str, tuple[int, int]], costs: Mapping) -> None:
    """Write ``{"layers": {name: {"shape": [out, in], "costs": {pattern: cost}}}}`` (what ``vnm select
    --per-layer`` reads) for the layers ``costs`` names."""
    shapes = _shapes(layers)
    data = {"layers": {n: {"shape": list(shapes[n]), "costs": {str(k): float(v) for k, v in c.items()}}
                       for n, c in costs.items()}}  # fmt: skip
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def load_layer_costs(path) -> tuple[dict[str, tuple[int, int]], dict[str, dict[str, float]]]:
    """Read a file written by save_layer_costs: ({name: (out, in)}, {name: {pattern: cost}})."""
    with open(path) as f:
        data = json.load(f)
    layers = data.get("layers") if isinstance(data, dict) else None
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f'{path}: expected {{"layers": {{name: {{"shape": [out, in], "costs": {{...}}}}}}}}')
    shapes, costs = {}, {}
    for name, entry in layers.items():
        try:
            out, inp = entry["shape"]
            shapes[name], costs[name] = (int(out), int(inp)), dict(entry["costs"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f'{path}: layer {name!r} needs "shape": [out, in] and "costs": {{pattern: cost}}'
            ) from None
    return shapes, costs
