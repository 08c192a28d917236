"""The dispatcher's measured tables ship inside the package and a user's own table takes precedence."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vnm_compile.kernels import dispatch, tables

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_tables_match_the_committed_results():
    """Each shipped table is the projection of benchmarks/results/<gpu>/linear.json (tools/update_tuning_tables.py)."""
    shipped = tables.shipped_tables()
    assert {"nvidia-h100-80gb-hbm3", "nvidia-h200"} <= set(shipped)
    for slug, path in shipped.items():
        source = ROOT / "benchmarks" / "results" / slug / "linear.json"
        assert source.is_file(), f"{path.name} has no benchmarks/results/{slug}/linear.json behind it"
        expected = tables.project(json.loads(source.read_text()), f"benchmarks/results/{slug}/linear.json")
        assert json.loads(path.read_text()) == expected, f"{path.name} is stale: run tools/update_tuning_tables.py"
        # it holds what the dispatcher reads, and nothing else
        assert expected["records"] and all(set(r) <= set(tables.TABLE_FIELDS) for r in expected["records"])


def _fake_cuda(monkeypatch, slug):
    monkeypatch.setattr(dispatch.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dispatch, "gpu_slug", lambda device=None: slug)


def test_shipped_table_decides_without_a_user_table(monkeypatch, tmp_path):
    monkeypatch.delenv("VNM_BENCH_RESULTS", raising=False)
    monkeypatch.setenv("VNM_CACHE_DIR", str(tmp_path / "empty-cache"))
    _fake_cuda(monkeypatch, "nvidia-h200")
    assert tables.find_table("nvidia-h200") == tables.shipped_table("nvidia-h200")
    table = json.loads(tables.shipped_table("nvidia-h200").read_text())
    expected = dispatch.token_limit(table, 4096, 4096, dispatch.as_pattern("64:2:8"))
    assert dispatch.sparse_token_limit(4096, 4096, "64:2:8", "cuda") == expected
    # without a table there is no sparse tensor-core window; the shipped H200 one has it from 1 to 16 tokens
    assert dispatch.sparse_tc_decode_window(4096, 4096, "64:2:8", "cuda") == (1, 16)


def test_user_cache_takes_precedence_over_the_shipped_table(monkeypatch, tmp_path):
    monkeypatch.delenv("VNM_BENCH_RESULTS", raising=False)
    monkeypatch.setenv("VNM_CACHE_DIR", str(tmp_path))
    _fake_cuda(monkeypatch, "nvidia-h200")
    mine = tmp_path / "nvidia-h200" / "linear.json"
    mine.parent.mkdir()

    def rec(tokens, us):
        return {"out_features": 4096, "in_features": 4096, "tokens": tokens, "dense_us": 10.0, "vnm_us": {"64:2:8": us}}

    mine.write_text(json.dumps({"records": [rec(1, 5.0), rec(4, 20.0)]}))
    assert tables.find_table("nvidia-h200") == mine
    assert dispatch.sparse_token_limit(4096, 4096, "64:2:8", "cuda") == 1
    # $VNM_BENCH_RESULTS comes first
    monkeypatch.setenv("VNM_BENCH_RESULTS", str(tmp_path / "elsewhere.json"))
    assert tables.find_table("nvidia-h200") == mine  # named but missing: the next candidate
    (tmp_path / "elsewhere.json").write_text(json.dumps({"records": [rec(1, 5.0), rec(4, 5.0), rec(16, 20.0)]}))
    assert tables.find_table("nvidia-h200") == tmp_path / "elsewhere.json"
    assert dispatch.sparse_token_limit(4096, 4096, "64:2:8", "cuda") == 4


def test_cache_dir_default(monkeypatch, tmp_path):
    monkeypatch.delenv("VNM_CACHE_DIR", raising=False)
    monkeypatch.setattr(tables.Path, "home", lambda: tmp_path)
    assert tables.cache_dir() == tmp_path / ".cache" / "vnm_compile"


_PROBE = """
import json, sys, torch
import vnm_compile
from vnm_compile.kernels import dispatch, tables
torch.cuda.is_available = lambda: True
dispatch.gpu_slug = lambda device=None: "nvidia-h200"
print(json.dumps({
    "package": vnm_compile.__file__,
    "table": str(tables.find_table("nvidia-h200")),
    "records": len(dispatch.load_table()["records"]),
    "limit": dispatch.sparse_token_limit(4096, 4096, "64:2:8", "cuda"),
    "floor": dispatch.sparse_tc_token_floor(4096, 11008, "64:2:8", "cuda"),
}))
"""


def test_wheel_install_finds_the_shipped_table(tmp_path):
    """Build a wheel (not editable), install it into a fresh venv and ask the dispatcher from outside the tree."""
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools")
    pytest.importorskip("wheel", reason="building the wheel needs the wheel package")
    import shutil

    import torch

    # 1. build from a copy, so the source tree gets no build/ or egg-info
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "vnm_compile", src / "vnm_compile", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", dist, src], check=True, timeout=120)
    (wheel,) = dist.glob("vnm_compile-*.whl")
    # 2. a fresh venv; the dependencies (torch, ...) come from this interpreter's site-packages through a plain
    # path in a .pth (its .pth files, such as an editable vnm_compile, are not run)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=60)
    python = next(p for p in (venv / "bin" / "python", venv / "Scripts" / "python.exe") if p.exists())
    site = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True
        ).strip()
    )
    (site / "deps.pth").write_text(str(Path(torch.__file__).resolve().parents[1]) + "\n")
    subprocess.run([*pip, "--python", python, "install", "--no-deps", "--no-index", wheel], check=True, timeout=120)
    # 3. from a folder outside the tree, with no user table
    run = tmp_path / "elsewhere"
    run.mkdir()
    env = {"PATH": "/usr/bin:/bin", "VNM_CACHE_DIR": str(tmp_path / "empty-cache"), "HOME": str(tmp_path)}
    out = json.loads(subprocess.check_output([python, "-c", _PROBE], cwd=run, env=env, text=True, timeout=120))
    assert Path(out["package"]).resolve().is_relative_to(site.resolve()), out["package"]
    assert Path(out["table"]).resolve() == (site / "vnm_compile" / "kernels" / "tables" / "nvidia-h200.json").resolve()
    shipped = json.loads(tables.shipped_table("nvidia-h200").read_text())
    assert out["records"] == len(shipped["records"])
    assert out["limit"] == dispatch.token_limit(shipped, 4096, 4096, dispatch.as_pattern("64:2:8"))
    assert out["floor"] == dispatch.tc_token_floor(shipped, 4096, 11008, dispatch.as_pattern("64:2:8"))
    assert out["floor"] is not None  # the shipped H200 table has the sparse tensor cores' timings
