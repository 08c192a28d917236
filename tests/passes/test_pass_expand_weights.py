"""expand_weights (option): the compiled graph holds each launch's expanded weights and passes them
to vnm::linear; the function computed is unchanged; the dispatcher is asked with expanded timings."""

import pytest
import torch
from test_pass_fuse_siblings import Recorder, _llama, compile_llama  # the shared tiny sparsified Llama (same folder)

from vnm_compile import VNMConfig, sparsify_
from vnm_compile.backend import vnm_backend
from vnm_compile.kernels import dispatch
from vnm_compile.kernels.vnm_triton import expand_weights, interpreter_ready
from vnm_compile.passes.graph import op_weight


def test_expanded_weights_are_passed_to_every_launch_and_change_nothing():
    model = _llama()
    ids = torch.randint(0, 100, (2, 9))
    plain, _ = compile_llama(model, ids)
    out, rec = compile_llama(model, ids, expand_weights=True)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)  # CPU reference path: the same computation
    gm = rec.graphs[-1]
    launches = rec.op_nodes()
    assert len(launches) == 8  # fused q/k/v and gate/up, o and down alone
    for node in launches:
        w = op_weight(node)
        assert w.rows_values is None and w.tc_records is None  # only the expanded copy asked for
        values, meta, e = (getattr(gm, getattr(w, k).target) for k in ("values", "meta", "expanded"))
        assert e.dtype == torch.float32 and torch.equal(e, expand_weights(values, meta, torch.float32))
    report = rec.report
    attn = "layers.1.self_attn"
    assert report[f"{attn}.q_proj"].mode == "sparse, fused x3, expanded"
    assert report["layers.0.mlp.down_proj"].mode == "sparse, expanded"
    held = sum(getattr(gm, op_weight(n).expanded.target).numel() * 4 for n in launches)
    assert f"expanded weights held: {held / 2**20:.1f} MiB" in report.summary()


def test_expanded_gather_under_the_triton_interpreter(monkeypatch):
    """The compiled model through the Triton kernels: above 32 tokens the interpreter runs the gather
    GEMM, here on the expanded weights the graph holds."""
    if not interpreter_ready():
        pytest.skip("triton was imported without TRITON_INTERPRET=1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = _llama()
    ids = torch.randint(0, 100, (1, 40))
    with torch.no_grad():
        want = model(ids).last_hidden_state
    out, rec = compile_llama(model, ids, expand_weights=True)
    nodes = rec.op_nodes()
    assert len(nodes) == 8 and all(
        op_weight(n).expanded is not None and op_weight(n).interleaved is None for n in nodes
    )
    torch.testing.assert_close(out, want, rtol=1e-3, atol=1e-3)


def test_the_dispatcher_is_asked_for_expanded_timings(monkeypatch):
    calls = []

    def limit(*args, **kwargs):
        calls.append(kwargs)
        return None

    monkeypatch.setattr(dispatch, "sparse_token_limit", limit)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    sparsify_(model, VNMConfig("16:2:8", score="abs", permute=False, min_numel=0), progress=False)
    for option in (False, True):
        calls.clear()
        torch._dynamo.reset()
        rec = Recorder(expand_weights=option)
        with torch.no_grad():
            torch.compile(model, backend=rec, fullgraph=True)(torch.randn(3, 64))
        assert calls == [{"expanded": True}] if option else calls == [{}]
        assert rec.report["0"].mode == ("sparse, expanded" if option else "sparse")


def test_expand_weights_option_is_validated():
    with pytest.raises(TypeError, match="expand_weights"):
        vnm_backend(None, [], options={"expand_weights": "yes"})


def test_expanded_timings_raise_the_token_limit():
    """With vnm_expanded_us recorded, token_limit(expanded=True) reads them (where measured)."""
    rec = lambda t, us, ex: {  # noqa: E731
        "out_features": 4096, "in_features": 4096, "tokens": t, "dense_us": 10.0,
        "vnm_us": {"64:2:8": us}, "vnm_expanded_us": {"64:2:8": ex} if ex else {},
    }  # fmt: skip
    table = {"records": [rec(1, 4.0, None), rec(16, 12.0, 6.0), rec(2048, 20.0, 8.0)]}
    p = dispatch.as_pattern("64:2:8")
    assert dispatch.token_limit(table, 4096, 4096, p) == 1
    assert dispatch.token_limit(table, 4096, 4096, p, expanded=True) is None  # wins everywhere
    assert dispatch.sparse_speedup(table, 4096, 4096, p, 16, expanded=True) == pytest.approx(10 / 6)
    assert dispatch.sparse_speedup(table, 4096, 4096, p, 1, expanded=True) == pytest.approx(2.5)  # vnm_us there
