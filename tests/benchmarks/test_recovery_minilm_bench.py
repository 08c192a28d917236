"""benchmarks/recovery_minilm.py helpers: method specs, step timing, results rendering (the GPU run's parts
that a CPU can check without the minutes of pruning and training)."""

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import recovery_minilm as rm  # noqa: E402


def test_method_specs():
    args = argparse.Namespace(stage_fractions=[0.025, 0.025, 0.95])
    assert rm.method_spec("fixed", args) == ("fixed", {})
    assert rm.method_spec("three_stage", args) == ("three_stage", {"stage_fractions": (0.025, 0.025, 0.95)})
    assert rm.method_spec("lora_fixed", args) == ("three_stage", {"stage_fractions": (0.0, 0.0, 1.0)})
    assert rm.method_spec("three_stage@0.1,0.1,0.8", args) == ("three_stage", {"stage_fractions": (0.1, 0.1, 0.8)})
    assert rm.method_spec("three_stage@0.1,0.1,0.8:pruned", args) == (
        "three_stage",
        {"stage_fractions": (0.1, 0.1, 0.8), "dense_start": False},
    )
    assert rm.method_spec("srste:pruned", args) == ("srste", {"dense_start": False})
    with pytest.raises(SystemExit, match="three stage shares"):
        rm.method_spec("three_stage@0.5,0.5", args)
    with pytest.raises(SystemExit, match="unknown method"):
        rm.method_spec("fixd", args)


def test_augment_specs():
    assert rm.augment_config("none") is None
    assert rm.augment_config("tokens") == rm.AugmentConfig(replace=0.15)
    assert rm.augment_config("crop=0.3,mix=0.2") == rm.AugmentConfig(replace=0.0, crop=0.3, mix=0.2)
    for bad in ("tokns", "crop=0.3,mx=0.2", "crop=", "crop=x", ""):
        with pytest.raises(SystemExit, match="none, one of"):
            rm.augment_config(bad)
    with pytest.raises(SystemExit, match="replace must be in"):
        rm.augment_config("replace=2")


def test_step_times_skip_warmup():
    clock = rm.TrainClock("cpu")
    times = iter([0.0, 5.0, 6.0, 7.0, 8.5, 10.0])  # two slow warm-up steps, then 1.0, 1.5, 1.5
    clock._now = lambda: next(times)
    timed = rm.StepTimes(lambda model, batch: torch.tensor(0.0), clock)
    for _ in range(6):
        timed(None, None)
    assert timed.step_seconds() == pytest.approx((1.0 + 1.5 + 1.5) / 3)


def test_nn_agreement():
    a = torch.nn.functional.normalize(torch.randn(20, 8), dim=-1)
    assert rm.nn_agreement(a, a) == 1.0
    b = a.clone()
    b[[0, 1]] = b[[1, 0]]
    assert rm.nn_agreement(a, b) < 1.0


def test_results_render(tmp_path):
    pytest.importorskip("matplotlib")
    curve = [{"step": 10, "cosine": 0.7, "nn_agreement": 0.6, "train_s": 1.0},
             {"step": 20, "cosine": 0.8, "nn_agreement": 0.7, "train_s": 2.0}]  # fmt: skip
    run = {"method": "three_stage@0.1,0.1,0.8", "recover_method": "three_stage", "lr": 2e-3, "steps": 20,
           "stage_fractions": [0.1, 0.1, 0.8], "probe_ms_per_step": 100.0, "train_seconds": 2.1, "cosine": 0.81,
           "nn_agreement": 0.7, "merged_weights_vnm": True, "curve": curve, "final_loss": 0.01}  # fmt: skip
    result = {"command": "python x", "machine": {"cpu": "x86_64", "threads": 2, "torch": "2.13", "device": "cpu"},
              "model": "all-MiniLM-L6-v2", "train_text": "wide", "train_texts": 3000, "train_batches": 188,
              "eval_texts": 512, "batch_size": 16, "max_length": 128, "distill": "all", "seconds_per_method": 2,
              "experiments": [{"pattern": "64:2:5", "prune": "ria", "one_shot": {"cosine": 0.55, "nn_agreement": 0.5},
                               "runs": [run]}]}  # fmt: skip
    stem = tmp_path / "r"
    stem.with_suffix(".json").write_text(json.dumps(result))
    rm.write(result, stem)
    md = stem.with_suffix(".md").read_text()
    assert "| 64:2:5 | ria | three_stage@0.1,0.1,0.8 [0.1, 0.1, 0.8] | 20 | 0.002 | 0.8100 |" in md
    assert "20/2s: 0.800" in md
    assert stem.with_suffix(".png").stat().st_size > 10_000


def test_results_render_train_cosine_and_augmentation():
    curve = [{"step": 20, "cosine": 0.8, "nn_agreement": 0.7, "train_cosine": 0.85, "train_s": 2.0}]
    run = {"method": "fixed", "recover_method": "fixed", "lr": 1e-3, "steps": 20, "stage_fractions": None,
           "probe_ms_per_step": None, "train_seconds": 2.1, "cosine": 0.81, "nn_agreement": 0.7, "train_cosine": 0.86,
           "merged_weights_vnm": True, "curve": curve, "final_loss": 0.01}  # fmt: skip
    result = {"command": "python x", "machine": {"cpu": "x86_64", "threads": 2, "torch": "2.13", "device": "cpu"},
              "model": "all-MiniLM-L6-v2", "train_text": "stdlib", "train_texts": 7600, "train_batches": 475,
              "eval_texts": 512, "eval_train_texts": 512, "batch_size": 16, "max_length": 64, "distill": "all",
              "seconds_per_method": 50, "steps_per_method": 20,
              "augment": {"replace": 0.1, "crop": 0.3, "mix": 0.0, "min_crop": 0.5},
              "experiments": [{"pattern": "64:2:5", "prune": "obs",
                               "one_shot": {"cosine": 0.55, "nn_agreement": 0.5, "train_cosine": 0.6},
                               "runs": [run]}]}  # fmt: skip
    md = rm.markdown(result)
    assert "at equal training steps (20 steps per method)" in md
    assert "10% of the tokens replaced, 30% of the rows cropped; windows >= 50%" in md
    assert "| 64:2:5 | obs | one-shot | 0 | | 0.5500 | 0.5000 | 0.6000 | | |" in md
    assert "| 64:2:5 | obs | fixed | 20 | 0.001 | 0.8100 | 0.7000 | 0.8600 | 2 | True |" in md
    assert "20/2s: 0.800 (0.850)" in md
    assert "Machine: cpu (x86_64, 2 torch threads)" in md  # a result from before "environment"
    # a result with the harness's environment prints its line (versions, commit, date)
    from vnm_compile.kernels.benchmark import environment, environment_line

    env = environment("cpu")
    md = rm.markdown({**result, "command": env["command"], "environment": env})
    assert f"Machine: {environment_line(env)}" in md and env["commit"] in md


def test_stdlib_texts_leave_out_the_excluded_modules():
    import inspect
    import textwrap

    from vnm_compile.data import _paragraphs

    everything = rm.stdlib_texts(())
    texts = rm.stdlib_texts(("textwrap",))
    assert len(texts) > 4000 and len(set(texts)) == len(texts)
    assert all(40 <= len(t) <= 600 for t in texts)
    own = _paragraphs(inspect.getdoc(textwrap.TextWrapper))  # defined in textwrap, documented nowhere else
    assert own and own[0][:600] in everything and own[0][:600] not in texts
    assert not set(rm.stdlib_texts(("textwrap", "json"))) - set(texts)  # excluding more only removes text
