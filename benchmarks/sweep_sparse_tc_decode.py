"""A wider sweep of the mma.sp decode kernel's configs: bench_sparse_tc_decode.py with 32 more configs.

    python benchmarks/sweep_sparse_tc_decode.py --tokens 1 4 16 32 --patterns 64:2:5 64:2:8 --out DIR

Times sparse_tc.DECODE_GRID plus every prefetching config (DP=1, XS=0) of DW/DU in (8, 1), (4, 2), (4, 1),
(8, 2) at 1, 2 and 4 CTAs per SM, with and without clusters (CL), and the same (DW, DU) without DP at one
CTA per SM, on the three Llama-2-7B shapes. The XS=0 grid before XS=2 was chosen from its result
(benchmarks/results/nvidia-h200/sparse_tc_decode_sweep.md); the current one from sweep_sparse_tc_decode_xs.py.
Writes sparse_tc_decode.json and .md to --out.
"""

import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_sparse_tc_decode as bench  # noqa: E402

import vnm_compile.kernels.sparse_tc as sparse_tc  # noqa: E402

EXTRA = [
    {"KERNEL": "decode", "DW": dw, "DU": du, "CTAS_PER_SM": c, "XS": 0, "CL": cl, "DP": 1}
    for (dw, du), c, cl in itertools.product(((8, 1), (4, 2), (4, 1), (8, 2)), (1, 2, 4), (0, 1))
] + [
    {"KERNEL": "decode", "DW": dw, "DU": du, "CTAS_PER_SM": 1, "XS": 0, "CL": cl}
    for (dw, du), cl in itertools.product(((8, 1), (4, 2), (4, 1), (8, 2)), (0, 1))
]


def main(argv: list[str] | None = None) -> int:
    known = {tuple(sorted(c.items())) for c in sparse_tc.DECODE_GRID}
    sparse_tc.DECODE_GRID[:] = sparse_tc.DECODE_GRID + [c for c in EXTRA if tuple(sorted(c.items())) not in known]
    bench.SHAPES[:] = [s for s in bench.SHAPES if s[0].startswith("llama")]
    return bench.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
