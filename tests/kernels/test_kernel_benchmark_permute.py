"""bench_linear / vnm bench --permute: the timed permuted weights compute the original layer (CPU, timing faked)."""

import pytest
import torch

from vnm_compile.kernels import benchmark


@pytest.fixture
def fake_timing(monkeypatch):
    calls = []

    def time_graph(fns, replays=30):
        calls.append([fn() for fn in fns])  # runs what would be timed
        return 1.0

    monkeypatch.setattr(benchmark, "time_graph", time_graph)
    monkeypatch.setattr(benchmark, "_copies", lambda nbytes, device, cap=48: 2)
    return calls


@pytest.mark.parametrize("mode", ["none", "random", "calibrated"])
def test_permuted_case_times_the_original_function(fake_timing, mode):
    rec = benchmark._time_case(96, 80, 5, ["16:2:8"], torch.device("cpu"), torch.float32, False, False, mode)
    assert rec["permute"] == mode and rec["vnm_us"]["16:2:8"] == 1.0
    # (_time_case raises when the op with its index ops differs from x @ W_masked^T in original coordinates)
    assert ("16:2:8" in rec["vnm_index_us"]) == (mode != "none")
    assert (rec["search_s"]["16:2:8"] > 0) == (mode == "calibrated")


def test_permutations_are_permutations_and_the_search_keeps_more():
    w = torch.randn(64, 80, generator=torch.Generator().manual_seed(0))
    pattern = benchmark.VNMPattern.parse("16:2:8")
    i, o, _ = benchmark._permutations(w, pattern, "random", seed=1)
    assert torch.equal(i.sort().values, torch.arange(80)) and torch.equal(o.sort().values, torch.arange(64))
    from vnm_compile.calibration.permutation import kept_importance

    i, o, seconds = benchmark._permutations(w, pattern, "calibrated", seed=1)
    assert seconds > 0 and kept_importance(w.abs(), pattern, i, o) >= kept_importance(w.abs(), pattern)
    assert benchmark._permutations(w, benchmark.VNMPattern.parse("2:4"), "random", 0) == (None, None, 0.0)
    with pytest.raises(ValueError, match="permute must be one of"):
        benchmark.run_benchmark(benchmark.GRIDS["quick"], device="cpu", permute="folded")
