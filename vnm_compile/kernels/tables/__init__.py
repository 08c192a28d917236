"""Where the dispatcher's measured tables live: shipped with the package, or measured by the user.

One JSON file per GPU model ships here (``<gpu slug>.json``, e.g. ``nvidia-h200.json``), holding only
what kernels.dispatch reads: per measured shape and token count, the dense time and the V:N:M times
per pattern (plain, with the expanded or row-interleaved copy held, on the sparse tensor cores).
Each is the projection of a committed benchmarks/results/<gpu>/linear.json, with the command and
source recorded under ``"source"``; ``python tools/update_tuning_tables.py`` rebuilds them.

Lookup order (find_table): 1. ``$VNM_BENCH_RESULTS`` (a linear.json, or a folder holding
<gpu>/linear.json); 2. the user's cache, ``$VNM_CACHE_DIR/<gpu>/linear.json`` (default
``~/.cache/vnm_compile``), which ``vnm bench`` writes, so a table measured on the user's own GPU
takes precedence; 3. the table shipped here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["TABLE_FIELDS", "cache_dir", "candidates", "find_table", "project", "shipped_table", "shipped_tables"]

# The fields of a linear.json record the dispatcher reads; everything else stays in benchmarks/results.
TABLE_FIELDS = (
    "out_features",
    "in_features",
    "tokens",
    "dense_us",
    "vnm_us",
    "vnm_expanded_us",
    "vnm_interleaved_us",
    "vnm_tc_us",
)


def cache_dir() -> Path:
    """The user's cache folder: ``$VNM_CACHE_DIR``, else ``~/.cache/vnm_compile``."""
    env = os.environ.get("VNM_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vnm_compile"


def shipped_table(slug: str) -> Path:
    """The path the table for GPU ``slug`` has inside the installed package (it may not exist)."""
    return Path(__file__).with_name(f"{slug}.json")


def shipped_tables() -> dict[str, Path]:
    """The GPU slugs with a shipped table, and their files."""
    return {p.stem: p for p in sorted(Path(__file__).parent.glob("*.json"))}


def candidates(slug: str) -> list[Path]:
    """The files that may hold the table for GPU ``slug``, first found wins (see the module docstring)."""
    paths = []
    env = os.environ.get("VNM_BENCH_RESULTS")
    if env:
        p = Path(env)
        paths.append(p if p.suffix == ".json" else p / slug / "linear.json")
    paths.append(cache_dir() / slug / "linear.json")
    paths.append(shipped_table(slug))
    return paths


def find_table(slug: str) -> Path | None:
    """The first existing table file for GPU ``slug``, or None."""
    return next((p for p in candidates(slug) if p.is_file()), None)


def project(table: dict[str, Any], source: str) -> dict[str, Any]:
    """A linear.json reduced to what the dispatcher reads (TABLE_FIELDS), with its origin recorded.

    Args:
        table: a benchmark table as bench_linear.py / ``vnm bench`` write it.
        source: where it came from (a path in the repository).
    """
    meta = table.get("meta", {})
    keep = ("gpu", "gpu_slug", "torch", "triton", "cuda", "dtype", "command", "date_utc")
    return {
        "source": {"file": source, **{k: meta[k] for k in keep if k in meta}},
        "records": [{k: r[k] for k in TABLE_FIELDS if k in r} for r in table.get("records", [])],
    }
