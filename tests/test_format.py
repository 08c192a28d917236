import pytest
import torch

from vnm_compile import VNMPattern, VNMWeight, is_vnm, vnm_mask


def permuted_mask(scores, p, in_perm, out_perm):
    mask_p = vnm_mask(scores[out_perm][:, in_perm], p)
    mask = torch.zeros_like(mask_p)
    mask[out_perm.unsqueeze(1), in_perm.unsqueeze(0)] = mask_p
    return mask


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pattern", ["64:2:5", "16:2:7", "128:2:16", "32:1:9", "32:3:6", "2:4"])
@pytest.mark.parametrize("shape", [(1, 5), (131, 97), (64, 40)])
@pytest.mark.parametrize("permute", [False, True])
def test_round_trip_is_exact(dtype, pattern, shape, permute):
    g = torch.Generator().manual_seed(hash((pattern, shape)) % 2**31)
    p = VNMPattern.parse(pattern)
    w = torch.randn(shape, generator=g).to(dtype)
    if permute:
        in_perm, out_perm = torch.randperm(shape[1], generator=g), torch.randperm(shape[0], generator=g)
        mask = permuted_mask(w.float().abs(), p, in_perm, out_perm)
        vw = VNMWeight.from_dense(w, mask, p, in_perm=in_perm, out_perm=out_perm)
        assert vw.row_index is not None
    else:
        mask = vnm_mask(w.float().abs(), p)
        vw = VNMWeight.from_dense(w, mask, p)
    dense = vw.to_dense()
    assert dense.dtype == dtype and dense.shape == w.shape
    assert torch.equal(dense, w * mask)


def test_partially_empty_mask_round_trips():
    # Rows with fewer than n kept values and blocks with fewer than 4 used columns.
    p = VNMPattern(4, 2, 6)
    w = torch.randn(8, 12)
    mask = vnm_mask(w.abs(), p)
    mask[0] = False
    mask[1, :] &= torch.arange(12) != mask[1].nonzero()[0, 0]
    mask[4:8, 6:12] = False
    assert is_vnm(mask, p)
    assert torch.equal(VNMWeight.from_dense(w, mask, p).to_dense(), w * mask)


def test_mask_breaking_pattern_raises():
    p = VNMPattern(64, 2, 8)
    w = torch.randn(64, 16)
    mask = vnm_mask(w.abs(), p)
    mask[0, :] = True
    with pytest.raises(ValueError, match="does not obey"):
        VNMWeight.from_dense(w, mask, p)


def test_mask_valid_only_with_permutation_raises_without_it():
    p = VNMPattern(4, 2, 8)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 16, generator=g)
    in_perm, out_perm = torch.randperm(16, generator=g), torch.randperm(8, generator=g)
    mask = permuted_mask(w.abs(), p, in_perm, out_perm)
    if not is_vnm(mask, p):
        with pytest.raises(ValueError):
            VNMWeight.from_dense(w, mask, p)
    VNMWeight.from_dense(w, mask, p, in_perm=in_perm, out_perm=out_perm)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"weight": torch.randn(4, 4, 4)}, "2-D"),
        ({"weight": torch.ones(8, 8, dtype=torch.int32)}, "floating"),
        ({"mask": torch.ones(8, 9, dtype=torch.bool)}, "shape"),
        ({"in_perm": torch.arange(7)}, "in_perm"),
    ],
)
def test_bad_inputs(kwargs, match):
    args = {"weight": torch.randn(8, 8), "mask": torch.zeros(8, 8, dtype=torch.bool), "pattern": "4:2:8"}
    args.update(kwargs)
    perms = {k: args.pop(k) for k in ("in_perm",) if k in args}
    with pytest.raises(ValueError, match=match):
        VNMWeight.from_dense(args["weight"], args["mask"], args["pattern"], **perms)


@pytest.mark.parametrize("pattern", ["32:2:5", "64:2:5", "64:2:8", "128:2:16", "16:2:16", "2:4"])
def test_nbytes_within_bound(pattern):
    p = VNMPattern.parse(pattern)
    w = torch.randn(1024, 1280, dtype=torch.float16)
    vw = VNMWeight.from_dense(w, vnm_mask(w.float().abs(), p), p)
    dense_bytes = w.numel() * 2
    bound = dense_bytes * ((2 / p.m) * (1 + 1 / 8) + 0.03)
    assert vw.nbytes <= bound, (vw.nbytes / dense_bytes, bound / dense_bytes)


