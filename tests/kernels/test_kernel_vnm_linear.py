"""vnm::linear kernels: Triton (interpreted on CPU, compiled on GPU) and the reference path.

Three-way check (flash-attention style): the kernel's max error against a
float64 reference must stay within 2x the error of PyTorch's own F.linear
at the same precision (+1e-5) for fp16/bf16; fp32 (where summation order,
not output rounding, dominates) must stay within 1e-5 relative error.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from vnm_compile.format import VNMWeight
from vnm_compile.kernels import expand_weights, prefer_sparse, vnm_linear, vnm_linear_reference
from vnm_compile.kernels import interleave_rows as kernels_interleave_rows
from vnm_compile.kernels.dispatch import sparse_speedup
from vnm_compile.kernels.vnm_linear import OpWeight, uses_triton
from vnm_compile.kernels.vnm_triton import (
    _ROWS_CONFIGS,
    KernelConfig,
    candidate_configs,
    interleave_rows,
    interpreter_ready,
    vnm_linear_triton,
)
from vnm_compile.masks import vnm_mask
from vnm_compile.pattern import VNMPattern

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# Triton's interpreter needs TRITON_INTERPRET=1 before triton is imported (CI sets it for the whole run).
interp = pytest.mark.skipif(not interpreter_ready(), reason="run with TRITON_INTERPRET=1 set before triton loads")


def make_weight(rows, cols, pattern, *, permute=False, dtype=torch.float32, device="cpu", seed=0):
    """A random VNMWeight (mask from random scores, optionally in permuted coordinates) and its dense twin."""
    g = torch.Generator().manual_seed(seed)
    p = VNMPattern.parse(pattern)
    w = torch.randn(rows, cols, generator=g)
    in_perm = out_perm = None
    if permute:
        in_perm, out_perm = torch.randperm(cols, generator=g), torch.randperm(rows, generator=g)
        mp = vnm_mask(w[out_perm][:, in_perm].abs(), p)
        mask = torch.empty_like(mp)
        mask[out_perm[:, None], in_perm[None, :]] = mp
    else:
        mask = vnm_mask(w.abs(), p)
    vw = VNMWeight.from_dense(w, mask, p, in_perm=in_perm, out_perm=out_perm).to(device=device, dtype=dtype)
    return vw, vw.to_dense()


def three_way(y, x, dense, bias):
    """(kernel max error, PyTorch-at-this-precision max error) vs float64."""
    ref = F.linear(x.double(), dense.double(), None if bias is None else bias.double())
    pt = F.linear(x, dense.to(x.dtype), None if bias is None else bias.to(x.dtype))
    assert not torch.isnan(y).any(), "output has NaN (unwritten or bad)"
    return (y.double() - ref).abs().max().item(), (pt.double() - ref).abs().max().item()


def check(y, x, dense, bias):
    err, err_pt = three_way(y, x, dense, bias)
    if x.dtype == torch.float32:
        # fp32: the output rounding is tiny and the error is summation order (the kernel's
        # K-chunk order differs from cuBLAS's), so bound the relative error instead.
        ref = F.linear(x.double(), dense.double(), None if bias is None else bias.double())
        rel = ((y.double() - ref).norm() / ref.norm()).item()
        assert rel <= 1e-5, f"fp32 relative error {rel:.3g} (PyTorch max error {err_pt:.3g}, kernel {err:.3g})"
        return
    assert err <= 2 * err_pt + 1e-5, f"kernel error {err:.3g} vs PyTorch {err_pt:.3g}"


# (rows, cols, pattern): primes, non-multiples of V and M, one row, tiny.
SHAPES = [
    (37, 101, "16:2:5"),
    (1, 29, "32:2:7"),
    (67, 131, "64:2:8"),
    (131, 47, "128:2:16"),
    (200, 97, "128:2:5"),
    (300, 61, "256:2:8"),
    (33, 50, "2:4"),
    (5, 9, "16:2:6"),
]


@interp
@pytest.mark.parametrize("rows,cols,pattern", SHAPES)
@pytest.mark.parametrize("tokens", [1, 7, 33])
def test_kernel_interpreted_matches_fp64(monkeypatch, rows, cols, pattern, tokens):
    """Every launch path (FMA decode, tensor-core dot) under the interpreter, outputs poisoned first."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    dtype = DTYPES[(rows + tokens) % 3]
    permute = (rows + cols + tokens) % 2 == 0
    vw, dense = make_weight(rows, cols, pattern, permute=permute, dtype=dtype, seed=rows + tokens)
    x = torch.randn(tokens, cols, dtype=dtype)
    bias = torch.randn(rows, dtype=dtype) if tokens != 7 else None
    out = torch.full((tokens, rows), float("nan"), dtype=dtype)
    y = vnm_linear_triton(
        x, vw.values, vw.columns, vw.meta, vw.row_index, bias, vw.block_rows, 2, vw.pattern.m, rows, out=out
    )
    assert y.data_ptr() == out.data_ptr()
    check(y, x, dense, bias)


