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
    from vnm_compile.kernels.vnm_linear import HYBRID_OP, sparse_tc_args

    rows = interleaved if interleaved is not None else (None, None)
    tc_args = (None, None, None, 0, 0, 0, 0)
    if tc is not None:
        packed, floor, (lo, hi) = tc
        tc_args = (*sparse_tc_args(packed), floor or 0, lo, hi)
    return HYBRID_OP(
        x, [dense], w.values, w.columns, w.meta, w.row_index, bias, w.block_rows, w.pattern.n, w.pattern.m,
        w.out_features, limit, expanded, *rows, *tc_args,
    )  # fmt: skip


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
