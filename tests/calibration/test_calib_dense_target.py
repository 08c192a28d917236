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


def test_add_pair_accumulates_every_moment():
    pruned, dense = _pair()
    obs = _observer(pruned, dense)
    p, d = pruned.double(), dense.double()
    for got, ref in ((obs.hessian, p.T @ p), (obs.cross, p.T @ d), (obs.dense_hessian, d.T @ d)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-3)
    assert obs.tokens == 300
    with pytest.raises(ValueError, match="enc.fc.*dense"):
        obs.add_pair(torch.randn(4, 29), torch.randn(5, 29))
    with pytest.raises(ValueError, match="enc.fc.*NaN"):
        obs.add_pair(torch.randn(4, 29), torch.full((4, 29), float("nan")))


def test_add_pair_leaves_padding_out():
    pruned, dense = _pair(tokens=24, inp=9)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    obs = HessianObserver(9)
    obs.add_pair(pruned.view(2, 12, 9), dense.view(2, 12, 9), mask)
    keep = mask.view(-1).bool()
    p, d = pruned[keep].double(), dense[keep].double()
    assert obs.tokens == 19
    torch.testing.assert_close(obs.cross.double(), p.T @ d, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(obs.dense_hessian.double(), d.T @ d, rtol=1e-5, atol=1e-4)


def test_fit_and_error_match_float64_least_squares():
    """W' solves min ||X_d Wᵀ - X W'ᵀ||² + λ||W' - W||²; error() is the residual of any weight on the
    data over ||X_d Wᵀ||²."""
    pruned, dense = _pair(seed=1)
    w = torch.randn(13, 29, generator=torch.Generator().manual_seed(2))
    target = dense_target(_observer(pruned, dense))
    damp = 0.01
    fitted = target.fit(w, damp)
    p, d, wd = pruned.double(), dense.double(), w.double()
    h = p.T @ p
    lam = damp * float(h.diagonal().mean())
    eye = torch.eye(29, dtype=torch.float64)
    ref = torch.linalg.solve(h + lam * eye, (p.T @ d + lam * eye) @ wd.T).T
    torch.testing.assert_close(fitted.double(), ref, rtol=1e-4, atol=1e-4)
    goal = d @ wd.T
    v = fitted * (torch.rand(13, 29, generator=torch.Generator().manual_seed(3)) > 0.5)
    for weight in (v, w, fitted):
        direct = float((goal - p @ weight.double().T).square().sum() / goal.square().sum())
        assert target.error(w, weight) == pytest.approx(direct, rel=1e-4, abs=1e-9)
    # The fitted weight maps the pruned inputs closer to the dense outputs than W itself.
    assert target.error(w, fitted) < 0.5 * target.error(w, w)


def test_singular_moments_stay_finite():
    pruned, dense = _pair(tokens=10, inp=29)  # 10 tokens for 29 channels: H has rank 10
    pruned[:, 4] = 0.0  # and a dead channel
    w = torch.randn(5, 29)
    fitted = dense_target(_observer(pruned, dense)).fit(w, 0.01)
    assert bool(torch.isfinite(fitted).all())
    assert torch.equal(dense_target(_observer(pruned, dense)).fit(w, 0.01), fitted)  # reproducible


def test_needs_paired_activations():
    obs = HessianObserver(5, "enc.q")
    obs.add_batch(torch.randn(9, 5))
    with pytest.raises(ValueError, match="enc.q.*add_pair"):
        dense_target(obs)
