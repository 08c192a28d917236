"""tools/fuzz_kernels.py: the GPU fuzz harness, checked on the CPU under the Triton interpreter."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "fuzz_kernels.py"


def _tool():
    spec = importlib.util.spec_from_file_location("fuzz_kernels", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_kernels"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def interpret(monkeypatch):
    from vnm_compile.kernels.vnm_triton import interpreter_ready

    if not interpreter_ready():  # Triton's interpreter needs TRITON_INTERPRET=1 before triton loads (CI sets it)
        pytest.skip("run with TRITON_INTERPRET=1 set before triton loads")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_harness_runs_and_writes_its_results(interpret, tmp_path):
    rc = _tool().main(["--out", str(tmp_path), "--cases", "8", "--seconds", "60", "--dynamic-calls", "4"])
    data = json.loads((tmp_path / "fuzz_kernels.json").read_text())
    assert rc == 0 and data["failures"] == 0 and data["cases"] == 8
    assert set(data["by_path"]) == {
        "triton",
        "triton+expanded",
        "triton+interleaved",
        "compressed_linear",
        "vnm_linear",
    }
    assert data["dynamic"]["calls"] == 4 and data["dynamic"]["graphs"] >= 1
    assert "8 random cases, 0 mismatches" in (tmp_path / "fuzz_kernels.md").read_text()


def test_a_wrong_or_unwritten_output_is_a_mismatch(interpret, tmp_path, monkeypatch):
    tool = _tool()
    real = tool.vnm_triton.vnm_linear_triton

    def broken(*args, out=None, **kwargs):
        y = real(*args, out=out, **kwargs)
        out[0, 0] = float("nan")  # an element left unwritten (the poison shows through)
        return y

    monkeypatch.setattr(tool.vnm_triton, "vnm_linear_triton", broken)
    rc = tool.main(["--out", str(tmp_path), "--cases", "3", "--seconds", "60", "--dynamic-calls", "1"])
    data = json.loads((tmp_path / "fuzz_kernels.json").read_text())
    assert rc == 1 and data["by_path"]["triton"]["failures"] == 1
    assert "NaN/Inf outputs" in data["failed_cases"][0]["note"]


def test_worker_processes_run_the_same_cases(interpret, tmp_path, monkeypatch):
    """--jobs splits the random cases over processes; case i comes from (seed, i) alone, so the cases (and
    their results) are the ones a single process runs."""
    monkeypatch.syspath_prepend(str(TOOL.parent))  # spawned workers import the tool by its module name
    tool = _tool()
    runs = {}
    for jobs in (1, 2):
        out = tmp_path / f"jobs{jobs}"
        args = ["--out", str(out), "--cases", "6", "--seconds", "120", "--dynamic-calls", "1", "--seed", "3"]
        assert tool.main([*args, "--jobs", str(jobs)]) == 0
        runs[jobs] = json.loads((out / "fuzz_kernels.json").read_text())
    assert runs[1]["cases"] == runs[2]["cases"] == 6
    strip = ("worst_ratio",)
    assert {p: {k: v for k, v in s.items() if k not in strip} for p, s in runs[1]["by_path"].items()} == {
        p: {k: v for k, v in s.items() if k not in strip} for p, s in runs[2]["by_path"].items()
    }
    with pytest.raises(SystemExit):
        tool.main(["--out", str(tmp_path), "--jobs", "0"])
