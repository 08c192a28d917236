"""tc_to_dense: the dense weight rebuilt from the sparse-tensor-core packing in one pass (no zero fill).

Run on CPU through the Triton interpreter (TRITON_INTERPRET=1), and compiled on a GPU (``-m gpu``, Llama-2-7B
shapes as well). The rebuild copies values, so the reference
is exact: the masked weight computed in float64 and cast, compared bit for bit. Every call writes into a
NaN-poisoned tensor: an element the kernel skipped stays NaN and fails the comparison.
"""

import pytest
import torch

from vnm_compile import VNMPattern, VNMWeight, vnm_mask
from vnm_compile.kernels.sparse_tc import pack_sparse_tc
from vnm_compile.kernels.tc_dense import tc_to_dense, tc_to_dense_reference

pytestmark = pytest.mark.usefixtures("interpret_unless_gpu")  # tests/conftest.py


def _packed(rows, cols, pattern, dtype, *, thin=0.0, seed=0, compact=False):
    """A random weight pruned to ``pattern`` (``thin``: the fraction of kept values dropped as well, so that
    blocks keep fewer than 4 columns and rows fewer than n values: padding slots), its mask and packing."""
    p = VNMPattern.parse(pattern)
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    mask = vnm_mask(w.abs(), p)
    if thin:
        mask &= torch.rand(rows, cols, generator=gen, dtype=torch.float64) >= thin
    expected = (w * mask).to(dtype)  # the float64 reference, cast once
    packed = pack_sparse_tc(VNMWeight.from_dense(w.to(dtype), mask, p), compact=compact)
    return p, expected, packed


def _poisoned(rows, cols, dtype, extra=0):
    return torch.full((rows, cols + extra), float("nan"), dtype=dtype)[:, :cols]


SHAPES = [(131, 203), (1, 37), (200, 640), (67, 1281)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pattern", ["64:2:5", "64:2:8", "128:2:5", "64:2:6", "128:2:16"])
def test_every_element_written_from_the_records(pattern, dtype):
    for rows, cols in SHAPES:
        p, expected, packed = _packed(rows, cols, pattern, dtype, compact=cols % 2 == 1)  # compact records too
        out = _poisoned(rows, cols, dtype)
        got = tc_to_dense(packed.records, packed.columns, rows, cols, p, dtype, out=out)
        assert got is out
        assert not got.isnan().any(), f"{rows}x{cols} at {pattern}: elements left unwritten"
        assert torch.equal(got, expected), f"{rows}x{cols} at {pattern}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pattern", ["64:2:5", "128:2:8"])
def test_padding_slots_write_zeros(pattern, dtype):
    """Blocks keeping fewer than 4 columns and rows fewer than 2 values: the packer's padding slots point at
    column 0 (a real column of group 0 for some rows) with zero values."""
    for thin in (0.5, 0.95, 1.0):
        p, expected, packed = _packed(133, 171, pattern, dtype, thin=thin, seed=1)
        out = _poisoned(133, 171, dtype)
        assert torch.equal(tc_to_dense(packed.records, packed.columns, 133, 171, p, dtype, out=out), expected)


def test_strided_output_keeps_the_columns_beyond():
    """A workspace wider than the weight: only the weight's columns are written."""
    p, expected, packed = _packed(131, 203, "64:2:5", torch.float16)
    out = _poisoned(131, 203, torch.float16, extra=29)
    tc_to_dense(packed.records, packed.columns, 131, 203, p, torch.float16, out=out)
    assert torch.equal(out, expected)
    assert out._base[:, 203:].isnan().all()


def test_without_out_matches_the_reference():
    p, expected, packed = _packed(97, 333, "64:2:7", torch.bfloat16, thin=0.3)
    got = tc_to_dense(packed.records, packed.columns, 97, 333, p, torch.bfloat16)
    assert torch.equal(got, expected)
    ref = tc_to_dense_reference(packed.records, packed.columns, 97, 333, p, torch.bfloat16)
    assert torch.equal(ref, expected)


