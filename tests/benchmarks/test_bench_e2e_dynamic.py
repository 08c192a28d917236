"""bench_e2e --dynamic (formerly bench_dynamic.py) on the CPU (--smoke): one dynamic-shape graph per variant
serves every token count, and each variant computes its pruned model (permuted, compressed, unpermuted)."""

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

VARIANTS = ["permuted", "compressed", "unpermuted", "pergraph"]


@pytest.mark.slow
def test_dynamic_smoke_writes_one_row_per_token_count(tmp_path):
    # a fresh process without TRITON_INTERPRET: the op takes its CPU reference path (the kernels have their own
    # tests), so this checks the benchmark's logic in seconds
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_e2e.py"), "--dynamic", "--smoke", "--llama-layers", "1"]
    cmd += ["--tokens", "1", "5", "--out", str(tmp_path), "--dynamic-variants", *VARIANTS]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "dynamic.json").read_text())
    assert [r["tokens"] for r in result["rows"]] == [1, 5]
    assert result["config"]["pattern"] == "64:2:8" and "--dynamic" in result["command"]
    for row in result["rows"]:
        assert set(row["ms"]) == {"dense", *VARIANTS} and all(ms > 0 for ms in row["ms"].values())
        assert set(row["rel_diff_vs_eager"]) == set(VARIANTS)
        assert max(row["rel_diff_vs_eager"].values()) < 1e-5  # float32 on the CPU
    assert result["config"]["variants"] == VARIANTS and result["config"]["sparsify"]["permuted"] > 0
    assert all(r.endswith(", 0 left dense") for r in result["reports"]), result["reports"]  # force_sparse
    md = (tmp_path / "dynamic.md").read_text()
    assert "| 5 |" in md and "compressed speed-up" in md


def test_dynamic_permuted_variants_need_permutations(tmp_path):
    with pytest.raises(SystemExit, match="need --permute"):
        bench_e2e.main(["--dynamic", "--smoke", "--llama-layers", "1", "--tokens", "1", "--permute", "none",
                        "--out", str(tmp_path)])  # fmt: skip


def test_dynamic_needs_a_pattern(capsys):
    with pytest.raises(SystemExit):
        bench_e2e.main(["--dynamic", "--smoke", "--variants", "dense"])
    assert "--dynamic needs a V:N:M pattern" in capsys.readouterr().err
