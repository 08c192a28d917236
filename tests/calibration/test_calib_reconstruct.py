import pytest
import torch

from vnm_compile import VNMPattern, is_vnm, vnm_mask
from vnm_compile.calibration.hessian import HessianObserver, damped_hessian
from vnm_compile.calibration.reconstruct import (
    exact_reconstruct,
    inverse_diagonal,
    obs_saliency,
    output_error,
    prune_second_order,
)

PATTERNS = [VNMPattern(16, 2, 5), VNMPattern(8, 2, 8), VNMPattern.parse("2:4")]


def _layer(out: int, inp: int, tokens: int, seed: int = 0):
    """A random weight and correlated, non-centred activations (like a real layer's input)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(inp, inp, generator=g) / inp**0.5
    x = torch.randn(tokens, inp, generator=g) @ mix + 0.5 * torch.randn(inp, generator=g)
    w = torch.randn(out, inp, generator=g)
    return w, x


def _hessian(x: torch.Tensor) -> torch.Tensor:
    obs = HessianObserver(x.shape[1])
    for chunk in x.split(37):  # streamed in uneven pieces
        obs.add_batch(chunk.unsqueeze(0))
    return obs.hessian


def test_hessian_observer_streams_xtx_in_float32():
    _, x = _layer(3, 23, 200)
    obs = HessianObserver(23, "enc.q")
    obs.add_batch(x[:150].view(3, 50, 23).to(torch.bfloat16))
    obs.add_batch(x[150:])
    ref = x[:150].to(torch.bfloat16).double()
    ref = ref.T @ ref + x[150:].double().T @ x[150:].double()
    assert obs.hessian.dtype == torch.float32 and obs.tokens == 200
    torch.testing.assert_close(obs.hessian.double(), ref, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="enc.q.*22"):
        obs.add_batch(torch.randn(4, 22))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_bad_activations_name_the_layer(bad):
    obs = HessianObserver(8, "encoder.layer.3.output.dense")
    x = torch.randn(5, 8)
    x[2, 3] = bad
    with pytest.raises(ValueError, match=r"encoder\.layer\.3\.output\.dense.*NaN or Inf"):
        obs.add_batch(x)


def test_exact_matches_float64_least_squares_per_row():
    w, x = _layer(37, 41, 300)
    h = _hessian(x)
    mask = vnm_mask(w.abs(), VNMPattern(8, 2, 5))
    hd = damped_hessian(h, 0.01).double()
    got = exact_reconstruct(w, damped_hessian(h, 0.01), mask)
    for i in range(w.shape[0]):
        s = mask[i].nonzero().squeeze(1)
        ref = torch.linalg.solve(hd[s][:, s], (hd @ w[i].double())[s])
        torch.testing.assert_close(got[i, s].double(), ref, rtol=1e-3, atol=1e-4)
    assert not bool(got[~mask].any())


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("method", ["sparsegpt", "exact", "auto"])
@pytest.mark.parametrize("shape", [(48, 64), (53, 97), (130, 41)])
def test_reconstruction_never_raises_the_output_error(pattern, method, shape):
    w, x = _layer(*shape, tokens=400, seed=shape[0])
    h = _hessian(x)
    mask = vnm_mask(w.abs(), pattern)
    rec = prune_second_order(w, h, pattern, mask=mask, method=method)
    assert torch.equal(rec.mask, mask)
    assert not bool(rec.weight[~mask].any())
    assert bool(torch.isfinite(rec.weight).all())
    masked_err = output_error(w, w * mask, h)
    assert rec.error_masked == pytest.approx(masked_err)
    assert rec.error == pytest.approx(output_error(w, rec.weight, h), rel=1e-4)
    assert rec.error < 0.9 * masked_err  # correlated inputs leave much to recover


def test_output_error_against_float64_outputs():
    w, x = _layer(20, 30, 100)
    h = _hessian(x)
    pruned = w * vnm_mask(w.abs(), "4:2:5")
    xd = x.double()
    ref = ((xd @ (w.double() - pruned.double()).T) ** 2).sum() / ((xd @ w.double().T) ** 2).sum()
    assert output_error(w, pruned, h) == pytest.approx(float(ref), rel=1e-4)


@pytest.mark.parametrize("pattern", PATTERNS[:2], ids=str)
def test_obs_mask_is_exact_with_and_without_permutations(pattern):
    w, x = _layer(64, 80, 500, seed=3)
    h = _hessian(x)
    g = torch.Generator().manual_seed(1)
    in_perm, out_perm = torch.randperm(80, generator=g), torch.randperm(64, generator=g)
    plain = prune_second_order(w, h, pattern, method="sparsegpt")
    assert is_vnm(plain.mask, pattern)
    permuted = prune_second_order(w, h, pattern, in_perm=in_perm, out_perm=out_perm, method="sparsegpt")
    assert is_vnm(permuted.mask, pattern, in_perm, out_perm)
    assert not is_vnm(permuted.mask, pattern)  # the pattern holds in permuted coordinates only
    for rec in (plain, permuted):
        assert not bool(rec.weight[~rec.mask].any())
        assert rec.error < rec.error_masked


def test_obs_saliency_is_the_single_weight_obs_error():
    """Removing w_ij alone and re-solving the rest of row i costs w_ij² / [H⁻¹]_jj (in output error units)."""
    w, x = _layer(4, 12, 200)
    hd = damped_hessian(_hessian(x), 0.01).double()
    sal = obs_saliency(w, inverse_diagonal(hd.float()))
    i, j = 2, 5
    keep = [k for k in range(12) if k != j]
    sol = torch.linalg.solve(hd[keep][:, keep], (hd @ w[i].double())[keep])
    new = torch.zeros(12, dtype=torch.float64)
    new[keep] = sol
    delta = w[i].double() - new
    assert float(sal[i, j]) == pytest.approx(float(delta @ hd @ delta), rel=1e-3)


def test_singular_hessian_dead_and_duplicated_channels():
    w, x = _layer(32, 40, 300)
    x[:, 7] = 0.0  # dead channel
    x[:, 11] = x[:, 12]  # duplicated channel
    h = _hessian(x)
    for mask in (None, vnm_mask(w.abs(), "16:2:5")):
        rec = prune_second_order(w, h, "16:2:5", mask=mask)
        assert bool(torch.isfinite(rec.weight).all())
        assert rec.error <= rec.error_masked
        assert is_vnm(rec.mask, "16:2:5")


def test_all_zero_hessian_falls_back_without_nan():
    w, _ = _layer(16, 20, 10)
    rec = prune_second_order(w, torch.zeros(20, 20), "8:2:5")
    assert bool(torch.isfinite(rec.weight).all()) and is_vnm(rec.mask, "8:2:5")
    assert rec.error == 0.0 and rec.error_masked == 0.0


def test_too_few_tokens_still_lowers_the_error():
    w, x = _layer(24, 64, 20)  # 20 tokens for a 64-wide input: H has rank 20
    h = _hessian(x)
    rec = prune_second_order(w, h, "8:2:5", mask=vnm_mask(w.abs(), "8:2:5"))
    assert bool(torch.isfinite(rec.weight).all())
    assert rec.error < rec.error_masked


def test_reproducible():
    w, x = _layer(40, 50, 300)
    h = _hessian(x)
    a = prune_second_order(w, h, "8:2:5")
    b = prune_second_order(w.clone(), h.clone(), "8:2:5")
    assert torch.equal(a.weight, b.weight) and torch.equal(a.mask, b.mask)


def test_bad_arguments():
    w, x = _layer(8, 10, 50)
    with pytest.raises(ValueError, match="method"):
        prune_second_order(w, _hessian(x), "4:2:5", method="cholesky")
    with pytest.raises(ValueError, match="square"):
        damped_hessian(torch.zeros(3, 4))


def test_hessian_observer_leaves_padding_out():
    _, x = _layer(3, 9, 24)
    x = x.view(2, 12, 9)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    obs = HessianObserver(9)
    obs.add_batch(x, mask)
    kept = torch.cat([x[0], x[1, :7]]).double()
    assert obs.tokens == 19
    torch.testing.assert_close(obs.hessian.double(), kept.T @ kept, rtol=1e-5, atol=1e-5)
    obs.add_batch(x[0], mask)  # a mask of another shape is ignored
    assert obs.tokens == 31


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_conjugate_gradients_reach_the_exact_solution(pattern):
    from vnm_compile.calibration.reconstruct import refine_cg

    w, x = _layer(40, 97, 500, seed=7)
    h = _hessian(x)
    hd = damped_hessian(h, 0.01)
    mask = vnm_mask(w.abs(), pattern)
    exact = exact_reconstruct(w, hd, mask)
    cg = refine_cg(w, hd, mask, w * mask, iters=60)
    assert not bool(cg[~mask].any())
    assert output_error(w, cg, h) == pytest.approx(output_error(w, exact, h), rel=1e-3)
    torch.testing.assert_close(cg, exact, rtol=1e-2, atol=1e-2 * float(exact.abs().max()))
    few = refine_cg(w, hd, mask, w * mask, iters=2)  # every iteration lowers the error
    assert output_error(w, exact, h) <= output_error(w, few, h) * (1 + 1e-4) < output_error(w, w * mask, h)


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("mask_blocksize", [None, 1, 16])
def test_adaptive_mask_blocks_exact_pattern_and_lower_error(pattern, mask_blocksize):
    """The mask chosen group by group on the updated weights: pattern exact (with and without
    permutations), never above the plain masked weight's error, and the same from the same inputs."""
    w, x = _layer(67, 83, 500, seed=11)
    h = _hessian(x)
    g = torch.Generator().manual_seed(2)
    in_perm, out_perm = torch.randperm(83, generator=g), torch.randperm(67, generator=g)
    for perms in ({}, {"in_perm": in_perm, "out_perm": out_perm}):
        rec = prune_second_order(w, h, pattern, mask_blocksize=mask_blocksize, **perms)
        assert is_vnm(rec.mask, pattern, perms.get("in_perm"), perms.get("out_perm"))
        assert not bool(rec.weight[~rec.mask].any()) and bool(torch.isfinite(rec.weight).all())
        assert rec.error_masked == pytest.approx(output_error(w, w * rec.mask, h))
        assert rec.error == pytest.approx(output_error(w, rec.weight, h), rel=1e-4)
        assert rec.error < rec.error_masked
        again = prune_second_order(w.clone(), h.clone(), pattern, mask_blocksize=mask_blocksize, **perms)
        assert torch.equal(again.weight, rec.weight) and torch.equal(again.mask, rec.mask)


