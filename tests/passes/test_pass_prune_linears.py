import pytest
import torch

from vnm_compile import VNMConfig, calibrate, get_sparsity, importance, is_vnm, sparsify_, vnm_mask
from vnm_compile.passes import prune_linears


def test_abs_prunes_the_compiled_copy_only(h, toy):
    before = {k: v.clone() for k, v in toy.state_dict().items()}
    gm, inputs = h.capture(toy, torch.randn(3, 48))
    ctx = h.context(gm, inputs, pattern="16:2:5", min_numel=0, ignore=["head"])
    code = gm.code
    assert prune_linears(gm, ctx) is False and gm.code == code
    for site in ctx.to_lower():
        assert site.origin == "compile (abs)"
        assert torch.equal(site.state.mask, vnm_mask(site.weight.abs(), "16:2:5"))
        assert is_vnm(site.state.mask, site.state.pattern)
    for k, v in toy.state_dict().items():  # the user's model never changes
        assert torch.equal(v, before[k]), k
    assert all(get_sparsity(m) is None for m in toy.modules())


def test_recorded_state_is_kept(h, toy):
    sparsify_(toy, VNMConfig("16:2:8", score="abs", permute=False, ignore=(), min_numel=0), progress=False)
    gm, inputs = h.capture(toy, torch.randn(3, 48))
    ctx = h.context(gm, inputs, pattern="2:4", min_numel=0)
    prune_linears(gm, ctx)
    for site in ctx.to_lower():
        assert site.state is get_sparsity(site.weight) and str(site.state.pattern) == "16:2:8"


@pytest.mark.parametrize("score", ["wanda", "ria"])
def test_calibration_batches_run_through_the_graph(h, toy, score):
    torch.manual_seed(1)
    batches = [torch.randn(3, 5, 48) * torch.linspace(0.1, 3, 48) for _ in range(3)]
    gm, inputs = h.capture(toy, batches[0])
    ctx = h.context(gm, inputs, pattern="16:2:5", score=score, calibration=batches, min_numel=0, ignore=[])
    prune_linears(gm, ctx)
    stats = calibrate(toy, batches, progress=False)  # the eager observers: the same norms
    for site in ctx.to_lower():
        expected = vnm_mask(importance(site.weight, score, stats.act_norm(site.name)), "16:2:5")
        assert torch.equal(site.state.mask, expected), site.name
        assert site.origin == f"compile ({score})"
    # a CalibrationStats is accepted too
    ctx2 = h.context(gm, inputs, pattern="16:2:5", score=score, calibration=stats, min_numel=0, ignore=[])
    prune_linears(gm, ctx2)
    for a, b in zip(ctx.to_lower(), ctx2.to_lower(), strict=True):
        assert torch.equal(a.state.mask, b.state.mask)


def test_dict_batches_and_dynamic_graphs(h, toy):
    class Kw(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, scale=None):
            return self.inner(x * scale)

    model = Kw(toy)
    torch.manual_seed(2)
    batches = [{"x": torch.randn(2, n, 48), "scale": torch.rand(48) + 0.5} for n in (3, 6)]
    gm, inputs = h.capture(model, batches[0]["x"], batches[0]["scale"], dynamic=True)
    assert any(isinstance(i, torch.SymInt) for i in inputs)  # sizes are graph inputs too
    ctx = h.context(gm, inputs, pattern="16:2:5", score="wanda", calibration=batches, min_numel=0, ignore=[])
    prune_linears(gm, ctx)
    stats = calibrate(model, batches, progress=False)
    site = ctx.sites[0]
    expected = vnm_mask(importance(site.weight, "wanda", stats.act_norm("inner.up")), "16:2:5")
    assert site.name == "inner.up" and torch.equal(site.state.mask, expected)


def test_bad_calibration_batches_give_clear_errors(h, toy):
    gm, inputs = h.capture(toy, torch.randn(3, 48))
    ctx = h.context(gm, inputs, pattern="2:4", score="ria", calibration=[(torch.randn(3, 48), 1)], min_numel=0)
    with pytest.raises(ValueError, match="2 positional inputs but the graph reads 1"):
        prune_linears(gm, ctx)
    ctx = h.context(gm, inputs, pattern="2:4", score="ria", calibration=[torch.randn(3, 47)], min_numel=0)
    with pytest.raises(ValueError, match="calibration batch 0 could not run through the captured graph"):
        prune_linears(gm, ctx)
