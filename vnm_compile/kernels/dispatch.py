"""Is the sparse kernel faster than dense here? Answered from the measured benchmark table.

Two questions: prefer_sparse (at one token count) and sparse_token_limit (up
to how many tokens; the compiler's runtime switch vnm::hybrid_linear takes
the dense path above it, so one dynamic-shape graph serves both decode and
prefill).

The table is a linear.json as bench_linear.py (``vnm bench``) writes it. It is
looked up, in order, at ``$VNM_BENCH_RESULTS`` (a linear.json file or a folder
holding <gpu>/linear.json), in the user's cache ``$VNM_CACHE_DIR/<gpu>/linear.json``
(default ~/.cache/vnm_compile, where ``vnm bench`` writes) and in the table shipped
with the package, kernels/tables/<gpu>.json (see kernels.tables). Off CUDA the answer is sparse (True / no
limit): the CPU reference and the interpreter are for correctness, not speed.
On a CUDA device without a table the answer is sparse up to
UNMEASURED_TOKEN_LIMIT tokens only (run ``vnm bench`` on that GPU to go further).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from pathlib import Path

import torch

from ..pattern import VNMPattern, as_pattern
from . import tables

__all__ = [
    "gpu_slug",
    "load_table",
    "prefer_sparse",
    "sparse_speedup",
    "sparse_token_limit",
    "sparse_tc_decode_window",
    "sparse_tc_token_floor",
    "tc_decode_window",
    "token_limit",
    "tc_token_floor",
    "results_dir",
]

log = logging.getLogger(__name__)


def gpu_slug(device: torch.device | str | None = None) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (the results folder name)."""
    name = torch.cuda.get_device_name(device)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def results_dir() -> Path:
    """The source tree's benchmarks/results folder, where the benchmark scripts write (may not exist in an
    installed package; the dispatcher does not read it: see kernels.tables)."""
    return Path(__file__).resolve().parents[2] / "benchmarks" / "results"


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
    path = tables.find_table(gpu_slug(device))
    return None if path is None else _load(str(path), path.stat().st_mtime)


def _log_dist(a: float, b: float) -> float:
    return abs(math.log(max(a, 1)) - math.log(max(b, 1)))


def _pattern_dist(measured: str, pattern: VNMPattern) -> float:
    q = VNMPattern.parse(measured)
    return abs(math.log(q.m / pattern.m)) * 10 + abs(math.log(max(q.v, 1) / max(pattern.v, 1)))


def _speedups_by_tokens(
    table: dict,
    out_features: int,
    in_features: int,
    pattern: VNMPattern,
    expanded: bool = False,
    tc: bool = False,
    interleaved: bool = False,
) -> dict[int, float]:
    """Measured dense / V:N:M time per measured token count, at the nearest measured shape
    (``expanded`` / ``interleaved``: the op's time with the expanded weights / the row-interleaved copy
    held, where measured; ``tc``: the sparse tensor cores' time, only where measured).

    The one lookup behind sparse_speedup and sparse_token_limit: 1. the
    measured shape nearest in log-distance (out + in); 2. at each token count
    measured there, the timings of every record at that point (a later
    record overrides an earlier one for the same pattern); 3. the pattern
    itself if measured there, else the nearest (M first, then V).
    """
    field = "vnm_tc_us" if tc else "vnm_us"
    recs = [r for r in table.get("records", []) if r.get(field)]
    if not recs:
        return {}
    near = min(
        recs, key=lambda r: _log_dist(r["out_features"], out_features) + _log_dist(r["in_features"], in_features)
    )
    shape = (near["out_features"], near["in_features"])
    timings: dict[int, dict[str, tuple[float, float]]] = {}
    held_fields = [] if tc else ["vnm_expanded_us"] * expanded + ["vnm_interleaved_us"] * interleaved
    with_held: dict[int, dict[str, tuple[float, float]]] = {}
    for r in recs:
        if (r["out_features"], r["in_features"]) == shape:
            tokens = int(r["tokens"])
            timings.setdefault(tokens, {}).update({p: (r["dense_us"], us) for p, us in r[field].items() if us})
            for held in held_fields:  # kept apart: a later record without them must not hide them
                times = r.get(held, {})
                with_held.setdefault(tokens, {}).update({p: (r["dense_us"], us) for p, us in times.items() if us})
    for tokens, point in with_held.items():
        timings[tokens].update(point)
    key = str(pattern)
    speedups = {}
    for tokens, point in sorted(timings.items()):
        if point:
            dense_us, vnm_us = (
                point[key] if key in point else point[min(point, key=lambda p: _pattern_dist(p, pattern))]
            )
            speedups[tokens] = dense_us / vnm_us
    return speedups


