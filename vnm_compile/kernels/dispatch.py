"""Is the sparse kernel faster than dense here? Answered from the measured benchmark table.

The table is benchmarks/results/<gpu>/linear.json written by bench_linear.py
(``vnm bench``). It is looked up, in order, at ``$VNM_BENCH_RESULTS`` (a
linear.json file or a folder holding <gpu>/linear.json), in
``~/.cache/vnm_compile/<gpu>/linear.json`` and in the source tree's
benchmarks/results/<gpu>/linear.json. Without a table for the device the
answer is True (sparse), as the issue asks.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
from pathlib import Path

import torch

from ..pattern import VNMPattern, as_pattern

__all__ = ["gpu_slug", "load_table", "prefer_sparse", "sparse_speedup", "results_dir"]

log = logging.getLogger(__name__)


def gpu_slug(device: torch.device | str | None = None) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (the results folder name)."""
    name = torch.cuda.get_device_name(device)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def results_dir() -> Path:
    """The source tree's benchmarks/results folder (may not exist in an installed package)."""
    return Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def _candidates(slug: str) -> list[Path]:
    paths = []
    env = os.environ.get("VNM_BENCH_RESULTS")
    if env:
        p = Path(env)
        paths.append(p if p.suffix == ".json" else p / slug / "linear.json")
    paths.append(Path.home() / ".cache" / "vnm_compile" / slug / "linear.json")
    paths.append(results_dir() / slug / "linear.json")
    return paths


@functools.lru_cache(maxsize=16)
def _load(path: str, mtime: float) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        log.warning("cannot read benchmark table %s: %s", path, err)
        return None


def load_table(device: torch.device | str | None = None) -> dict | None:
    """The benchmark table for this CUDA device, or None."""
    slug = gpu_slug(device)
    for path in _candidates(slug):
        if path.is_file():
            return _load(str(path), path.stat().st_mtime)
    return None


def _log_dist(a: float, b: float) -> float:
    return abs(math.log(max(a, 1)) - math.log(max(b, 1)))


def sparse_speedup(table: dict, out_features: int, in_features: int, pattern: VNMPattern, tokens: int) -> float | None:
    """Measured dense / V:N:M time at the nearest measured shape, token count and pattern."""
    recs = [r for r in table.get("records", []) if r.get("vnm_us")]
    if not recs:
        return None
    key = str(pattern)

    def pat_dist(p: str) -> float:
        q = VNMPattern.parse(p)
        return abs(math.log(q.m / pattern.m)) * 10 + abs(math.log(max(q.v, 1) / max(pattern.v, 1)))

    best = min(
        recs,
        key=lambda r: (
            _log_dist(r["out_features"], out_features) + _log_dist(r["in_features"], in_features),
            _log_dist(r["tokens"], tokens),
        ),
    )
    # all records at that shape / token count, nearest pattern among them
    same = [
        r for r in recs
        if (r["out_features"], r["in_features"], r["tokens"]) == (best["out_features"], best["in_features"], best["tokens"])
    ]  # fmt: skip
    timings = {}
    for r in same:
        timings.update({p: (r["dense_us"], us) for p, us in r["vnm_us"].items() if us})
    if not timings:
        return None
    p = key if key in timings else min(timings, key=pat_dist)
    dense_us, vnm_us = timings[p]
    return dense_us / vnm_us


def prefer_sparse(
    out_features: int, in_features: int, pattern: VNMPattern | str, tokens: int, device: torch.device | str
) -> bool:
    """True when the V:N:M kernel is expected to beat dense cuBLAS for this layer.

    From the measured table for the device when one exists (nearest measured
    shape / tokens / pattern, speed-up > 1); otherwise True.
    """
    pattern = as_pattern(pattern)
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return True
    table = load_table(device)
    if table is None:
        return True
    s = sparse_speedup(table, out_features, in_features, pattern, tokens)
    return True if s is None else s > 1.0
