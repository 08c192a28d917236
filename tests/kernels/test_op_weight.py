"""The op's weight as one object: every launcher (Triton kernels, sparse tensor cores, CPU reference, the
hybrid op's dense branch) receives, field by field, what the earlier 20-argument op passed it.

The launchers are replaced by recorders, and x is a CPU tensor that reports ``is_cuda``, so the CUDA
dispatch runs here up to the launch: the sparse-tensor-core packing the mma.sp kernels would get is
built and compared although no kernel runs. The expectations are spelled out from the VNMWeight and
the layout choices, independently of the op's code.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from test_sparse_tc import vnm_weight  # the random (optionally permuted) VNMWeight builder (same folder)

from vnm_compile.kernels import expand_weights, interleave_rows, vnm_linear
from vnm_compile.kernels.sparse_tc import default_config, pack_sparse_tc

vnm_linear_module = importlib.import_module("vnm_compile.kernels.vnm_linear")
sparse_tc_module = importlib.import_module("vnm_compile.kernels.sparse_tc")


class CudaLike(torch.Tensor):
    """A CPU tensor that answers ``is_cuda`` with True: the op takes its CUDA branches up to the launch."""

    @property
    def is_cuda(self) -> bool:
        return True


class Launches:
    """Replaces every launcher with a recorder of (launcher, args, kwargs); returns zeros of the output shape."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []
        for module, name in (
            (vnm_linear_module, "vnm_linear_triton"),
            (vnm_linear_module, "_reference_from_tensors"),
            (vnm_linear_module, "_dense_linear"),
            (sparse_tc_module, "sparse_tc_linear"),
        ):
            monkeypatch.setattr(module, name, self._recorder(name))

    def _recorder(self, name):
        def record(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            x = args[0]
            out = {"sparse_tc_linear": lambda: args[1].out_features, "_dense_linear": lambda: args[3]}
            features = out[name]() if name in out else args[9]
            return torch.zeros(*x.shape[:-1], features, dtype=x.dtype)

        return record

    def one(self):
        assert len(self.calls) == 1, [c[0] for c in self.calls]
        return self.calls.pop()


def _hybrid(x, dense, w, bias, limit, expanded=None, interleaved=None, tc=None):
    """vnm::hybrid_linear on ``w`` with these layout choices (tc: (packed, min_tokens, (lo, hi)))."""
    from vnm_compile.kernels.vnm_linear import HYBRID_OP, OpWeight

    packed, floor, window = tc if tc is not None else (None, 1, None)
    weight = OpWeight.from_vnm(
        w, expanded=expanded, interleaved=interleaved, sparse_tc=packed, sparse_tc_min_tokens=floor,
        sparse_tc_decode_tokens=None if window == (0, 0) else window, max_sparse_tokens=limit,
    )  # fmt: skip
    return HYBRID_OP(x, [dense], *weight.pack(), bias)


def _expect_tc(call, x, w, bias, packed, wgmma: bool) -> None:
    """sparse_tc_linear(x, SparseTCWeight, bias) as the old op built it, every field."""
    name, args, kwargs = call
    assert name == "sparse_tc_linear" and not kwargs and len(args) == 3
    got_x, got, got_bias = args
    assert torch.equal(got_x, x) and got_bias is bias
    gather = wgmma or default_config(packed)["KERNEL"] != "dense"
    assert got.records is packed.records and got.columns is packed.columns and got.row_index is w.row_index
    assert (got.out_features, got.in_features, got.dtype) == (w.out_features, w.in_features, x.dtype)
    assert got.group_columns is (None if gather else packed.group_columns)
    assert got.group_width == (0 if gather else w.pattern.m)
    assert got.group_identity == (not gather and packed.group_identity)
    assert got.block_rows == w.block_rows


def _expect_sparse(call, x, w, bias, expanded=None, interleaved=None) -> None:
    """The Triton launcher (n = 2, CUDA) or the reference, with the VNMWeight's tensors themselves."""
    name, args, kwargs = call
    triton = w.pattern.n == 2 and x.dtype != torch.float64
    assert name == ("vnm_linear_triton" if triton else "_reference_from_tensors")
    assert torch.equal(args[0], x) and len(args) == 10
    for got, want in zip(args[1:6], (w.values, w.columns, w.meta, w.row_index, bias), strict=True):
        assert got is want
    assert args[6:] == (w.block_rows, w.pattern.n, w.pattern.m, w.out_features)
    if not triton:
        assert not kwargs
        return
    assert set(kwargs) == {"expanded", "interleaved"} and kwargs["expanded"] is expanded
    if interleaved is None:
        assert kwargs["interleaved"] is None
    else:
        assert all(a is b for a, b in zip(kwargs["interleaved"], interleaved, strict=True))


CASES = [  # rows, cols, pattern, permute, dtype
    (200, 97, "64:2:8", True, torch.float16),  # the dense mma.sp kernel's rows (M <= 8), permuted
    (192, 300, "64:2:8", False, torch.bfloat16),  # ... without permutation: the identity row order
    (257, 515, "128:2:16", True, torch.float16),  # the gather kernel (M > 8), V = 128, a partial block
    (131, 61, "64:2:5", False, torch.float16),
    (40, 70, "16:2:6", True, torch.float32),  # no sparse tensor cores (V = 16, fp32)
    (40, 37, "2:4", True, torch.float32),  # N:4 storage (block_rows 64)
    (24, 36, "8:1:6", False, torch.float32),  # n = 1: the reference on every device
]


@pytest.mark.parametrize("rows, cols, pattern, permute, dtype", CASES)
@pytest.mark.parametrize("wgmma", [False, True])
def test_launchers_receive_what_the_old_op_passed(rows, cols, pattern, permute, dtype, wgmma, monkeypatch):
    if wgmma:  # on a Hopper GPU the op passes the gather indices only, whatever M
        monkeypatch.setattr(sparse_tc_module, "wgmma_available", lambda device: True)
    w = vnm_weight(rows, cols, pattern, permute, dtype, seed=3)
    gen = torch.Generator().manual_seed(rows + cols)
    bias = torch.randn(rows, generator=gen).to(dtype)
    dense = w.to_dense()
    n2 = w.pattern.n == 2
    expanded = expand_weights(w) if n2 else None
    interleaved = interleave_rows(w) if n2 and w.block_rows % 4 == 0 else None
    tc_ok = n2 and w.block_rows % 64 == 0 and dtype in (torch.float16, torch.bfloat16)
    packed = pack_sparse_tc(w) if tc_ok else None
    launches = Launches(monkeypatch)
    windows = [(20, (0, 0)), (None, (4, 16)), (24, (2, 3))] if tc_ok else [(None, None)]
    for tokens in (1, 3, 4, 16, 17, 20, 33):
        x = torch.randn(tokens, cols, generator=gen).to(dtype).as_subclass(CudaLike)
        for floor, window in windows:
            tc_runs = packed is not None and (
                (floor is not None and tokens >= floor) or window[0] <= tokens <= window[1]
            )
            kw = {}
            if packed is not None:
                kw = {"sparse_tc": packed, "sparse_tc_min_tokens": floor}
                kw["sparse_tc_decode_tokens"] = None if window == (0, 0) else window
            layouts = [(None, None), (expanded, interleaved)] if n2 else [(None, None)]
            for exp, inter in layouts:
                # 1. vnm_linear (vnm::linear)
                vnm_linear(x, w, bias, expanded=exp, interleaved=inter, **kw)
                if tc_runs:
                    _expect_tc(launches.one(), x, w, bias, packed, wgmma)
                else:
                    _expect_sparse(launches.one(), x, w, bias, exp, inter)
                # 2. vnm::hybrid_linear: sparse up to 16 tokens (or where the tensor cores run), else dense
                tc = None if packed is None else (packed, floor, window)
                _hybrid(x, dense, w, bias, 16, exp, inter, tc)
                call = launches.one()
                if tc_runs:
                    _expect_tc(call, x, w, bias, packed, wgmma)
                elif tokens > 16:
                    name, args, kwargs = call
                    assert name == "_dense_linear" and not kwargs and torch.equal(args[0], x)
                    assert args[1] == [dense] and args[1][0] is dense and args[2] is bias
                    assert args[3] == w.out_features
                else:
                    _expect_sparse(call, x, w, bias, exp, inter)
    if not permute and n2:
        # 3. vnm::compressed_linear's row-major layout at decode: the same Triton launch, nothing held beside
        from vnm_compile.kernels.compressed import LAYOUT_ROWS
        from vnm_compile.kernels.compressed import OP as COMPRESSED_OP

        spec = [LAYOUT_ROWS, w.block_rows, w.pattern.n, w.pattern.m, w.out_features]
        x = torch.randn(5, cols, generator=gen).to(dtype).as_subclass(CudaLike)
        COMPRESSED_OP(x, [w.values, w.columns, w.meta], spec, bias)
        _expect_sparse(launches.one(), x, w, bias)


def test_cpu_inputs_never_reach_the_cuda_launchers(monkeypatch):
    """Off CUDA (no interpreter) the packed weight is ignored and the reference runs."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    w = vnm_weight(128, 96, "64:2:8", True, torch.float16, seed=4)
    packed = pack_sparse_tc(w)
    launches = Launches(monkeypatch)
    x = torch.randn(40, 96).half()
    vnm_linear(x, w, None, sparse_tc=packed, sparse_tc_min_tokens=1)
    name, args, kwargs = launches.one()
    assert name == "_reference_from_tensors" and not kwargs and args[0] is x and args[1] is w.values
    assert args[4] is w.row_index and args[6:] == (64, 2, 8, 128)


def test_pack_and_unpack_are_inverse():
    """Every combination of held layouts survives pack/unpack field by field; malformed bundles say what is wrong;
    vnm::compressed_linear's row-major (weight, spec) unpacks as the weight alone."""
    from vnm_compile.kernels.op_weight import SPEC, TC_GATHER, OpWeight

    w = vnm_weight(128, 96, "64:2:8", True, torch.float16, seed=5)
    packed = pack_sparse_tc(w)
    choices = [{}, {"expanded": expand_weights(w)}, {"interleaved": interleave_rows(w)}, {"max_sparse_tokens": 0},
               {"sparse_tc": packed, "sparse_tc_min_tokens": None, "sparse_tc_decode_tokens": (2, 9)},
               {"expanded": expand_weights(w), "interleaved": interleave_rows(w), "sparse_tc": packed,
                "max_sparse_tokens": 7}]  # fmt: skip
    fields = [f.name for f in OpWeight.__dataclass_fields__.values()]
    for kw in choices:
        one = OpWeight.from_vnm(w, **kw)
        weight, spec = one.pack()
        assert len(spec) == len(SPEC) and all(type(s) is int for s in spec)
        two = OpWeight.unpack(weight, spec)
        for name in fields:
            a, b = getattr(one, name), getattr(two, name)
            assert a is b if isinstance(a, torch.Tensor) or a is None else a == b, (kw, name)
    rows_only = OpWeight.unpack([w.values, w.columns, w.meta], [0, 64, 2, 8, 128])
    assert rows_only.row_index is None and rows_only.tc_mode == 0 and rows_only.max_sparse_tokens is None
    weight, spec = OpWeight.from_vnm(w).pack()
    with pytest.raises(ValueError, match="takes 4 tensors"):
        OpWeight.unpack(weight[:3], spec)
    with pytest.raises(ValueError, match="spec must hold 13 ints"):
        OpWeight.unpack(weight, spec[:7])
    with pytest.raises(ValueError, match="row-major layout"):
        OpWeight.unpack(weight, [1, *spec[1:]])
    with pytest.raises(ValueError, match="takes tc_rows only"):
        OpWeight(w.values, w.columns, w.meta, 64, 2, 8, 128, tc_records=packed.records, tc_columns=packed.columns,
                 tc_rows=packed.group_columns, tc_mode=TC_GATHER, tc_min_tokens=1)  # fmt: skip
    with pytest.raises(ValueError, match="tc_mode=0"):
        OpWeight(w.values, w.columns, w.meta, 64, 2, 8, 128, tc_records=packed.records)
    with pytest.raises(ValueError, match="has no max_sparse_tokens"):
        torch.ops.vnm.hybrid_linear(torch.randn(2, 96).half(), [w.to_dense()], weight, spec, None)
    with pytest.raises(ValueError, match="which vnm::hybrid_linear takes"):
        torch.ops.vnm.linear(torch.randn(2, 96).half(), *OpWeight.from_vnm(w, max_sparse_tokens=3).pack(), None)


@pytest.mark.parametrize("permute", [False, True])
def test_the_ops_trace_with_a_symbolic_token_count(permute, monkeypatch):
    """torch.compile(dynamic=True) over two token counts: one graph (the fakes run on a symbolic token
    count), both ops take (x, [dense,] weight, spec, bias) with the spec as plain ints, and the compiled
    function matches eager and a float64 reference; 6 and 13 tokens take hybrid_linear's two branches."""
    from torch._dynamo.backends.common import aot_autograd

    from vnm_compile.kernels.vnm_linear import HYBRID_OP, OP, OpWeight
    from vnm_compile.passes.graph import op_args, op_weight

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    w = vnm_weight(40, 70, "16:2:5", permute, torch.float32, seed=6)
    dense = w.to_dense()
    bias = torch.randn(40)
    hybrid = OpWeight.from_vnm(w, max_sparse_tokens=6).pack()

    def f(x):
        return vnm_linear(x, w, bias) - 2 * HYBRID_OP(x, [dense], *hybrid, bias)

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(f, backend=aot_autograd(fw_compiler=keep), fullgraph=True, dynamic=True)
    with torch.no_grad():
        for tokens in (6, 13):  # sizes no weight tensor has (duck sizing would tie them and recompile)
            x = torch.randn(1, tokens, 70)
            y = compiled(x)
            want = -torch.nn.functional.linear(x.double(), dense.double(), bias.double())
            torch.testing.assert_close(y, f(x), rtol=0, atol=0)
            torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    assert len(graphs) == 1
    calls = [n for n in graphs[0].graph.nodes if n.op == "call_function" and n.target in (OP, HYBRID_OP)]
    assert sorted(n.target is HYBRID_OP for n in calls) == [False, True]
    for node in calls:
        spec = op_args(node)["spec"]
        assert all(type(s) is int for s in spec) and len(op_args(node)["weight"]) == 3 + permute
        assert op_weight(node).max_sparse_tokens == (6 if node.target is HYBRID_OP else None)
        out = node.meta["val"]
        assert isinstance(out.shape[1], torch.SymInt) and out.shape[-1] == 40  # the token count stays symbolic
