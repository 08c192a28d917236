"""Time the V:N:M channel permutation search on a Llama-7B MLP-sized layer (CPU).

Target (issue 3): a 4096 x 11008 layer in under 2 minutes on a 2-core CPU,
2 rounds. Scores mimic RIA on a real layer: |W| relative to its row and column
sums, times a heavy-tailed per-input-channel activation norm ** 0.5.

    python benchmarks/bench_permutation.py [--shape 4096 11008] [--patterns 64:2:5 64:2:8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from vnm_compile.calibration.importance import importance
from vnm_compile.calibration.permutation import find_permutation, kept_importance
from vnm_compile.masks import is_vnm, vnm_mask


def ria_like_scores(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g) * 0.02
    act_norm = torch.empty(cols).log_normal_(0.0, 1.0, generator=g)  # a few channels carry large activations
    return importance(weight, "ria", act_norm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=2, default=[4096, 11008])
    parser.add_argument("--patterns", nargs="+", default=["64:2:5", "64:2:8"])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    rows, cols = args.shape
    scores = ria_like_scores(rows, cols)
    total = float(scores.sum(dtype=torch.float64))
    print(f"CPU threads: {torch.get_num_threads()} (os.cpu_count()={os.cpu_count()}), torch {torch.__version__}")
    print(f"scores: RIA-like {rows} x {cols}, rounds={args.rounds}; load average {os.getloadavg()[0]:.1f}\n")
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


if __name__ == "__main__":
    main()
