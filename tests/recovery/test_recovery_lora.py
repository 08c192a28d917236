"""Three-stage LoRA (TS3): the schedule switches at the right steps; merging keeps V:N:M."""

import pytest
import torch
from torch import nn

from vnm_compile import VNMConfig, get_sparsity, is_vnm, sparsify_
from vnm_compile.recovery import LoRAWeight, ThreeStageSchedule, lora_, lora_weight, recover_
from vnm_compile.recovery.masking import sparsity_of

PATTERN = "8:2:6"


def sparse_tiny(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(29, 40), nn.ReLU(), nn.Linear(40, 17), nn.ReLU(), nn.Linear(17, 5))
    sparsify_(model, VNMConfig(PATTERN, score="abs", permute=False, min_numel=0, ignore=["4"]), progress=False)
    return model


@pytest.mark.parametrize(
    "steps, fractions, interval, s1, s2, updates",
    [
        (200, (0.025, 0.025, 0.95), 20, 5, 10, [5]),
        (1000, (0.025, 0.025, 0.95), 20, 25, 50, [25, 45]),
        (40, (0.25, 0.25, 0.5), 4, 10, 20, [10, 14, 18]),
        (10, (0.0, 0.0, 1.0), 20, 0, 0, []),
    ],
)
def test_schedule_boundaries(steps, fractions, interval, s1, s2, updates):
    sch = ThreeStageSchedule(steps, fractions, interval)
    assert (sch.stage1_end, sch.stage2_end) == (s1, s2)
    stages = [sch.stage(s) for s in range(steps)]
    assert stages == [1] * s1 + [2] * (s2 - s1) + [3] * (steps - s2)
    assert [s for s in range(steps) if sch.update_due(s)] == updates
    assert [sch.masked(s) for s in range(steps)] == [s >= s1 for s in range(steps)]


@pytest.mark.parametrize(
    "kwargs", [{"steps": 0}, {"fractions": (0.5, 0.5, 0.5)}, {"fractions": (-0.1, 0.1, 1.0)}, {"interval": 0}]
)
def test_schedule_validation(kwargs):
    with pytest.raises(ValueError, match="ThreeStageSchedule"):
        ThreeStageSchedule(**{"steps": 100, **kwargs})
    with pytest.raises(ValueError, match="outside"):
        ThreeStageSchedule(10).stage(10)


def test_lora_merge_yields_vnm_weights_equal_to_masked_sum():
    model = sparse_tiny()
    handle = lora_(model, rank=4, alpha=8)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    expected = {}
    for lin in (model[0], model[2], model[4]):
        adapter = lin.parametrizations.weight[0]
        with torch.no_grad():
            adapter.lora_B.normal_()  # a non-trivial BA that fills pruned positions
        delta = 2.0 * adapter.lora_B.detach() @ adapter.lora_A.detach()
        w = lin.parametrizations.weight.original.detach()
        state = sparsity_of(lin)
        expected[lin] = (w + delta) * state.mask if state is not None else w + delta
        torch.testing.assert_close(lin.weight.detach(), expected[lin])  # the forward already computes it
    assert handle.merge() == 2
    for lin, exp in expected.items():
        assert type(lin.weight) is nn.Parameter and lin.weight.requires_grad
        torch.testing.assert_close(lin.weight.detach(), exp)
        state = get_sparsity(lin.weight)
        if lin is model[4]:
            assert state is None  # an ignored (dense) linear gets a plain merged adapter
            continue
        assert is_vnm(lin.weight != 0, state.pattern)
        torch.testing.assert_close(state.compress(lin.weight).to_dense(), lin.weight.detach())
    assert all(p.requires_grad for p in model.parameters())


def test_lora_targets_sparse_only():
    model = sparse_tiny()
    handle = lora_(model, targets="sparse", freeze=False)
    assert set(handle.adapters) == {"0", "2"}
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="targets"):
        lora_(sparse_tiny(), targets="dense")


def test_lora_weight_needs_adapter():
    with pytest.raises(ValueError, match="LoRAWeight"):
        lora_weight(nn.utils.parametrize.register_parametrization(nn.Linear(3, 4), "weight", nn.Identity()))
    with pytest.raises(ValueError, match="rank"):
        LoRAWeight(4, 3, rank=0)


def test_three_stage_run_switches_stages_at_the_right_steps():
    model, teacher = sparse_tiny(0), sparse_tiny(1)
    for lin in (teacher[0], teacher[2]):  # a dense teacher with other weights
        del lin.vnm_sparsity
    steps, fractions, interval = 24, (0.25, 0.25, 0.5), 2
    seen, first_dense = [], []

    def loss(m, batch):
        adapter = m[0].parametrizations.weight[0]
        if not seen:
            first_dense.append(m[0].parametrizations.weight.original.detach().clone())
        seen.append((adapter.mask_enabled, sparsity_of(m[0]).mask.clone(), adapter.mask.clone()))
        return nn.functional.mse_loss(m(batch), teacher(batch))

    data = [torch.randn(16, 29) for _ in range(3)]
    recover_(model, data, method="three_stage", steps=steps, stage_fractions=fractions, stage2_interval=interval,
             score="abs", lr=0.05, loss=loss, teacher=teacher, progress=False)  # fmt: skip
    assert [e for e, _, _ in seen] == [False] * 6 + [True] * 18
    assert all(torch.equal(a, b) for _, a, b in seen), "state mask and parametrization mask must agree"
    changes = [s for s in range(1, steps) if not torch.equal(seen[s][1], seen[s - 1][1])]
    assert changes and set(changes) <= {6, 8, 10}, changes
    state = get_sparsity(model[0].weight)
    assert torch.equal(state.mask, seen[-1][1]) and is_vnm(model[0].weight != 0, state.pattern)
    # dense_start: stage 1 trained from the teacher's dense weights, not the pruned ones.
    assert torch.equal(first_dense[0], teacher[0].weight.detach())
