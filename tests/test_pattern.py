import math

import pytest

from vnm_compile import VNMPattern, mask_diversity


def test_parse_and_str_round_trip():
    p = VNMPattern.parse("64:2:5")
    assert p == VNMPattern(64, 2, 5)
    assert str(p) == "64:2:5"
    assert p.density == pytest.approx(2 / 5)
    assert VNMPattern.parse(str(VNMPattern(128, 2, 16))) == VNMPattern(128, 2, 16)


def test_nm_pattern():
    p = VNMPattern.parse("2:4")
    assert p.is_nm and p.m == 4 and p.n == 2
    assert str(p) == "2:4"
    assert p.density == 0.5


@pytest.mark.parametrize(
    "args, field",
    [((64, 4, 8), "n"), ((64, 2, 3), "m"), ((0, 2, 8), "v"), ((64, 0, 8), "n"), ((64, 5, 8), "n")],
)
def test_invalid_values_name_the_field(args, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        VNMPattern(*args)


@pytest.mark.parametrize("text", ["", "64:2", "a:b:c", "64:2:5:1", "2:8x"])
def test_parse_rejects_garbage(text):
    with pytest.raises(ValueError):
        VNMPattern.parse(text)


def test_frozen():
    p = VNMPattern(64, 2, 5)
    with pytest.raises(AttributeError):
        p.v = 32


def test_mask_diversity_matches_formula():
    for v, m in [(16, 5), (64, 8), (128, 16)]:
        k = (math.comb(m, 4) * math.comb(4, 2) ** v) ** (1 / (v * m))
        assert mask_diversity(VNMPattern(v, 2, m)) == pytest.approx(math.log(k))
    # Larger V at the same M has fewer choices per weight (paper Fig. 4).
    assert mask_diversity("16:2:8") > mask_diversity("128:2:8")
