"""Time ``vnm_mask`` (S_{V:N:M}) on Llama-7B MLP-sized score matrices (CPU).

Target (issue 2): an 11008 x 4096 mask well under a second on a 2-core CPU.
Scores are uniform in [0, 1) float32 (non-negative, like every importance
measure). Each configuration runs once untimed, then ``--repeats`` timed runs;
the table gives the median and the minimum. Threads 0 means torch's default.

    python benchmarks/bench_mask.py [--shape 11008 4096 --shape 4096 11008]
        [--pattern 64:2:5 64:2:8] [--repeats 7] [--threads 1 0]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

import torch

from vnm_compile.masks import vnm_mask

log = logging.getLogger("bench_mask")


def time_mask(scores: torch.Tensor, pattern: str, repeats: int) -> list[float]:
    vnm_mask(scores, pattern)  # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        vnm_mask(scores, pattern)
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=2, action="append", metavar=("ROWS", "COLS"))
    parser.add_argument("--pattern", nargs="+", default=["64:2:5", "64:2:8"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 0], help="0 = torch default")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    shapes = args.shape or [[11008, 4096], [4096, 11008]]

    default_threads = torch.get_num_threads()
    log.info("torch %s, default threads %d, os.cpu_count()=%s", torch.__version__, default_threads, os.cpu_count())
    log.info("load average %.2f at start; %d timed runs each\n", os.getloadavg()[0], args.repeats)
    print(f"{'shape':>13} {'pattern':>8} {'threads':>7} {'median s':>9} {'min s':>7}")
    for rows, cols in shapes:
        scores = torch.rand(rows, cols, generator=torch.Generator().manual_seed(0))
        for pattern in args.pattern:
            for threads in args.threads:
                torch.set_num_threads(threads or default_threads)
                seconds = time_mask(scores, pattern, args.repeats)
                shape = f"{rows}x{cols}"
                print(
                    f"{shape:>13} {pattern:>8} {torch.get_num_threads():>7} "
                    f"{statistics.median(seconds):>9.3f} {min(seconds):>7.3f}"
                )
    torch.set_num_threads(default_threads)
    log.info("\nload average %.2f at end", os.getloadavg()[0])


if __name__ == "__main__":
    main()
