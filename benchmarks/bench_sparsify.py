"""CPU timings of the pruning steps on Llama-7B MLP-sized layers: the V:N:M mask and the permutation search.

    python benchmarks/bench_sparsify.py mask [--shape 11008 4096 --shape 4096 11008]
        [--patterns 64:2:5 64:2:8] [--repeats 7] [--threads 1 0]
    python benchmarks/bench_sparsify.py permutation [--shape 4096 11008] [--patterns 64:2:5 64:2:8] [--rounds 2]

mask: ``vnm_mask`` (S_{V:N:M}) on uniform [0, 1) float32 scores (non-negative, like every importance
measure); target (issue 2): an 11008 x 4096 mask well under a second on a 2-core CPU. Each configuration
runs once untimed, then ``--repeats`` timed runs; the table gives the median and the minimum. Threads 0
means torch's default.

permutation: ``find_permutation`` on RIA-like scores (|W| relative to its row and column sums, times a
heavy-tailed per-input-channel activation norm ** 0.5); target (issue 3): a 4096 x 11008 layer in under
2 minutes on a 2-core CPU, 2 rounds. The table gives the importance kept before and after, and the time.

Both print the environment first (kernels.benchmark.environment_line: CPUs, threads, load, versions, commit,
date) and write nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vnm_compile.calibration.importance import importance
from vnm_compile.calibration.permutation import find_permutation, kept_importance
from vnm_compile.kernels.benchmark import environment, environment_line, llama_linears
from vnm_compile.masks import is_vnm, vnm_mask

LLAMA_MLP = [[out_f, in_f] for out_f, in_f, _ in llama_linears()[1:]]  # Llama-2-7B gate/up, down


def time_mask(scores: torch.Tensor, pattern: str, repeats: int) -> list[float]:
    vnm_mask(scores, pattern)  # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        vnm_mask(scores, pattern)
        seconds.append(time.perf_counter() - start)
    return seconds


def bench_mask(args: argparse.Namespace) -> None:
    default_threads = torch.get_num_threads()
    print(f"vnm_mask, {args.repeats} timed runs each\n")
    print(f"{'shape':>13} {'pattern':>8} {'threads':>7} {'median s':>9} {'min s':>7}")
    for rows, cols in args.shape or LLAMA_MLP:
        scores = torch.rand(rows, cols, generator=torch.Generator().manual_seed(0))
        for pattern in args.patterns:
            for threads in args.threads:
                torch.set_num_threads(threads or default_threads)
                seconds = time_mask(scores, pattern, args.repeats)
                print(f"{f'{rows}x{cols}':>13} {pattern:>8} {torch.get_num_threads():>7} "
                      f"{statistics.median(seconds):>9.3f} {min(seconds):>7.3f}")  # fmt: skip
    torch.set_num_threads(default_threads)


def ria_like_scores(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g) * 0.02
    act_norm = torch.empty(cols).log_normal_(0.0, 1.0, generator=g)  # a few channels carry large activations
    return importance(weight, "ria", act_norm)


def bench_permutation(args: argparse.Namespace) -> None:
    for rows, cols in args.shape or [LLAMA_MLP[1]]:
        scores = ria_like_scores(rows, cols)
        total = float(scores.sum(dtype=torch.float64))
        print(f"find_permutation, RIA-like {rows} x {cols}, rounds={args.rounds}\n")
        print(f"{'pattern':>8} {'kept before':>12} {'kept after':>11} {'gain':>8} {'wall s':>8} {'CPU s':>8}")
        for pattern in args.patterns:
            before = kept_importance(scores, pattern) / total
            start, cpu = time.perf_counter(), time.process_time()
            in_perm, out_perm = find_permutation(scores, pattern, rounds=args.rounds)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            after = kept_importance(scores, pattern, in_perm, out_perm) / total
            p = scores[out_perm][:, in_perm]
            mask = torch.empty_like(p, dtype=torch.bool)
            mask[out_perm.unsqueeze(1), in_perm.unsqueeze(0)] = vnm_mask(p, pattern)
            assert is_vnm(mask, pattern, in_perm, out_perm)
            print(f"{pattern:>8} {before:>12.4f} {after:>11.4f} {after - before:>+8.4f} {seconds:>8.1f} {cpu:>8.1f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    for name, func in (("mask", bench_mask), ("permutation", bench_permutation)):
        p = sub.add_parser(name)
        p.add_argument("--shape", type=int, nargs=2, action="append", metavar=("ROWS", "COLS"))
        p.add_argument("--patterns", nargs="+", default=["64:2:5", "64:2:8"])
        p.set_defaults(func=func)
        if name == "mask":
            p.add_argument("--repeats", type=int, default=7)
            p.add_argument("--threads", type=int, nargs="+", default=[1, 0], help="0 = torch default")
        else:
            p.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    print(environment_line(environment("cpu", program="python ")) + "\n")
    args.func(args)


if __name__ == "__main__":
    main()
