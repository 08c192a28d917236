import pytest
import torch

from vnm_compile import importance

W = torch.tensor([[1.0, -2.0, 0.0], [3.0, 4.0, -1.0]])
NORM = torch.tensor([4.0, 1.0, 9.0])


def test_abs():
    assert torch.equal(importance(W, "abs"), W.abs())


def test_wanda_by_hand():
    expected = torch.tensor([[4.0, 2.0, 0.0], [12.0, 4.0, 9.0]])
    assert torch.allclose(importance(W, "wanda", NORM), expected)


def test_ria_by_hand():
    # column sums of |W|: [4, 6, 1]; row sums: [3, 8]; sqrt(norm) = [2, 1, 3]
    expected = torch.tensor(
        [
            [(1 / 4 + 1 / 3) * 2, (2 / 6 + 2 / 3) * 1, 0.0],
            [(3 / 4 + 3 / 8) * 2, (4 / 6 + 4 / 8) * 1, (1 / 1 + 1 / 8) * 3],
        ]
    )
    assert torch.allclose(importance(W, "ria", NORM), expected)
    # alpha changes the activation exponent
    assert torch.allclose(importance(W, "ria", NORM, alpha=1.0)[1, 2], torch.tensor((1 + 1 / 8) * 9))


def test_ria_zero_rows_and_columns_give_zero_not_nan():
    w = torch.zeros(3, 4)
    w[0, 0] = 1.0
    s = importance(w, "ria", torch.ones(4))
    assert torch.isfinite(s).all() and s[0, 0] == 2.0 and s.sum() == 2.0


@pytest.mark.parametrize("method", ["wanda", "ria"])
def test_missing_act_norm(method):
    with pytest.raises(ValueError, match="act_norm"):
        importance(W, method)


def test_bad_inputs():
    with pytest.raises(ValueError, match="shape"):
        importance(W, "ria", torch.ones(4))
    with pytest.raises(ValueError, match="unknown importance method"):
        importance(W, "magnitude")
    with pytest.raises(ValueError, match="2-D"):
        importance(torch.ones(3), "abs")
    with pytest.raises(ValueError, match="finite"):
        importance(W, "wanda", torch.tensor([1.0, float("nan"), 1.0]))
