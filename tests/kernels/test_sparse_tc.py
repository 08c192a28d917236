"""kernels.sparse_tc (the mma.sp and wgmma.sp kernels). On CPU: the packer's records, read back through the
mma.sp operand layouts (A fragments in the dense m16n8k16 layout on the compressed 16x16 tile, the metadata
map the GPU probe measured), rebuild exactly the weight the VNMWeight stores; bad input is refused. On a
GPU: the kernels against a float32 / float64 reference (the decode kernel also: repeated launches and CUDA
graph replays give the same bits)."""

import dataclasses
import itertools
import json
from pathlib import Path

import pytest
import torch

from vnm_compile.format import VNMWeight
from vnm_compile.kernels.sparse_tc import (
    DECODE_CONFIGS,
    DECODE_GRID,
    DECODE_MAX_TOKENS,
    DENSE_CONFIG,
    METADATA_MAP,
    WGMMA_CONFIG,
    WGMMA_GRID,
    WGMMA_SHARE_CONFIG,
    _can_stage,
    _smem_bytes,
    check_wgmma_config,
    decode_candidates,
    decode_smem,
    decode_split,
    default_config,
    default_decode_config,
    feature_major,
    gemm_candidates,
    launch,
    launch_decode,
    max_active_clusters,
    pack_sparse_tc,
    probe_metadata_map,
    selector1_map,
    sparse_tc_linear,
    wgmma_available,
)
from vnm_compile.kernels.vnm_triton import _feature_major, interpreter_ready
from vnm_compile.masks import vnm_mask
from vnm_compile.pattern import VNMPattern

ROOT = Path(__file__).resolve().parents[2]
interp = pytest.mark.skipif(not interpreter_ready(), reason="run with TRITON_INTERPRET=1 set before triton loads")
# the gather kernel, the dense kernel (KSUB = 2, two V blocks per CTA; and with bulk copies of the records
# + fragments read a k-step ahead, sm_90 only), and the default for the weight
CONFIGS = [
    {"KERNEL": "gather", "WR": 1, "WN": 4, "NT": 4, "STAGES": 4, "KSUB": 1, "MINB": 4},
    {"KERNEL": "dense", "WR": 2, "WN": 2, "NT": 4, "STAGES": 3, "KSUB": 2, "MINB": 1},
    {"KERNEL": "dense", "WR": 4, "WN": 1, "NT": 8, "STAGES": 3, "KSUB": 2, "MINB": 2, "BULK": 1, "PF": 1},
    None,
    # the Hopper kernel (sm_90 only): its default, two warpgroups and 64 tokens per CTA (one 16-bit index per
    # thread), 4 warpgroups, and the halves of 128-row V blocks sharing their gathered rows
    WGMMA_CONFIG,
    {"KERNEL": "wgmma", "WG": 2, "TNW": 64, "WST": 6},
    {"KERNEL": "wgmma", "WG": 4, "TNW": 128, "WST": 3},
    WGMMA_SHARE_CONFIG,
]
CONFIG_IDS = ["gather", "dense", "dense-bulk", "default", "wgmma", "wgmma-2x64", "wgmma-4x128", "wgmma-share"]


def test_selector1_map_moves_each_field_two_lanes():
    assert selector1_map({(0, 3): (0, 1), (5, 0): (1, 4)}) == {(2, 3): (0, 1), (7, 0): (1, 4)}
    assert set(selector1_map(METADATA_MAP).values()) == set(METADATA_MAP.values())
    assert all(lane % 4 >= 2 for lane, _ in selector1_map(METADATA_MAP))


def test_metadata_map_is_the_one_measured_on_the_gpu():
    recorded = json.loads((ROOT / "benchmarks/results/nvidia-h200/sparse_tc.json").read_text())["meta"]
    measured = {tuple(map(int, k.split(","))): tuple(v) for k, v in recorded["metadata_map"].items()}
    assert measured == METADATA_MAP and len(METADATA_MAP) == 128


def vnm_weight(rows, cols, pattern, permute, dtype, device="cpu", seed=0):
    p = VNMPattern.parse(pattern)
    gen = torch.Generator().manual_seed(rows * cols + seed)
    weight = torch.randn(rows, cols, generator=gen)
    ip = torch.randperm(cols, generator=gen) if permute else None
    op = torch.randperm(rows, generator=gen) if permute else None
    mask = vnm_mask(weight.abs()[op][:, ip] if permute else weight.abs(), p)
    if permute:  # the mask holds the pattern in permuted coordinates
        unpermuted = torch.zeros_like(mask)
        unpermuted[op.unsqueeze(1), ip.unsqueeze(0)] = mask
        mask = unpermuted
    w = VNMWeight.from_dense(weight.to(dtype), mask, p, in_perm=ip, out_perm=op)
    return w.to(device)


