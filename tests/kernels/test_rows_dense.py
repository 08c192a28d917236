"""rows_to_dense: the dense weight rebuilt from the row-major compressed layout in one pass (no zero fill).

On CPU through the Triton interpreter (TRITON_INTERPRET=1), and compiled on a GPU (``-m gpu``). The rebuild copies
values: the reference is the
masked weight computed in float64 and cast, compared bit for bit, written into NaN-poisoned outputs.
"""

import pytest
import torch

from vnm_compile import VNMPattern, VNMWeight, vnm_mask
from vnm_compile.kernels.rows_dense import rows_to_dense

pytestmark = pytest.mark.usefixtures("interpret_unless_gpu")  # tests/conftest.py


def _weight(rows, cols, pattern, dtype, *, thin=0.0, seed=0):
    p = VNMPattern.parse(pattern)
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    mask = vnm_mask(w.abs(), p)
    if thin:  # fewer kept values than the pattern allows: padding slots
        mask &= torch.rand(rows, cols, generator=gen, dtype=torch.float64) >= thin
    return (w * mask).to(dtype), VNMWeight.from_dense(w.to(dtype), mask, p)


@pytest.mark.parametrize(
    "pattern, dtype",
    [("16:2:5", torch.float32), ("64:2:8", torch.float16), ("128:2:5", torch.bfloat16), ("2:4", torch.float16),
     ("32:1:6", torch.float32), ("16:3:7", torch.float64), ("64:2:16", torch.bfloat16)],
)  # fmt: skip
def test_every_element_written(pattern, dtype):
    for rows, cols in ((131, 203), (1, 37), (64, 80), (67, 1281)):
        thin = 0.6 if rows % 2 else 0.0  # odd row counts: padding slots too
        expected, w = _weight(rows, cols, pattern, dtype, thin=thin, seed=rows)
        out = torch.full((rows, cols + 3), float("nan"), dtype=dtype)[:, :cols]
        got = rows_to_dense(w, out=out)
        assert got is out and not got.isnan().any(), f"{rows}x{cols} at {pattern}: elements left unwritten"
        assert torch.equal(got, expected), f"{rows}x{cols} at {pattern}"
        assert out._base[:, cols:].isnan().all()
    assert torch.equal(rows_to_dense(w), expected)  # without out


def test_bad_arguments_are_named():
    _, w = _weight(64, 80, "16:2:5", torch.float16)
    with pytest.raises(ValueError, match="out must be a \\(64, 80\\) torch.float16"):
        rows_to_dense(w, out=torch.empty(64, 80))
    with pytest.raises(TypeError, match="takes a VNMWeight"):
        rows_to_dense(torch.zeros(2, 2))
    folded = VNMWeight(w.values, w.columns, w.meta, torch.arange(64, dtype=torch.int32), w.pattern, w.shape)
    with pytest.raises(ValueError, match="stored coordinates"):
        rows_to_dense(folded)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "pattern, dtype",
    [("16:2:5", torch.float32), ("64:2:8", torch.float16), ("128:2:5", torch.bfloat16), ("32:1:6", torch.float32),
     ("16:3:7", torch.float64)],
)  # fmt: skip
def test_every_element_written_on_the_gpu(pattern, dtype):
    for rows, cols in ((131, 203), (4096, 4096), (4096, 11008)):
        expected, w = _weight(rows, cols, pattern, dtype, thin=0.5 if rows % 2 else 0.0, seed=rows)
        out = torch.full((rows, cols + 3), float("nan"), dtype=dtype, device="cuda")[:, :cols]
        got = rows_to_dense(w.to("cuda"), out=out)
        assert not got.isnan().any() and torch.equal(got.cpu(), expected), f"{rows}x{cols} at {pattern}"


@pytest.mark.parametrize("pattern, dtype", [("16:2:5", torch.float32), ("64:2:8", torch.float16)])
def test_rows_out_places_each_stored_row_at_its_output_row(pattern, dtype):
    """``rows_out`` (vnm::compressed_linear's row_index: the output permutation, -1 for padding rows): each
    stored row written at its output row, every element once."""
    for rows, cols in ((131, 203), (1, 37), (67, 1281)):
        expected, w = _weight(rows, cols, pattern, dtype, seed=rows)
        perm = torch.randperm(rows, generator=torch.Generator().manual_seed(cols))
        table = torch.full((w.values.shape[0],), -1, dtype=torch.int32)
        table[:rows] = perm.to(torch.int32)
        out = torch.full((rows, cols), float("nan"), dtype=dtype)
        got = rows_to_dense(w, out=out, rows_out=table)
        want = torch.empty_like(expected)
        want[perm] = expected
        assert got is out and torch.equal(got, want), f"{rows}x{cols} at {pattern}"
