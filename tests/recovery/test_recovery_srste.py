"""SR-STE (TS2): one update equals its formula; masks change only at the set interval and keep the pattern."""

import pytest
import torch
from torch import nn

from vnm_compile import VNMConfig, get_sparsity, is_vnm, sparsify_
from vnm_compile.recovery import SRSTEWeight, merge_, recover_, srste_, srste_update_due
from vnm_compile.recovery.masking import sparsity_of

PATTERN = "4:2:5"


def sparse_linear(out_f: int, in_f: int, seed: int = 0, dtype=torch.float64) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, dtype=dtype)
    sparsify_(lin, VNMConfig(PATTERN, score="abs", permute=False, min_numel=0), progress=False)
    return lin


@pytest.mark.parametrize("shape", [(9, 13), (16, 10)])
def test_one_srste_step_equals_formula(shape):
    lam, lr = 0.3, 0.1
    lin = sparse_linear(*shape)
    mask = get_sparsity(lin).mask
    # SR-STE starts from the dense weights: put values back at pruned positions.
    with torch.no_grad():
        lin.weight.add_(torch.randn_like(lin.weight) * (~mask))
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    x, y = torch.randn(7, shape[1], dtype=torch.float64), torch.randn(7, shape[0], dtype=torch.float64)

    # Reference: gradient of the loss at the masked weight, passed straight through, plus lam * (not M) * W.
    wm = (w0 * mask).requires_grad_()
    ref_out = nn.functional.linear(x, wm, b0)
    nn.functional.mse_loss(ref_out, y).backward()
    expected = w0 - lr * (wm.grad + lam * (~mask) * w0)

    srste_(lin, lam)
    out = lin(x)
    torch.testing.assert_close(out, ref_out.detach(), rtol=0, atol=0)  # forward is exactly x @ (W * M)^T + b
    opt = torch.optim.SGD(lin.parameters(), lr=lr)
    nn.functional.mse_loss(out, y).backward()
    opt.step()
    dense = lin.parametrizations.weight.original
    torch.testing.assert_close(dense.detach(), expected)
    assert not torch.equal(dense[~mask], w0[~mask]), "pruned weights must be decayed / updated"


def test_srste_rejects_negative_lambda():
    with pytest.raises(ValueError, match="lambda"):
        SRSTEWeight(torch.ones(3, 5, dtype=torch.bool), lam=-1.0)


def test_update_schedule():
    assert [s for s in range(12) if srste_update_due(s, 4)] == [3, 7, 11]
    with pytest.raises(ValueError):
        srste_update_due(0, 0)


def test_masks_change_only_at_interval():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(15, 24), nn.Tanh(), nn.Linear(24, 6))
    teacher = nn.Sequential(nn.Linear(15, 24), nn.Tanh(), nn.Linear(24, 6))  # a different net: masks must move
    sparsify_(model, VNMConfig(PATTERN, score="abs", permute=False, min_numel=0), progress=False)
    snapshots = []

    def record(m):
        snapshots.append([sparsity_of(lin).mask.clone() for lin in (m[0], m[2])])
        return 0.0

    data = [torch.randn(32, 15) for _ in range(4)]
    interval, steps = 3, 12
    recover_(model, data, method="srste", steps=steps, srste_interval=interval, srste_lambda=1e-3, lr=0.05,
             teacher=teacher, eval_fn=record, eval_every=1, progress=False)  # fmt: skip
    per_step = snapshots[:steps]  # the last snapshot is the merged model's
    final = [get_sparsity(lin).mask for lin in (model[0], model[2])]
    changed_at = []
    prev = None
    for step, masks in enumerate(per_step, start=1):
        if prev is not None and any(not torch.equal(a, b) for a, b in zip(masks, prev, strict=True)):
            changed_at.append(step)
        prev = masks
    assert changed_at, "the masks should move towards the teacher"
    assert all(s % interval == 0 for s in changed_at), changed_at
    for lin, mask in zip((model[0], model[2]), final, strict=True):
        assert not parametrized(lin)
        assert is_vnm(mask, PATTERN)
        assert (lin.weight[~mask] == 0).all()
        assert torch.equal(mask, per_step[-1][0 if lin is model[0] else 1])


def parametrized(module):
    return hasattr(module, "parametrizations")


def test_merge_after_srste_leaves_masked_plain_weights():
    lin = sparse_linear(12, 20, dtype=torch.float32)
    srste_(lin)
    with torch.no_grad():
        lin.parametrizations.weight.original.fill_(1.0)  # pruned positions non-zero underneath
    merge_(lin)
    state = get_sparsity(lin.weight)
    assert isinstance(lin.weight, nn.Parameter) and not parametrized(lin)
    assert torch.equal(lin.weight.detach(), state.mask.float())
