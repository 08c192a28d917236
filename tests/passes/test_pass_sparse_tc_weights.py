"""sparse_tensor_cores (option, default "auto": on where the kernels run): the compiled graph holds each eligible launch's weight
packed for the mma.sp kernels and passes it, with the token count, to vnm::linear; the function
computed is unchanged (on CPU the op ignores them; on CUDA see tests/kernels/test_sparse_tc.py and
the GPU test below); ineligible layers (V not a multiple of 64, float32) are left as they were."""

import pytest
import torch
from test_pass_fuse_siblings import Recorder  # the backend wrapper that keeps graphs and report (same folder)

from vnm_compile import VNMConfig, sparsify_
from vnm_compile.backend import vnm_backend
from vnm_compile.format import VNMWeight
from vnm_compile.kernels import dispatch, vnm_linear
from vnm_compile.kernels.op_weight import SPEC, OpWeight
from vnm_compile.kernels.sparse_tc import pack_sparse_tc
from vnm_compile.kernels.vnm_linear import HYBRID_OP, OP, TC_DENSE, TC_DENSE_IDENTITY, TC_GATHER, TC_OFF
from vnm_compile.passes.graph import op_args, op_weight
from vnm_compile.pattern import VNMPattern
from vnm_compile.state import get_sparsity


def _model(pattern: str, dtype: torch.dtype, permute: bool):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(192, 136), torch.nn.ReLU(), torch.nn.Linear(136, 72))
    sparsify_(model, VNMConfig(pattern, score="abs", permute=permute, min_numel=0), progress=False)
    return model.to(dtype)


def _compile(model, x, **options):
    torch._dynamo.reset()
    rec = Recorder(fuse_siblings=False, **options)
    with torch.no_grad():
        out = torch.compile(model, backend=rec, fullgraph=True)(x)
    return out, rec


@pytest.mark.parametrize("pattern, permute, mode", [("64:2:8", False, TC_DENSE_IDENTITY), ("64:2:8", True, TC_DENSE),
                                                    ("64:2:16", False, TC_GATHER)])  # fmt: skip
def test_packed_weights_are_passed_and_change_nothing(pattern, permute, mode):
    model = _model(pattern, torch.float16, permute)
    x = torch.randn(5, 192, dtype=torch.float16)
    plain, _ = _compile(model, x)
    out, rec = _compile(model, x, sparse_tensor_cores=256)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)  # CPU: the reference path either way
    gm = rec.graphs[-1]
    launches = rec.op_nodes()
    assert len(launches) == 2
    held = 0
    for node in launches:
        args = op_weight(node)
        assert args.tc_mode == mode and args.tc_min_tokens == 256
        assert (args.tc_decode_min, args.tc_decode_max) == (0, 0)  # an int option sets only the floor
        values, columns, meta = (getattr(gm, getattr(args, k).target) for k in ("values", "columns", "meta"))
        row_index = getattr(gm, args.row_index.target) if args.row_index is not None else None
        w = VNMWeight(values, columns, meta, row_index, VNMPattern.parse(pattern), (args.out_features, _in(node, gm)))
        packed = pack_sparse_tc(w)
        records, cols = getattr(gm, args.tc_records.target), getattr(gm, args.tc_columns.target)
        assert torch.equal(records, packed.records) and torch.equal(cols, packed.columns)
        rows = args.tc_rows
        assert (rows is None) == (mode == TC_GATHER)
        if rows is not None:
            assert torch.equal(getattr(gm, rows.target), packed.group_columns)
        held += sum(
            t.numel() * t.element_size() for t in (records, cols) + ((getattr(gm, rows.target),) if rows else ())
        )
    assert rec.report["0"].mode == rec.report["2"].mode == "sparse, sparse TC from 256 tokens"
    assert f"sparse-tensor-core packings held: {held / 2**20:.1f} MiB" in rec.report.summary()


def _compressed(linear: torch.nn.Linear) -> VNMWeight:
    return get_sparsity(linear).compress(linear.weight.detach())


def _in(node, gm) -> int:
    """in_features of a launch: its input's last dim (the example value Dynamo recorded)."""
    return op_args(node)["x"].meta["example_value"].shape[-1]


@pytest.mark.parametrize("pattern, dtype", [("16:2:8", torch.float16), ("64:2:8", torch.float32)])
def test_ineligible_layers_are_left_as_they_were(pattern, dtype):
    model = _model(pattern, dtype, False)
    out, rec = _compile(model, torch.randn(3, 192, dtype=dtype), sparse_tensor_cores=64)
    nodes = rec.op_nodes()
    assert len(nodes) == 2 and all(op_weight(n).tc_mode == TC_OFF and op_weight(n).tc_records is None for n in nodes)
    assert rec.report["0"].mode == "sparse" and "sparse-tensor-core" not in rec.report.summary()