def rebuild(rec, idx, nb, nkc, meta_map, cols, dtype):
    """What mma.sp computes with these operands, as a dense (nb * 64, cols) weight (float64)."""
    a = rec[..., :512].contiguous().view(dtype).view(nb, nkc, 4, 8, 4, 2, 2, 2)  # mt, g, q, gh, h, slot
    words = (rec[..., 512:576].to(torch.int64) & 0xFFFFFFFF).view(nb, nkc, 2, 32)
    # tile mt reads word mt // 2 with sparsity selector mt % 2: the map's lanes, 2 further for selector 1
    e = torch.stack([words[:, :, mt // 2, torch.arange(32).roll(-2 * (mt % 2))] for mt in range(4)], 2)
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
     (70, 45, "64:2:7", False), (300, 203, "256:2:8", True)],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_packed_records_rebuild_the_weight(rows, cols, pattern, permute, dtype):
    w = vnm_weight(rows, cols, pattern, permute, dtype)
    packed = pack_sparse_tc(w)
    rec, idx = packed.records, packed.columns
    nb, nkc = rec.shape[:2]
    assert rec.shape == (nb, nkc, 584) and idx.shape == (nb, nkc, 32) and nkc % 2 == 0
    assert (packed.out_features, packed.in_features, packed.dtype) == (rows, cols, dtype)
    stored = rebuild(rec, idx, nb, nkc, METADATA_MAP, cols, dtype)
    rows_out = w.row_index.long() if w.row_index is not None else torch.arange(nb * 64)
    keep = (rows_out >= 0) & (rows_out < rows)
    assert len(rows_out) == nb * 64
    rebuilt = torch.zeros(rows, cols, dtype=torch.float64)
    rebuilt[rows_out[keep]] = stored[keep]
    assert torch.equal(rebuilt, w.to_dense().double())
    assert not stored[~keep].any()  # padding rows hold zeros


@pytest.mark.parametrize(
    "rows, cols, pattern, permute",
    [(200, 97, "64:2:8", False), (257, 515, "128:2:8", True), (64, 40, "64:2:5", True), (130, 300, "64:2:16", True)],
)  # fmt: skip
def test_dense_rows_point_at_the_kept_columns(rows, cols, pattern, permute):
    """The dense kernel reads kept column l of (block, k-step) from x^T row step * 8M + local[l], the
    transpose fills that row with input feature group_columns[row] (-1: zeros): the mma.sp operands read
    that way must rebuild the weight, every group's rows must lie in that group's 8M-row window, and
    without an input permutation the rows are the features in order (a plain transpose)."""
    w = vnm_weight(rows, cols, pattern, permute, torch.float16)
    packed = pack_sparse_tc(w)
    m = w.pattern.m
    nb, nkc = packed.records.shape[:2]
    assert packed.group_width == m and packed.group_columns.shape == (nkc * 8 * m,)
    assert packed.group_identity == (not permute)
    if not permute:
        expected = torch.arange(nkc * 8 * m)
        assert torch.equal(packed.group_columns.long(), torch.where(expected < cols, expected, -1))
    local = packed.records[..., 576:].contiguous().view(torch.uint8).view(nb, nkc, 32).long()
    lanes = torch.arange(32)
    assert bool(((local >= (lanes // 4) * m) & (local < (lanes // 4 + 1) * m)).all())
    rows_read = local + torch.arange(nkc).view(1, nkc, 1) * 8 * m
    features = packed.group_columns.long()[rows_read]
    stored = rebuild(packed.records, features.clamp(min=0), nb, nkc, METADATA_MAP, cols, w.dtype)
    rows_out = w.row_index.long() if w.row_index is not None else torch.arange(nb * 64)
    keep = (rows_out >= 0) & (rows_out < rows)
    rebuilt = torch.zeros(rows, cols, dtype=torch.float64)
    rebuilt[rows_out[keep]] = stored[keep]
    assert torch.equal(rebuilt, w.to_dense().double())
    # every kept column but the padding's column 0 (zero weights) reads exactly the gather kernel's column
    same = features == (packed.columns.long() & 0xFFFF)
    assert bool(same[(packed.columns.long() & 0xFFFF) != 0].all())
    # within a group, each input feature has one row (padding columns read feature 0 with zero weights, so
    # feature 0 may also sit in the last groups)
    for group in packed.group_columns.view(-1, m):
        features = group[group >= 0]
        assert features.unique().numel() == features.numel()


def test_dense_rows_refused_where_a_group_spans_too_many_features():
    w = vnm_weight(128, 40, "64:2:5", False, torch.float16)
    columns = w.columns.clone()
    columns[1, 0] = torch.tensor([5, 6, 7, 8])  # block 1 keeps features of group 1 in group 0
    packed = pack_sparse_tc(dataclasses.replace(w, columns=columns))
    assert packed.group_columns is None and packed.group_width == 0


def test_default_config_and_kernel_choice():
    w8, w16 = vnm_weight(128, 96, "64:2:8", True, torch.float16), vnm_weight(128, 96, "64:2:16", False, torch.float16)
    assert default_config(pack_sparse_tc(w8))["KERNEL"] == "dense"
    assert default_config(pack_sparse_tc(w16))["KERNEL"] == "gather"
    w5 = vnm_weight(128, 40, "64:2:5", False, torch.float16)
    columns = w5.columns.clone()
    columns[1, 0] = torch.tensor([5, 6, 7, 8])  # block 1 keeps features of group 1 in group 0: no dense rows
    odd = pack_sparse_tc(dataclasses.replace(w5, columns=columns))
    assert default_config(odd)["KERNEL"] == "gather"
    x, y = torch.zeros(40, 8, dtype=torch.float16), torch.zeros(8, 128, dtype=torch.float16)
    with pytest.raises(ValueError, match="unknown sparse_tc kernel 'tiled'"):
        launch(x, 8, odd, y, None, {"KERNEL": "tiled"})
    with pytest.raises(ValueError, match="no dense x\\^T row order"):
        launch(x, 8, odd, y, None, dict(default_config(pack_sparse_tc(w8))))
    packed8 = pack_sparse_tc(w8)  # x^T laid out for the gather kernel, launched with the dense one
    with pytest.raises(ValueError, match="x\\^T for the dense kernel must be \\(128, >= 8 tokens\\)"):
        launch(torch.zeros(96, 8, dtype=torch.float16), 8, packed8, y, None, default_config(packed8))


@interp
@pytest.mark.parametrize("with_rows", [False, True])
def test_transpose_with_rows(with_rows):
    x = torch.randn(37, 90, dtype=torch.float16)[:, :83]  # strided rows
    rows = torch.tensor([5, -1, 82, 0, 7, -1] * 11 + [3], dtype=torch.int32) if with_rows else None
    xt = _feature_major(x, 40, True, rows, out_rows=None if with_rows else 97)  # without rows: 14 zero rows
    want = torch.zeros(97 if rows is None else len(rows), 40, dtype=x.dtype)
    src = torch.arange(83) if rows is None else rows.long()
    dst = torch.arange(len(src))
    want[dst[src >= 0], :37] = x[:, src[src >= 0]].t()
    assert torch.equal(xt, want)


def test_bad_input_is_refused_with_a_clear_error():
    w32 = VNMWeight.from_dense(torch.randn(32, 40), vnm_mask(torch.rand(32, 40), VNMPattern.parse("32:2:5")), "32:2:5")
    with pytest.raises(ValueError, match="V a multiple of 64"):
        pack_sparse_tc(w32)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        pack_sparse_tc(vnm_weight(64, 40, "64:2:5", False, torch.float32))
    with pytest.raises(TypeError, match="VNMWeight"):
        pack_sparse_tc(torch.randn(64, 40))
    packed = pack_sparse_tc(vnm_weight(64, 40, "64:2:5", False, torch.float16))
    with pytest.raises(ValueError, match="CUDA tensors only"):
        sparse_tc_linear(torch.randn(3, 40, dtype=torch.float16), packed)
    with pytest.raises(TypeError, match="SparseTCWeight"):
        sparse_tc_linear(torch.randn(3, 40, dtype=torch.float16), vnm_weight(64, 40, "64:2:5", False, torch.float16))


@pytest.mark.gpu(sparse_tc=True)
def test_probe_agrees_with_the_packer_on_this_gpu():
    assert probe_metadata_map() == METADATA_MAP
    # sparsity selector 1 (the odd m16 tiles' metadata): the same fields in the other two lanes of each quad
    assert probe_metadata_map(selector=1) == selector1_map(METADATA_MAP)


@pytest.mark.gpu(sparse_tc=True)
@pytest.mark.parametrize(
    "rows, cols, lead, pattern, permute",
    [(64, 40, (5,), "64:2:5", False), (200, 97, (3, 13), "64:2:8", True), (128, 300, (130,), "64:2:16", False),
     (257, 515, (2, 150), "128:2:8", True), (64, 16, (1,), "64:2:8", False), (192, 512, (129,), "64:2:7", True),
     (300, 203, (2, 70), "256:2:8", True)],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_kernel_matches_float32(rows, cols, lead, pattern, permute, dtype, with_bias, config):
    if config and config.get("BULK") and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("bulk copies on mbarriers need compute capability >= 9.0")
    if config and config["KERNEL"] == "wgmma" and not wgmma_available("cuda"):
        pytest.skip("the wgmma kernel needs compute capability 9.0")
    if config and config.get("SHARE") and int(pattern.split(":")[0]) % 128:
        pytest.skip("SHARE=1 takes V a multiple of 128")
    w = vnm_weight(rows, cols, pattern, permute, dtype, device="cuda", seed=1)
    packed = pack_sparse_tc(w)
    x = torch.randn(*lead, cols + 5, device="cuda", dtype=dtype)[..., :cols]  # non-contiguous rows
    bias = torch.randn(rows, device="cuda", dtype=dtype) if with_bias else None
    ref = x.float() @ w.to_dense().float().t() + (bias.float() if with_bias else 0)
    y = sparse_tc_linear(x, packed, bias, config)
    assert y.shape == (*lead, rows) and y.dtype == dtype
    err = ((y.float() - ref).norm() / ref.norm()).item()
    assert err < 1e-2, err


@pytest.mark.gpu(sparse_tc=True)
@pytest.mark.parametrize(
    "rows, cols, lead, pattern, permute",
    [(64, 40, (5,), "64:2:5", False), (200, 97, (3, 13), "64:2:8", True), (257, 515, (2, 150), "128:2:8", True),
     (192, 4096, (129,), "64:2:5", True), (131, 4096, (1,), "64:2:5", False), (131, 4096, (7,), "64:2:5", True),
     (64, 11008, (16,), "64:2:5", True), (64, 11008, (32,), "64:2:8", False)],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [c for c in CONFIGS if not c or c["KERNEL"] != "dense"],
                         ids=[i for c, i in zip(CONFIGS, CONFIG_IDS, strict=True) if not c or c["KERNEL"] != "dense"])  # fmt: skip
def test_compact_records_run_the_gather_wgmma_and_decode_kernels(rows, cols, lead, pattern, permute, dtype, config):
    """pack_sparse_tc(compact=True): the kernels compiled with REC=2304 against float32 (up to 32 tokens the
    default is the decode kernel, autotuned over its grid); the dense GEMM refuses the records."""
    if config and config["KERNEL"] == "wgmma" and not wgmma_available("cuda"):
        pytest.skip("the wgmma kernel needs compute capability 9.0")
    if config and config.get("SHARE") and not pattern.startswith("128:"):
        pytest.skip("SHARE=1 takes 128-row V blocks")
    w = vnm_weight(rows, cols, pattern, permute, dtype, device="cuda", seed=5)
    packed = pack_sparse_tc(w, compact=True)
    x = torch.randn(*lead, cols + 5, device="cuda", dtype=dtype)[..., :cols]
    bias = torch.randn(rows, device="cuda", dtype=dtype)
    ref = x.float() @ w.to_dense().float().t() + bias.float()
    if config is not None and x.numel() // cols <= DECODE_MAX_TOKENS:
        pytest.skip("a GEMM config at decode token counts: the default (None) covers the decode kernel")
    y = sparse_tc_linear(x, packed, bias, config)
    err = ((y.float() - ref).norm() / ref.norm()).item()
    assert err < 1e-2, err
    with pytest.raises(ValueError, match="no dense x\\^T row order"):
        dense = {"KERNEL": "dense", "WR": 2, "WN": 2, "NT": 4, "STAGES": 3, "KSUB": 2, "MINB": 1}
        launch(torch.zeros(1, 8, device="cuda", dtype=dtype), 1, packed, y.reshape(-1, rows), None, dense)


@pytest.mark.gpu(sparse_tc=True)
def test_kernel_refuses_mismatched_input():
    packed = pack_sparse_tc(vnm_weight(64, 40, "64:2:5", False, torch.float16, device="cuda"))
    with pytest.raises(ValueError, match="features"):
        sparse_tc_linear(torch.randn(3, 41, device="cuda", dtype=torch.float16), packed)
    with pytest.raises(ValueError, match="bfloat16"):
        sparse_tc_linear(torch.randn(3, 40, device="cuda", dtype=torch.bfloat16), packed)


@pytest.mark.gpu(sparse_tc=True)
@pytest.mark.parametrize(
    "rows, cols, pattern, permute",
    [(200, 97, "64:2:8", True), (128, 300, "64:2:16", False), (192, 512, "64:2:5", False), (257, 515, "128:2:8", True)],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_vnm_linear_runs_the_mma_sp_kernel_from_its_token_count(rows, cols, pattern, permute, dtype, monkeypatch):
    """vnm_linear(sparse_tc=...) and the hybrid op: the mma.sp kernel from sparse_tc_min_tokens rows of x
    (counted through a spy), the Triton kernels or dense below; every path within fp16/bf16 rounding."""
    import vnm_compile.kernels.sparse_tc as sparse_tc_module
    from vnm_compile.kernels.vnm_linear import HYBRID_OP, OpWeight, vnm_linear

    calls = []
    real = sparse_tc_module.sparse_tc_linear
    monkeypatch.setattr(sparse_tc_module, "sparse_tc_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    w = vnm_weight(rows, cols, pattern, permute, dtype, device="cuda", seed=2)
    packed = pack_sparse_tc(w)
    bias = torch.randn(rows, device="cuda", dtype=dtype)
    dense = w.to_dense()
    for lead, want_tc in (((3,), False), ((2, 7), False), ((33,), True), ((3, 50), True)):
        x = torch.randn(*lead, cols, device="cuda", dtype=dtype)
        ref = x.float() @ dense.float().t() + bias.float()
        before = len(calls)
        y = vnm_linear(x, w, bias, sparse_tc=packed, sparse_tc_min_tokens=20)
        assert (len(calls) > before) == want_tc, lead
        weight = OpWeight.from_vnm(w, sparse_tc=packed, sparse_tc_min_tokens=20, max_sparse_tokens=0)
        y_hybrid = HYBRID_OP(x, [dense], *weight.pack(), bias)
        assert (len(calls) > before + 1) == want_tc, lead
        for out in (y, y_hybrid):
            assert out.shape == (*lead, rows) and out.dtype == dtype
            err = ((out.float() - ref).norm() / ref.norm()).item()
            assert err < 1e-2, (lead, err)


def test_wgmma_configs_and_their_shared_memory():
    # off Hopper (here: a CPU weight) the mma.sp GEMMs are the only candidates; the wgmma configs fit in an
    # H200's 227 KiB at Llama-2-7B's widest k (4096 x 11008 at 64:2:5: 276 k-steps)
    packed = pack_sparse_tc(vnm_weight(128, 96, "128:2:8", False, torch.float16))
    assert packed.block_rows == 128 and not wgmma_available(packed.device)
    assert gemm_candidates(packed) == [default_config(packed)] and default_config(packed)["KERNEL"] == "dense"
    for cfg in [WGMMA_CONFIG, WGMMA_SHARE_CONFIG, *WGMMA_GRID]:
        assert _smem_bytes(cfg, 276, 0) <= 227 << 10, cfg
        check_wgmma_config(cfg, packed)  # raises on a config the kernel does not take
    # stages x blocks x (B tile + record) + the blocks' index tables + the 1024-byte alignment slack
    assert _smem_bytes(WGMMA_CONFIG, 10, 0) == 4 * (64 * 256 + 2336) + 10 * 64 + 1024


def test_wgmma_config_check_names_what_does_not_fit():
    w64 = pack_sparse_tc(vnm_weight(128, 96, "64:2:8", False, torch.float16))
    w128 = pack_sparse_tc(vnm_weight(128, 96, "128:2:8", False, torch.float16))
    good = {"KERNEL": "wgmma", "WG": 1, "TNW": 256, "WST": 4, "MINB": 2}
    assert check_wgmma_config(good, w64) == {k: v for k, v in good.items() if k != "KERNEL"}
    assert check_wgmma_config(WGMMA_SHARE_CONFIG, w128)["SHARE"] == 1
    bad = [
        ({**good, "TNW": 96}, w64, "TNW in \\(64, 128, 256\\)"),
        ({**good, "WG": 4, "TNW": 64}, w64, "512 threads must split the 256"),
        # the measurement and rejected variants left the kernel (docs/experiments.md)
        ({**good, "WNI": 128}, w64, "unknown keys \\['WNI'\\]"),
        ({**good, "WPROBE": 1}, w64, "unknown keys \\['WPROBE'\\]"),
        ({**good, "WG": 2, "SHARE": 1}, w64, "V a multiple of 128"),
    ]
    for cfg, w, message in bad:
        with pytest.raises(ValueError, match=message):
            check_wgmma_config(cfg, w)


def test_hopper_picks_the_wgmma_kernel_and_autotunes_over_both_families(monkeypatch):
    """The selection logic, with the device check answered as on an H100/H200 (CPU weights here)."""
    import vnm_compile.kernels.sparse_tc as sparse_tc

    monkeypatch.setattr(sparse_tc, "wgmma_available", lambda device: True)
    w64 = pack_sparse_tc(vnm_weight(128, 96, "64:2:8", True, torch.float16))
    w128 = pack_sparse_tc(vnm_weight(256, 96, "128:2:8", False, torch.float16))
    assert default_config(w64, 300) is WGMMA_CONFIG and default_config(w128, 300) is WGMMA_SHARE_CONFIG
    assert default_config(w64, 32)["KERNEL"] == "decode"  # few tokens: the decode kernel either way
    # then the rest of the wgmma grid and the mma.sp GEMM (the dense kernel at M = 8), nothing timed twice
    assert gemm_candidates(w64) == [WGMMA_CONFIG, *WGMMA_GRID, DENSE_CONFIG]
    assert gemm_candidates(w128) == [WGMMA_SHARE_CONFIG, WGMMA_CONFIG, *WGMMA_GRID, DENSE_CONFIG]
    # the op holds only the gather indices on Hopper (the wgmma kernel reads those)
    from vnm_compile.kernels.vnm_linear import TC_GATHER, sparse_tc_args

    assert sparse_tc_args(w64)[2:] == (None, TC_GATHER)


@pytest.mark.gpu(sparse_tc=True)
def test_wgmma_kernel_is_the_hopper_default_and_refuses_bad_configs():
    w = vnm_weight(192, 256, "64:2:8", True, torch.float16, device="cuda")
    packed = pack_sparse_tc(w)
    x = torch.randn(300, 256, device="cuda", dtype=torch.float16)
    y = torch.empty(300, 192, device="cuda", dtype=torch.float16)
    xt = _feature_major(x, 304, False)
    if not wgmma_available("cuda"):
        assert default_config(packed)["KERNEL"] != "wgmma"
        with pytest.raises(ValueError, match="compute capability 9.0"):
            launch(xt, 300, packed, y, None, WGMMA_CONFIG)
        return
    assert default_config(packed, 300) is WGMMA_CONFIG
    cands = gemm_candidates(packed)
    assert cands[0] is WGMMA_CONFIG and cands[-1]["KERNEL"] == "dense" and len(cands) == len(WGMMA_GRID) + 2
    with pytest.raises(ValueError, match="SHARE=1 pairs the 64-row halves"):
        launch(xt, 300, packed, y, None, WGMMA_SHARE_CONFIG)
    with pytest.raises(ValueError, match="TNW in \\(64, 128, 256\\)"):
        launch(xt, 300, packed, y, None, {**WGMMA_CONFIG, "TNW": 96})
    with pytest.raises(ValueError, match="512 threads must split the 256 16-byte chunks"):
        launch(xt, 300, packed, y, None, {**WGMMA_CONFIG, "WG": 4, "TNW": 64})
    with pytest.raises(ValueError, match="x\\^T for the wgmma kernel"):
        launch(xt[:, :296], 300, packed, y, None, WGMMA_CONFIG)
    ref = x.float() @ w.to_dense().float().t()
    for cfg in cands:  # every candidate the autotuning may pick, poisoned output first
        y.fill_(float("nan"))
        launch(feature_major(x, packed, cfg), 300, packed, y, None, cfg)
        assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2, cfg


def test_packed_bytes_count_what_the_packing_adds():
    packed = pack_sparse_tc(vnm_weight(200, 97, "64:2:8", True, torch.float16))
    parts = [packed.records, packed.columns] + ([packed.group_columns] if packed.group_columns is not None else [])
    assert packed.nbytes == sum(t.numel() * t.element_size() for t in parts) > 0


PACK_CASES = [(200, 97, "64:2:8", False), (257, 515, "128:2:8", True), (64, 40, "64:2:5", True),
              (130, 300, "64:2:16", False), (70, 45, "64:2:7", False), (131, 4096, "64:2:5", True)]  # fmt: skip


@pytest.mark.parametrize("rows, cols, pattern, permute", PACK_CASES)
def test_compact_packing_is_the_default_less_local_rows_and_step_padding(rows, cols, pattern, permute):
    """compact=True: the same A fragments, metadata and kept columns, records of 576 words (no dense-kernel
    rows), k-steps padded to whole steps only; the dense mma.sp GEMM is never chosen for it."""
    from vnm_compile.kernels.sparse_tc import GATHER_CONFIG, mma_sp_config, unpack_sparse_tc

    w = vnm_weight(rows, cols, pattern, permute, torch.bfloat16)
    full, compact = pack_sparse_tc(w), pack_sparse_tc(w, compact=True)
    groups = -(-cols // w.pattern.m)
    steps = -(-groups // 8)
    assert compact.records.shape == (full.records.shape[0], steps, 576) and compact.columns.shape[1] == steps
    assert torch.equal(compact.records, full.records[:, :steps, :576])
    assert torch.equal(compact.columns, full.columns[:, :steps])
    assert compact.group_columns is None and mma_sp_config(compact) is GATHER_CONFIG
    assert (compact.record_bytes, compact.rec_define(), full.rec_define()) == (2304, {"REC": 2304}, {})
    assert compact.nbytes < full.nbytes
    a, b = unpack_sparse_tc(full, w.pattern), unpack_sparse_tc(compact, w.pattern)
    for name in ("values", "columns", "meta", "row_index"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None and y is None) or torch.equal(x, y), name
    assert _smem_bytes(WGMMA_CONFIG, 10, 0, compact.record_bytes) == 4 * (64 * 256 + 2304) + 10 * 64 + 1024


def test_decode_split_and_configs():
    assert decode_split(64, 64, 132, 4) == (8, 8)  # 4096 x 4096: 512 CTAs of 8 k-steps
    assert decode_split(172, 64, 132, 4) == (22, 3)  # 11008 rows: 3 CTAs per block, the last with 20 steps
    assert decode_split(12, 12, 132, 4) == (1, 12)  # never more CTAs than k-steps
    assert decode_split(500, 3, 132, 1) == (3, 1)  # enough blocks: no split
    assert decode_split(64, 64, 132, 4, max_split=8) == (8, 8)
    assert decode_split(16, 64, 132, 4, max_split=8) == (8, 8)  # 33 wanted, at most a cluster of 8 (CL=1)
    assert decode_split(16, 61, 132, 4, max_split=8) == (8, 8)  # the last CTA with 5 steps
    with pytest.raises(ValueError, match="positive"):
        decode_split(0, 4, 132, 4)
    with pytest.raises(ValueError, match="positive"):
        decode_split(16, 4, 132, 4, max_split=0)
    w = pack_sparse_tc(vnm_weight(200, 97, "64:2:8", False, torch.float16))
    for tokens in range(1, DECODE_MAX_TOKENS + 1):
        cfg = default_config(w, tokens)
        assert cfg["KERNEL"] == "decode" and cfg is DECODE_CONFIGS[min(t for t in DECODE_CONFIGS if t >= tokens)]
    assert default_config(w, DECODE_MAX_TOKENS + 1)["KERNEL"] == "dense" == default_config(w)["KERNEL"]
    for tokens in (1, 9, 32):  # autotuning: the untuned default first, then the whole grid
        assert decode_candidates(tokens) == [default_config(w, tokens), *DECODE_GRID]
    assert len(DECODE_GRID) == 12 and all(c["KERNEL"] == "decode" for c in DECODE_GRID)
    assert len({tuple(sorted(c.items())) for c in DECODE_GRID}) == 12  # no config twice
    assert not any(c.get("DP") and c["XS"] == 1 for c in [*DECODE_GRID, *DECODE_CONFIGS.values()])  # DP: XS 0/2
    with pytest.raises(ValueError, match="1 to 32 tokens"):
        default_decode_config(0)
    # shared memory: a 16-byte flag, then the larger of the warps' sums and (XS=1) their staged slices of x
    assert decode_smem({"DW": 4, "DU": 2}, 16, 0) == 16 + 4 * 16 * 68 * 4
    assert decode_smem({"DW": 4, "DU": 2, "XS": 1}, 16, 128) == 16 + 4 * 2 * 16 * 136 * 2
    # XS=2: per warp DU x NT tiles of 32 x^T rows of 16 bytes (here smaller than the sums, which reuse them)
    assert decode_smem({"DW": 8, "DU": 4, "XS": 2}, 32, 0) == 16 + 8 * 32 * 68 * 4
    assert decode_smem({"DW": 8, "DU": 16, "XS": 2}, 32, 0) == 16 + 8 * 16 * 4 * 512
    # CL=1: + the CTA's sums, which the cluster's CTAs read
    assert decode_smem({"DW": 4, "DU": 2, "CL": 1}, 16, 0) == 16 + 4 * 16 * 68 * 4 + 16 * 64 * 4


def test_launch_decode_refuses_bad_input():
    w = pack_sparse_tc(vnm_weight(200, 97, "64:2:8", True, torch.float16))
    y = torch.empty(40, 200, dtype=torch.float16)
    with pytest.raises(ValueError, match="1 to 32 tokens"):
        launch_decode(torch.zeros(33, 97, dtype=torch.float16), w, y, None, DECODE_CONFIGS[8])
    with pytest.raises(ValueError, match="contiguous rows"):
        launch_decode(torch.zeros(97, 4, dtype=torch.float16).t(), w, y, None, DECODE_CONFIGS[8])
    with pytest.raises(ValueError, match="XS=1 needs"):  # an input permutation: x cannot be staged by slices
        launch_decode(torch.zeros(4, 97, dtype=torch.float16), w, y, None, {**DECODE_CONFIGS[8], "XS": 1})
    with pytest.raises(ValueError, match="XS must be 0, 1 or 2"):
        launch_decode(torch.zeros(4, 97, dtype=torch.float16), w, y, None, {**DECODE_CONFIGS[8], "XS": 3})
    w = pack_sparse_tc(vnm_weight(200, 96, "64:2:8", False, torch.float16))
    with pytest.raises(ValueError, match="DP=1 .* needs XS=0 or 2"):
        launch_decode(torch.zeros(4, 96, dtype=torch.float16), w, y, None, {**DECODE_CONFIGS[8], "XS": 1, "DP": 1})


DECODE_CASES = [(64, 40, "64:2:5", False), (200, 97, "64:2:8", True), (130, 300, "64:2:16", False),
                (257, 515, "128:2:8", True), (64, 16, "64:2:8", False), (448, 1024, "64:2:5", False),
                (192, 512, "64:2:7", True)]  # fmt: skip
# the default split, no split (CTAS_PER_SM=1 at these sizes: fewer CTAs than SMs), one k-step per CTA, and
# the partials summed in a cluster (CL=1) of as many CTAs as it takes (up to 8; several k-steps each where
# a block has more than 8), each warp loading its next k-steps ahead (DP=1: several batches per warp), and x
# transposed through shared memory (XS=2, the default) with and without loading ahead, and x's slices staged
# (XS=1, refused where the weight or x does not allow it)
DECODE_TEST_CONFIGS = [
    {"KERNEL": "decode", "DW": 4, "DU": 2, "CTAS_PER_SM": 4},
    {"KERNEL": "decode", "DW": 8, "DU": 1, "CTAS_PER_SM": 1, "XS": 0},
    {"KERNEL": "decode", "DW": 2, "DU": 4, "CTAS_PER_SM": 1000},
    {"KERNEL": "decode", "DW": 4, "DU": 2, "CTAS_PER_SM": 1000, "CL": 1},
    {"KERNEL": "decode", "DW": 2, "DU": 2, "CTAS_PER_SM": 1, "CL": 1, "DP": 1, "XS": 0},
    {"KERNEL": "decode", "DW": 8, "DU": 2, "CTAS_PER_SM": 4, "XS": 0, "CL": 1},
    {"KERNEL": "decode", "DW": 2, "DU": 3, "CTAS_PER_SM": 1000, "CL": 1, "DP": 1, "XS": 2},
    {"KERNEL": "decode", "DW": 4, "DU": 2, "CTAS_PER_SM": 2, "XS": 1},
]


@pytest.mark.gpu(sparse_tc=True)
@pytest.mark.parametrize("rows, cols, pattern, permute", DECODE_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "config",
    DECODE_TEST_CONFIGS,
    ids=[
        "default-split",
        "no-split",
        "step-per-cta",
        "cluster",
        "prefetch",
        "gathered-cluster",
        "transposed-prefetch",
        "staged",
    ],
)
def test_decode_kernel_matches_float64(rows, cols, pattern, permute, dtype, config):
    """Every token count 1..32 (1-4 n-tiles, partial ones), with and without bias, x rows 16-byte aligned
    or not (XS=1 refuses those and permuted weights); outputs poisoned before each launch, each launched twice
    (the split-K arrival counters must be back at zero)."""
    w = vnm_weight(rows, cols, pattern, permute, dtype, device="cuda", seed=3)
    packed = pack_sparse_tc(w)
    dense = w.to_dense().double()
    for tokens in (1, 2, 7, 8, 9, 16, 17, 31, 32):
        width = cols + 5 if tokens % 2 else -(-cols // 8) * 8 + 8  # odd: unaligned rows
        x = torch.randn(tokens, width, device="cuda", dtype=dtype)[:, :cols]
        bias = torch.randn(rows, device="cuda", dtype=dtype) if tokens % 3 else None
        ref = x.double() @ dense.t() + (bias.double() if bias is not None else 0)
        if config.get("XS") == 1 and not _can_stage(x, packed):
            with pytest.raises(ValueError, match="XS=1 needs"):
                launch_decode(x, packed, torch.empty(tokens, rows, device="cuda", dtype=dtype), bias, config)
            continue
        for _ in range(2):
            y = torch.full((tokens, rows), float("nan"), device="cuda", dtype=dtype)
            launch_decode(x, packed, y, bias, config)
            err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
            assert err < 1e-2, (tokens, err)


@pytest.mark.gpu(sparse_tc=True)
def test_decode_kernel_gives_the_same_bits_every_launch_and_in_graphs():
    w = vnm_weight(1024, 1024, "64:2:8", False, torch.float16, device="cuda", seed=4)
    packed = pack_sparse_tc(w)
    assert packed.group_identity  # XS=1 can run
    # the default (partials summed in a cluster, x transposed) and x staged with the partials in global memory
    configs = (DECODE_CONFIGS[16], {**DECODE_CONFIGS[16], "XS": 1, "CL": 0, "DP": 0})
    for tokens, cfg in itertools.product((1, 16), configs):
        x = torch.randn(tokens, 1024, device="cuda", dtype=torch.float16)
        y = torch.empty(tokens, 1024, device="cuda", dtype=torch.float16)
        launch_decode(x, packed, y, None, cfg)
        first = y.clone()
        # B fragments gathered (XS=0), from staged slices (XS=1) or transposed through shared memory (XS=2):
        # the same operands in the same order, the same bits
        y.fill_(float("nan"))
        launch_decode(x, packed, y, None, {**cfg, "XS": 0 if cfg["XS"] == 2 else 2})
        assert torch.equal(y, first)
        for _ in range(3):
            launch_decode(x, packed, y, None, cfg)
            assert torch.equal(y, first)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            launch_decode(x, packed, y, None, cfg)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            launch_decode(x, packed, y, None, cfg)
        for _ in range(3):
            y.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(y, first)
        # the same split summed through global memory (CL=0) or in a cluster (CL=1): the same order, the same bits
        cfg = {"KERNEL": "decode", "DW": 8, "DU": 1, "CTAS_PER_SM": 1}  # 16 blocks of 16 k-steps: 8 CTAs each
        outs = []
        for cl in (0, 1):
            y.fill_(float("nan"))
            launch_decode(x, packed, y, None, {**cfg, "CL": cl})
            outs.append(y.clone())
        assert torch.equal(outs[0], outs[1])


@pytest.mark.gpu(sparse_tc=True)
def test_decode_clusters_fit_and_a_refused_cluster_falls_back_to_global_sums(monkeypatch, caplog):
    """The driver's cluster occupancy for the CL=1 defaults (clusters of 8 CTAs at 4096 x 4096 64:2:8); where
    it says 0 (as on a GPU whose GPCs cannot hold the cluster), the launch sums through global memory: the
    same split, so the same bits as CL=1, and a warning."""
    import vnm_compile.kernels.sparse_tc as sparse_tc_module

    w = vnm_weight(4096, 4096, "64:2:8", False, torch.float16, device="cuda", seed=5)
    packed = pack_sparse_tc(w)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for tokens in (1, 16, 32):
        cfg = default_decode_config(tokens)
        assert cfg["CL"] == 1
        per, split = decode_split(64, packed.records.shape[1], sms, cfg["CTAS_PER_SM"], 8)
        nt = -(-tokens // 8)
        defines = {k: cfg.get(k, 0) for k in ("DW", "DU", "XS", "CL", "DP")}
        kernel = sparse_tc_module._kernels().get("vnm_mma_sp_decode", DECODE=1, NT=nt, BF16=0, DS=split, **defines)
        smem = decode_smem(cfg, tokens, 0)
        assert split >= 2 and max_active_clusters(kernel, (64, split, 1), (cfg["DW"] * 32, 1, 1), smem) >= 1
    x = torch.randn(16, 4096, device="cuda", dtype=torch.float16)
    y = torch.full((16, 4096), float("nan"), device="cuda", dtype=torch.float16)
    launch_decode(x, packed, y, None, DECODE_CONFIGS[16])
    clustered = y.clone()
    monkeypatch.setattr(sparse_tc_module, "max_active_clusters", lambda *a: 0)
    monkeypatch.setattr(sparse_tc_module, "_CLUSTERS_FIT", {})
    y.fill_(float("nan"))
    with caplog.at_level("WARNING", logger="vnm_compile.kernels.sparse_tc"):
        launch_decode(x, packed, y, None, DECODE_CONFIGS[16])
    assert "do not fit" in caplog.text
    assert torch.equal(y, clustered)


@pytest.mark.gpu(sparse_tc=True)
@pytest.mark.parametrize("permute", [False, True])
def test_vnm_linear_runs_the_decode_kernel_at_its_token_counts(permute, monkeypatch):
    """sparse_tc_decode_tokens=(4, 16) without a floor: the decode kernel at 4..16 rows only (a spy counts its
    launches), through vnm_linear and the hybrid op (dense branch outside, max_sparse_tokens=0)."""
    import vnm_compile.kernels.sparse_tc as sparse_tc_module
    from vnm_compile.kernels.vnm_linear import HYBRID_OP, OpWeight, vnm_linear

    monkeypatch.setenv("VNM_AUTOTUNE", "0")  # the autotuner's own launches would count too
    calls = []
    real = sparse_tc_module.launch_decode
    monkeypatch.setattr(sparse_tc_module, "launch_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    w = vnm_weight(200, 300, "64:2:8", permute, torch.float16, device="cuda", seed=5)
    packed = pack_sparse_tc(w)
    bias = torch.randn(200, device="cuda", dtype=torch.float16)
    dense = w.to_dense()
    weight = OpWeight.from_vnm(
        w, sparse_tc=packed, sparse_tc_min_tokens=None, sparse_tc_decode_tokens=(4, 16), max_sparse_tokens=0
    ).pack()
    for lead, want in (((3,), False), ((4,), True), ((2, 8), True), ((16,), True), ((17,), False), ((40,), False)):
        x = torch.randn(*lead, 300, device="cuda", dtype=torch.float16)
        ref = x.float() @ dense.float().t() + bias.float()
        before = len(calls)
        y = vnm_linear(x, w, bias, sparse_tc=packed, sparse_tc_min_tokens=None, sparse_tc_decode_tokens=(4, 16))
        y_hybrid = HYBRID_OP(x, [dense], *weight, bias)
        assert len(calls) - before == (2 if want else 0), lead
        for out in (y, y_hybrid):
            assert out.shape == (*lead, 200)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            assert err < 1e-2, (lead, err)