def test_hessian_factors_match_factoring_per_call():
    """The shared factors equal what each linear factored on its own (float64: permuting H⁻¹ instead of
    factoring the permuted H changes nothing but rounding), and a factors object serving several
    permutations gives each call what a fresh one gives (float32, bit for bit)."""
    from vnm_compile.calibration.reconstruct import HessianFactors, inverse_cholesky

    w, x = _layer(29, 53, 300, seed=5)
    h = _hessian(x)
    g = torch.Generator().manual_seed(4)
    perms = [torch.randperm(53, generator=g), None, torch.randperm(53, generator=g)]
    f64 = HessianFactors(h.double(), 0.01)
    hd = damped_hessian(h.double(), 0.01)
    assert hd.dtype == torch.float64
    torch.testing.assert_close(f64.inverse_diagonal(), inverse_diagonal(hd), rtol=1e-9, atol=0)
    for perm in perms:
        p = torch.arange(53) if perm is None else perm
        ref = inverse_cholesky(hd[p][:, p])
        torch.testing.assert_close(f64.inverse_upper(perm), ref, rtol=1e-9, atol=1e-12 * float(ref.abs().max()))
        assert torch.equal(f64.damped_in(perm), hd[p][:, p])
    shared = HessianFactors(h, 0.01)
    for perm, mask in zip(perms, (None, vnm_mask(w.abs(), "8:2:5"), None), strict=True):
        kw = dict(mask=mask, in_perm=perm, out_perm=None if perm is None else torch.arange(29).flip(0))
        a = prune_second_order(w, h, "8:2:5", factors=shared, **kw)
        b = prune_second_order(w, h, "8:2:5", **kw)
        assert torch.equal(a.weight, b.weight) and torch.equal(a.mask, b.mask) and a.error == b.error