def test_tc_token_floor_reads_the_measured_table():
    rec = lambda t, tc: {  # noqa: E731
        "out_features": 4096, "in_features": 4096, "tokens": t, "dense_us": 10.0,
        "vnm_us": {"64:2:8": 20.0}, **({"vnm_tc_us": {"64:2:8": tc}} if tc else {}),
    }  # fmt: skip
    p = VNMPattern.parse("64:2:8")
    table = {"records": [rec(16, 14.0), rec(256, 9.5), rec(2048, 8.0), rec(8192, 7.5)]}
    assert dispatch.tc_token_floor(table, 4096, 4096, p) == 2048  # 256: 1.05x, below MIN_SPEEDUP
    table["records"].append(rec(512, 8.5))
    assert dispatch.tc_token_floor(table, 4096, 4096, p) == 512
    table["records"].append(rec(16384, 11.0))  # a loss at the largest count: no floor
    assert dispatch.tc_token_floor(table, 4096, 4096, p) is None
    assert dispatch.tc_token_floor({"records": [rec(2048, None)]}, 4096, 4096, p) is None  # not measured


def test_tc_decode_window_reads_the_measured_table():
    rec = lambda t, triton, tc: {  # noqa: E731
        "out_features": 4096, "in_features": 4096, "tokens": t, "dense_us": 10.0,
        "vnm_us": {"64:2:8": triton}, "vnm_tc_us": {"64:2:8": tc},
    }  # fmt: skip
    p = VNMPattern.parse("64:2:8")
    # 1: Triton faster than the decode kernel; 4, 8, 16: the decode kernel wins; 32: 1.05x, below MIN_SPEEDUP
    table = {"records": [rec(1, 5.0, 6.0), rec(4, 12.0, 6.0), rec(8, 12.0, 7.0), rec(16, 14.0, 8.0),
                         rec(32, 15.0, 9.5), rec(2048, 20.0, 8.0)]}  # fmt: skip
    assert dispatch.tc_decode_window(table, 4096, 4096, p) == (4, 16)
    table["records"].append(rec(8, 12.0, 12.0))  # a later record for 8 tokens: a loss splits the run
    assert dispatch.tc_decode_window(table, 4096, 4096, p) == (4, 4)  # the longer run; ties: the first
    table["records"].append(rec(24, 13.0, 8.0))
    assert dispatch.tc_decode_window(table, 4096, 4096, p) == (16, 24)
    assert dispatch.tc_decode_window({"records": [rec(1, 5.0, 9.5)]}, 4096, 4096, p) is None


def test_tc_decode_window_compares_with_the_layouts_the_options_hold():
    def rec(t, triton, tc, **held):
        return {"out_features": 4096, "in_features": 4096, "tokens": t, "dense_us": 10.0,
                "vnm_us": {"64:2:8": triton}, "vnm_tc_us": {"64:2:8": tc},
                **{f"vnm_{k}_us": {"64:2:8": v} for k, v in held.items()}}  # fmt: skip

    p = VNMPattern.parse("64:2:8")
    # 1 token: the decode kernel beats plain Triton (8 us) but not the interleaved copy (5 us); 16 tokens:
    # it beats plain Triton (14 us) but not the expanded weights (6 us)
    table = {"records": [rec(1, 8.0, 6.0, interleaved=5.0), rec(4, 12.0, 6.0, interleaved=11.0),
                         rec(16, 14.0, 7.0, expanded=6.0)]}  # fmt: skip
    assert dispatch.tc_decode_window(table, 4096, 4096, p) == (1, 16)
    assert dispatch.tc_decode_window(table, 4096, 4096, p, interleaved=True) == (4, 16)
    assert dispatch.tc_decode_window(table, 4096, 4096, p, expanded=True) == (1, 4)
    assert dispatch.tc_decode_window(table, 4096, 4096, p, expanded=True, interleaved=True) == (4, 4)


def _hybrid_setup(monkeypatch, floor, window=None):
    """Triton kernels never beat dense (token limit 0); the sparse tensor cores from ``floor`` tokens and
    their decode kernel at ``window`` token counts."""
    monkeypatch.setattr(dispatch, "sparse_token_limit", lambda *a, **k: 0)
    monkeypatch.setattr(dispatch, "sparse_tc_token_floor", lambda *a, **k: floor)
    monkeypatch.setattr(dispatch, "sparse_tc_decode_window", lambda *a, **k: window)


