"""sweep_sparse_tc_decode_xs: the candidate configs, the greedy order and the table (CPU, made-up times)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import sweep_sparse_tc_decode_xs as sweep  # noqa: E402

from vnm_compile.kernels.sparse_tc import DECODE_GRID  # noqa: E402


def test_candidates_cover_every_grid_config_with_each_way_of_building_b():
    cands = sweep.candidates()
    keys = [tuple(sorted(c.items())) for c in cands]
    assert len(keys) == len(set(keys))  # each once
    for cfg in DECODE_GRID:
        for xs in (0, 1, 2):
            c = {**cfg, "XS": xs}
            assert (tuple(sorted(c.items())) in keys) == (not (xs == 1 and c.get("DP")))  # XS=1 takes no DP


def _record(tokens, times):
    return {"name": "l", "out_features": 64, "in_features": 128, "tokens": tokens, "pattern": "64:2:8",
            "dense_us": 10.0, "configs_us": times}  # fmt: skip


def test_greedy_order_and_table():
    records = [
        _record(1, {"A XS=0": 4.0, "B XS=2": 5.0, "C XS=1": None}),
        _record(16, {"A XS=0": 9.0, "B XS=2": 6.0, "C XS=1": 8.0}),
    ]
    order = sweep.greedy(records)
    # B alone: (5/4 + 1) / 2; A alone: (1 + 9/6) / 2; C alone: never ran at 1 token
    assert [k for k, _ in order] == ["B XS=2", "A XS=0", "C XS=1"]
    assert order[0][1] == (5 / 4 + 1) / 2 and order[1][1] == 1.0 == order[2][1]
    meta = {"gpu": "G", "torch": "t", "triton": "tr", "cuda": "c", "date_utc": "d", "command": "cmd", "seconds": 1}
    md = sweep.to_markdown({"meta": meta, "records": records, "greedy": order})
    assert "| l | 64x128 | 1 | 64:2:8 | 10.0 | 4.00 | n/a | 5.00 | 0.80x | 2.50x | A XS=0 |" in md
    assert "| l | 64x128 | 16 | 64:2:8 | 10.0 | 9.00 | 8.00 | 6.00 | 1.50x | 1.67x | B XS=2 |" in md
    assert "1. `B XS=2`: 1.1250" in md


def test_explore_candidates_are_the_earlier_grid_its_xs2_copies_and_six_more():
    earlier = sweep.earlier_grid()
    explore = sweep.explore_candidates()
    keys = [tuple(sorted(c.items())) for c in explore]
    assert len(earlier) == 16 and len(explore) == 35 == len(set(keys))
    assert explore[:16] == earlier and all(c["XS"] in (0, 1) for c in earlier)
    copies = [{**c, "XS": 2} for c in earlier if c["XS"] == 0]
    assert explore[16 : 16 + len(copies)] == copies and all(c["XS"] == 2 for c in explore[16:])
    assert all(tuple(sorted(c.items())) in keys for c in DECODE_GRID)  # the grid was picked from them