def _sparsegpt_column_by_column(weight, hinv_upper, pattern, mask=None, blocksize=128, mask_blocksize=None):
    """The SparseGPT pass as first written: every column's error spread at once over the rest of its
    block (rank-1 updates), masks from vnm_mask; the reference for the blocked pass."""
    w = weight.clone()
    cols = w.shape[1]
    chosen = torch.zeros_like(w, dtype=torch.bool) if mask is None else mask.bool()
    width = max(pattern.m, blocksize // pattern.m * pattern.m)
    step = pattern.m if mask_blocksize is None else min(width, max(pattern.m, mask_blocksize // pattern.m * pattern.m))
    for i1 in range(0, cols, width):
        i2 = min(i1 + width, cols)
        w1, hinv1 = w[:, i1:i2].clone(), hinv_upper[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            if mask is None and i % step == 0:
                j = min(i + step, i2 - i1)
                chosen[:, i1 + i : i1 + j] = vnm_mask(w1[:, i:j].square() / hinv1.diagonal()[i:j].square(), pattern)
            keep = chosen[:, i1 + i].to(w1.dtype)
            err = w1[:, i] * (1 - keep) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i1:i2] = w1 * chosen[:, i1:i2]
        if i2 < cols:
            w[:, i2:] -= err1 @ hinv_upper[i1:i2, i2:]
    return w, chosen


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("shape", [(48, 64), (53, 97), (130, 41), (19, 263)])
def test_blocked_sparsegpt_matches_column_by_column(pattern, shape, monkeypatch):
    """Blocked updates per M-column group give the column-by-column pass's masks and weights (float64),
    permuted and not, with the mask chosen per group, per 16 columns, or fixed; the pattern is exact,
    and the pass never asks the device for a value (no bool()/item() in the column loop)."""
    from vnm_compile.calibration.reconstruct import inverse_cholesky, sparsegpt_prune

    w, x = _layer(*shape, tokens=300, seed=sum(shape))
    w = w.double()
    hd = damped_hessian(_hessian(x).double(), 0.01)
    g = torch.Generator().manual_seed(shape[1])
    in_perm, out_perm = torch.randperm(shape[1], generator=g), torch.randperm(shape[0], generator=g)
    for perms in ((None, None), (in_perm, out_perm)):
        ip = torch.arange(shape[1]) if perms[0] is None else perms[0]
        op = torch.arange(shape[0]) if perms[1] is None else perms[1]
        wp, hinv_u = w[op][:, ip], inverse_cholesky(hd[ip][:, ip])
        for mask, mask_blocksize in ((None, None), (None, 16), (vnm_mask(wp.abs(), pattern), None)):
            ref_w, ref_mask = _sparsegpt_column_by_column(wp, hinv_u, pattern, mask, 32, mask_blocksize)
            with monkeypatch.context() as m:
                for attr in ("__bool__", "item", "__float__", "__int__"):
                    m.setattr(
                        torch.Tensor, attr, lambda *a, attr=attr: pytest.fail(f"the pass waited on the device: {attr}")
                    )
                got_w, got_mask = sparsegpt_prune(wp, hinv_u, pattern, mask, 32, mask_blocksize)
            assert got_w.dtype == torch.float64
            assert torch.equal(got_mask, ref_mask) and is_vnm(got_mask, pattern)
            torch.testing.assert_close(got_w, ref_w, rtol=0, atol=1e-9 * float(ref_w.abs().max()))
            assert not bool(got_w[~got_mask].any())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), 3e19])