def test_state_dict_round_trip_through_safetensors(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    g = torch.Generator().manual_seed(5)
    w = torch.randn(70, 33, generator=g).half()
    in_perm, out_perm = torch.randperm(33, generator=g), torch.randperm(70, generator=g)
    p = VNMPattern(16, 2, 6)
    vw = VNMWeight.from_dense(
        w, permuted_mask(w.float().abs(), p, in_perm, out_perm), p, in_perm=in_perm, out_perm=out_perm
    )
    safetensors.save_file(vw.state_dict(), tmp_path / "w.safetensors")
    back = VNMWeight.from_state_dict(safetensors.load_file(tmp_path / "w.safetensors"))
    assert back.pattern == p and back.shape == (70, 33)
    assert torch.equal(back.to_dense(), vw.to_dense())
    with pytest.raises(ValueError, match="missing"):
        VNMWeight.from_state_dict({"values": vw.values})


def test_to_casts_values_only():
    w = torch.randn(64, 40)
    vw = VNMWeight.from_dense(w, vnm_mask(w.abs(), "64:2:5"), "64:2:5")
    half = vw.to(torch.float16)
    assert half.values.dtype == torch.float16 and half.columns.dtype == vw.columns.dtype
    assert torch.equal(half.to_dense(), vw.to_dense().half())


def _random_weight(rows, cols, pattern, *, perm: bool, seed: int) -> VNMWeight:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    p = VNMPattern.parse(pattern)
    in_perm = torch.randperm(cols, generator=g) if perm else None
    out_perm = torch.randperm(rows, generator=g) if perm else None
    mask = permuted_mask(w.abs(), p, in_perm, out_perm) if perm else vnm_mask(w.abs(), p)
    return VNMWeight.from_dense(w, mask, p, in_perm=in_perm, out_perm=out_perm)


@pytest.mark.parametrize("pattern", ["16:2:5", "64:2:8", "2:4"])
@pytest.mark.parametrize("perms", [(False, False, False), (True, False, True), (False, True, False)])
def test_cat_rows_equals_concatenated_dense(pattern, perms):
    """Stacked weights compute torch.cat of the parts: awkward row counts (padding rows in the middle),
    permuted and unpermuted parts mixed; the row_index is dropped only when nothing needs it."""
    from vnm_compile.format import cat_rows

    v = VNMPattern.parse(pattern)
    block = 64 if v.is_nm else v.v
    rows = (37, 3 * block, 11)
    parts = [_random_weight(r, 45, pattern, perm=p, seed=i) for i, (r, p) in enumerate(zip(rows, perms, strict=True))]
    fused = cat_rows(parts)
    assert fused.shape == (sum(rows), 45)
    assert torch.equal(fused.to_dense(), torch.cat([w.to_dense() for w in parts]))
    full = [_random_weight(2 * block, 45, pattern, perm=False, seed=10 + i) for i in range(3)]
    plain = cat_rows(full)
    assert plain.row_index is None and torch.equal(plain.to_dense(), torch.cat([w.to_dense() for w in full]))


def test_cat_rows_rejects_mismatched_weights():
    from vnm_compile.format import cat_rows

    a = _random_weight(16, 40, "16:2:5", perm=False, seed=0)
    with pytest.raises(ValueError, match="same pattern"):
        cat_rows([a, _random_weight(16, 40, "16:2:8", perm=False, seed=1)])
    with pytest.raises(ValueError, match="same pattern"):
        cat_rows([a, _random_weight(16, 45, "16:2:5", perm=False, seed=1)])
    with pytest.raises(ValueError, match="same pattern"):
        cat_rows([a, a.to(torch.float16)])
    with pytest.raises(TypeError, match="non-empty list"):
        cat_rows([])
    with pytest.raises(TypeError, match="non-empty list"):
        cat_rows([a, a.values])


@pytest.mark.parametrize("dtype, bits", [(torch.float32, torch.int32), (torch.float16, torch.int16)])
@pytest.mark.parametrize("permuted", [False, True])
def test_to_dense_is_bit_exact_with_nan_inf_and_signed_zeros(dtype, bits, permuted):
    torch.manual_seed(11)
    rows, cols, p = 37, 29, VNMPattern(16, 2, 5)
    w = torch.randn(rows, cols).to(dtype)
    mask = vnm_mask(torch.rand(rows, cols), p)
    mask[::3] &= torch.rand(cols) < 0.3  # rows keeping fewer than n values: filler slots in use
    pruned, kept = (~mask).nonzero(), mask.nonzero()
    w[tuple(pruned[::4].t())] = float("nan")  # NaN / inf where the mask drops them
    w[tuple(pruned[1::4].t())] = float("inf")
    w[tuple(pruned[2::4].t())] = -0.0
    w[tuple(kept[::5].t())] = -0.0  # kept -0.0, inf and NaN must survive bit for bit
    w[tuple(kept[1::7].t())] = float("-inf")
    w[tuple(kept[2::11].t())] = float("nan")
    in_perm = torch.randperm(cols) if permuted else None
    out_perm = torch.randperm(rows) if permuted else None
    pm = mask if not permuted else torch.empty_like(mask)
    if permuted:  # a mask that obeys the pattern after the permutations
        pm[out_perm.unsqueeze(1), in_perm.unsqueeze(0)] = mask
    cw = VNMWeight.from_dense(w, pm, p, in_perm=in_perm, out_perm=out_perm)
    want = torch.where(pm, w, torch.zeros((), dtype=dtype))
    got = cw.to_dense()
    assert torch.equal(got.view(bits), want.view(bits))
