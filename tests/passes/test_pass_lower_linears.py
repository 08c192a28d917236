import pytest
import torch

from vnm_compile.kernels.vnm_linear import OP
from vnm_compile.passes import PASSES, lower_linears, run_passes
from vnm_compile.passes.graph import op_args, op_weight


def lowered(h, model, x, **options):
    gm, inputs = h.capture(model, x)
    ctx = h.context(gm, inputs, **options)
    assert run_passes(gm, ctx, PASSES[1:]) is True
    return gm, inputs, ctx


def test_every_eligible_linear_is_replaced(h, toy):
    x = torch.randn(3, 7, 48)
    ref = h.abs_sparsified(toy, "16:2:5", ignore=["head"], min_numel=0)
    gm, inputs = h.capture(toy, x)
    assert h.count_linear(gm) == 6
    ctx = h.context(gm, inputs, pattern="16:2:5", min_numel=0, ignore=["head"])
    run_passes(gm, ctx, PASSES[1:])
    assert h.count_vnm(gm) == 5  # up, down, shared twice, tiny
    assert h.count_linear(gm) == 1  # head (ignored)
    vnm_nodes = [n for n in gm.graph.nodes if n.target is OP]
    for n in vnm_nodes:
        w = op_weight(n)
        assert "stack_trace" in n.meta and n.meta["example_value"].shape[-1] == w.out_features  # meta copied
        assert all(getattr(w, k).op == "get_attr" for k in ("values", "columns", "meta"))
    # the shared weight is stored once and read by both calls
    shared = [
        n
        for n in vnm_nodes
        if op_weight(n).out_features == 40
        and op_args(n)["bias"] is not None
        and op_args(n)["bias"].name.endswith("shared_parameters_bias_")
    ]
    assert len(shared) == 2 and op_weight(shared[0]).values is op_weight(shared[1]).values
    with torch.no_grad():
        for a, b in zip(gm(*inputs), ref(x), strict=True):
            # the CPU op decompresses and multiplies in float32: the same products as eager F.linear
            # on the masked weight, summed in a possibly different order (float32 rounding only).
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_idempotent_and_untouched_cases(h, toy):
    gm, inputs, ctx = lowered(h, toy, torch.randn(2, 48), pattern="2:4", min_numel=1000, ignore=["head"])
    code = gm.code
    kept = {s.name for s in ctx.sites if s.dense_reason}
    assert kept == {"head", "tiny"}
    # running the passes again finds only the dense layers and changes nothing
    ctx2 = h.context(gm, inputs, pattern="2:4", min_numel=1000, ignore=["head"])
    assert run_passes(gm, ctx2, PASSES[1:]) is False
    assert gm.code == code
    assert {s.name for s in ctx2.sites} == {"head", "tiny"}


def test_no_lowering_without_state_or_pattern(h, toy):
    gm, inputs = h.capture(toy, torch.randn(2, 48))
    code = gm.code
    ctx = h.context(gm, inputs)
    assert lower_linears(gm, ctx) is False and gm.code == code


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_eager_within_its_own_rounding(h, toy, dtype):
    toy = toy.to(dtype)
    ref = h.abs_sparsified(toy, "16:2:5", ignore=[], min_numel=0)
    x = torch.randn(4, 5, 48, dtype=dtype)
    gm, inputs, _ = lowered(h, toy, x, pattern="16:2:5", min_numel=0, ignore=[])
    with torch.no_grad():
        got, eager = gm(*inputs), ref(x)
        exact = ref.double()(x.double())
    for g, e, t in zip(got, eager, exact, strict=True):
        # three-way check: the compiled error vs float64 is at most the eager low-precision error plus
        # one rounding of the output (both accumulate in float32, then round to dtype per layer).
        eps = torch.finfo(dtype).eps
        err_c = (g.double() - t).abs().max().item()
        err_e = (e.double() - t).abs().max().item()
        assert err_c <= 2 * err_e + eps * t.abs().max().item(), (err_c, err_e)


def test_sites_with_a_token_limit_become_hybrid_linear(h, toy, monkeypatch):
    from vnm_compile import VNMConfig, sparsify_
    from vnm_compile.kernels import dispatch
    from vnm_compile.kernels.vnm_linear import HYBRID_OP

    monkeypatch.setattr(dispatch, "sparse_token_limit", lambda out_features, *a: 16 if out_features == 40 else None)
    sparsify_(toy, VNMConfig("16:2:5", score="abs", permute=True, ignore=("head",), min_numel=0), progress=False)
    x = torch.randn(3, 7, 48)
    torch._dynamo.mark_dynamic(x, 1)
    gm, inputs, ctx = lowered(h, toy, x, pattern="16:2:5", min_numel=0, ignore=[], permutations="fold")
    # down and shared (x2) are recorded (masked in place); head is pruned here (its weight is not masked)
    hybrid = [n for n in gm.graph.nodes if n.target is HYBRID_OP]
    assert len(hybrid) == 4 and h.count_vnm(gm) == 2 and h.count_linear(gm) == 0  # up and tiny: vnm.linear
    for n in hybrid:
        dense = op_args(n)["dense_weights"]
        assert op_weight(n).max_sparse_tokens == 16 and len(dense) == 1 and dense[0].op in ("placeholder", "get_attr")
        assert n.meta["example_value"].shape[-1] == op_weight(n).out_features == 40
    by_weight = {op_args(n)["dense_weights"][0].op for n in hybrid}
    assert by_weight == {"placeholder", "get_attr"}  # model's masked Parameter / head's masked copy
    dense_buffers = [name for name, _ in gm.named_buffers() if name.endswith("_dense")]
    assert len(dense_buffers) == 1
    # the reference: the recorded layers as sparsify_ left them, head pruned by ABS as the backend does
    ref = h.abs_sparsified(toy, "16:2:5", ignore=["up", "down", "shared", "tiny"], min_numel=0)
    with torch.no_grad():  # 21 tokens: the dense branch of down/shared/head (the backend tests run both)
        for a, b in zip(gm(*inputs), ref(x), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
