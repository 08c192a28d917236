"""bench_second_order on CPU at tiny shapes: both parts run, print their targets, and --build-layers
extrapolates the model's time from the blocks it built."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_second_order  # noqa: E402

TINY = ["--device", "cpu", "--shape", "64", "97", "--patterns", "8:2:5", "--repeats", "1", "--hidden", "64",
        "--intermediate", "176", "--heads", "4", "--sequences", "2", "--seq-len", "16", "--batch", "1",
        "--model-pattern", "16:2:5"]  # fmt: skip


def test_cpu_smoke_run_prints_targets_and_extrapolates(capsys, tmp_path):
    out = bench_second_order.main([*TINY, "--layers", "8", "--build-layers", "2", "--json", str(tmp_path / "r.json")])
    text = capsys.readouterr().out
    assert len(out["layer"]) == 2 and all(r["target_met"] is None for r in out["layer"])  # not the target's shape
    assert text.count("target <= 2 s holds for 4096x11008 on a GPU: not this run") == 2
    model = out["model"]
    assert model["built_layers"] == 2 and model["layers"] == 8 and model["linears"] == 2 * 7
    assert model["seconds"] == pytest.approx(model["measured_s"] * 4)
    assert model["target_met"] is None and "extrapolated" in text and "target <= 600 s holds for" in text
    assert model["mean_error"] <= model["mean_error_masked"]
    assert (tmp_path / "r.json").exists()


def test_verdict():
    assert bench_second_order.verdict(1.5, 2.0, True, "x") == "target <= 2 s: met"
    assert bench_second_order.verdict(2.5, 2.0, True, "x") == "target <= 2 s: MISSED"
    with pytest.raises(SystemExit):
        bench_second_order.main([*TINY, "--build-layers", "0"])
