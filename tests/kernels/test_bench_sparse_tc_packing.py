"""The host side of the sparse-tensor-core experiment (benchmarks/bench_sparse_tc.py), on CPU: the packer's
records, read back through the mma.sp operand layouts the GPU probe measured (the metadata map recorded in
benchmarks/results/nvidia-h200/sparse_tc.json; A fragments in the dense m16n8k16 layout on the compressed
16x16 tile), rebuild exactly the weight the VNMWeight stores."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from vnm_compile.format import VNMWeight
from vnm_compile.masks import vnm_mask
from vnm_compile.pattern import VNMPattern

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_sparse_tc", ROOT / "benchmarks" / "bench_sparse_tc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def meta_map():
    recorded = json.loads((ROOT / "benchmarks/results/nvidia-h200/sparse_tc.json").read_text())["meta"]
    return {tuple(map(int, k.split(","))): tuple(v) for k, v in recorded["metadata_map"].items()}


def rebuild(rec, idx, nb, nkc, meta_map, cols, dtype):
    """What mma.sp computes with these operands, as a dense (nb * 64, cols) weight (float64)."""
    a = rec[..., :512].contiguous().view(dtype).view(nb, nkc, 4, 8, 4, 2, 2, 2)  # mt, g, q, gh, h, slot
    e = (rec[..., 512:].to(torch.int64) & 0xFFFFFFFF).view(nb, nkc, 4, 32)
    col_idx = idx.to(torch.int64) & 0xFFFF  # (nb, nkc, 32)
    dense = torch.zeros(nb * 64, cols, dtype=torch.float64)
    blocks = torch.arange(nb).view(nb, 1, 1) * 64 + torch.arange(4).view(1, 1, 4) * 16
    steps = torch.arange(nkc).view(1, nkc, 1)
    for (lane, nib), (r, c) in meta_map.items():
        code = (e[..., lane] >> (4 * nib)) & 0xF  # (nb, nkc, mt)
        assert int((code & 3).min()) >= 0 and bool(((code & 3) < (code >> 2)).all())  # ordered positions
        for slot, pos in ((0, code & 3), (1, code >> 2)):
            value = a[:, :, :, r % 8, c % 4, c // 4, r // 8, slot].double()
            column = col_idx[torch.arange(nb).view(nb, 1, 1), steps, 4 * c + pos]
            row = (blocks + r).expand_as(column)
            dense.index_put_((row.flatten(), column.flatten()), value.flatten(), accumulate=True)
    return dense


@pytest.mark.parametrize(
    "rows, cols, pattern, permute",
    [(200, 97, "64:2:8", False), (257, 515, "128:2:8", True), (64, 40, "64:2:5", True), (130, 300, "64:2:16", False),
     (70, 45, "64:2:7", False)],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_packed_records_rebuild_the_weight(bench, meta_map, rows, cols, pattern, permute, dtype):
    p = VNMPattern.parse(pattern)
    gen = torch.Generator().manual_seed(rows * cols)
    weight = torch.randn(rows, cols, generator=gen)
    ip = torch.randperm(cols, generator=gen) if permute else None
    op = torch.randperm(rows, generator=gen) if permute else None
    mask = vnm_mask(weight.abs()[op][:, ip] if permute else weight.abs(), p)
    if permute:  # the mask holds the pattern in permuted coordinates
        unpermuted = torch.zeros_like(mask)
        unpermuted[op.unsqueeze(1), ip.unsqueeze(0)] = mask
        mask = unpermuted
    w = VNMWeight.from_dense(weight.to(dtype), mask, p, in_perm=ip, out_perm=op)
    rec, idx, nb, nkc = bench.pack(w, meta_map)
    assert rec.shape == (nb, nkc, 640) and idx.shape == (nb, nkc, 32) and nkc % 2 == 0
    stored = rebuild(rec, idx, nb, nkc, meta_map, cols, dtype)
    rows_out = w.row_index.long() if w.row_index is not None else torch.arange(nb * 64)
    keep = (rows_out >= 0) & (rows_out < rows)
    assert len(rows_out) == nb * 64
    rebuilt = torch.zeros(rows, cols, dtype=torch.float64)
    rebuilt[rows_out[keep]] = stored[keep]
    assert torch.equal(rebuilt, w.to_dense().double())
    assert not stored[~keep].any()  # padding rows hold zeros


def test_packer_refuses_what_the_kernel_cannot_run(bench, meta_map):
    w = VNMWeight.from_dense(torch.randn(32, 40), vnm_mask(torch.rand(32, 40), VNMPattern.parse("32:2:5")), "32:2:5")
    with pytest.raises(ValueError, match="V a multiple of 64"):
        bench.pack(w, meta_map)
