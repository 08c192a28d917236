"""Dense cuBLAS vs cuSPARSELt 2:4 vs V:N:M (Triton) linear layers, one run under CUDA graphs.

    python benchmarks/bench_linear.py --grid default   # ~5 min on an H100
    python benchmarks/bench_linear.py --grid quick     # one shape, a minute
    python benchmarks/bench_linear.py --shapes vit-b 4096x4096 --tokens 16 2048 --patterns 64:2:8
    python benchmarks/bench_linear.py --grid quick --permute none   # unpermuted masks (earlier results)

--permute random (default) / calibrated: masks chosen inside random / searched permutations, the weight held
in permuted coordinates as the backend holds it; linear.json then also has vnm_index_us (the op with its
two index ops as separate launches) and search_s.

Writes benchmarks/results/<gpu>/linear.json, linear.md, linear.png and
speedups.json (see vnm_compile/kernels/benchmark.py). Same as `vnm bench`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from vnm_compile.cli import add_grid_arguments
from vnm_compile.kernels.benchmark import GRIDS, custom_grid, run_benchmark, write_results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", choices=sorted(GRIDS), default="default")
    parser.add_argument("--out", type=Path, default=None, help="folder (default benchmarks/results/<gpu>)")
    add_grid_arguments(parser)
    parser.add_argument(
        "--from-json", type=Path, default=None, help="only rewrite .md/.png/speedups from a linear.json"
    )
    parser.add_argument("--configs", action="store_true", help="time every kernel config at Llama-2-7B shapes instead")
    parser.add_argument(
        "--permute", choices=["none", "random", "calibrated"], default="random",
        help="V:N:M masks chosen inside random permutations (default), the permutation search's (timed), or "
        "none; the weight held permuted as the backend holds it (kernels/benchmark.py _time_case)",
    )  # fmt: skip
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    try:
        grid = custom_grid(GRIDS[args.grid], args.shapes, args.tokens, args.patterns)
    except ValueError as err:
        parser.error(str(err))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)

    import torch

    from vnm_compile.kernels.dispatch import gpu_slug, results_dir

    if args.from_json:
        import json

        results = json.loads(args.from_json.read_text())
        for p in write_results(results, args.out or args.from_json.parent):
            print(f"wrote {p}")
        return 0
    if not torch.cuda.is_available():
        print("bench_linear needs a CUDA GPU", file=sys.stderr)
        return 1
    if args.configs:
        from vnm_compile.kernels.benchmark import LLAMA2_7B, config_report, save_results

        rows = config_report([s[:2] for s in LLAMA2_7B], [1, 16, 2048], ["64:2:5", "64:2:8", "64:2:16"])
        if args.out:
            save_results(args.out, "configs", rows)
        return 0
    out = args.out or results_dir() / gpu_slug()
    results = run_benchmark(grid, checkpoint=out / "linear.json", permute=args.permute)
    for p in write_results(results, out):
        print(f"wrote {p}")
    print(Path(out, "linear.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
