"""vnm::hybrid_linear: the runtime switch between vnm::linear (up to max_sparse_tokens rows of x)
and F.linear on the masked dense weight (above). CPU: the reference path, or the Triton kernels
under the interpreter when TRITON_INTERPRET=1 (CI), so the shapes stay small."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vnm_compile.format import VNMWeight
from vnm_compile.kernels.vnm_linear import HYBRID_OP, OP, OpWeight
from vnm_compile.masks import vnm_mask
from vnm_compile.pattern import VNMPattern


def masked_weight(rows, cols, pattern, *, seed, dtype=torch.float32):
    """A VNMWeight with permutations (row_index present) and the masked weight in original order."""
    g = torch.Generator().manual_seed(seed)
    p = VNMPattern.parse(pattern)
    w = torch.randn(rows, cols, generator=g)
    in_perm, out_perm = torch.randperm(cols, generator=g), torch.randperm(rows, generator=g)
    mp = vnm_mask(w[out_perm][:, in_perm].abs(), p)
    mask = torch.empty_like(mp)
    mask[out_perm[:, None], in_perm[None, :]] = mp
    vw = VNMWeight.from_dense(w, mask, p, in_perm=in_perm, out_perm=out_perm).to(dtype=dtype)
    return vw, (w * mask).to(dtype)


def hybrid(x, dense_weight, vw, bias, limit):
    weights = dense_weight if isinstance(dense_weight, list) else [dense_weight]
    return HYBRID_OP(x, weights, *OpWeight.from_vnm(vw, max_sparse_tokens=limit).pack(), bias)


@pytest.mark.parametrize("pattern", ["16:2:5", "2:4"])
def test_both_branches_match_the_reference(pattern):
    vw, dense = masked_weight(40, 70, pattern, seed=1)
    assert torch.equal(vw.to_dense(), dense)
    bias = torch.randn(40)
    x = torch.randn(2, 3, 70)  # 6 tokens
    ref = F.linear(x.double(), dense.double(), bias.double())
    sparse = OP(x, *OpWeight.from_vnm(vw).pack(), bias)
    for limit in (6, 1000):  # tokens <= limit: the sparse op
        y = hybrid(x, dense, vw, bias, limit)
        assert y.shape == (2, 3, 40) and y.dtype == torch.float32
        torch.testing.assert_close(y, sparse, rtol=0, atol=0)
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    for limit in (5, 0):  # tokens > limit: F.linear on the dense weight
        y = hybrid(x, dense, vw, bias, limit)
        torch.testing.assert_close(y, F.linear(x, dense, bias), rtol=0, atol=0)
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_the_switch_reads_the_token_count_of_every_call():
    """A dense weight of zeros tells the branches apart: only the dense branch would give the bias alone."""
    vw, dense = masked_weight(40, 70, "32:2:6", seed=2)
    bias = torch.randn(40)
    zeros = torch.zeros_like(dense)
    for shape in [(1, 70), (4, 70), (2, 2, 70), (5, 70), (3, 2, 70), (70,)]:
        x = torch.randn(shape)
        tokens = x.numel() // 70
        y = hybrid(x, zeros, vw, bias, 4)
        if tokens > 4:
            torch.testing.assert_close(y, bias.expand_as(y), rtol=0, atol=0)
        else:
            torch.testing.assert_close(
                y.double(), F.linear(x.double(), dense.double(), bias.double()), rtol=1e-5, atol=1e-5
            )


def test_no_bias_and_half_precision():
    vw, dense = masked_weight(40, 70, "16:2:8", seed=3, dtype=torch.float16)
    x = torch.randn(7, 70, dtype=torch.float16)
    exact = F.linear(x.double(), dense.double())
    eager = F.linear(x, dense).double()  # PyTorch at the same precision
    for limit in (7, 6):
        y = hybrid(x, dense, vw, None, limit)
        assert y.dtype == torch.float16
        err = (y.double() - exact).abs().max().item()
        assert err <= 2 * (eager - exact).abs().max().item() + 1e-5


@pytest.mark.parametrize("limit", [2, 100])
def test_opcheck(limit):
    import vnm_compile.backend  # noqa: F401  (registers the autograd formula that opcheck checks)

    vw, dense = masked_weight(40, 70, "16:2:5", seed=4)
    x = torch.randn(3, 70, requires_grad=True)
    bias = torch.randn(40, requires_grad=True)
    args = (x, [dense], *OpWeight.from_vnm(vw, max_sparse_tokens=limit).pack(), bias)
    torch.library.opcheck(HYBRID_OP, args)


@pytest.mark.parametrize("limit", [4, 5])
def test_gradients_for_x_and_bias(limit):
    import vnm_compile.backend  # noqa: F401  (registers the autograd formula)

    vw, dense = masked_weight(40, 70, "32:2:8", seed=5)
    x = torch.randn(5, 70, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(40, dtype=torch.float64, requires_grad=True)
    weight = dense.double().requires_grad_()  # the model's Parameter: frozen, gets no gradient
    vw64 = vw.to(dtype=torch.float64)
    torch.autograd.gradcheck(lambda x, b: hybrid(x, weight, vw64, b, limit), (x, bias))
    hybrid(x, weight, vw64, bias, limit).sum().backward()
    assert weight.grad is None


def stacked(parts):
    """Sibling layers as the fuse_siblings pass stacks them: one VNMWeight, the dense weights as a list."""
    from vnm_compile.format import cat_rows

    return cat_rows([vw for vw, _ in parts]), [dense for _, dense in parts]


@pytest.mark.parametrize("limit", [0, 100])
def test_stacked_siblings_both_branches(limit):
    """A fused launch: the dense branch writes each weight's column slice of one output."""
    parts = [masked_weight(rows, 70, "16:2:5", seed=10 + rows) for rows in (23, 32, 9)]
    vw, denses = stacked(parts)
    bias = torch.randn(64)
    x = torch.randn(2, 3, 70)
    y = hybrid(x, denses, vw, bias, limit)
    ref = F.linear(x.double(), torch.cat(denses).double(), bias.double())
    assert y.shape == (2, 3, 64) and y._base is None
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    y = hybrid(x, denses, vw, None, limit)
    torch.testing.assert_close(y.double(), F.linear(x.double(), torch.cat(denses).double()), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rows"):
        hybrid(x, denses[:2], vw, None, 0)


@pytest.mark.parametrize("limit", [2, 100])
def test_stacked_siblings_opcheck_and_gradients(limit):
    import vnm_compile.backend  # noqa: F401  (registers the autograd formula)

    parts = [masked_weight(rows, 70, "16:2:5", seed=20 + rows) for rows in (16, 9)]
    vw, denses = stacked(parts)
    x = torch.randn(3, 70, requires_grad=True)
    bias = torch.randn(25, requires_grad=True)
    args = (x, denses, *OpWeight.from_vnm(vw, max_sparse_tokens=limit).pack(), bias)
    torch.library.opcheck(HYBRID_OP, args)
    x64 = torch.randn(3, 70, dtype=torch.float64, requires_grad=True)
    b64 = torch.randn(25, dtype=torch.float64, requires_grad=True)
    d64, vw64 = [d.double() for d in denses], vw.to(dtype=torch.float64)
    torch.autograd.gradcheck(lambda x, b: hybrid(x, d64, vw64, b, limit), (x64, b64))