def test_a_layer_only_the_sparse_tensor_cores_win_is_lowered_as_hybrid(monkeypatch):
    _hybrid_setup(monkeypatch, 512)
    model = _model("64:2:8", torch.float16, False)
    x = torch.randn(600, 192, dtype=torch.float16)
    with torch.no_grad():
        want = model(x)
    out, rec = _compile(model, x, sparse_tensor_cores=True)
    torch.testing.assert_close(out, want)  # CPU: dense above the (zero) limit, as the hybrid op says
    nodes = [n for n in rec.graphs[-1].graph.nodes if n.op == "call_function" and n.target is HYBRID_OP]
    assert len(nodes) == 2
    assert all(op_weight(n).max_sparse_tokens == 0 and op_weight(n).tc_min_tokens == 512 for n in nodes)
    assert rec.report["0"].mode == "hybrid (dense below the sparse tensor cores), sparse TC from 512 tokens"
    # fewer tokens than the floor in a static graph: dense, and the reason says why
    out, rec = _compile(model, x[:100], sparse_tensor_cores=True)
    assert not rec.report["0"].lowered and "sparse tensor cores from 512" in rec.report["0"].reason
    # the option off: dense, as before
    out, rec = _compile(model, x, sparse_tensor_cores=None)
    assert not rec.report["0"].lowered


def limits(nodes) -> list[tuple[int, ...]]:
    """(max_sparse_tokens, tc_min_tokens, tc_decode_min, tc_decode_max) of each hybrid_linear call."""
    fields = ("max_sparse_tokens", "tc_min_tokens", "tc_decode_min", "tc_decode_max")
    return [tuple(getattr(op_weight(n), k) for k in fields) for n in nodes]


def test_a_layer_the_decode_kernel_wins_is_lowered_for_those_token_counts(monkeypatch):
    _hybrid_setup(monkeypatch, None, (4, 16))
    model = _model("64:2:8", torch.float16, False)
    x = torch.randn(8, 192, dtype=torch.float16)
    with torch.no_grad():
        want = model(x)
    out, rec = _compile(model, x, sparse_tensor_cores=True)
    torch.testing.assert_close(out, want)  # CPU: the hybrid op's dense branch (CUDA only runs the kernels)
    nodes = [n for n in rec.graphs[-1].graph.nodes if n.op == "call_function" and n.target is HYBRID_OP]
    assert limits(nodes) == [(0, 0, 4, 16)] * 2
    assert rec.report["0"].mode == "hybrid (dense where the sparse tensor cores do not run), sparse TC at 4-16 tokens"
    # a static token count outside the window: dense, and the reason names the window
    out, rec = _compile(model, x[:2], sparse_tensor_cores=True)
    assert not rec.report["0"].lowered and "decode kernel at 4-16" in rec.report["0"].reason
    # with a floor as well, both in the report
    _hybrid_setup(monkeypatch, 512, (4, 16))
    out, rec = _compile(model, x, sparse_tensor_cores=True)
    assert rec.report["0"].mode.endswith("sparse TC at 4-16 tokens and from 512 tokens")
    nodes = [n for n in rec.graphs[-1].graph.nodes if n.op == "call_function" and n.target is HYBRID_OP]
    assert limits(nodes) == [(0, 512, 4, 16)] * 2  # (the positional check before it read no node: all hybrid)


def test_a_layer_without_a_measured_win_is_not_packed(monkeypatch):
    _hybrid_setup(monkeypatch, None)
    model = _model("64:2:8", torch.float16, False)
    out, rec = _compile(model, torch.randn(600, 192, dtype=torch.float16), sparse_tensor_cores=True)
    assert not rec.report["0"].lowered and "sparse-tensor-core" not in rec.report.summary()
    assert "sparse tensor cores: no measured win" in rec.report["0"].reason  # says why the option did nothing


@pytest.mark.parametrize("bad", [0, -3, 2.5, "256", "on", 1.0])
def test_sparse_tensor_cores_option_is_validated(bad):
    with pytest.raises(ValueError, match="sparse_tensor_cores"):
        vnm_backend(None, [], options={"sparse_tensor_cores": bad})


def test_auto_is_on_only_where_the_kernels_run(monkeypatch):
    """The default "auto": True for a CUDA weight where sparse_tc_available says the kernels run,
    off for a CPU weight (whatever the machine has) and where they do not run; the other values as given."""
    from vnm_compile.kernels import sparse_tc
    from vnm_compile.passes.context import CompileOptions
    from vnm_compile.passes.find_linears import tc_option

    assert CompileOptions().sparse_tensor_cores == "auto"
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.setattr(sparse_tc, "sparse_tc_available", lambda device=None: True)
    assert tc_option("auto", cuda) is True and tc_option("auto", cpu) is None
    monkeypatch.setattr(sparse_tc, "sparse_tc_available", lambda device=None: False)
    assert tc_option("auto", cuda) is None
    assert tc_option(True, cpu) is True and tc_option(256, cuda) == 256
    assert tc_option(False, cuda) is None and tc_option(None, cuda) is None


