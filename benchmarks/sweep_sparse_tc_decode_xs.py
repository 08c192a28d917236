"""How the mma.sp decode kernel should build its B fragments from x: every config of sparse_tc.DECODE_GRID
with each of the three ways (XS=0: each lane gathers its fragment from global memory; XS=1: the k-step's
slice of x staged in shared memory; XS=2: each lane gathers its kept column for every token, the warp
transposes through shared memory), on the three Llama-2-7B shapes.

    python benchmarks/sweep_sparse_tc_decode_xs.py --tokens 1 4 16 32 --patterns 64:2:5 64:2:8 --out DIR
    python benchmarks/sweep_sparse_tc_decode_xs.py --candidates explore ...

``--candidates explore`` times instead the set DECODE_GRID was picked from: the grid before XS=2 (16 configs
with XS 0 or 1), an XS=2 copy of each of its XS=0 configs and six more XS=2 configs (35 in all).

Times only the decode kernel (and dense cuBLAS for the ratio), each config checked against a float32
reference first; CUDA graphs, median of 30 replays, weights rotated through copies > 3x L2. Writes
sparse_tc_decode_xs_sweep.json (every config's time) and .md: per case the best of each XS, then the configs
in greedy order (each adds the most to the sum over cases of best-chosen / best-overall).
"""

import itertools
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sparse_tc_decode import decode_arguments, dense_case, time_configs  # noqa: E402

log = logging.getLogger("sweep_sparse_tc_decode_xs")
SHAPES = [("llama2-7b qkvo", 4096, 4096), ("llama2-7b gate/up", 11008, 4096), ("llama2-7b down", 4096, 11008)]


def earlier_grid() -> list[dict]:
    """DECODE_GRID before XS=2 (commit bdf3adc)."""
    from vnm_compile.kernels.sparse_tc import _decode as d

    return [
        d(8, 1, 2, 0, cl=1), d(8, 1, 1, 0, cl=1, dp=1), d(8, 1, 4, 0, cl=1), d(4, 1, 2, 0, cl=1, dp=1),
        d(8, 1, 1, 0, cl=1), d(8, 1, 2, 0, dp=1), d(4, 2, 2, 1, cl=1), d(4, 2, 4, 0, cl=1), d(4, 2, 2, 0, cl=1),
        d(4, 2, 4, 1, cl=1), d(8, 1, 2, 0, cl=1, dp=1), d(4, 2, 2, 0, cl=1, dp=1), d(8, 2, 2, 1), d(8, 2, 2, 0),
        d(8, 1, 4, 0), d(4, 2, 4, 0),
    ]  # fmt: skip


def explore_candidates() -> list[dict]:
    """What DECODE_GRID was picked from: the earlier grid, its XS=0 configs as XS=2, six more XS=2 configs."""
    from vnm_compile.kernels.sparse_tc import _decode as d

    grid = earlier_grid()
    return grid + [{**c, "XS": 2} for c in grid if c["XS"] == 0] + [
        d(8, 2, 2, 2, cl=1, dp=1), d(8, 2, 1, 2, cl=1, dp=1), d(4, 4, 2, 2, cl=1), d(4, 1, 4, 2, cl=1, dp=1),
        d(8, 1, 4, 2, cl=1, dp=1), d(16, 1, 1, 2, cl=1, dp=1),
    ]  # fmt: skip


def candidates() -> list[dict]:
    """DECODE_GRID's configs with XS = 0, 1 and 2 (XS=1 without DP, which it cannot take), each once."""
    from vnm_compile.kernels.sparse_tc import DECODE_GRID

    out, seen = [], set()
    for cfg, xs in itertools.product(DECODE_GRID, (0, 1, 2)):
        c = {**cfg, "XS": xs}
        if xs == 1 and c.get("DP"):
            continue
        if tuple(sorted(c.items())) not in seen:
            seen.add(tuple(sorted(c.items())))
            out.append(c)
    return out


def time_case(rows: int, cols: int, tokens: int, pattern: str, configs: list[dict]) -> dict:
    from vnm_compile.format import VNMWeight
    from vnm_compile.kernels.sparse_tc import pack_sparse_tc
    from vnm_compile.masks import vnm_mask
    from vnm_compile.pattern import VNMPattern

    weight, x, dense_us = dense_case(rows, cols, tokens)
    p = VNMPattern.parse(pattern)
    w = VNMWeight.from_dense(weight, vnm_mask(weight.abs().float(), p), p)
    ref = x.float() @ w.to_dense().float().t()
    label = f"{rows}x{cols} {tokens} tokens {pattern}"
    configs_us = time_configs(x, pack_sparse_tc(w), ref, configs, label)
    return {"dense_us": dense_us, "configs_us": configs_us}


