"""vnm::compressed_linear with a row_index: the output permutation applied in the kernels' store.

The op with ``weight + [row_index]`` must give what the op without it gives, followed by the output index op
(store_out_permutations rewrites the second into the first), in every layout, with and without bias (read in
output coordinates), through its dense path (rebuild_dense) and its backward. CPU through the Triton
interpreter and the reference; the sparse kernels on a GPU (``-m gpu``) at decode and prefill token counts.
"""

import pytest
import torch

from vnm_compile.deploy import VNMLinear
from vnm_compile.format import VNMWeight
from vnm_compile.kernels.compressed import OP, rebuild_dense, row_index
from vnm_compile.masks import vnm_mask
from vnm_compile.pattern import VNMPattern

pytestmark = pytest.mark.usefixtures("interpret_unless_gpu")  # tests/conftest.py

ROWS, COLS = 131, 203  # not multiples of V or M: padded stored rows and a ragged last group


def _module(layout: str, dtype, device="cpu", pattern="64:2:5"):
    p = VNMPattern.parse(pattern)
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(ROWS, COLS, generator=gen, dtype=torch.float64)
    in_perm, out_perm = torch.randperm(COLS, generator=gen), torch.randperm(ROWS, generator=gen)
    stored = w[out_perm][:, in_perm]
    mask = vnm_mask(stored.abs(), p)
    bias = torch.randn(ROWS, generator=gen, dtype=torch.float64).to(dtype)
    weight = VNMWeight.from_dense(stored.to(dtype), mask, p)
    mod = VNMLinear.from_weight(weight, None, in_perm=in_perm, out_perm=out_perm, layout="rows")
    mod._to_layout(layout)
    mod = mod.to(device)
    tensors = mod._weight_tensors()
    stored_rows = tensors[0].shape[0] * (1 if mod.layout == "rows" else 64)  # (moved to a GPU: its layout)
    rows = torch.full((stored_rows,), -1, dtype=torch.int32, device=device)
    rows[:ROWS] = out_perm.to(device=device, dtype=torch.int32)  # stored row r is output row out_perm[r]
    return mod, tensors, rows, bias.to(device), (stored * mask).to(dtype), out_perm


@pytest.mark.parametrize("layout", ["rows", "tc", "tc-compact"])
def test_row_index_equals_the_index_op_after_the_op(layout):
    dtype = torch.float16
    mod, tensors, rows, bias, stored, out_perm = _module(layout, dtype)
    spec = mod._spec
    assert row_index(tensors, spec) is None and row_index([*tensors, rows], spec) is rows
    x = torch.randn(3, 5, COLS, dtype=dtype)
    expected = OP(x, tensors, spec, None).index_select(-1, mod._out_inv)
    got = OP(x, [*tensors, rows], spec, None)
    assert got.shape == expected.shape and got._base is None
    assert torch.equal(got, expected)
    with_bias = OP(x, [*tensors, rows], spec, bias)
    torch.testing.assert_close(with_bias.float(), (expected.float() + bias.float()), rtol=2e-3, atol=2e-3)
    # the dense path's weight: each stored row at its output row
    original = torch.empty_like(stored)
    original[out_perm] = stored
    assert torch.equal(rebuild_dense([*tensors, rows], spec, COLS, dtype), original)


def test_row_index_backward_matches():
    mod, tensors, rows, bias, _, _ = _module("rows", torch.float32)
    x = torch.randn(4, COLS, dtype=torch.float32, requires_grad=True)
    grad = torch.randn(4, ROWS)
    (OP(x, tensors, mod._spec, None).index_select(-1, mod._out_inv) * grad).sum().backward()
    expected, x.grad = x.grad.clone(), None
    b = bias.clone().requires_grad_(True)
    (OP(x, [*tensors, rows], mod._spec, b) * grad).sum().backward()
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, grad.sum(0))


def test_a_second_extra_tensor_is_refused():
    mod, tensors, rows, _, _, _ = _module("tc", torch.float16)
    x = torch.randn(2, COLS, dtype=torch.float16)
    with pytest.raises(ValueError, match="optionally a row_index"):
        OP(x, [*tensors, rows, rows], mod._spec, None)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["rows", "tc"])
@pytest.mark.parametrize("tokens", [1, 5, 16, 32, 48])
def test_gpu_row_index_store_matches_float64(layout, tokens):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    dtype = torch.float16
    mod, tensors, rows, bias, stored, out_perm = _module(layout, dtype, "cuda")
    original = torch.empty_like(stored)
    original[out_perm] = stored
    for _ in range(2):  # fresh inputs; the op's output is a fresh tensor, checked whole
        x = torch.randn(tokens, COLS, device="cuda", dtype=dtype)
        ref = torch.nn.functional.linear(x.double(), original.double().cuda(), bias.double())
        y = OP(x, [*tensors, rows], mod._spec, bias)
        floor = torch.nn.functional.linear(x.float(), original.float().cuda(), bias.float()).to(dtype).double() - ref
        err = (y.double() - ref).abs().max()
        assert torch.isfinite(y).all() and err <= 2 * floor.abs().max() + 1e-3, f"error {err:.3g}"


def test_held_dense_weights_run_the_dense_path_without_a_rebuild(monkeypatch):
    """dense_weights: a masked model's own weights, stacked (two here, as for fused siblings); where the dense
    path runs (the sparse-tensor-core layout on the CPU), cuBLAS runs on them and nothing is rebuilt."""
    from vnm_compile.kernels import compressed as C

    mod, tensors, _, bias, stored, _ = _module("tc", torch.float16)
    held = [stored[:64].clone(), stored[64:].clone()]
    x = torch.randn(2, 7, COLS, dtype=torch.float16)
    expected = OP(x, tensors, mod._spec, bias)  # rebuilds the same weight
    monkeypatch.setattr(C, "rebuild_dense", lambda *a, **k: pytest.fail("rebuilt with held dense weights"))
    got = OP(x, tensors, mod._spec, bias, held)
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-3)  # float32 accumulation vs the CPU fp16 matmul
    xg = x.float().requires_grad_(True)
    monkeypatch.undo()
    grad = torch.randn(2, 7, ROWS)
    (OP(xg.half(), tensors, mod._spec, None, held).float() * grad).sum().backward()
    torch.testing.assert_close(xg.grad, (grad.half() @ stored).float(), rtol=2e-2, atol=2e-2)


def test_held_dense_weights_are_checked():
    mod, tensors, rows, _, stored, _ = _module("tc", torch.float16)
    x = torch.randn(2, COLS, dtype=torch.float16)
    with pytest.raises(ValueError, match="stack to 131 rows"):
        OP(x, tensors, mod._spec, None, [stored[:100]])
    with pytest.raises(ValueError, match="exclude each other"):
        OP(x, [*tensors, rows], mod._spec, None, [stored])