def test_auto_changes_nothing_on_cpu(monkeypatch):
    """On CPU the default packs nothing even where a measured table would say the kernels win: the graph
    and the report are those of the option off."""
    _hybrid_setup(monkeypatch, 512, (4, 16))
    model = _model("64:2:8", torch.float16, False)
    x = torch.randn(8, 192, dtype=torch.float16)
    out, rec = _compile(model, x)  # the default, "auto"
    off, rec_off = _compile(model, x, sparse_tensor_cores=False)
    torch.testing.assert_close(out, off, rtol=0, atol=0)
    for name in ("0", "2"):
        got, want = rec.report[name], rec_off.report[name]
        assert (got.lowered, got.mode, got.reason, got.tc_bytes) == (want.lowered, want.mode, want.reason, 0)
    assert not any(n.target is HYBRID_OP for n in rec.graphs[-1].graph.nodes)
    assert "sparse TC" not in rec.report.summary()


def test_vnm_linear_takes_a_packed_weight():
    model = _model("64:2:8", torch.float16, True)
    vw = _compressed(model[0])
    x = torch.randn(4, 192, dtype=torch.float16)
    packed = pack_sparse_tc(vw)
    torch.testing.assert_close(vnm_linear(x, vw, sparse_tc=packed, sparse_tc_min_tokens=2), vnm_linear(x, vw))
    with pytest.raises(TypeError, match="SparseTCWeight"):
        vnm_linear(x, vw, sparse_tc=vw)
    with pytest.raises(ValueError, match="sparse_tc_min_tokens"):
        vnm_linear(x, vw, sparse_tc=packed, sparse_tc_min_tokens=0)
    torch.testing.assert_close(
        vnm_linear(x, vw, sparse_tc=packed, sparse_tc_min_tokens=None, sparse_tc_decode_tokens=(1, 8)),
        vnm_linear(x, vw),
    )  # fmt: skip
    for bad in [(0, 4), (4, 2), (1, 33), [1, 4], (1.0, 4), (True, 4), 4]:
        with pytest.raises(ValueError, match="sparse_tc_decode_tokens"):
            vnm_linear(x, vw, sparse_tc=packed, sparse_tc_decode_tokens=bad)
    with pytest.raises(ValueError, match="never run"):
        vnm_linear(x, vw, sparse_tc=packed, sparse_tc_min_tokens=None)
    weight, spec = OpWeight.from_vnm(vw, sparse_tc=packed, sparse_tc_decode_tokens=(3, 8)).pack()
    spec[SPEC.index("tc_decode_max")] = 40  # past sparse_tc.DECODE_MAX_TOKENS
    with pytest.raises(ValueError, match="tc_decode_min"):
        OP(x, weight, spec, None)
    other = pack_sparse_tc(_compressed(_model("64:2:8", torch.float16, False)[2]))
    with pytest.raises(ValueError, match="packed from another weight"):
        vnm_linear(x, vw, sparse_tc=other)


def test_opcheck_with_packed_weights():
    import vnm_compile.backend  # noqa: F401  (registers the autograd formula that opcheck checks)

    model = _model("64:2:8", torch.float16, True)
    vw = _compressed(model[0])
    packed = pack_sparse_tc(vw)
    x = torch.randn(3, 192, dtype=torch.float16)
    weight = OpWeight.from_vnm(vw, sparse_tc=packed, sparse_tc_min_tokens=16, sparse_tc_decode_tokens=(1, 8))
    assert weight.tc_mode == TC_DENSE and weight.tc_rows is packed.group_columns
    torch.library.opcheck(OP, (x, *weight.pack(), None))


@pytest.mark.gpu(sparse_tc=True)
@pytest.mark.parametrize("permute", [False, True])
def test_compiled_model_runs_the_mma_sp_kernel_on_the_gpu(permute):
    """Above the token count the op runs the mma.sp kernel: the compiled model matches eager within fp16
    rounding, at token counts on both sides of the limit."""
    model = _model("64:2:8", torch.float16, permute).cuda()
    for tokens in (7, 300):
        x = torch.randn(tokens, 192, dtype=torch.float16, device="cuda")
        with torch.no_grad():
            want = model(x).float()
        out, rec = _compile(model, x, sparse_tensor_cores=256)
        assert all(op_weight(n).tc_mode != TC_OFF and op_weight(n).tc_min_tokens == 256 for n in rec.op_nodes())
        err = ((out.float() - want).norm() / want.norm()).item()
        assert err < 1e-2, (tokens, err)
