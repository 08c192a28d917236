"""The dense path of a compressed linear: the rebuild of the dense weight (tc_to_dense / rows_to_dense, one pass
writing every element) against cuBLAS on the dense weight, Llama-2-7B shapes.

    python benchmarks/bench_rebuild.py [--tokens 2048] [--patterns 64:2:5 64:2:8] [--out DIR]

Per shape, pattern and layout ("tc", "tc-compact", "rows"): the rebuild alone, a memset of the same
output (what the earlier rebuild spent before its scatter), the 2048-token GEMM on the dense weight, and
the rebuild + GEMM against the GEMM alone (the dense path's cost over a dense model). Timed under CUDA
graphs (kernels/benchmark.time_graph, median of replays). Writes rebuild.json/.md to --out (default
benchmarks/results/<gpu>/).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vnm_compile.kernels.benchmark import llama_linears

SHAPES = tuple((out_f, in_f) for out_f, in_f, _ in llama_linears())  # Llama-2-7B


def _case(name: str, out_f: int, in_f: int, tokens: int) -> list[dict]:
    """The rows of one pattern and shape."""
    from functools import partial

    import torch

    from vnm_compile import VNMPattern, VNMWeight, vnm_mask
    from vnm_compile.kernels.benchmark import time_graph
    from vnm_compile.kernels.rows_dense import rows_to_dense
    from vnm_compile.kernels.sparse_tc import pack_sparse_tc
    from vnm_compile.kernels.tc_dense import tc_to_dense

    p = VNMPattern.parse(name)
    w = torch.randn(out_f, in_f, device="cuda", dtype=torch.float16)
    packed = VNMWeight.from_dense(w, vnm_mask(w.float().abs(), p), p)
    dense = torch.empty_like(w)
    x = torch.randn(tokens, in_f, device="cuda", dtype=torch.float16)
    gemm_call = partial(torch.nn.functional.linear, x, dense)
    gemm, memset = time_graph([gemm_call]), time_graph([dense.zero_])
    rows = []
    for layout in ("tc", "tc-compact", "rows"):
        if layout == "rows":
            rebuild = partial(rows_to_dense, packed, out=dense)
        else:
            tc = pack_sparse_tc(packed, compact=layout == "tc-compact")
            rebuild = partial(tc_to_dense, tc.records, tc.columns, out_f, in_f, p, w.dtype, out=dense)
        rebuild_us = time_graph([rebuild])
        both = time_graph([rebuild, gemm_call]) * 2  # time_graph gives microseconds per call
        rows.append({"pattern": name, "shape": [out_f, in_f], "layout": layout, "rebuild_us": rebuild_us,
                     "memset_us": memset, "gemm_us": gemm, "dense_path_us": both,
                     "dense_path_vs_gemm": both / gemm})  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def run(args) -> list[dict]:
    return [r for name in args.patterns for out_f, in_f in SHAPES for r in _case(name, out_f, in_f, args.tokens)]


def _md(result: dict) -> str:
    env = result["environment"]
    lines = [f"# dense path of a compressed linear — {env['gpu']}", "", f"Command: `{env['command']}`", "",
             f"Versions: torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; commit {result['commit']}",
             "", f"Tokens: {result['tokens']}", "",
             "| pattern | shape | layout | rebuild us | memset us | GEMM us | rebuild + GEMM us | vs GEMM |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["records"]:
        lines.append(f"| {r['pattern']} | {r['shape'][0]}x{r['shape'][1]} | {r['layout']} | {r['rebuild_us']:.1f} | "
                     f"{r['memset_us']:.1f} | {r['gemm_us']:.1f} | {r['dense_path_us']:.1f} | "
                     f"{r['dense_path_vs_gemm']:.3f}x |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--patterns", nargs="+", default=["64:2:5", "64:2:8"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    import torch

    from vnm_compile.kernels.benchmark import environment, save_results
    from vnm_compile.kernels.dispatch import gpu_slug, results_dir

    if not torch.cuda.is_available():
        print("bench_rebuild needs a CUDA GPU", file=sys.stderr)
        return 1
    env = environment(torch.device("cuda"), torch.float16)
    result = {"environment": env, "commit": env["commit"], "tokens": args.tokens, "records": run(args)}
    save_results(args.out or results_dir() / gpu_slug(), "rebuild", result, _md(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
