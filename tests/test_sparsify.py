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


class MLP(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.up, self.down = nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(x)))


class Blocks(nn.Module):
    """Two residual MLP blocks in a ModuleList (the layer-by-layer path's shape), awkward widths."""

    def __init__(self, d: int = 48, f: int = 85):
        super().__init__()
        self.layers = nn.ModuleList(MLP(d, f) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _data(seed: int = 0, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(48, 48, generator=g) / 7
    return [torch.randn(3, 50, 48, generator=g) @ mix + 0.3 for _ in range(n)]


def test_second_order_configs_need_data():
    for cfg in (VNMConfig("16:2:5", score="obs"), VNMConfig("16:2:5", score="ria", reconstruct=True)):
        with pytest.raises(ValueError, match="data="):
            sparsify_(Blocks(), cfg, progress=False)
    assert not VNMConfig("16:2:5", score="ria").needs_second_moments
    cfg = VNMConfig("16:2:5", score="obs", reconstruct=True, sequential=False, damp=0.1)
    assert VNMConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="damp"):
        VNMConfig(damp=0.0)
    with pytest.raises(ValueError, match="reconstruct_method"):
        VNMConfig(reconstruct_method="qr")


@pytest.mark.parametrize("score", ["obs", "ria", "abs"])
@pytest.mark.parametrize("permute", [False, True])
def test_reconstruct_keeps_the_pattern_and_lowers_the_error(score, permute):
    torch.manual_seed(0)
    model = Blocks()
    dense = copy.deepcopy(model)
    pattern = VNMPattern(16, 2, 5)
    data = _data()
    cfg = VNMConfig(pattern, score=score, permute=permute, reconstruct=True, min_numel=1024)
    report = sparsify_(model, cfg, data=data, progress=False)
    masked = copy.deepcopy(dense)
    assert len(report.sparsified) == 4
    for r in report.sparsified:
        module = model.get_submodule(r.name)
        state = get_sparsity(module)
        assert is_vnm(state.mask, pattern, state.in_perm, state.out_perm)
        assert r.permuted == (state.in_perm is not None or state.out_perm is not None)
        assert not bool(module.weight[~state.mask].any())
        assert 0 < r.error <= r.error_masked
        masked.get_submodule(r.name).weight.data.mul_(state.mask)
    if permute:
        assert any(r.permuted for r in report.sparsified)
    with torch.no_grad():
        x = torch.cat(data)
        ref = dense(x)
        err = (model(x) - ref).square().sum() / ref.square().sum()
        err_masked = (masked(x) - ref).square().sum() / ref.square().sum()
    assert err < 0.7 * err_masked  # the same masks, reconstructed: a model much closer to the dense one
    assert "output error" in report.table()


def test_obs_without_reconstruct_only_masks():
    model = Blocks()
    dense = copy.deepcopy(model)
    report = sparsify_(model, VNMConfig("16:2:5", score="obs", permute=False, min_numel=1024), data=_data(),
                       progress=False)  # fmt: skip
    for r in report.sparsified:
        state = get_sparsity(model.get_submodule(r.name))
        assert torch.equal(model.get_submodule(r.name).weight, dense.get_submodule(r.name).weight * state.mask)
        assert r.error == r.error_masked > 0


def test_sequential_and_dense_input_modes():
    """The first layer sees the same (dense) inputs in both modes; later ones see different inputs."""
    torch.manual_seed(0)
    base = Blocks()
    runs = {}
    for sequential in (True, False):
        model = copy.deepcopy(base)
        cfg = VNMConfig("16:2:5", score="obs", reconstruct=True, sequential=sequential, min_numel=1024)
        sparsify_(model, cfg, data=_data(), progress=False)
        runs[sequential] = model
    seq, dense_in = runs[True], runs[False]
    assert torch.equal(seq.layers[0].up.weight, dense_in.layers[0].up.weight)
    for name in ("layers.0.down", "layers.1.up", "layers.1.down"):
        assert not torch.equal(seq.get_submodule(name).weight, dense_in.get_submodule(name).weight), name
    with torch.no_grad():  # sequential calibration compensates the earlier layers' errors: closer end to end
        x = torch.cat(_data())
        ref = base(x)
        errs = {k: float((m(x) - ref).square().sum() / ref.square().sum()) for k, m in runs.items()}
    assert errs[True] < errs[False]


def test_second_order_is_reproducible():
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        model = Blocks()
        sparsify_(model, VNMConfig("16:2:8", score="obs", reconstruct=True, min_numel=1024), data=_data(5),
                  progress=False)  # fmt: skip
        outs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(outs[0], outs[1])


def test_second_order_bad_activations_name_the_layer():
    cfg = VNMConfig("16:2:5", score="obs", reconstruct=True, min_numel=1024)
    data = _data()
    data[2][1, 7, 3] = float("nan")
    with pytest.raises(ValueError, match=r"layers\.0\.up.*NaN or Inf"):
        sparsify_(Blocks(), cfg, data=data, progress=False)
    model = Blocks()
    with torch.no_grad():
        model.layers[0].down.bias[5] = float("inf")  # block 0's output, block 1's input
    with pytest.raises(ValueError, match=r"layers\.1\.up.*NaN or Inf"):
        sparsify_(model, cfg, data=_data(), progress=False)


def test_too_few_tokens_warns(caplog):
    model = Blocks()
    data = [torch.randn(1, 20, 48)]  # 20 tokens, inputs 48 and 85 wide
    with caplog.at_level("WARNING"):
        report = sparsify_(model, VNMConfig("16:2:5", score="ria", reconstruct=True, min_numel=1024), data=data,
                           progress=False)  # fmt: skip
    assert "rank-deficient" in caplog.text and "layers.0.up" in caplog.text
    for r in report.sparsified:
        assert bool(torch.isfinite(model.get_submodule(r.name).weight).all())
        assert r.error <= r.error_masked
