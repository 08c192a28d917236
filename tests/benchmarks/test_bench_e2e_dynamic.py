"""bench_e2e --dynamic (formerly bench_dynamic.py) on the CPU (--smoke): one dynamic-shape graph per variant
serves every token count, and the three variants compute the same pruned model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_e2e  # noqa: E402


@pytest.mark.slow
def test_dynamic_smoke_writes_one_row_per_token_count(tmp_path):
    # a fresh process without TRITON_INTERPRET: the op takes its CPU reference path (the kernels have their own
    # tests), so this checks the benchmark's logic in seconds
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_e2e.py"), "--dynamic", "--smoke", "--llama-layers", "1"]
    cmd += ["--tokens", "1", "5", "--out", str(tmp_path)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "dynamic.json").read_text())
    assert [r["tokens"] for r in result["rows"]] == [1, 5]
    assert result["config"]["pattern"] == "64:2:8" and "--dynamic" in result["command"]
    for row in result["rows"]:
        assert set(row["ms"]) == {"dense", "hybrid", "pergraph"} and all(ms > 0 for ms in row["ms"].values())
        assert max(row["rel_diff_vs_dense"].values()) < 1e-5  # the same pruned model, float32 on the CPU
    assert all("7 linears lowered" in r for r in result["reports"]), result["reports"]
    assert "| 5 |" in (tmp_path / "dynamic.md").read_text()


def test_dynamic_needs_a_pattern(capsys):
    with pytest.raises(SystemExit):
        bench_e2e.main(["--dynamic", "--smoke", "--variants", "dense"])
    assert "--dynamic needs a V:N:M pattern" in capsys.readouterr().err
