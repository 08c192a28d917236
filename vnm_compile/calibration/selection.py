"""Choosing V and M from measured speed-ups (paper section 4.1; docs/design.md, "Choosing V and M").

Given a table {pattern: speed-up over dense} measured on the target GPU and a
speed-up threshold s:

1. keep the patterns whose speed-up is >= s;
2. for each V keep only the smallest M (the densest pattern that is fast enough:
   fewer weights pruned);
3. among those pick the largest mask diversity K(V, M) (``mask_diversity``, in
   log space): more freedom in where the kept weights sit.

Ties on diversity go to the higher speed-up, then the smaller V, then the
smaller M. N:4 entries (e.g. "2:4", V irrelevant) take part as V = 1.

One pattern per layer, from per-layer speed-ups at a token mix and per-layer accuracy costs under one
global budget: plan.py (``plan_patterns``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..pattern import VNMPattern, as_pattern, mask_diversity

__all__ = ["select_pattern", "sift_patterns", "SiftResult", "load_speedups"]


@dataclass
class SiftResult:
    """Every stage of the sifting, for reporting (``vnm select``)."""

    threshold: float
    candidates: dict[VNMPattern, float] = field(default_factory=dict)  # all measured patterns
    fast_enough: dict[VNMPattern, float] = field(default_factory=dict)  # step 1
    smallest_m: dict[VNMPattern, float] = field(default_factory=dict)  # step 2
    pick: VNMPattern | None = None  # step 3

    def table(self) -> str:
        """One line per measured pattern: speed-up, diversity, and the step that dropped it."""
        head = f"{'pattern':>10} {'speed-up':>9} {'log K':>8}  outcome"
        lines = [head, "-" * len(head)]
        for p in sorted(self.candidates, key=lambda q: (q.v, q.m, q.n)):
            if p == self.pick:
                outcome = "PICK (largest mask diversity)"
            elif p in self.smallest_m:
                outcome = "smallest M for its V, lower diversity"
            elif p in self.fast_enough:
                outcome = f"a smaller M meets the threshold for V={p.v}"
            else:
                outcome = f"below threshold {self.threshold:g}"
            lines.append(f"{str(p):>10} {self.candidates[p]:>9.3f} {mask_diversity(p):>8.4f}  {outcome}")
        return "\n".join(lines)


def _parse_table(speedups: Mapping[VNMPattern | str, float]) -> dict[VNMPattern, float]:
    if not isinstance(speedups, Mapping):
        raise TypeError(f"speedups must be a mapping {{pattern: speed-up}}, got {type(speedups).__name__}")
    table: dict[VNMPattern, float] = {}
    for key, value in speedups.items():
        try:
            pattern = as_pattern(key)
        except ValueError as e:
            raise ValueError(f"speedups key {key!r} is not a V:N:M pattern: {e}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"speed-up of {key!r} must be a finite number, got {value!r}")
        if pattern in table and table[pattern] != float(value):
            raise ValueError(f"pattern {pattern} appears twice with different speed-ups")
        table[pattern] = float(value)
    return table


def sift_patterns(speedups: Mapping[VNMPattern | str, float], threshold: float) -> SiftResult:
    """Run the sifting and return every stage (``pick`` is None when nothing meets the threshold)."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    result = SiftResult(float(threshold), _parse_table(speedups))
    # 1. Fast enough.
    result.fast_enough = {p: s for p, s in result.candidates.items() if s >= threshold}
    # 2. Per V, the smallest M (all N at that M stay in).
    smallest: dict[int, int] = {}
    for p in result.fast_enough:
        smallest[p.v] = min(smallest.get(p.v, p.m), p.m)
    result.smallest_m = {p: s for p, s in result.fast_enough.items() if p.m == smallest[p.v]}
    # 3. Largest mask diversity; ties: higher speed-up, smaller V, smaller M.
    if result.smallest_m:
        result.pick = min(result.smallest_m, key=lambda p: (-mask_diversity(p), -result.smallest_m[p], p.v, p.m, p.n))
    return result


def select_pattern(speedups: Mapping[VNMPattern | str, float], threshold: float) -> VNMPattern:
    """The paper's choice of (V, M): fast enough, smallest M per V, then largest mask diversity.

    Args:
        speedups: measured speed-up over dense per pattern ("64:2:5" or VNMPattern keys).
        threshold: the speed-up the user needs.
    Raises:
        ValueError: when no pattern reaches the threshold (or the table is empty).
    """
    result = sift_patterns(speedups, threshold)
    if result.pick is None:
        if not result.candidates:
            raise ValueError("select_pattern got an empty speed-up table")
        best = max(result.candidates.items(), key=lambda kv: kv[1])
        raise ValueError(
            f"no pattern reaches speed-up {threshold:g}; the fastest measured is {best[0]} at {best[1]:.3f}"
        )
    return result.pick


def load_speedups(path: str | Path) -> dict[str, float]:
    """Read a JSON speed-up table ``{"64:2:5": 1.8, ...}`` (benchmarks/results/<gpu>/speedups.json)."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object {{pattern: speed-up}}, got {type(data).__name__}")
    return data