def sparse_speedup(
    table: dict, out_features: int, in_features: int, pattern: VNMPattern, tokens: int, *, expanded: bool = False
) -> float | None:
    """Measured dense / V:N:M time at the nearest measured shape, token count and pattern."""
    speedups = _speedups_by_tokens(table, out_features, in_features, pattern, expanded)
    if not speedups:
        return None
    return speedups[min(speedups, key=lambda t: _log_dist(t, tokens))]


# A measured point counts as a win only at this speed-up or more. Between measured points the
# kernel choice changes (autotune buckets), and a 1.02-1.04x win at 16 tokens measured as a
# 0.93x loss at 7 tokens end to end (H100, benchmarks/results/nvidia-h100-80gb-hbm3/dynamic_min_speedup_1.0.md).
MIN_SPEEDUP = 1.1


def token_limit(
    table: dict, out_features: int, in_features: int, pattern: VNMPattern, *, expanded: bool = False
) -> int | None:
    """The largest measured token count T up to which V:N:M beats dense at every measured count.

    At the nearest measured shape and pattern (as sparse_speedup). Token
    counts between two measured points are judged by the lower one: the limit
    is the last winning measured point, so with wins at 1 and 16 tokens and a
    loss at 2048 the limit is 16 (17-2047 tokens run dense). 0 when sparse
    loses at the smallest measured count; None when it wins at every measured
    count (no limit: the trend is assumed to hold beyond the largest) or the
    table has nothing for this layer. ``expanded``: with the expanded weights held.
    """
    speedups = _speedups_by_tokens(table, out_features, in_features, pattern, expanded)
    if not speedups:
        return None
    limit = 0
    for tokens, speedup in speedups.items():  # ascending token counts
        if speedup < MIN_SPEEDUP:
            return limit
        limit = tokens
    return None


def tc_token_floor(table: dict, out_features: int, in_features: int, pattern: VNMPattern) -> int | None:
    """The smallest measured token count T from which the sparse tensor cores (kernels.sparse_tc) beat
    dense at every larger measured count, at the nearest shape and pattern measured with them
    (``vnm_tc_us``). Counts between two measured points are judged by the higher one: the floor is a
    measured winning point. None when they lose at the largest measured count or were not measured."""
    speedups = _speedups_by_tokens(table, out_features, in_features, pattern, tc=True)
    floor = None
    for tokens in sorted(speedups, reverse=True):
        if speedups[tokens] < MIN_SPEEDUP:
            break
        floor = tokens
    return floor


def tc_decode_window(
    table: dict,
    out_features: int,
    in_features: int,
    pattern: VNMPattern,
    *,
    expanded: bool = False,
    interleaved: bool = False,
) -> tuple[int, int] | None:
    """The token counts (lo, hi) at which the sparse tensor cores' decode kernel runs this layer: the
    longest run of consecutive measured counts up to sparse_tc.DECODE_MAX_TOKENS where their speed-up over
    dense (``vnm_tc_us``) is at least MIN_SPEEDUP and at least the Triton kernels' (``vnm_us``; with
    ``expanded`` / ``interleaved``, the layouts those options hold, where measured), at the nearest shape
    and pattern measured. Counts between two measured points of the run count as inside; None where no
    measured count wins."""
    from .sparse_tc import DECODE_MAX_TOKENS

    tc = _speedups_by_tokens(table, out_features, in_features, pattern, tc=True)
    triton = _speedups_by_tokens(table, out_features, in_features, pattern, expanded, interleaved=interleaved)
    runs: list[list[int]] = [[]]
    for tokens in sorted(t for t in tc if t <= DECODE_MAX_TOKENS):
        if tc[tokens] >= MIN_SPEEDUP and tc[tokens] >= triton.get(tokens, 0.0):
            runs[-1].append(tokens)
        elif runs[-1]:
            runs.append([])
    best = max(runs, key=len)
    return (best[0], best[-1]) if best else None


