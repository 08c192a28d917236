"""keep_dense_off_gpu: off CUDA, eligible layers run their masked weights dense unless forced."""

import pytest
import torch

from vnm_compile.kernels.vnm_linear import OP
from vnm_compile.passes import PASSES, CompileContext, CompileOptions, find_linears, run_passes


def _run(h, model, x, **options):
    gm, inputs = h.capture(model, x)
    ctx = CompileContext(CompileOptions.from_dict(options), inputs)  # not h.context: that one forces
    find_linears(gm, ctx)
    changed = run_passes(gm, ctx, PASSES[1:])
    return gm, inputs, ctx, changed


def test_recorded_layers_stay_dense_on_cpu_with_the_reason_and_match_eager(h, toy):
    x = torch.randn(2, 5, 48)
    ref = h.abs_sparsified(toy, "16:2:5", ignore=["head"], min_numel=0)
    gm, inputs, ctx, changed = _run(h, ref, x)
    assert not changed and h.count_vnm(gm) == 0 and h.count_linear(gm) == 6  # the graph is untouched
    report = ctx.report()
    assert not report.lowered
    for name in ("up", "down", "shared", "tiny"):
        assert report[name].reason.startswith("no fast V:N:M kernels on cpu") and "force_sparse" in report[name].reason
    with torch.no_grad():
        for a, b in zip(gm(*inputs), ref(x), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compile_time_pruning_runs_a_masked_copy_dense(h, toy):
    x = torch.randn(2, 5, 48)
    ref = h.abs_sparsified(toy, "16:2:5", ignore=["head"], min_numel=0)
    before = {k: v.clone() for k, v in toy.state_dict().items()}
    gm, inputs, ctx, changed = _run(h, toy, x, pattern="16:2:5", min_numel=0, ignore=["head"])
    assert changed and h.count_vnm(gm) == 0 and h.count_linear(gm) == 6
    assert "a masked copy: pruned at compile time to 16:2:5" in ctx.report()["up"].reason
    assert sum(s.masked_copy for s in ctx.sites) == 4
    with torch.no_grad():
        for a, b in zip(gm(*inputs), ref(x), strict=True):  # the pruned function, not the dense one
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(v, before[k]) for k, v in toy.state_dict().items())  # the user's model untouched


def test_strict_refuses_and_force_sparse_lowers(h, toy):
    x = torch.randn(2, 5, 48)
    ref = h.abs_sparsified(toy, "16:2:5", ignore=["head"], min_numel=0)
    with pytest.raises(RuntimeError, match="strict=True.*no fast V:N:M kernels on cpu.*force_sparse=True"):
        _run(h, ref, x, strict=True)
    gm, inputs, ctx, changed = _run(h, ref, x, force_sparse=True)
    assert changed and h.count_vnm(gm) == 5 and len(ctx.report().lowered) == 4
    assert any(n.target is OP for n in gm.graph.nodes)
