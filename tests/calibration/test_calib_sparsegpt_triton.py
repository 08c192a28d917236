"""SparseGPT's group step in one Triton launch (calibration/sparsegpt_triton.py) against its PyTorch reference.

On CPU through the Triton interpreter (TRITON_INTERPRET=1), compiled on a GPU (``-m gpu``). Outputs are poisoned
(NaN errors, random mask bits) before each run; masks must match exactly, weights and errors as closely as the
PyTorch step itself matches a float64 run of the same step (three-way check).
"""

import pytest
import torch

from vnm_compile import VNMPattern, is_vnm, vnm_mask
from vnm_compile.calibration.hessian import damped_hessian
from vnm_compile.calibration.reconstruct import inverse_cholesky, sparsegpt_prune
from vnm_compile.calibration.sparsegpt_triton import sparsegpt_group_, sparsegpt_group_reference_

pytestmark = pytest.mark.usefixtures("interpret_unless_gpu")  # tests/conftest.py

# (pattern, rows, cols, first column of the group, its width): partial V blocks, groups narrower than M at the
# matrix's right edge (fewer than 4 columns too), several V blocks per program (8:2:8, 16:1:6, 24:2:6), V not a power of two (24, 48), one row.
GROUPS = [
    ("2:4", 70, 22, 8, 4),
    ("2:4", 70, 22, 20, 2),
    ("64:2:5", 96, 23, 10, 5),
    ("64:2:5", 131, 23, 20, 3),
    ("64:2:8", 65, 27, 8, 8),
    ("64:2:8", 64, 27, 24, 3),
    ("64:2:16", 130, 37, 16, 16),
    ("64:2:16", 1, 37, 32, 5),
    ("8:2:8", 37, 20, 8, 8),
    ("8:2:8", 45, 20, 16, 4),
    ("16:1:6", 50, 13, 12, 1),
    ("16:3:7", 33, 14, 7, 7),
    ("24:2:6", 77, 20, 6, 6),
    ("48:1:5", 100, 9, 5, 4),
]


def _upper_factor(cols: int, gen: torch.Generator) -> torch.Tensor:
    """The upper Cholesky factor of H⁻¹ of a random SPD H (float64)."""
    x = torch.randn(3 * cols, cols, generator=gen, dtype=torch.float64)
    return inverse_cholesky(damped_hessian(x.T @ x, 0.01))


def _run(step, w, hinv, chosen, c1, c2, pattern, choose, device):
    """One group step on copies; err1 poisoned with NaN, its group's columns start at 3."""
    w, chosen = w.clone().to(device), chosen.clone().to(device)
    err1 = torch.full((w.shape[0], 3 + pattern.m + 2), float("nan"), dtype=w.dtype, device=device)
    step(w, hinv.to(device), err1, chosen, c1, c2, 3, pattern, choose)
    return w.cpu(), err1.cpu(), chosen.cpu()


def _check_group(pattern, rows, cols, c1, width, device, *, integer=False):
    p = VNMPattern.parse(pattern)
    gen = torch.Generator().manual_seed(rows * cols + c1)
    c2 = c1 + width
    if integer:  # ties everywhere: small integers, a unit diagonal (saliency w², exact column sums)
        w = torch.randint(-2, 3, (rows, cols), generator=gen).double()
        hinv = torch.randint(-2, 3, (cols, cols), generator=gen).double().triu(1) / 8 + torch.eye(cols)
    else:
        w, hinv = torch.randn(rows, cols, generator=gen, dtype=torch.float64), _upper_factor(cols, gen)
    poison = torch.rand(rows, cols, generator=gen) < 0.5
    for choose in (True, False):
        ref = _run(sparsegpt_group_reference_, w.float(), hinv.float(), poison, c1, c2, p, choose, device)
        got = _run(sparsegpt_group_, w.float().contiguous(), hinv.float(), poison, c1, c2, p, choose, device)
        exact = _run(sparsegpt_group_reference_, w, hinv, ref[2], c1, c2, p, False, "cpu")  # float64, same mask
        what = f"{pattern} {rows}x{cols} columns {c1}:{c2} choose={choose}"
        assert torch.equal(got[2], ref[2]), f"{what}: masks differ"
        if choose:
            assert is_vnm(got[2][:, c1:c2], p), what
        else:
            assert torch.equal(got[2], poison), what
        assert torch.equal(got[0][:, :c1], w[:, :c1].float()) and torch.equal(got[0][:, c2:], w[:, c2:].float())
        assert got[1][:, :3].isnan().all() and got[1][:, 3 + width :].isnan().all(), f"{what}: wrote past the group"
        for k, name in ((0, "weights"), (1, "errors")):
            cut = (slice(None), slice(c1, c2)) if k == 0 else (slice(None), slice(3, 3 + width))
            g, r, e = got[k][cut].double(), ref[k][cut].double(), exact[k][cut]
            assert not g.isnan().any(), f"{what}: {name} left unwritten"
            err_got, err_ref = (g - e).abs().max(), (r - e).abs().max()
            assert err_got <= 2 * err_ref + 1e-6 * (1 + e.abs().max()), f"{what}: {name} {err_got:.3g} vs {err_ref:.3g}"


@pytest.mark.parametrize("case", GROUPS, ids=lambda c: f"{c[0]}-{c[1]}x{c[2]}-{c[3]}+{c[4]}")
def test_group_step_matches_torch(case):
    _check_group(*case, "cpu")