def test_bad_activations_found_from_the_diagonal_in_any_batch(bad):
    """The observers check only diag(H) (and the dense moment's): a NaN, ±Inf or overflowing activation
    anywhere, in any batch, is still found, on the pruned and on the dense side; damped_hessian finds a
    non-finite H from its diagonal too."""
    g = torch.Generator().manual_seed(0)
    for row, col in ((0, 0), (6, 10), (3, 5)):
        obs = HessianObserver(11, "blocks.2.fc")
        obs.add_batch(torch.randn(7, 11, generator=g))  # a good batch first
        x = torch.randn(7, 11, generator=g)
        x[row, col] = bad
        with pytest.raises(ValueError, match=r"blocks\.2\.fc.*NaN or Inf"):
            obs.add_batch(x)
        pair = HessianObserver(11, "blocks.2.fc")
        with pytest.raises(ValueError, match=r"blocks\.2\.fc: the dense model's.*NaN or Inf"):
            pair.add_pair(torch.randn(7, 11, generator=g), x)
    h = torch.eye(5)
    h[2, 2] = bad if bad != 3e19 else float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        damped_hessian(h)


@pytest.mark.parametrize("iters", [1, 3, 5])
def test_in_place_conjugate_gradients_follow_the_textbook_iterates(iters):
    """refine_cg's in-place buffers give the iterates of a plain Jacobi-preconditioned CG per row (float64),
    in the first iterations (near convergence float32 iterates scatter while the objective does not)."""
    from vnm_compile.calibration.reconstruct import refine_cg

    w, x = _layer(23, 61, 400, seed=9)
    hd = damped_hessian(_hessian(x), 0.01)
    mask = vnm_mask(w.abs(), "8:2:5")
    h64, w64, keep = hd.double(), w.double(), mask.double()
    inv_diag = 1 / h64.diagonal()
    ref = w64 * keep
    r = ((w64 - ref) @ h64) * keep
    z = r * inv_diag
    p, rz = z.clone(), (r * z).sum(1, keepdim=True)
    for _ in range(iters):
        ap = (p @ h64) * keep
        alpha = rz / (p * ap).sum(1, keepdim=True)
        ref, r = ref + alpha * p, r - alpha * ap
        z = r * inv_diag
        rz_new = (r * z).sum(1, keepdim=True)
        p, rz = z + rz_new / rz * p, rz_new
    got = refine_cg(w, hd, mask, w * mask, iters=iters, tol=0.0)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-4 * float(ref.abs().max()))
