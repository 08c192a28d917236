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


# --- issue 31: reliability -------------------------------------------------------------------------------


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=32, vocab_size=101)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval(), transformers


def test_gpt2_conv1d_layers_are_calibrated_pruned_and_keep_their_checkpoint_layout():
    model, transformers = _tiny_gpt2()
    ids = torch.randint(0, 101, (2, 12))
    dense = copy.deepcopy(model)
    stats = calibrate(model, [{"input_ids": ids}], progress=False)
    assert "transformer.h.0.attn.c_attn" in stats.names() and "transformer.h.1.mlp.c_proj" in stats.names()
    report = sparsify_(model, VNMConfig("16:2:8", min_numel=0), stats, progress=False)
    names = {r.name for r in report.sparsified}
    conv_names = {n for n, m in dense.named_modules() if type(m).__name__ == "Conv1D"}
    assert len(conv_names) == 8 and names == conv_names
    assert report["lm_head"].skipped.startswith("ignored by name")
    for name in conv_names:
        lin = model.get_submodule(name)
        assert isinstance(lin, nn.Linear) and report[name].note == "Conv1D converted to nn.Linear"
        conv = dense.get_submodule(name)
        state = get_sparsity(lin)
        assert state.mask.shape == (conv.nf, conv.nx) and is_vnm(state.mask, "16:2:8", state.in_perm, state.out_perm)
        assert torch.equal(lin.weight, conv.weight.t() * state.mask)  # the same weights, transposed and masked
    # the pruned model computes with the masked Conv1D weights
    ref = copy.deepcopy(dense)
    with torch.no_grad():
        for name in conv_names:
            ref.get_submodule(name).weight.mul_(get_sparsity(model.get_submodule(name)).mask.t())
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)
    # its state_dict keeps transformers' Conv1D layout: a fresh GPT-2 loads it and matches
    sd = model.state_dict()
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == dense.transformer.h[0].attn.c_attn.weight.shape
    fresh = transformers.GPT2LMHeadModel(model.config).eval()
    unexpected = fresh.load_state_dict(sd, strict=False).unexpected_keys
    assert unexpected and all(".vnm_" in k for k in unexpected)  # only the sparsity buffers are extra
    torch.testing.assert_close(fresh(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)
    model.load_state_dict(sd)  # and the converted model reads it back
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)


def test_tied_lm_head_is_never_pruned_and_ignored_under_any_of_its_names():
    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(128, 64)
            self.body = nn.Linear(64, 64)
            self.head = nn.Linear(64, 128, bias=False)
            self.head.weight = self.wte.weight

        def forward(self, ids):
            return self.head(self.body(self.wte(ids)))

    model = TiedLM()
    before = model.wte.weight.detach().clone()
    report = sparsify_(model, VNMConfig("16:2:8", score="abs", ignore=[], min_numel=0), progress=False)
    assert "tied to 'wte'" in report["head"].skipped and report["body"].skipped is None
    assert torch.equal(model.wte.weight, before) and get_sparsity(model.head) is None
    report = sparsify_(TiedLM(), VNMConfig("16:2:8", score="abs", ignore=["wte"], min_numel=0), progress=False)
    assert report["head"].skipped.startswith("ignored by name")


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, before):
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) or (v.isnan() == before[k].isnan()).all(), k
    assert not any(get_sparsity(m) is not None for m in model.modules() if isinstance(m, nn.Linear))


@pytest.mark.parametrize("score", ["abs", "ria"])
def test_sparsify_is_atomic_and_names_the_layer_with_nan_weights(score):
    torch.manual_seed(2)
    model = Tiny()
    stats = calibrate(model, [torch.randn(4, 96)], progress=False)
    with torch.no_grad():
        model.down.weight[3, 5] = float("nan")
    before = _weights(model)
    with pytest.raises(ValueError, match=r"layer 'down' 96x130: .*1 NaN"):
        sparsify_(model, VNMConfig("16:2:5", score=score, min_numel=1024), stats, progress=False)
    _assert_untouched(model, before)  # 'up' (before 'down') is not half pruned


def test_stats_of_another_model_are_refused():
    torch.manual_seed(3)
    other = nn.Sequential(nn.Linear(96, 96), nn.Linear(96, 96))
    stats = calibrate(other, [torch.randn(4, 96)], progress=False)
    model = Tiny()
    before = _weights(model)
    with pytest.raises(ValueError, match="match none of the model's 2 eligible linears"):
        sparsify_(model, VNMConfig("16:2:5", min_numel=1024), stats, progress=False)
    _assert_untouched(model, before)


