import itertools

import pytest
import torch

from vnm_compile import VNMPattern, is_vnm, vnm_mask
from vnm_compile.masks import block_rows


def loop_reference(scores: torch.Tensor, p: VNMPattern) -> torch.Tensor:
    """S_{V:N:M} written the obvious way: a Python loop over blocks and rows."""
    rows, cols = scores.shape
    v = block_rows(p)
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for r0 in range(0, rows, v):
        for c0 in range(0, cols, p.m):
            block = scores[r0 : r0 + v, c0 : c0 + p.m]
            norms = block.abs().sum(0).tolist()
            order = sorted(range(len(norms)), key=lambda c: (-norms[c], c))
            kept = sorted(order[:4])
            for r in range(block.shape[0]):
                vals = [(float(block[r, c]), c) for c in kept]
                best = sorted(vals, key=lambda t: (-t[0], t[1]))[: p.n]
                for _, c in best:
                    mask[r0 + r, c0 + c] = True
    return mask


SHAPES = [(1, 7), (13, 29), (37, 53), (67, 41)]


@pytest.mark.parametrize("v", [16, 32, 64, 128])
def test_matches_loop_reference_all_patterns(v):
    g = torch.Generator().manual_seed(v)
    for m in range(4, 17):
        p = VNMPattern(v, 2, m)
        for shape in SHAPES:
            scores = torch.rand(shape, generator=g)
            mask = vnm_mask(scores, p)
            assert mask.shape == scores.shape and mask.dtype == torch.bool
            assert torch.equal(mask, loop_reference(scores, p)), (p, shape)
            assert is_vnm(mask, p)


@pytest.mark.parametrize("pattern", ["64:1:7", "32:3:6", "16:2:5", "2:4", "1:4"])
def test_other_n(pattern):
    p = VNMPattern.parse(pattern)
    scores = torch.rand(45, 71, generator=torch.Generator().manual_seed(1))
    mask = vnm_mask(scores, p)
    assert torch.equal(mask, loop_reference(scores, p))
    assert is_vnm(mask, p)


@pytest.mark.parametrize("pattern", ["16:2:5", "8:1:7", "32:3:6", "4:2:16", "2:4"])
def test_ties_and_negative_scores_match_loop_reference(pattern):
    # Few distinct values: norms and row scores tie often; ties go to the lower column.
    # Negative scores take the abs() path for the norms; zeros include -0.0.
    p = VNMPattern.parse(pattern)
    g = torch.Generator().manual_seed(7)
    for shape in [(37, 53), (70, 33)]:
        rounded = torch.randint(0, 4, shape, generator=g).float() / 4
        signed = torch.randint(-2, 3, shape, generator=g).float()
        signed[signed == 0] = -0.0
        for scores in (rounded, signed):
            mask = vnm_mask(scores, p)
            assert torch.equal(mask, loop_reference(scores, p)), (p, shape)
            assert is_vnm(mask, p)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int32])
def test_score_dtypes(dtype):
    # Low-precision norms are summed in float32; float64 is compared in float64.
    p = VNMPattern(16, 2, 5)
    scores = (torch.rand(45, 71, generator=torch.Generator().manual_seed(2)) * 100).to(dtype)
    mask = vnm_mask(scores, p)
    reference = scores.double() if dtype == torch.float64 else scores.float()
    assert torch.equal(mask, loop_reference(reference, p))


def test_non_contiguous_scores():
    p = VNMPattern(16, 2, 5)
    scores = torch.rand(53, 40, generator=torch.Generator().manual_seed(4)).t()
    assert torch.equal(vnm_mask(scores, p), loop_reference(scores, p))


def test_density_on_divisible_shape():
    p = VNMPattern(64, 2, 8)
    mask = vnm_mask(torch.rand(128, 256), p)
    assert mask.float().mean().item() == pytest.approx(p.density)


def test_rejects_bad_scores():
    with pytest.raises(ValueError, match="2-D"):
        vnm_mask(torch.rand(4, 4, 4), "64:2:5")
    bad = torch.rand(8, 10)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        vnm_mask(bad, "64:2:5")


def test_large_layer_is_vectorised():
    # An 11008 x 4096 mask must not loop over blocks in Python (timing is in benchmarks;
    # here we only check it completes and is valid).
    scores = torch.rand(11008, 4096)
    mask = vnm_mask(scores, "64:2:5")
    assert is_vnm(mask, "64:2:5")


class TestIsVnmRejects:
    p = VNMPattern(4, 2, 6)

    def base(self):
        return vnm_mask(torch.rand(8, 12, generator=torch.Generator().manual_seed(0)), self.p)

    def test_valid(self):
        assert is_vnm(self.base(), self.p)

    def test_too_many_in_a_row(self):
        mask = self.base()
        kept = mask[0, :6].nonzero().flatten().tolist()
        block_cols = mask[:4, :6].any(0).nonzero().flatten().tolist()
        extra = next(c for c in block_cols if c not in kept)
        mask[0, extra] = True  # 3 in a row, still 4 columns in the block
        assert mask[:4, :6].any(0).sum() <= 4
        assert not is_vnm(mask, self.p)

    def test_five_columns_in_a_block(self):
        mask = torch.zeros(4, 6, dtype=torch.bool)
        for row, cols in enumerate([(0, 1), (2, 3), (4, 0), (1, 2)]):
            mask[row, list(cols)] = True  # every row keeps n=2, but the block uses 5 columns
        assert not is_vnm(mask, self.p)
        mask[2] = False
        mask[2, [0, 3]] = True  # back to 4 columns
        assert is_vnm(mask, self.p)

    def test_too_many_in_a_row_of_a_partial_group(self):
        mask = torch.zeros(3, 7, dtype=torch.bool)
        mask[0, 6] = True
        assert is_vnm(mask, VNMPattern(4, 1, 6))
        mask[0, 0] = True
        mask[0, 1] = True
        assert not is_vnm(mask, VNMPattern(4, 1, 6))

    def test_permutations(self):
        g = torch.Generator().manual_seed(3)
        mask_p = self.base()
        in_perm, out_perm = torch.randperm(12, generator=g), torch.randperm(8, generator=g)
        mask = torch.zeros_like(mask_p)
        mask[out_perm.unsqueeze(1), in_perm.unsqueeze(0)] = mask_p
        assert is_vnm(mask, self.p, in_perm, out_perm)
        assert torch.equal(mask[out_perm][:, in_perm], mask_p)

    def test_bad_permutation(self):
        with pytest.raises(ValueError, match="in_perm"):
            is_vnm(self.base(), self.p, in_perm=torch.zeros(12, dtype=torch.long))
        with pytest.raises(ValueError, match="out_perm"):
            is_vnm(self.base(), self.p, out_perm=torch.arange(7))


def test_every_single_violation_detected_exhaustively():
    # Tiny exhaustive check against a loop checker: 2 rows x 5 cols, V=2, N=1, M=5.
    p = VNMPattern(2, 1, 5)
    for bits in itertools.product([0, 1], repeat=10):
        mask = torch.tensor(bits, dtype=torch.bool).view(2, 5)
        cols_used = int(mask.any(0).sum())
        ok = cols_used <= 4 and bool((mask.sum(1) <= 1).all())
        assert is_vnm(mask, p) == ok