@pytest.mark.parametrize("case", [GROUPS[0], GROUPS[2], GROUPS[8], GROUPS[11]], ids=lambda c: c[0])
def test_group_step_ties_go_to_the_lower_column(case):
    """Integer weights with a unit diagonal: tied column norms and tied saliencies in every block."""
    _check_group(*case, "cpu", integer=True)


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # the interpreter's numpy on Inf / NaN
def test_group_step_non_finite_saliency():
    """Saliency +Inf (w² overflows, or d = 0) counts as the largest float, NaN (0 / 0) as 0, as
    ``torch.nan_to_num``: in rows 0-63, columns 0-2 and 4 (two saliencies of 0.6x the largest float each)
    have Inf norms and beat column 3 (one Inf saliency, so the largest float), which would win a tie."""
    p = VNMPattern.parse("64:2:8")
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(70, 12, generator=gen)
    hinv = torch.randn(12, 12, generator=gen).triu(1) / 8 + torch.eye(12)
    big = (0.6 * torch.finfo(torch.float32).max) ** 0.5
    w[:2, [0, 1, 2, 4]], w[2, 3], w[:, 5] = big, 1e20, 0.0
    w[60:, 5] = 2.0
    hinv[5, 5] = 0.0  # column 5: 0 / 0 (NaN) in rows 0-59, Inf in the rest
    poison = torch.rand(70, 12, generator=gen) < 0.5
    ref = _run(sparsegpt_group_reference_, w, hinv, poison, 0, 8, p, True, "cpu")
    got = _run(sparsegpt_group_, w, hinv, poison, 0, 8, p, True, "cpu")
    assert ref[2][:64, :8].any(0).tolist() == [True, True, True, False, True, False, False, False]
    assert torch.equal(got[2], ref[2])
    torch.testing.assert_close(got[0], ref[0], equal_nan=True)
    torch.testing.assert_close(got[1][:, 3:11], ref[1][:, 3:11], equal_nan=True)


def _prune_both(pattern, rows, cols, device, mask_kind, monkeypatch, blocksize=32):
    p = VNMPattern.parse(pattern)
    gen = torch.Generator().manual_seed(rows + cols)
    w = torch.randn(rows, cols, generator=gen)
    hinv = _upper_factor(cols, gen).float()
    mask = vnm_mask(w.abs(), p) if mask_kind == "fixed" else None
    mask_blocksize = 2 * p.m if mask_kind == "wide" else None
    args = (w.to(device), hinv.to(device), p, None if mask is None else mask.to(device), blocksize, mask_blocksize)
    ref_w, ref_mask = sparsegpt_prune(*args, kernel=False)
    with monkeypatch.context() as m:  # the pass never waits on the device
        for attr in ("__bool__", "item", "__float__", "__int__"):
            m.setattr(torch.Tensor, attr, lambda *a, attr=attr: pytest.fail(f"the pass waited on the device: {attr}"))
        got_w, got_mask = sparsegpt_prune(*args, kernel=True)
    assert torch.equal(got_mask, ref_mask) and is_vnm(got_mask.cpu(), p)
    if mask is not None:
        assert torch.equal(got_mask.cpu(), mask)
    torch.testing.assert_close(got_w, ref_w, rtol=1e-4, atol=1e-5 * float(ref_w.abs().max()))
    assert not bool(got_w[~got_mask].any())


@pytest.mark.parametrize(
    "pattern, rows, cols, mask_kind",
    [("64:2:5", 96, 73, "chosen"), ("64:2:5", 70, 53, "fixed"), ("8:2:8", 37, 70, "chosen"),
     ("2:4", 70, 50, "chosen"), ("16:2:6", 40, 45, "wide"), ("24:2:6", 61, 40, "chosen")],
)  # fmt: skip
def test_sparsegpt_prune_kernel_path_matches_torch_path(pattern, rows, cols, mask_kind, monkeypatch):
    """The whole pass: ragged rows and columns, several blocks (width 30 / 32), the mask chosen per group, fixed,
    or chosen two groups at a time in torch (``mask_blocksize``) with the kernel reading it."""
    _prune_both(pattern, rows, cols, "cpu", mask_kind, monkeypatch)


def test_kernel_refused_where_it_cannot_run(monkeypatch):
    w, hinv = torch.randn(8, 8, dtype=torch.float64), torch.eye(8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="group kernel needs Triton and float32"):
        sparsegpt_prune(w, hinv, VNMPattern.parse("2:4"), kernel=True)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="group kernel needs Triton and float32"):
        sparsegpt_prune(w.float(), hinv.float(), VNMPattern.parse("2:4"), kernel=True)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GROUPS, ids=lambda c: f"{c[0]}-{c[1]}x{c[2]}-{c[3]}+{c[4]}")
def test_group_step_matches_torch_gpu(case):
    _check_group(*case, "cuda")
    _check_group(*case, "cuda", integer=True)


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", ["2:4", "64:2:5", "64:2:8", "64:2:16", "8:2:8"])
@pytest.mark.parametrize("mask_kind", ["chosen", "fixed"])
def test_sparsegpt_prune_kernel_path_matches_torch_path_gpu(pattern, mask_kind, monkeypatch):
    _prune_both(pattern, 300, 517, "cuda", mask_kind, monkeypatch, blocksize=128)
