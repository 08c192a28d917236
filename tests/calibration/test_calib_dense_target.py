import pytest
import torch

from vnm_compile.calibration.dense_target import dense_target
from vnm_compile.calibration.hessian import HessianObserver


def _pair(tokens: int = 300, inp: int = 29, seed: int = 0):
    """Dense inputs and 'pruned' ones: the same tokens with a correlated error and a shifted mean."""
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(tokens, inp, generator=g) @ (torch.randn(inp, inp, generator=g) / inp**0.5) + 0.7
    pruned = dense + 0.3 * dense @ (torch.randn(inp, inp, generator=g) / inp**0.5) + 0.1
    return pruned, dense


def _observer(pruned, dense):
    obs = HessianObserver(pruned.shape[1], "enc.fc")
    for a, b in zip(pruned.split(41), dense.split(41), strict=True):
        obs.add_pair(a.unsqueeze(0), b.unsqueeze(0))
    return obs


def test_add_pair_accumulates_every_moment_in_float64_reference():
    pruned, dense = _pair()
    obs = _observer(pruned, dense)
    p, d = pruned.double(), dense.double()
    for got, ref in ((obs.hessian, p.T @ p), (obs.cross, p.T @ d), (obs.dense_hessian, d.T @ d)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(obs.sum, p.sum(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(obs.dense_sum, d.sum(0), rtol=1e-6, atol=1e-6)
    assert obs.tokens == 300
    with pytest.raises(ValueError, match="enc.fc.*dense"):
        obs.add_pair(torch.randn(4, 29), torch.randn(5, 29))
    with pytest.raises(ValueError, match="enc.fc.*NaN"):
        obs.add_pair(torch.randn(4, 29), torch.full((4, 29), float("nan")))


@pytest.mark.parametrize("centre", [False, True])
def test_fit_and_error_match_float64_least_squares(centre):
    """W' solves min ||W X_dᵀ - W' Xᵀ (- b)||² + λ||W' - W||² (b free when centred); error() is that
    residual on the data, bias shift included, over ||W X_dᵀ||²."""
    pruned, dense = _pair(seed=1)
    w = torch.randn(13, 29, generator=torch.Generator().manual_seed(2))
    target = dense_target(_observer(pruned, dense), centre)
    damp = 0.01
    fitted = target.fit(w, damp)
    p, d, wd = pruned.double(), dense.double(), w.double()
    if centre:
        p, d = p - p.mean(0), d - d.mean(0)
    h = p.T @ p
    lam = damp * float((pruned.double().T @ pruned.double() if not centre else h).diagonal().mean())
    ref = torch.linalg.solve(h + lam * torch.eye(29, dtype=h.dtype), (p.T @ d + lam * torch.eye(29)) @ wd.T).T
    torch.testing.assert_close(fitted.double(), ref, rtol=1e-4, atol=1e-4)
    # The error of any weight, measured directly on the data.
    v = fitted * (torch.rand(13, 29, generator=torch.Generator().manual_seed(3)) > 0.5)
    out = pruned.double() @ v.double().T
    shift = target.bias_shift(w, v)
    if centre:
        out = out + shift.double()
    else:
        assert shift is None
    goal = dense.double() @ wd.T
    direct = float((goal - out).square().sum() / goal.square().sum())
    assert target.error(w, v) == pytest.approx(direct, rel=1e-4)
    # The fitted dense weight is closer to the dense outputs than W itself on the pruned inputs.
    assert target.error(w, fitted) < target.error(w, w)


def test_needs_paired_activations():
    obs = HessianObserver(5, "enc.q")
    obs.add_batch(torch.randn(9, 5))
    with pytest.raises(ValueError, match="enc.q.*add_pair"):
        dense_target(obs, False)