# On a GPU with no measured table: sparse up to this many tokens. On the H100 and H200 the
# decode kernel beat cuBLAS at 1 token at every measured shape and M >= 5 and lost from 16
# tokens up at M <= 8 (benchmarks/results/), so 1 token is the only safe default.
UNMEASURED_TOKEN_LIMIT = 1
_WARNED: set[str] = set()


def _on_cuda(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available()


def _device_table(device: torch.device) -> dict | None:
    """The benchmark table that decides for ``device`` (a CUDA device), or None."""
    table = load_table(device)
    if table is None:
        slug = gpu_slug(device)
        if slug not in _WARNED:
            _WARNED.add(slug)
            log.warning(
                "no benchmark table for %s: V:N:M kernels only up to %d token(s), dense above; "
                "run `vnm bench` on this GPU (or set VNM_BENCH_RESULTS) to measure where they win",
                slug,
                UNMEASURED_TOKEN_LIMIT,
            )
    return table


def prefer_sparse(
    out_features: int,
    in_features: int,
    pattern: VNMPattern | str,
    tokens: int,
    device: torch.device | str,
    *,
    expanded: bool = False,
) -> bool:
    """True when the V:N:M kernel is expected to beat dense cuBLAS for this layer at ``tokens``.

    From the measured table for the device when one exists (nearest measured
    shape / tokens / pattern, speed-up >= MIN_SPEEDUP); on a CUDA device
    without one, tokens <= UNMEASURED_TOKEN_LIMIT; off CUDA True.
    """
    device = torch.device(device)
    if not _on_cuda(device):
        return True
    table = _device_table(device)
    if table is None:
        return tokens <= UNMEASURED_TOKEN_LIMIT
    s = sparse_speedup(table, out_features, in_features, as_pattern(pattern), tokens, expanded=expanded)
    return True if s is None else s >= MIN_SPEEDUP


def sparse_token_limit(
    out_features: int,
    in_features: int,
    pattern: VNMPattern | str,
    device: torch.device | str,
    *,
    expanded: bool = False,
) -> int | None:
    """Up to how many tokens (rows of x) the V:N:M kernel is expected to beat dense for this layer.

    See token_limit (nearest measured shape and pattern; between measured
    points the lower one decides). None means no limit: not CUDA (as
    prefer_sparse answers True there), or sparse wins at every measured count.
    0 means sparse never wins. A CUDA device without a table gets
    UNMEASURED_TOKEN_LIMIT.
    """
    device = torch.device(device)
    if not _on_cuda(device):
        return None
    table = _device_table(device)
    if table is None:
        return UNMEASURED_TOKEN_LIMIT
    return token_limit(table, out_features, in_features, as_pattern(pattern), expanded=expanded)


def sparse_tc_token_floor(
    out_features: int, in_features: int, pattern: VNMPattern | str, device: torch.device | str
) -> int | None:
    """From how many tokens the sparse tensor cores are expected to beat dense for this layer (see
    tc_token_floor), from the device's measured table; None off CUDA, without a table, or never."""
    device = torch.device(device)
    if not _on_cuda(device):
        return None
    table = _device_table(device)
    return None if table is None else tc_token_floor(table, out_features, in_features, as_pattern(pattern))


def sparse_tc_decode_window(
    out_features: int,
    in_features: int,
    pattern: VNMPattern | str,
    device: torch.device | str,
    *,
    expanded: bool = False,
    interleaved: bool = False,
) -> tuple[int, int] | None:
    """At which token counts (lo, hi) the sparse tensor cores' decode kernel is expected to beat both
    dense and the Triton kernels (with the layouts ``expanded`` / ``interleaved`` held) for this layer (see
    tc_decode_window), from the device's measured table; None off CUDA, without a table, or nowhere."""
    device = torch.device(device)
    if not _on_cuda(device):
        return None
    table = _device_table(device)
    if table is None:
        return None
    held = {"expanded": expanded, "interleaved": interleaved}
    return tc_decode_window(table, out_features, in_features, as_pattern(pattern), **held)