def greedy(records: list[dict]) -> list[tuple[str, float]]:
    """Configs in the order that most lowers sum(best chosen so far / best) over the cases, with that mean."""
    keys = list(records[0]["configs_us"])

    def t(r: dict, k: str) -> float:
        return r["configs_us"][k] or float("inf")

    best = [min(t(r, k) for k in keys) for r in records]
    order: list[tuple[str, float]] = []
    while len(order) < len(keys):
        chosen = [k for k, _ in order]
        score = {
            k: sum(min(t(r, c) for c in [*chosen, k]) / b for r, b in zip(records, best, strict=True)) / len(records)
            for k in keys
            if k not in chosen
        }
        k = min(score, key=score.get)
        order.append((k, score[k]))
    return order


def to_markdown(results: dict) -> str:
    m = results["meta"]
    lines = [
        f"# mma.sp decode kernel: how B is built from x (XS) — {m['gpu']}",
        "",
        f"torch {m['torch']}, triton {m['triton']}, CUDA {m['cuda']}, float16, {m['date_utc']} UTC. "
        f"Command: `{m['command']}` ({m['seconds']} s).",
        "",
        "CUDA graphs, median of 30 replays, weights rotated through copies > 3x L2; speed-up = dense cuBLAS "
        "time / time, same run. XS=0: each lane gathers its B fragment from global memory (8 token rows per "
        "load); XS=1: the k-step's slice of x staged in shared memory; XS=2: each lane gathers its kept column "
        "for every token (one token row per load) and the warp transposes through shared memory.",
        "",
        "| layer | out x in | tokens | pattern | dense us | XS=0 us | XS=1 us | XS=2 us | XS=2 vs XS=0 | best | best config |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["records"]:
        ran = {k: v for k, v in r["configs_us"].items() if v is not None}
        by_xs = {xs: min((v for k, v in ran.items() if f"XS={xs}" in k), default=None) for xs in (0, 1, 2)}
        best = min(ran, key=ran.get)
        cells = " | ".join("n/a" if v is None else f"{v:.2f}" for v in by_xs.values())
        lines.append(
            f"| {r['name']} | {r['out_features']}x{r['in_features']} | {r['tokens']} | {r['pattern']} | "
            f"{r['dense_us']:.1f} | {cells} | {by_xs[0] / by_xs[2]:.2f}x | {r['dense_us'] / ran[best]:.2f}x | {best} |"
        )
    lines += ["", "Greedy order (mean over the cases of the best chosen so far / the best of all):", ""]
    lines += [f"{i + 1}. `{k}`: {score:.4f}" for i, (k, score) in enumerate(results["greedy"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = decode_arguments(
        argv, __doc__, "sweep_sparse_tc_decode_xs", [1, 4, 16, 32], ["64:2:5", "64:2:8"], candidates=["grid", "explore"]
    )

    import torch

    from vnm_compile.kernels.benchmark import environment
    from vnm_compile.kernels.dispatch import gpu_slug, results_dir

    t0 = time.time()
    configs = candidates() if args.candidates == "grid" else explore_candidates()
    records = []
    for (name, rows, cols), tokens, pattern in itertools.product(SHAPES, args.tokens, args.patterns):
        r = {"name": name, "out_features": rows, "in_features": cols, "tokens": tokens, "pattern": pattern}
        r.update(time_case(rows, cols, tokens, pattern, configs))
        records.append(r)
        ran = {k: v for k, v in r["configs_us"].items() if v is not None}
        best = min(ran, key=ran.get)
        log.info("%-18s %2d %-7s dense %6.1f  best %.2fx [%s]", name, tokens, pattern, r["dense_us"],
                 r["dense_us"] / ran[best], best)  # fmt: skip
    meta = environment(torch.device("cuda"), torch.float16)
    meta.update(seconds=round(time.time() - t0, 1), date_utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()))
    results = {"meta": meta, "records": records, "greedy": greedy(records)}
    out = args.out or results_dir() / gpu_slug(torch.device("cuda"))
    out.mkdir(parents=True, exist_ok=True)
    name = "sparse_tc_decode_xs_sweep" if args.candidates == "grid" else "sparse_tc_decode_xs_explore"
    (out / f"{name}.json").write_text(json.dumps(results, indent=1))
    (out / f"{name}.md").write_text(to_markdown(results))
    print(to_markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
