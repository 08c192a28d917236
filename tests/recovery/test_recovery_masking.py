"""Fixed masks (TS1): masked weights stay exactly zero under any optimizer; masks recomputed inside permutation groups."""

import pytest
import torch
from torch import nn

from vnm_compile import VNMConfig, get_sparsity, is_vnm, sparsify_, vnm_mask
from vnm_compile.recovery import MaskGuard, fix_masks_, merge_, recompute_mask, recover_, update_masks_
from vnm_compile.state import LinearSparsity, set_sparsity

PATTERN = "8:2:5"


def tiny_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(23, 37), nn.GELU(), nn.Linear(37, 19), nn.GELU(), nn.Linear(19, 11))


def sparse_tiny(seed: int = 0) -> nn.Sequential:
    model = tiny_model(seed)
    sparsify_(model, VNMConfig(PATTERN, score="abs", permute=False, min_numel=0), progress=False)
    return model


def linears(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


OPTIMIZERS = {
    "sgd_momentum_wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.1),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "adam_wd": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1),
    "adamw_wd": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5, weight_decay=0.1),
}


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_zeros_stay_zero_with_carried_over_optimizer_state(opt_name):
    # The optimizer first trains densely, so its momentum / moments are non-zero at pruned positions
    # when the masks take over: a gradient hook alone would let those weights move.
    model = tiny_model()
    opt = OPTIMIZERS[opt_name](model.parameters())
    x, y = torch.randn(64, 23), torch.randn(64, 11)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    sparsify_(model, VNMConfig(PATTERN, score="abs", permute=False, min_numel=0), progress=False)
    before = [m.weight.detach().clone() for m in linears(model)]
    with fix_masks_(model, opt):
        for _ in range(5):
            opt.zero_grad()
            nn.functional.mse_loss(model(torch.randn(64, 23)), y).backward()
            for m in linears(model):
                assert (m.weight.grad[~get_sparsity(m).mask] == 0).all()
            opt.step()
            for m in linears(model):
                assert (m.weight[~get_sparsity(m).mask] == 0).all()
    for m, w0 in zip(linears(model), before, strict=True):
        kept = get_sparsity(m).mask
        assert not torch.equal(m.weight[kept], w0[kept]), "kept weights should train"


def test_guard_removal_stops_masking():
    model = sparse_tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = MaskGuard(model, opt)
    guard.remove()
    nn.functional.mse_loss(model(torch.randn(8, 23)), torch.randn(8, 11)).backward()
    opt.step()
    first = linears(model)[0]
    assert (first.weight[~get_sparsity(first).mask] != 0).any()


def test_fix_masks_needs_sparsified_model():
    with pytest.raises(ValueError, match="sparsify_"):
        fix_masks_(tiny_model())


@pytest.mark.parametrize("opt_name", ["sgd_momentum_wd", "adamw_wd"])
def test_recover_fixed_keeps_zeros_and_records_state(opt_name):
    model = sparse_tiny()
    teacher = tiny_model()
    data = [torch.randn(16, 23) for _ in range(3)]
    recover_(model, data, method="fixed", steps=6, teacher=teacher, optimizer=OPTIMIZERS[opt_name], progress=False)
    for m in linears(model):
        state = get_sparsity(m.weight)  # re-indexed by the merge
        assert state is not None
        assert (m.weight[~state.mask] == 0).all()
        assert is_vnm(m.weight != 0, state.pattern)
        torch.testing.assert_close(state.compress(m.weight).to_dense(), m.weight.detach())


def random_perm_state(module: nn.Linear, seed: int) -> LinearSparsity:
    g = torch.Generator().manual_seed(seed)
    out_perm = torch.randperm(module.out_features, generator=g)
    in_perm = torch.randperm(module.in_features, generator=g)
    state = get_sparsity(module)
    return LinearSparsity(state.pattern, state.mask, in_perm, out_perm, "abs")


def test_recompute_mask_works_in_permuted_coordinates():
    model = sparse_tiny()
    for i, m in enumerate(linears(model)):
        state = random_perm_state(m, i)
        w = torch.randn(m.out_features, m.in_features, dtype=torch.float64)
        mask = recompute_mask(w, state, "abs")
        assert is_vnm(mask, state.pattern, state.in_perm, state.out_perm)
        expected_p = vnm_mask(w.abs()[state.out_perm][:, state.in_perm], state.pattern)
        assert torch.equal(mask[state.out_perm][:, state.in_perm], expected_p)


def test_update_masks_keeps_permutation_groups_and_merge_applies_them():
    model = sparse_tiny()
    for i, m in enumerate(linears(model)):
        set_sparsity(m, random_perm_state(m, i))
        with torch.no_grad():
            m.weight.copy_(torch.randn_like(m.weight))
    moved = update_masks_(model)
    assert set(moved) == {"0", "2", "4"} and all(0 < f <= 1 for f in moved.values())
    merge_(model)
    for m in linears(model):
        state = get_sparsity(m)
        assert is_vnm(state.mask, state.pattern, state.in_perm, state.out_perm)
        assert (m.weight[~state.mask] == 0).all()
        state.compress(m.weight)  # VNMWeight.from_dense validates the pattern after the permutations


def test_update_masks_ria_needs_stats():
    model = sparse_tiny()
    with pytest.raises(ValueError, match="calibration statistics"):
        update_masks_(model, score="ria")


def test_zeros_stay_zero_under_autocast():
    model = sparse_tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    with fix_masks_(model, opt):
        for _ in range(3):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(torch.randn(16, 23)).float().square().mean()
            loss.backward()
            opt.step()
    for m in linears(model):
        assert m.weight.dtype == torch.float32
        assert (m.weight[~get_sparsity(m).mask] == 0).all()
        assert (m.weight[get_sparsity(m).mask] != 0).all()