@interp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["fma", "dot", "dot_fm", "dot_split", "gather"])
def test_each_kernel_each_dtype(monkeypatch, dtype, kind):
    """Every kernel forced, odd token count, permutations and bias, 64:2:5 with a partial last chunk."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    vw, dense = make_weight(71, 83, "64:2:5", permute=True, dtype=dtype, seed=3)
    tokens = 3 if kind == "fma" else 19  # the FMA kernel runs one program per token (slow to interpret)
    x = torch.randn(tokens, 83, dtype=dtype)
    bias = torch.randn(71, dtype=dtype)
    cfg = {
        "fma": KernelConfig("fma", 32, 8),
        "dot": KernelConfig("dot", 16, 8, 16),
        "dot_fm": KernelConfig("dot", 32, 8, 16, fm=True),  # feature-major copy of x
        "dot_split": KernelConfig("dot", 16, 8, 16, split_k=4),  # 2 full chunks -> 2 splits + tail
        "gather": KernelConfig("gather", 16, 4, 16),  # 68 kept columns per block: 4 K steps of 16 + a tail
    }[kind]
    out = torch.full((tokens, 71), float("nan"), dtype=dtype)
    y = vnm_linear_triton(x, vw.values, vw.columns, vw.meta, vw.row_index, bias, 64, 2, 5, 71, out=out, config=cfg)
    check(y, x, dense, bias)


def _wide_case(device):
    """in_features > 32767: the column indices are int32 (two 8-byte words per group in the FMA kernel)."""
    vw, dense = make_weight(19, 32801, "16:2:5", permute=True, seed=4)
    assert vw.columns.dtype == torch.int32
    vw, dense = vw.to(device=device), dense.to(device)
    x = torch.randn(2, 32801, device=device)
    bias = torch.randn(19, device=device)
    return vw, dense, x, bias


@interp
@pytest.mark.parametrize("kind", ["fma", "dot", "gather", "rows"])
def test_int32_columns(monkeypatch, kind):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    vw, dense, x, bias = _wide_case("cpu")
    cfg = {
        "fma": KernelConfig("fma", 16, 512),
        "dot": KernelConfig("dot", 16, 512, 16),
        "gather": KernelConfig("gather", 16, 256, 16),
        "rows": KernelConfig("rows", 16, 512),
    }[kind]
    inter = interleave_rows(vw.values, vw.meta, 16, 8) if kind == "rows" else None
    out = torch.full((2, 19), float("nan"))
    y = vnm_linear_triton(
        x, vw.values, vw.columns, vw.meta, vw.row_index, bias, 16, 2, 5, 19, out=out, config=cfg, interleaved=inter
    )
    check(y, x, dense, bias)


@pytest.mark.gpu
def test_gpu_int32_columns():
    vw, dense, x, bias = _wide_case("cuda")
    inter = interleave_rows(vw.values, vw.meta, 16, 8)
    for cfg in (
        KernelConfig("fma", 4, 128),
        KernelConfig("dot", 16, 32, 16),
        KernelConfig("gather", 16, 16, 128),
        KernelConfig("rows", 16, 64),
    ):
        out = torch.full((2, 19), float("nan"), device="cuda")
        args = (x, vw.values, vw.columns, vw.meta, vw.row_index, bias, 16, 2, 5, 19)
        check(vnm_linear_triton(*args, out=out, config=cfg, interleaved=inter), x, dense, bias)


@interp
@pytest.mark.parametrize("pattern,cols,tokens", [("64:2:8", 128, 40), ("128:2:16", 300, 16), ("32:2:4", 24, 77)])
def test_gather_kernel_tiles(monkeypatch, pattern, cols, tokens):
    """The expand + gather GEMM path: K steps that divide the kept columns exactly (no tail),
    fewer kept columns than one K step (tail only), tokens not a multiple of the token tile
    (padded x^T), several row tiles per V-block, an output permutation (row_index)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    vw, dense = make_weight(150, cols, pattern, permute=True, dtype=torch.float16, seed=cols)
    x = torch.randn(tokens, cols, dtype=torch.float16)
    bias = torch.randn(150, dtype=torch.float16)
    p = vw.pattern
    cfg = KernelConfig("gather", 16, 4, 32)
    out = torch.full((tokens, 150), float("nan"), dtype=torch.float16)
    y = vnm_linear_triton(x, vw.values, vw.columns, vw.meta, vw.row_index, bias, vw.block_rows, 2, p.m, 150, out=out,
                          config=cfg)  # fmt: skip
    check(y, x, dense, bias)


