"""The dispatcher's answers from a measured table: prefer_sparse (one token count) and
sparse_token_limit (up to how many tokens), on small synthetic tables."""

from __future__ import annotations

import json

import pytest
import torch

from vnm_compile.kernels import dispatch
from vnm_compile.kernels.dispatch import prefer_sparse, sparse_speedup, sparse_token_limit, token_limit
from vnm_compile.pattern import VNMPattern


def rec(out_features, in_features, tokens, dense_us, **vnm_us):
    """One table record; keyword names are patterns with '_' for ':' (p64_2_8 -> '64:2:8')."""
    return {
        "out_features": out_features,
        "in_features": in_features,
        "tokens": tokens,
        "dense_us": dense_us,
        "vnm_us": {k.removeprefix("p").replace("_", ":"): us for k, us in vnm_us.items()},
    }


# dense 10 us everywhere: vnm_us < 10 is a win.
TABLE = {
    "records": [
        # 1000x2000: wins at 1 and 16, loses at 2048 and 8192 -> limit 16
        rec(1000, 2000, 1, 10.0, p64_2_8=4.0),
        rec(1000, 2000, 16, 10.0, p64_2_8=8.0),
        rec(1000, 2000, 2048, 10.0, p64_2_8=30.0),
        rec(1000, 2000, 8192, 10.0, p64_2_8=40.0),
        # 8000x8000: a win at 2048 after a loss at 16 does not count -> limit 1; 64:2:5 never wins -> 0;
        # 64:2:16 always wins -> None (no limit)
        rec(8000, 8000, 1, 10.0, p64_2_8=5.0, p64_2_5=12.0, p64_2_16=2.0),
        rec(8000, 8000, 16, 10.0, p64_2_8=11.0, p64_2_5=13.0, p64_2_16=3.0),
        rec(8000, 8000, 2048, 10.0, p64_2_8=9.0, p64_2_5=14.0, p64_2_16=6.0),
        # a second record at a point already measured (another part of the grid): its patterns are added
        rec(8000, 8000, 16, 10.0, p16_2_8=7.0),
    ]
}


def P(s: str) -> VNMPattern:
    return VNMPattern.parse(s)


def test_token_limit_rules():
    assert token_limit(TABLE, 1000, 2000, P("64:2:8")) == 16
    assert token_limit(TABLE, 8000, 8000, P("64:2:8")) == 1  # sparse must win at every count <= T
    assert token_limit(TABLE, 8000, 8000, P("64:2:5")) == 0  # never wins
    assert token_limit(TABLE, 8000, 8000, P("64:2:16")) is None  # wins everywhere measured: no limit
    assert token_limit({"records": []}, 1000, 2000, P("64:2:8")) is None
    assert token_limit({"records": [rec(8, 8, 1, 1.0, p64_2_8=None)]}, 8, 8, P("64:2:8")) is None


def test_a_win_needs_the_margin():
    # 1.05x at 16 tokens is within timing noise / kernel-bucket changes: not a win, the limit stays at 1
    table = {"records": [rec(64, 64, 1, 10.0, p64_2_8=5.0), rec(64, 64, 16, 10.0, p64_2_8=10 / 1.05)]}
    assert dispatch.MIN_SPEEDUP > 1.05
    assert token_limit(table, 64, 64, P("64:2:8")) == 1
    table["records"][1]["vnm_us"]["64:2:8"] = 10 / (dispatch.MIN_SPEEDUP + 0.01)
    assert token_limit(table, 64, 64, P("64:2:8")) is None


def test_token_limit_nearest_shape_and_pattern():
    # nearest shape in log distance: 1100x1900 -> 1000x2000, 5000x9000 -> 8000x8000
    assert token_limit(TABLE, 1100, 1900, P("64:2:8")) == 16
    assert token_limit(TABLE, 5000, 9000, P("64:2:8")) == 1
    # unmeasured pattern: nearest M first (32:2:5 -> 64:2:5, never wins), then V
    assert token_limit(TABLE, 8000, 8000, P("32:2:5")) == 0
    assert token_limit(TABLE, 8000, 8000, P("128:2:16")) is None
    # nearest pattern per measured point: 16:2:8 is measured at 16 tokens only (a win there);
    # at 1 and 2048 tokens the nearest is 64:2:8 (win at 1, win at 2048) -> sparse wins everywhere
    assert token_limit(TABLE, 8000, 8000, P("16:2:8")) is None
    assert sparse_speedup(TABLE, 8000, 8000, P("16:2:8"), 16) == pytest.approx(10 / 7)
    assert sparse_speedup(TABLE, 8000, 8000, P("64:2:8"), 16) == pytest.approx(10 / 11)