@pytest.mark.parametrize("layout", ["tc", "tc-compact"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_permuted_compressed_linear_rebuilds_and_runs(dtype, layout):
    """A VNMLinear with input and output permutations in the sparse-tensor-core layout: the op's dense path
    rebuilds the weight in its stored coordinates, the module puts the order back; against float64."""
    from vnm_compile.deploy import VNMLinear
    from vnm_compile.kernels.compressed import rebuild_dense

    rows, cols = 131, 203
    p = VNMPattern.parse("64:2:5")
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    in_perm, out_perm = torch.randperm(cols, generator=gen), torch.randperm(rows, generator=gen)
    stored = w[out_perm][:, in_perm]
    mask = vnm_mask(stored.abs(), p)
    bias = torch.randn(rows, generator=gen, dtype=torch.float64)
    weight = VNMWeight.from_dense(stored.to(dtype), mask, p)
    mod = VNMLinear.from_weight(weight, bias.to(dtype), in_perm=in_perm, out_perm=out_perm, layout="rows")
    mod._to_layout(layout)  # the GPU layout, packed here on the CPU
    assert mod.layout == layout and mod.tc_records.shape[-1] == (576 if layout == "tc-compact" else 584)
    dense = rebuild_dense(mod._weight_tensors(), mod._spec, cols, dtype)
    assert torch.equal(dense, (stored * mask).to(dtype))
    original = torch.empty_like(w)
    original[out_perm.unsqueeze(1), in_perm.unsqueeze(0)] = stored * mask
    assert torch.equal(mod.to_dense(), original.to(dtype))
    x = torch.randn(3, 5, cols, generator=gen, dtype=torch.float64)
    ref = torch.nn.functional.linear(x, original.to(dtype).double(), bias.to(dtype).double())
    y = mod(x.to(dtype))
    same_precision = torch.nn.functional.linear(x.to(dtype).float(), original.to(dtype).float(), bias.to(dtype).float())
    err, floor = (y.double() - ref).abs().max(), (same_precision.to(dtype).double() - ref).abs().max()
    assert err <= 2 * floor + 1e-6, f"error {err:.3g} against float64, PyTorch in float32 then {dtype}: {floor:.3g}"


def test_bad_arguments_are_named():
    p, _, packed = _packed(64, 80, "64:2:5", torch.float16)
    with pytest.raises(ValueError, match="out must be a \\(64, 80\\) torch.float16"):
        tc_to_dense(packed.records, packed.columns, 64, 80, p, torch.float16, out=torch.empty(64, 81).half())
    with pytest.raises(ValueError, match="out must be"):
        tc_to_dense(packed.records, packed.columns, 64, 80, p, torch.float16, out=torch.empty(80, 64).half().t())
    with pytest.raises(ValueError, match="cannot hold a 65x80 weight"):
        tc_to_dense(packed.records, packed.columns, 65, 80, p, torch.float16)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        tc_to_dense(packed.records, packed.columns, 64, 80, p, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pattern", ["64:2:5", "64:2:8", "128:2:5"])
def test_every_element_written_on_the_gpu(pattern, dtype, compact):
    for rows, cols in ((131, 203), (4096, 4096), (11008, 4096), (4096, 11008), (67, 1281)):
        p, expected, packed = _packed(rows, cols, pattern, dtype, thin=0.3 if rows % 2 else 0.0, compact=compact)
        records, columns = packed.records.cuda(), packed.columns.cuda()
        out = _poisoned(rows, cols, dtype, extra=8).cuda()
        got = tc_to_dense(records, columns, rows, cols, p, dtype, out=out)
        assert not got.isnan().any() and torch.equal(got.cpu(), expected), f"{rows}x{cols} at {pattern}"
        assert torch.equal(tc_to_dense(records, columns, rows, cols, p, dtype).cpu(), expected)


@pytest.mark.parametrize("pattern", ["64:2:5", "128:2:8"])
def test_rows_place_each_stored_row_at_its_output_row(pattern):
    """With ``rows`` (vnm::compressed_linear's row_index: the output permutation, -1 for padding rows) each
    stored row is written at its output row as the rebuild writes it; every element still written once."""
    dtype = torch.float16
    for rows, cols in SHAPES:
        p, expected, packed = _packed(rows, cols, pattern, dtype, seed=rows)
        perm = torch.randperm(rows, generator=torch.Generator().manual_seed(cols))
        table = torch.full((packed.records.shape[0] * 64,), -1, dtype=torch.int32)
        table[:rows] = perm.to(torch.int32)
        out = _poisoned(rows, cols, dtype)
        got = tc_to_dense(packed.records, packed.columns, rows, cols, p, dtype, out=out, rows=table)
        want = torch.empty_like(expected)
        want[perm] = expected
        assert torch.equal(got, want), f"{rows}x{cols} at {pattern}"
    with pytest.raises(ValueError, match="rows must be a 1-D int32 tensor"):
        tc_to_dense(packed.records, packed.columns, rows, cols, p, dtype, rows=table[:3])
