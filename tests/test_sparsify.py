import copy

import pytest
import torch
from torch import nn

from vnm_compile import VNMConfig, VNMPattern, calibrate, get_sparsity, is_vnm, sparsify_, vnm_mask


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(96, 130)
        self.down = nn.Linear(130, 96)
        self.small = nn.Linear(8, 8)
        self.classifier = nn.Linear(96, 96)
        self.frozen = nn.Linear(96, 96)
        self.frozen.weight = nn.Parameter(torch.ones(96, 96, dtype=torch.int32), requires_grad=False)

    def forward(self, x):
        return self.classifier(self.down(torch.relu(self.up(x))))


def test_abs_sparsify_records_state_and_reports():
    torch.manual_seed(0)
    model = Tiny()
    original = copy.deepcopy(model)
    report = sparsify_(model, VNMConfig("16:2:5", score="abs", permute=False, min_numel=1024), progress=False)
    assert {r.name for r in report.sparsified} == {"up", "down"}
    reasons = {r.name: r.skipped for r in report.skipped}
    assert reasons["classifier"] == "ignored by name"
    assert "too small" in reasons["small"]
    assert "non-float" in reasons["frozen"]
    for name in ("up", "down"):
        mod, orig = getattr(model, name), getattr(original, name)
        state = get_sparsity(mod)
        assert state is get_sparsity(mod.weight)
        assert is_vnm(state.mask, VNMPattern(16, 2, 5))
        assert torch.equal(state.mask, vnm_mask(orig.weight.abs(), "16:2:5"))
        assert torch.equal(mod.weight, orig.weight * state.mask)
        assert 0 < report[name].importance_kept < 1
    assert torch.equal(model.classifier.weight, original.classifier.weight)
    assert "16:2:5" in str(report) and "ignored by name" in report.table()
    x = torch.randn(3, 96)
    assert torch.allclose(model(x), original.classifier(nn.functional.linear(
        torch.relu(nn.functional.linear(x, original.up.weight * get_sparsity(model.up).mask, original.up.bias)),
        original.down.weight * get_sparsity(model.down).mask, original.down.bias)), atol=1e-5)  # fmt: skip


def test_ria_needs_stats_and_uses_them():
    torch.manual_seed(1)
    model = Tiny()
    with pytest.raises(ValueError, match="calibration"):
        sparsify_(copy.deepcopy(model), VNMConfig("16:2:5", score="ria", permute=False), progress=False)
    stats = calibrate(model, [torch.randn(4, 96) * torch.linspace(0.1, 3, 96)], progress=False)
    report = sparsify_(model, VNMConfig("16:2:5", score="ria", permute=False, min_numel=1024), stats, progress=False)
    assert {r.name for r in report.sparsified} == {"up", "down"}
    assert get_sparsity(model.up).score == "ria"


def test_nm_baseline_and_already_sparsified():
    model = Tiny()
    cfg = VNMConfig("2:4", score="abs", min_numel=1024)
    report = sparsify_(model, cfg, progress=False)
    assert report["up"].density == pytest.approx(0.5, abs=0.01)
    again = sparsify_(model, cfg, progress=False)
    assert again["up"].skipped == "already sparsified"


def test_config_validation_and_json():
    cfg = VNMConfig("64:2:8", score="wanda", ignore=["lm_head", "*.gate"])
    assert cfg.pattern == VNMPattern(64, 2, 8)
    assert VNMConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="score"):
        VNMConfig(score="magnitude")
    with pytest.raises(ValueError, match="ignore"):
        VNMConfig(ignore="lm_head")
    with pytest.raises(ValueError):
        VNMConfig("64:4:8")


def test_no_linears():
    with pytest.raises(ValueError, match="no nn.Linear"):
        sparsify_(nn.Sequential(nn.ReLU()), VNMConfig(score="abs"), progress=False)


def test_glob_ignore():
    model = Tiny()
    report = sparsify_(
        model, VNMConfig("16:2:5", score="abs", permute=False, ignore=["u*"], min_numel=1024), progress=False
    )
    assert report["up"].skipped == "ignored by name" and report["classifier"].skipped is None
