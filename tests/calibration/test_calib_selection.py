"""select_pattern: the paper's sifting on hand-made speed-up tables (threshold, smallest M per V,
largest mask diversity), ties, bad input and empty results; `vnm select` on a JSON table."""

from __future__ import annotations

import json
import math

import pytest

from vnm_compile import VNMPattern, mask_diversity, select_pattern
from vnm_compile.calibration.selection import sift_patterns
from vnm_compile.cli import main

TABLE = {
    "16:2:5": 1.1, "16:2:6": 1.3, "16:2:8": 1.6,
    "32:2:5": 1.2, "32:2:6": 1.45, "32:2:8": 1.8,
    "64:2:5": 1.3, "64:2:6": 1.6, "64:2:8": 2.0,
    "128:2:5": 1.4, "128:2:8": 2.2,
}  # fmt: skip


def _log_k(v: int, m: int, n: int = 2) -> float:
    """log K(V, M) written out independently: K = [C(M,4) * C(4,n)^V]^(1/(V*M))."""
    return math.log((math.comb(m, 4) * math.comb(4, n) ** v) ** (1.0 / (v * m)))


def test_mask_diversity_matches_formula():
    for v, m in [(16, 5), (64, 5), (64, 8), (128, 16)]:
        assert mask_diversity(f"{v}:2:{m}") == pytest.approx(_log_k(v, m), rel=1e-12)
    # More diversity at smaller M (fixed V) and at smaller V (fixed M).
    assert mask_diversity("64:2:5") > mask_diversity("64:2:8")
    assert mask_diversity("16:2:8") > mask_diversity("64:2:8")


@pytest.mark.parametrize(
    "threshold, expected",
    [
        (1.5, "64:2:6"),  # fast: 16:2:8 32:2:8 64:2:6 64:2:8 128:2:8 -> smallest M: 16:2:8 32:2:8 64:2:6 128:2:8
        (1.0, "16:2:5"),  # everything passes: M=5 everywhere, V=16 has the most diversity
        (1.35, "128:2:5"),  # smallest M: 16:2:8 32:2:6 64:2:6 128:2:5 -> M=5 wins even at V=128
        (2.0, "64:2:8"),  # exactly at the threshold counts
        (2.1, "128:2:8"),
    ],
)
def test_sifting_on_hand_made_table(threshold, expected):
    assert select_pattern(TABLE, threshold) == VNMPattern.parse(expected)
    # Reference: brute force over the table with the formula above.
    fast = {VNMPattern.parse(k): s for k, s in TABLE.items() if s >= threshold}
    smallest = {p for p in fast if p.m == min(q.m for q in fast if q.v == p.v)}
    assert max(smallest, key=lambda p: _log_k(p.v, p.m)) == VNMPattern.parse(expected)


def test_sift_stages_are_reported():
    result = sift_patterns(TABLE, 1.5)
    assert set(map(str, result.fast_enough)) == {"16:2:8", "32:2:8", "64:2:6", "64:2:8", "128:2:8"}
    assert set(map(str, result.smallest_m)) == {"16:2:8", "32:2:8", "64:2:6", "128:2:8"}
    assert str(result.pick) == "64:2:6"
    table = result.table()
    assert "PICK" in table and "below threshold" in table and "smaller M" in table


def test_same_m_different_n_and_pattern_keys():
    table = {VNMPattern(64, 1, 5): 1.6, "64:2:5": 1.5, VNMPattern(64, 2, 8): 2.0}
    # Both M=5 entries survive step 2; 64:2:5 has more diversity (C(4,2) > C(4,1)).
    assert select_pattern(table, 1.5) == VNMPattern(64, 2, 5)
    assert select_pattern(table, 1.55) == VNMPattern(64, 1, 5)


def test_ties_go_to_higher_speedup_then_smaller_v():
    # N:4 patterns have the same diversity log(6)/4 whatever V: an exact tie.
    a, b = VNMPattern(16, 2, 4), VNMPattern(32, 2, 4)
    assert mask_diversity(a) == mask_diversity(b)
    assert select_pattern({a: 1.2, b: 1.3}, 1.0) == b
    assert select_pattern({a: 1.3, b: 1.3}, 1.0) == a
    assert select_pattern({b: 1.3, a: 1.3}, 1.0) == a  # independent of table order


def test_empty_and_nothing_fast_enough():
    with pytest.raises(ValueError, match="empty"):
        select_pattern({}, 1.0)
    with pytest.raises(ValueError, match=r"no pattern reaches speed-up 3.*128:2:8 at 2.200"):
        select_pattern(TABLE, 3.0)
    assert sift_patterns(TABLE, 3.0).pick is None


def test_bad_tables():
    with pytest.raises(ValueError, match="not a V:N:M pattern"):
        select_pattern({"64-2-5": 1.5}, 1.0)
    with pytest.raises(ValueError, match="finite number"):
        select_pattern({"64:2:5": float("nan")}, 1.0)
    with pytest.raises(ValueError, match="twice"):
        select_pattern({"64:2:5": 1.5, VNMPattern(64, 2, 5): 1.6}, 1.0)
    with pytest.raises(ValueError, match="threshold"):
        select_pattern(TABLE, float("inf"))
    with pytest.raises(TypeError, match="mapping"):
        select_pattern([("64:2:5", 1.5)], 1.0)


def test_cli_select(tmp_path, capsys):
    path = tmp_path / "speedups.json"
    path.write_text(json.dumps(TABLE))
    assert main(["select", "--speedups", str(path), "--threshold", "1.5"]) == 0
    out = capsys.readouterr().out
    assert "64:2:6" in out and "PICK" in out
    for key in TABLE:
        assert key in out
    assert main(["select", "--speedups", str(path), "--threshold", "9"]) == 1
    assert "no pattern reaches" in capsys.readouterr().out


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        ("{not json", "Expecting property name"),
        ('{"64-2-5": 1.5}', "not a V:N:M pattern"),
        ('[["64:2:5", 1.5]]', "expected a JSON object"),
    ],
)
def test_cli_select_bad_input_is_one_line_and_nonzero(tmp_path, capsys, content, message):
    path = tmp_path / "speedups.json"
    if content is not None:
        path.write_text(content)
    assert main(["select", "--speedups", str(path), "--threshold", "1.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vnm select: ") and message in err and "\n" not in err
