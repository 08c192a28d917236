"""bench_wgmma_variants: the bytes its gathers read and the table (CPU, a packed weight and made-up times)."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_wgmma_variants as bench  # noqa: E402

from vnm_compile.format import VNMWeight  # noqa: E402
from vnm_compile.kernels.sparse_tc import REC_BYTES, check_wgmma_config, pack_sparse_tc  # noqa: E402
from vnm_compile.masks import vnm_mask  # noqa: E402
from vnm_compile.pattern import VNMPattern  # noqa: E402


def test_configs_are_ones_the_kernel_takes_and_the_gathered_bytes():
    p = VNMPattern.parse("64:2:8")
    weight = torch.randn(130, 96).half()
    packed = pack_sparse_tc(VNMWeight.from_dense(weight, vnm_mask(weight.abs().float(), p), p))
    for cfg in bench.CONFIGS:
        check_wgmma_config(cfg, packed)
    assert bench.CONFIGS[0] == {"KERNEL": "wgmma", "WG": 1, "TNW": 256, "WST": 4, "MINB": 2}
    # 3 V blocks (130 rows), 96 / 2 kept columns = 2 k-steps of 32 (rounded up), 300 tokens = 2 CTAs of 256
    blocks, steps = packed.records.shape[:2]
    assert (blocks, steps) == (3, 2)
    assert bench.load_bytes(packed, 300, bench.CONFIGS[0]) == 3 * 2 * 2 * (32 * 256 * 2 + REC_BYTES)


def test_table_marks_the_best_config_and_the_bounds(tmp_path):
    configs = [{"KERNEL": "wgmma", "WG": 1, "TNW": 256}, {"KERNEL": "wgmma", "WG": 1, "TNW": 256, "WNI": 128}]
    rec = {"name": "l", "out_features": 64, "in_features": 128, "tokens": 2048, "pattern": "64:2:8",
           "dense_us": 100.0, "transpose_us": 10.0, "configs_us": {"WG=1 TNW=256": 80.0, "WG=1 TNW=256 WNI=128": 50.0},
           "best_config": "WG=1 TNW=256 WNI=128", "best_us": 50.0, "probe1_us": 40.0, "probe2_us": 20.0,
           "c0_load_bytes": 80_000_000}  # fmt: skip
    meta = {"gpu": "G", "torch": "t", "cuda": "c", "dtype": "float16", "date_utc": "d", "seconds": 1,
            "command": "cmd", "correctness_cases": 3, "worst_relative_error": 1e-3, "l2_read_TBps": 9.5}  # fmt: skip
    md = bench.to_markdown({"meta": meta, "configs": configs, "records": [rec]})
    assert (
        "| l | 64x128 | 2048 | 64:2:8 | 100.0 | 10.0 | 1.25 | **2.00** | 50.0 | 1.67x | 80.0 | 40.0 | 20.0 | 2.0 | 2.50x / 2.00x |"
        in md
    )
    assert "c1 = `WG=1 TNW=256 WNI=128`" in md and "9.5 TB/s" in md
    results = {"meta": meta, "configs": configs, "records": [rec]}
    bench.bst.write_results(tmp_path, "wgmma_variants", results, bench.to_markdown)
    assert (tmp_path / "wgmma_variants.md").read_text() == md
    assert json.loads((tmp_path / "wgmma_variants.json").read_text()) == results


def test_cases_are_the_llama_and_deit_shapes_filtered_by_layer_name():
    assert len(bench.bst.gemm_cases(None)) == 3 * 2 + 4
    assert bench.bst.gemm_cases(["down"]) == [
        ("llama2-7b down", 4096, 11008, 2048),
        ("llama2-7b down", 4096, 11008, 8192),
    ]