def test_between_measured_points_the_last_winning_point_is_the_limit():
    limit = token_limit(TABLE, 1000, 2000, P("64:2:8"))
    assert limit == 16  # 17-2047 tokens take the dense path
    # prefer_sparse's answer at one count takes the nearest point (100 tokens: nearer 16 in log)
    assert sparse_speedup(TABLE, 1000, 2000, P("64:2:8"), 100) == pytest.approx(10 / 8)
    assert sparse_speedup(TABLE, 1000, 2000, P("64:2:8"), 1000) == pytest.approx(10 / 30)


def test_sparse_speedup_nearest_point():
    p = P("64:2:8")
    assert sparse_speedup(TABLE, 1000, 2000, p, 1) == pytest.approx(2.5)
    assert sparse_speedup(TABLE, 1000, 2000, p, 3) == pytest.approx(2.5)
    assert sparse_speedup(TABLE, 1000, 2000, p, 6) == pytest.approx(1.25)
    assert sparse_speedup(TABLE, 900, 2100, p, 20000) == pytest.approx(0.25)
    assert sparse_speedup({"records": []}, 1, 1, p, 1) is None


def test_expanded_timings_where_measured():
    # 16 tokens: 12 us without the expanded weights (a loss), 8 us with them (a win); a later
    # record at the same point (the pattern sweep) times the op without them only
    main = rec(1000, 2000, 16, 10.0, p64_2_8=12.0)
    main["vnm_expanded_us"] = {"64:2:8": 8.0}
    table = {"records": [rec(1000, 2000, 1, 10.0, p64_2_8=4.0), main, rec(1000, 2000, 16, 10.0, p64_2_8=12.5)]}
    p = P("64:2:8")
    assert sparse_speedup(table, 1000, 2000, p, 16) == pytest.approx(10 / 12.5)
    assert sparse_speedup(table, 1000, 2000, p, 16, expanded=True) == pytest.approx(10 / 8)
    # at 1 token nothing was timed with them: the plain time answers
    assert sparse_speedup(table, 1000, 2000, p, 1, expanded=True) == pytest.approx(2.5)
    assert token_limit(table, 1000, 2000, p) == 1
    assert token_limit(table, 1000, 2000, p, expanded=True) is None


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """A "CUDA device" whose table is tmp_path/fake-gpu/linear.json (found through $VNM_BENCH_RESULTS)."""
    monkeypatch.setattr(dispatch.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dispatch, "gpu_slug", lambda device=None: "fake-gpu")
    monkeypatch.setenv("VNM_BENCH_RESULTS", str(tmp_path))
    path = tmp_path / "fake-gpu" / "linear.json"
    path.parent.mkdir()
    path.write_text(json.dumps(TABLE))
    return path


def test_device_answers_from_the_table(fake_gpu):
    assert sparse_token_limit(1000, 2000, "64:2:8", "cuda") == 16
    assert sparse_token_limit(8000, 8000, "64:2:5", torch.device("cuda", 0)) == 0
    assert sparse_token_limit(8000, 8000, "64:2:16", "cuda") is None
    assert prefer_sparse(1000, 2000, "64:2:8", 16, "cuda") is True
    assert prefer_sparse(1000, 2000, "64:2:8", 2048, "cuda") is False
    # off CUDA: always sparse, whatever the table says
    assert sparse_token_limit(8000, 8000, "64:2:5", "cpu") is None
    assert prefer_sparse(8000, 8000, "64:2:5", 1, "cpu") is True


def test_device_table_as_a_json_path(fake_gpu, monkeypatch):
    monkeypatch.setenv("VNM_BENCH_RESULTS", str(fake_gpu))
    assert sparse_token_limit(1000, 2000, "64:2:8", "cuda") == 16


def test_an_unmeasured_gpu_runs_sparse_only_at_decode(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(dispatch.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dispatch, "gpu_slug", lambda device=None: "no-such-gpu-measured")
    monkeypatch.setenv("VNM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(dispatch, "_WARNED", set())
    monkeypatch.setenv("VNM_BENCH_RESULTS", str(tmp_path))
    with caplog.at_level("WARNING", logger=dispatch.__name__):
        assert sparse_token_limit(1000, 2000, "64:2:8", "cuda") == dispatch.UNMEASURED_TOKEN_LIMIT == 1
    assert "vnm bench" in caplog.text
    assert prefer_sparse(1000, 2000, "64:2:8", 1, "cuda") is True
    assert prefer_sparse(1000, 2000, "64:2:8", 4096, "cuda") is False
    # off CUDA it stays sparse (the CPU reference / interpreter are for correctness)
    assert sparse_token_limit(1000, 2000, "64:2:8", "cpu") is None
