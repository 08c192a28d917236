"""interleave_rows (option): the compiled graph holds each launch's row-interleaved values and
metadata and passes them to vnm::linear; the function computed is unchanged (also through the
Triton decode kernel under the interpreter, and together with expand_weights)."""

import pytest
import torch
from test_pass_fuse_siblings import Recorder, _llama, compile_llama  # the shared tiny sparsified Llama (same folder)

from vnm_compile.backend import vnm_backend
from vnm_compile.kernels.vnm_triton import default_interleave, interleave_rows, interpreter_ready
from vnm_compile.passes.graph import op_weight


def test_interleaved_copies_are_passed_to_every_launch_and_change_nothing():
    model = _llama()
    ids = torch.randint(0, 100, (2, 9))
    plain, _ = compile_llama(model, ids)
    out, rec = compile_llama(model, ids, interleave_rows=True)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)  # CPU reference path: the same computation
    gm = rec.graphs[-1]
    launches = rec.op_nodes()
    assert len(launches) == 8  # fused q/k/v and gate/up, o and down alone
    held = 0
    for node in launches:
        w = op_weight(node)
        assert w.expanded is None and w.tc_records is None  # no expanded weights asked for
        values, meta = getattr(gm, w.values.target), getattr(gm, w.meta.target)
        rv, rm = getattr(gm, w.rows_values.target), getattr(gm, w.rows_meta.target)
        want = interleave_rows(values, meta, 16, default_interleave(values.shape[0], 16))
        assert torch.equal(rv, want[0]) and torch.equal(rm, want[1])
        held += rv.numel() * rv.element_size() + rm.numel() * rm.element_size()
    report = rec.report
    assert report["layers.1.self_attn.q_proj"].mode == "sparse, fused x3, interleaved"
    assert report["layers.0.mlp.down_proj"].mode == "sparse, interleaved"
    assert f"row-interleaved copies held: {held / 2**20:.1f} MiB" in report.summary()


def test_with_expanded_weights_both_are_passed():
    model = _llama()
    ids = torch.randint(0, 100, (1, 5))
    plain, _ = compile_llama(model, ids)
    out, rec = compile_llama(model, ids, interleave_rows=True, expand_weights=True)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    gm = rec.graphs[-1]
    for node in rec.op_nodes():
        w = op_weight(node)
        assert all(isinstance(getattr(w, k), torch.fx.Node) for k in ("expanded", "rows_values", "rows_meta"))
        assert getattr(gm, w.expanded.target).dim() == 2 and getattr(gm, w.rows_values.target).dim() == 4
    assert rec.report["layers.0.mlp.down_proj"].mode == "sparse, expanded, interleaved"


def test_decode_kernel_on_the_interleaved_copies_under_the_triton_interpreter(monkeypatch):
    """The compiled model through the Triton kernels at 2 tokens: the interpreter runs the decode
    kernel on the interleaved copies the graph holds (its default config for them)."""
    if not interpreter_ready():
        pytest.skip("triton was imported without TRITON_INTERPRET=1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = _llama()
    ids = torch.randint(0, 100, (1, 2))
    with torch.no_grad():
        want = model(ids).last_hidden_state
    out, rec = compile_llama(model, ids, interleave_rows=True)
    assert all(op_weight(n).interleaved is not None and op_weight(n).expanded is None for n in rec.op_nodes())
    torch.testing.assert_close(out, want, rtol=1e-3, atol=1e-3)


def test_interleave_rows_option_is_validated():
    with pytest.raises(TypeError, match="interleave_rows"):
        vnm_backend(None, [], options={"interleave_rows": 1})


@pytest.mark.slow
def test_hybrid_launches_take_the_interleaved_copies(monkeypatch):
    """vnm.hybrid_linear (sparse up to 4 tokens) gets them in its weight too; one dynamic
    graph still computes the eager function on both branches (under the Triton interpreter when it
    is ready, so the 3-token calls run the decode kernel on the interleaved copies)."""
    from vnm_compile.kernels import dispatch
    from vnm_compile.kernels.vnm_linear import HYBRID_OP

    if interpreter_ready():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(dispatch, "sparse_token_limit", lambda *a, **k: 4)
    model = _llama()
    torch._dynamo.reset()
    rec = Recorder(interleave_rows=True)
    compiled = torch.compile(model, backend=rec, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for seq in (3, 10):
            ids = torch.randint(0, 100, (1, seq))
            torch.testing.assert_close(
                compiled(ids).last_hidden_state, model(ids).last_hidden_state, rtol=1e-3, atol=1e-3
            )
    nodes = [n for n in rec.graphs[0].graph.nodes if n.op == "call_function" and n.target is HYBRID_OP]
    assert len(nodes) == 8
    gm = rec.graphs[0]
    for node in nodes:
        w = op_weight(node)
        assert w.expanded is None and w.tc_records is None
        assert getattr(gm, w.rows_values.target).dim() == 4 and getattr(gm, w.rows_meta.target).dim() == 2
    assert rec.report["layers.1.mlp.up_proj"].mode == "hybrid (sparse up to 4 tokens), fused x2, interleaved"