def _check_expanded(e, vw, dense):
    """y[:, original row of r] = sum_j e[r, j] * x[:, column j of r's block] must equal x @ W^T (float64):
    the expanded weights hold each row's values at its block's kept columns, zeros elsewhere."""
    rows_p = vw.values.shape[0]
    assert e.shape == (rows_p, 2 * vw.values.shape[1])
    cols = vw.columns.long()[torch.arange(rows_p) // vw.block_rows].reshape(rows_p, -1)  # (Rp, 4G)
    x = torch.randn(5, dense.shape[1], dtype=torch.float64)
    y_rows = (e.double()[None] * x[:, cols]).sum(-1)  # (5, Rp)
    dest = vw.row_index.long() if vw.row_index is not None else torch.arange(rows_p)
    ok = (dest >= 0) & (dest < dense.shape[0])
    y = torch.zeros(5, dense.shape[0], dtype=torch.float64)
    y[:, dest[ok]] = y_rows[:, ok]
    torch.testing.assert_close(y, x @ dense.double().t())
    assert (e.double()[~ok] == 0).all()


@pytest.mark.parametrize("pattern,permute", [("64:2:8", True), ("16:2:5", False), ("2:4", True)])
def test_expand_weights_reference(monkeypatch, pattern, permute):
    """The CPU reference of expand_weights (no interpreter) against the dense weight it came from."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    vw, dense = make_weight(70, 45, pattern, permute=permute, dtype=torch.float16, seed=8)
    e = expand_weights(vw)
    assert e.stride(0) % 64 == 0  # rows 16-byte aligned
    _check_expanded(e, vw, dense)
    assert expand_weights(vw, torch.float32).dtype == torch.float32


@interp
@pytest.mark.parametrize("tokens", [2, 9, 40, 130])
def test_expanded_weights_gather(monkeypatch, tokens):
    """vnm_linear with the expanded weights held by the caller: the interpreted expand kernel equals
    the reference, and the gather GEMM on them (forced, and the interpreter's default) is correct."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    vw, dense = make_weight(100, 77, "32:2:6", permute=True, dtype=torch.float16, seed=tokens)
    e = expand_weights(vw)
    _check_expanded(e, vw, dense)
    x = torch.randn(tokens, 77, dtype=torch.float16)
    bias = torch.randn(100, dtype=torch.float16)
    args = (x, vw.values, vw.columns, vw.meta, vw.row_index, bias, 32, 2, 6, 100)
    for cfg in (KernelConfig("gather", 16, 4, 16), KernelConfig("gather", 32, 8, 32)):
        out = torch.full((tokens, 100), float("nan"), dtype=torch.float16)
        check(vnm_linear_triton(*args, out=out, config=cfg, expanded=e), x, dense, bias)
    check(vnm_linear(x, vw, bias, expanded=e), x, dense, bias)


@interp
def test_expanded_weights_bad_input(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    vw, _ = make_weight(40, 30, "16:2:5", dtype=torch.float16, seed=9)
    x = torch.randn(3, 30, dtype=torch.float16)
    e = expand_weights(vw)
    args = (x, vw.values, vw.columns, vw.meta, vw.row_index, None, 16, 2, 5, 40)
    for bad in (e[:, :-1], e.float(), e.t().contiguous().t()):
        with pytest.raises(ValueError, match="expanded must be"):
            vnm_linear_triton(*args, config=KernelConfig("gather", 16, 4, 16), expanded=bad)
    with pytest.raises(ValueError, match="n = 2"):
        expand_weights(make_weight(16, 16, "16:1:4")[0])


@interp
@pytest.mark.parametrize(
    "rows,cols,pattern,r,dtype",
    [
        (131, 257, "64:2:8", 4, torch.float32),  # 33 groups: one chunk of 32 + a tail of 1
        (67, 640, "64:2:5", 8, torch.float16),
        (64, 1001, "16:2:8", 16, torch.bfloat16),
        (40, 9, "32:2:5", 4, torch.float32),  # 2 groups: fewer than one chunk
        (1, 29, "32:2:7", 8, torch.float16),  # one row
    ],
)
def test_rows_kernel(monkeypatch, rows, cols, pattern, r, dtype):
    """The decode kernel on the row-interleaved layout: permutations, bias, 1-4 tokens (one of
    them a 3-D, non-contiguous x), every config that fits R, and the interpreter's default."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    vw, dense = make_weight(rows, cols, pattern, permute=True, dtype=dtype, seed=rows + r)
    v, m = vw.block_rows, vw.pattern.m
    inter = interleave_rows(vw.values, vw.meta, v, r)
    assert inter[0].shape == (vw.values.shape[0] // r, vw.values.shape[1] // 2, r, 2)
    bias = torch.randn(rows, dtype=dtype)
    x4 = torch.randn(4, 2 * cols, dtype=dtype)[:, ::2]  # not contiguous
    cfgs = [c for c in _ROWS_CONFIGS if c.block_r % r == 0] + [None]
    for tokens, cfg in zip([1, 2, 3, 4, 1, 2, 3], cfgs, strict=False):
        x = x4[:tokens] if tokens != 3 else x4[:3].reshape(1, 3, cols)
        out = torch.full((tokens, rows), float("nan"), dtype=dtype)
        args = (x, vw.values, vw.columns, vw.meta, vw.row_index, bias, v, 2, m, rows)
        vnm_linear_triton(*args, out=out, config=cfg, interleaved=inter)
        check(out, x.reshape(tokens, cols), dense, bias)


def test_interleave_rows_layout():
    """Unit q, group g, row i of the interleaved copy is row R*q + i of the values, and the i-th
    4-bit code of its metadata word is that row's code in the row-major metadata."""
    vw, _ = make_weight(128, 200, "64:2:5", seed=1)
    vals, words = interleave_rows(vw.values, vw.meta, 64, 16)
    assert words.dtype == torch.int64 and vals.shape == (8, 40, 16, 2)
    codes = ((vw.meta.to(torch.int64) & 0xFFFFFFFF)[:, :, None] >> (4 * torch.arange(8))) & 15
    codes = codes.reshape(128, -1)[:, :40]
    for q, g, i in [(0, 0, 0), (3, 17, 5), (7, 39, 15), (5, 8, 9)]:
        assert torch.equal(vals[q, g, i], vw.values[16 * q + i, 2 * g : 2 * g + 2])
        assert ((words[q, g].item() >> (4 * i)) & 15) == codes[16 * q + i, g].item()
    assert vw.values.shape[0] // 64 == 2 and interleave_rows(vw.values, vw.meta, 64)[0].shape[2] == 4


@interp
def test_rows_kernel_bad_input(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    vw, _ = make_weight(64, 40, "32:2:5", dtype=torch.float16, seed=2)
    x = torch.randn(1, 40, dtype=torch.float16)
    args = (x, vw.values, vw.columns, vw.meta, vw.row_index, None, 32, 2, 5, 64)
    inter = interleave_rows(vw.values, vw.meta, 32, 8)
    cfg = KernelConfig("rows", 8, 32)
    for bad in (
        (inter[0].float(), inter[1]),
        (inter[0], inter[1].to(torch.int16)),
        (inter[0][:-1], inter[1][:-1]),
        inter[0],
    ):
        with pytest.raises(ValueError, match="interleaved must be"):
            vnm_linear_triton(*args, config=cfg, interleaved=bad)
    with pytest.raises(ValueError, match="needs the interleaved values"):
        vnm_linear_triton(*args, config=cfg)
    with pytest.raises(ValueError, match="does not fit values interleaved by 8"):
        vnm_linear_triton(*args, config=KernelConfig("rows", 4, 32), interleaved=inter)
    for r in (3, 32, 64):
        with pytest.raises(ValueError, match="rows must be 4, 8 or 16"):
            interleave_rows(vw.values, vw.meta, 32, r)
    assert candidate_configs(32, 1, rows=8) != candidate_configs(32, 1)
    assert all(c.kind != "rows" for c in candidate_configs(32, 5, rows=8))


@interp
def test_300_tokens_3d_noncontiguous(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    vw, dense = make_weight(40, 61, "32:2:7", permute=True, dtype=torch.float16, seed=5)
    base = torch.randn(3, 100, 2 * 61, dtype=torch.float16)
    x = base[..., ::2]  # (3, 100, 61), not contiguous
    assert not x.is_contiguous()
    bias = torch.randn(40, dtype=torch.float16)
    assert uses_triton(x, 2)
    y = vnm_linear(x, vw, bias)
    assert y.shape == (3, 100, 40) and y.dtype == torch.float16
    check(y.reshape(300, 40), x.reshape(300, 61), dense, bias)


@interp
def test_transposed_view_input(monkeypatch):
    """x given as a transposed (feature-major) view: strides go to the kernel, no copy needed."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    vw, dense = make_weight(20, 45, "16:2:5", dtype=torch.bfloat16, seed=6)
    x = torch.randn(45, 9, dtype=torch.bfloat16).t()
    check(vnm_linear(x, vw), x, dense, None)


def test_reference_path_without_interpreter(monkeypatch):
    """CPU without TRITON_INTERPRET: the plain PyTorch reference (what model-level tests use)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    vw, dense = make_weight(50, 70, "64:2:8", permute=True, dtype=torch.bfloat16, seed=7)
    x = torch.randn(2, 5, 70, dtype=torch.bfloat16)
    bias = torch.randn(50, dtype=torch.bfloat16)
    assert not uses_triton(x, 2)
    y = vnm_linear(x, vw, bias)
    check(y.reshape(10, 50), x.reshape(10, 70), dense, bias)
    torch.testing.assert_close(y, vnm_linear_reference(x, vw, bias), rtol=0, atol=0)


@pytest.mark.parametrize("pattern", ["16:1:6", "32:3:5"])
def test_other_n_falls_back_to_reference(monkeypatch, pattern):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    vw, dense = make_weight(21, 40, pattern, dtype=torch.float32, seed=8)
    x = torch.randn(4, 40)
    assert not uses_triton(x, vw.pattern.n)
    check(vnm_linear(x, vw), x, dense, None)


def test_float64_takes_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    vw, dense = make_weight(9, 13, "16:2:5", dtype=torch.float64, seed=9)
    x = torch.randn(3, 13, dtype=torch.float64)
    torch.testing.assert_close(vnm_linear(x, vw), F.linear(x, dense))


def test_empty_tokens(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    vw, _ = make_weight(9, 13, "16:2:5", seed=10)
    assert vnm_linear(torch.randn(0, 13), vw).shape == (0, 9)


def test_bad_inputs():
    vw, _ = make_weight(9, 13, "16:2:5", seed=11)
    with pytest.raises(ValueError, match="features"):
        vnm_linear(torch.randn(2, 12), vw)
    with pytest.raises(TypeError, match="floating point"):
        vnm_linear(torch.ones(2, 13, dtype=torch.int32), vw)
    with pytest.raises(ValueError, match="bias"):
        vnm_linear(torch.randn(2, 13), vw, torch.randn(8))
    with pytest.raises(ValueError, match="on meta"):
        vnm_linear(torch.randn(2, 13, device="meta"), vw)
    with pytest.raises(TypeError, match="VNMWeight"):
        vnm_linear(torch.randn(2, 13), torch.randn(9, 13))
    with pytest.raises(ValueError, match="n = 2"):
        vnm_linear_triton(torch.randn(2, 13), vw.values, vw.columns, vw.meta, None, None, 16, 1, 5, 9)


@pytest.mark.parametrize("interpret", [False, pytest.param(True, marks=interp)])
def test_opcheck(monkeypatch, interpret):
    if interpret:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    vw, _ = make_weight(19, 23, "16:2:5", permute=True, dtype=torch.float16, seed=12)
    x = torch.randn(3, 23, dtype=torch.float16)
    bias = torch.randn(19, dtype=torch.float16)
    rows = interleave_rows(vw.values, vw.meta, vw.block_rows, 4)
    # the weight alone, with the expanded copy, with the interleaved one and no expanded
    for held in ({}, {"expanded": expand_weights(vw)}, {"interleaved": rows}):
        torch.library.opcheck(torch.ops.vnm.linear.default, (x, *OpWeight.from_vnm(vw, **held).pack(), bias))


@pytest.mark.parametrize("interpret", [False, pytest.param(True, marks=interp)])
def test_vnm_linear_interleaved(monkeypatch, interpret):
    """The public op with the interleaved copy: the reference path ignores it, the Triton path reads
    it at 1-4 tokens; a wrong pair is refused on both paths, and one half alone by the op."""
    if interpret:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    vw, dense = make_weight(70, 45, "32:2:5", permute=True, dtype=torch.float16, seed=14)
    inter = kernels_interleave_rows(vw)
    bias = torch.randn(70, dtype=torch.float16)
    for tokens in (1, 3, 6):
        x = torch.randn(2, tokens, 45, dtype=torch.float16)
        y = vnm_linear(x, vw, bias, interleaved=inter)
        assert y.shape == (2, tokens, 70)
        check(y.reshape(-1, 70), x.reshape(-1, 45), dense, bias)
    with pytest.raises(ValueError, match="interleaved must be"):
        vnm_linear(x, vw, interleaved=(inter[0].float(), inter[1]))
    with pytest.raises(ValueError, match="come together"):
        OpWeight.from_vnm(vw, interleaved=inter).map_tensors(lambda k, t: None if k == "rows_meta" else t)
    weight, spec = OpWeight.from_vnm(vw, interleaved=inter).pack()
    with pytest.raises(ValueError, match="takes 6 tensors"):  # rows_meta dropped from the list
        torch.ops.vnm.linear(x, weight[:-1], spec, None)
    with pytest.raises(ValueError, match="n = 2"):
        kernels_interleave_rows(make_weight(16, 16, "16:1:4")[0])


def test_grad_with_expanded_weights():
    """Backward returns one gradient per argument passed, with or without the optional expanded weights."""
    import vnm_compile.backend as backend

    backend._ensure_autograd()
    vw, dense = make_weight(19, 23, "16:2:5", permute=True, seed=13)
    bias = torch.randn(19, requires_grad=True)
    rows = interleave_rows(vw.values, vw.meta, vw.block_rows, 8)
    for held in ({}, {"expanded": expand_weights(vw)}, {"interleaved": rows}):
        x = torch.randn(3, 23, requires_grad=True)
        torch.ops.vnm.linear(x, *OpWeight.from_vnm(vw, **held).pack(), bias).sum().backward()
        torch.testing.assert_close(x.grad, dense.sum(0).expand(3, -1))
        hybrid = OpWeight.from_vnm(vw, **held, max_sparse_tokens=0)  # dense branch, same function
        x.grad = None
        torch.ops.vnm.hybrid_linear(x, [dense], *hybrid.pack(), bias).sum().backward()
        torch.testing.assert_close(x.grad, dense.sum(0).expand(3, -1))
    assert bias.grad is not None


def test_candidate_configs_fit():
    for v in (1, 5, 16, 24, 64, 128):
        for t in (1, 3, 16, 40, 300, 8192):
            cands = candidate_configs(v, t)
            assert cands and all(c.fits(v, t) for c in cands)
    assert any(c.kind == "fma" for c in candidate_configs(64, 1))
    assert {c.kind for c in candidate_configs(64, 2048)} == {"dot", "gather"}


@pytest.mark.parametrize(
    "v, tokens, expanded, rows, kind",
    [(64, 1, False, 0, "fma"), (64, 1, False, 4, "rows"), (64, 16, False, 0, "dot"), (64, 16, True, 0, "gather"),
     (64, 2048, False, 0, "gather"), (64, 8192, True, 0, "gather"), (128, 2048, False, 0, "gather")],
)  # fmt: skip
def test_first_candidate_is_the_usual_winner(v, tokens, expanded, rows, kind):
    """The first candidate runs untimed (VNM_AUTOTUNE=0, a first call inside a CUDA-graph capture):
    it is the kind the autotuner picked most often on the H100/H200 for that case."""
    assert candidate_configs(v, tokens, expanded, rows)[0].kind == kind
    assert all(c.kind != "gather" for c in candidate_configs(64, 64))  # the weight rebuild costs too much there
    assert any(c.kind == "gather" for c in candidate_configs(64, 16, expanded=True))  # no rebuild: from 2 tokens
    assert all(c.kind != "gather" for c in candidate_configs(64, 1, expanded=True))


def _table(tmp_path, speedup_16: float):
    rec = lambda t, us: {  # noqa: E731
        "out_features": 4096, "in_features": 4096, "tokens": t, "dense_us": 10.0, "vnm_us": {"64:2:8": us},
    }  # fmt: skip
    path = tmp_path / "linear.json"
    path.write_text(json.dumps({"records": [rec(1, 4.0), rec(16, 10.0 / speedup_16), rec(2048, 20.0)]}))
    return json.loads(path.read_text()), path


def test_sparse_speedup_lookup(tmp_path):
    table, _ = _table(tmp_path, 1.5)
    p = VNMPattern.parse("64:2:8")
    assert sparse_speedup(table, 4096, 4096, p, 1) == pytest.approx(2.5)
    assert sparse_speedup(table, 4000, 4200, p, 12) == pytest.approx(1.5)  # nearest shape and tokens
    assert sparse_speedup(table, 4096, 4096, p, 8192) == pytest.approx(0.5)
    # unmeasured pattern: nearest measured one
    assert sparse_speedup(table, 4096, 4096, VNMPattern.parse("32:2:8"), 1) == pytest.approx(2.5)
    assert sparse_speedup({"records": []}, 1, 1, p, 1) is None


def test_prefer_sparse_without_table_or_gpu():
    assert prefer_sparse(4096, 4096, "64:2:8", 1, "cpu") is True


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 3, 16, 33, 300, 2048])
@pytest.mark.parametrize(
    "rows,cols,pattern",
    [(4096, 4096, "64:2:8"), (331, 1031, "16:2:5"), (517, 999, "128:2:16"), (300, 1031, "256:2:8"), (130, 258, "2:4")],
)
def test_gpu_matches_fp64(rows, cols, pattern, tokens, dtype):
    vw, dense = make_weight(rows, cols, pattern, permute=rows % 2 == 1, dtype=dtype, device="cuda", seed=tokens)
    x = torch.randn(tokens, cols, dtype=dtype, device="cuda")
    bias = torch.randn(rows, dtype=dtype, device="cuda")
    out = torch.full((tokens, rows), float("nan"), dtype=dtype, device="cuda")
    y = vnm_linear_triton(
        x, vw.values, vw.columns, vw.meta, vw.row_index, bias, vw.block_rows, 2, vw.pattern.m, rows, out=out
    )
    check(y, x, dense, bias)
    check(vnm_linear(x, vw, bias), x, dense, bias)


@pytest.mark.gpu
def test_gpu_every_config():
    """Every autotune candidate computes the same function (not only the one autotune picks)."""
    from vnm_compile.kernels.vnm_triton import (
        _FMA_CONFIGS,
        _GATHER_CONFIGS,
        _GATHER_MID_CONFIGS,
        _PREFILL_CONFIGS,
        _SMALL_DOT_CONFIGS,
    )

    # 2056 columns: 257 groups = 8 full chunks of 32 + a 1-group tail (split-K 4 and 8 apply)
    vw, dense = make_weight(256, 2056, "128:2:8", permute=True, dtype=torch.float16, device="cuda", seed=1)
    bias = torch.randn(256, dtype=torch.float16, device="cuda")
    expanded = expand_weights(vw)
    for cfg in _FMA_CONFIGS + _SMALL_DOT_CONFIGS + _PREFILL_CONFIGS + _GATHER_CONFIGS + _GATHER_MID_CONFIGS:
        for tokens in (1, 37, 256):
            for e in (None, expanded) if cfg.kind == "gather" else (None,):
                x = torch.randn(tokens, 2056, dtype=torch.float16, device="cuda")
                out = torch.full((tokens, 256), float("nan"), dtype=torch.float16, device="cuda")
                w = vw
                args = (x, w.values, w.columns, w.meta, w.row_index, bias, 128, 2, 8, 256)
                vnm_linear_triton(*args, out=out, config=cfg, expanded=e)
                check(out, x, dense, bias)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [2, 16, 33, 300])
def test_gpu_expanded_weights(tokens):
    """vnm_linear with the expanded weights on the GPU (whatever config the dispatcher picks)."""
    vw, dense = make_weight(517, 999, "64:2:8", permute=True, dtype=torch.float16, device="cuda", seed=tokens)
    x = torch.randn(tokens, 999, dtype=torch.float16, device="cuda")
    bias = torch.randn(517, dtype=torch.float16, device="cuda")
    check(vnm_linear(x, vw, bias, expanded=expand_weights(vw)), x, dense, bias)


@pytest.mark.gpu
@pytest.mark.parametrize("r", [4, 8, 16])
def test_gpu_rows_kernel(r):
    """Every decode config on the row-interleaved layout on the GPU, 1 and 4 tokens, and the
    autotuned choice with the layout held (fp16, permutations, bias, a partial last chunk)."""
    vw, dense = make_weight(517, 999, "64:2:5", permute=True, dtype=torch.float16, device="cuda", seed=r)
    inter = interleave_rows(vw.values, vw.meta, 64, r)
    bias = torch.randn(517, dtype=torch.float16, device="cuda")
    args = (vw.values, vw.columns, vw.meta, vw.row_index, bias, 64, 2, 5, 517)
    for tokens in (1, 4):
        x = torch.randn(tokens, 999, dtype=torch.float16, device="cuda")
        for cfg in [c for c in _ROWS_CONFIGS if c.block_r % r == 0] + [None]:
            out = torch.full((tokens, 517), float("nan"), dtype=torch.float16, device="cuda")
            check(vnm_linear_triton(x, *args, out=out, config=cfg, interleaved=inter), x, dense, bias)


@pytest.mark.gpu
def test_gpu_opcheck_and_compile():
    vw, dense = make_weight(96, 200, "32:2:6", dtype=torch.float16, device="cuda", seed=2)
    x = torch.randn(5, 200, dtype=torch.float16, device="cuda")
    torch.library.opcheck(torch.ops.vnm.linear.default, (x, *OpWeight.from_vnm(vw).pack(), None))
    compiled = torch.compile(lambda x: vnm_linear(x, vw), fullgraph=True)
    check(compiled(x), x, dense, None)


@pytest.mark.gpu
def test_gpu_cusparselt_baseline():
    from vnm_compile.kernels import CSLTLinear, cusparselt_available

    if not cusparselt_available():
        pytest.skip("no cuSPARSELt")
    vw, dense = make_weight(256, 512, "2:4", dtype=torch.float16, device="cuda", seed=4)
    bias = torch.randn(256, dtype=torch.float16, device="cuda")
    c = CSLTLinear(dense, bias)
    x = torch.randn(64, 512, dtype=torch.float16, device="cuda")
    check(c.linear(x), x, dense, bias)