def test_zero_size_and_meta_layers_and_none_batches_give_clear_errors():
    model = nn.Sequential(nn.Linear(8, 0), nn.Linear(0, 8), nn.Linear(8, 64))
    stats = calibrate(model, [torch.randn(3, 8)], progress=False)  # a layer with 0 inputs does not crash
    report = sparsify_(model, VNMConfig("16:2:5", min_numel=0), stats, progress=False)
    assert report["0"].skipped == "zero-size weight (0, 8)" and report["1"].skipped == "zero-size weight (8, 0)"
    assert report["2"].skipped is None
    with pytest.raises(ValueError, match="calibration batch 1 is None"):
        calibrate(model, [torch.randn(3, 8), None], progress=False)
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(ValueError, match="layer '0' is on the meta device"):
        sparsify_(meta, VNMConfig("16:2:5", score="abs", min_numel=0), progress=False)
    with pytest.raises(ValueError, match="meta device"):
        vnm_mask(torch.empty(64, 64, device="meta"), "16:2:5")


def test_huge_activations_do_not_overflow_act_norm():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(64, 64))
    x = torch.randn(16, 64)
    big = calibrate(model, [x * 1e30], progress=False)  # squares overflow float32
    small = calibrate(model, [x], progress=False)
    assert torch.isfinite(big.act_norm("0")).all()
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    for score in ("wanda", "ria"):
        cfg = VNMConfig("16:2:8", score=score, permute=False, min_numel=0, overwrite=True)
        sparsify_(a, cfg, big, progress=False)
        sparsify_(b, cfg, small, progress=False)
        assert torch.equal(get_sparsity(a[0]).mask, get_sparsity(b[0]).mask)
    with pytest.raises(ValueError, match=r"layer '0'.*NaN or Inf"):
        calibrate(model, [torch.full((2, 64), float("inf"))], progress=False)


def test_resparsify_with_another_pattern_raises_or_overwrites_and_the_summary_is_true():
    torch.manual_seed(5)
    model = Tiny()
    cfg = VNMConfig("16:2:5", score="abs", permute=False, min_numel=1024)
    sparsify_(model, cfg, progress=False)
    again = sparsify_(model, cfg, progress=False)
    assert "0 linears sparsified" in again.summary() and "2 already sparsified (kept)" in again.summary()
    assert "3 left dense" in again.summary()  # small, classifier, frozen
    before = _weights(model)
    with pytest.raises(ValueError, match=r"already sparsified with another pattern: up \(16:2:5\), down \(16:2:5\)"):
        sparsify_(model, VNMConfig("16:2:8", score="abs", permute=False, min_numel=1024), progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    masked_up = model.up.weight.detach().clone()
    report = sparsify_(
        model, VNMConfig("16:2:8", score="abs", permute=False, min_numel=1024, overwrite=True), progress=False
    )
    assert {r.name for r in report.sparsified} == {"up", "down"}
    state = get_sparsity(model.up)
    assert state.pattern == VNMPattern(16, 2, 8) and torch.equal(state.mask, vnm_mask(masked_up.abs(), "16:2:8"))
    assert torch.equal(model.up.weight, masked_up * state.mask)


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


@pytest.mark.parametrize("permute", [False, True])
def test_dense_target_and_adaptive_masks(permute):
    """dense_target + per-group adaptive masks (the defaults): the pattern exact, each layer's error
    against the dense outputs never above its plain masked weight's, reproducible, and a model closer
    to the dense one end to end (held-out inputs) than plain sequential reconstruction."""
    torch.manual_seed(0)
    base = Blocks()
    x = torch.cat(_data(seed=7))
    errs, weights = {}, {}
    plain = {"dense_target": False, "mask_blocksize": 128}
    for name, extra in (("plain", plain), ("dense", {}), ("again", {})):
        model = copy.deepcopy(base)
        cfg = VNMConfig("16:2:5", score="obs", permute=permute, reconstruct=True, min_numel=1024, **extra)
        report = sparsify_(model, cfg, data=_data(), progress=False)
        for r in report.sparsified:
            state = get_sparsity(model.get_submodule(r.name))
            assert is_vnm(state.mask, cfg.pattern, state.in_perm, state.out_perm)
            assert not bool(model.get_submodule(r.name).weight[~state.mask].any())
            assert 0 < r.error <= r.error_masked
        with torch.no_grad():
            ref = base(x)
            errs[name] = float((model(x) - ref).square().sum() / ref.square().sum())
        weights[name] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.equal(weights["dense"], weights["again"])
    assert errs["dense"] < 0.8 * errs["plain"]


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
