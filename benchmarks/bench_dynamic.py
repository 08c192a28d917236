"""One dynamic-shape "vnm" graph serving decode and prefill sizes (the runtime dense/sparse switch).

    python benchmarks/bench_dynamic.py                 # 2 Llama-2-7B-shaped layers, ~1 min on an H100
    python benchmarks/bench_dynamic.py --layers 4 --tokens 1 16 512 2048

A Llama-2-7B-shaped LlamaModel (random fp16 weights, no KV cache: each call is a forward over
``tokens`` positions at batch 1), pruned in place with ``sparsify_`` (ABS, no permutation), then
compiled three ways with ``dynamic=True``: dense inductor (on the pruned weights), the vnm backend
(default ``dense_fallback=True``: each linear runs sparse up to the token count where the measured
table says V:N:M wins, dense cuBLAS on its masked weight above it, decided inside the op at run
time) and the vnm backend with ``dense_fallback=False`` (the dense-or-sparse choice made once per
compiled graph from its example token count). Token counts are visited in the order given; the
number of vnm graphs compiled shows whether new sizes recompile. Reports median ms under CUDA
graphs and the relative difference between each vnm variant and the dense one (all three compute
the same pruned model, so only rounding differs). Writes dynamic.json/.md to --out (default
benchmarks/results/<gpu>/).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

log = logging.getLogger("bench_dynamic")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--pattern", default="64:2:8")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 2048, 7, 300])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import torch
    import transformers
    import triton
    from bench_e2e import build_llama

    import vnm_compile
    from vnm_compile import VNMConfig, sparsify_
    from vnm_compile.backend import clear_reports, reports
    from vnm_compile.kernels.dispatch import gpu_slug

    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    # the same Llama-2-7B-shaped stack (and seed) as bench_e2e.py
    model = build_llama(argparse.Namespace(smoke=False, device="cuda", dtype=torch.float16, llama_layers=args.layers))
    cfg = model.config
    report = sparsify_(model, VNMConfig(args.pattern, score="abs", permute=False), progress=False)
    log.info("%s", report.summary())
    dense = torch.compile(model, backend="inductor", dynamic=True, fullgraph=True)
    clear_reports()
    hybrid = torch.compile(model, backend="vnm", dynamic=True, fullgraph=True)
    pergraph = torch.compile(model, backend="vnm", options={"dense_fallback": False}, dynamic=True, fullgraph=True)

    rows = []
    with torch.no_grad():
        for t in args.tokens:
            ids = torch.randint(0, cfg.vocab_size, (1, t), device="cuda")
            fns = {name: (lambda c=c, ids=ids: c(input_ids=ids, use_cache=False).last_hidden_state)
                   for name, c in (("dense", dense), ("hybrid", hybrid), ("pergraph", pergraph))}  # fmt: skip
            first = {}
            outs = {}
            for name, fn in fns.items():
                t0 = time.perf_counter()
                outs[name] = fn()
                torch.cuda.synchronize()
                first[name] = time.perf_counter() - t0
            ref = outs["dense"].float()
            diff = {k: ((outs[k].float() - ref).norm() / ref.norm()).item() for k in ("hybrid", "pergraph")}
            ms = {
                name: triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median") for name, fn in fns.items()
            }
            row = {"tokens": t, "ms": ms, "first_call_s": first, "rel_diff_vs_dense": diff,
                   "vnm_graphs_so_far": len(reports())}  # fmt: skip
            rows.append(row)
            log.info(
                "tokens %5d: dense %.3f ms, hybrid %.3f ms (%.2fx), per-graph %.3f ms (%.2fx), rel. diff %s",
                t, ms["dense"], ms["hybrid"], ms["dense"] / ms["hybrid"], ms["pergraph"], ms["dense"] / ms["pergraph"], diff,
            )  # fmt: skip
    result = {
        "gpu": torch.cuda.get_device_name(),
        "versions": {
            "torch": torch.__version__,
            "triton": triton.__version__,
            "transformers": transformers.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "vnm_compile": getattr(vnm_compile, "__version__", "?"),
        },  # fmt: skip
        "command": "python " + " ".join(sys.argv),
        "config": vars(args) | {"out": str(args.out)},
        "vnm_graphs": len(reports()),
        "reports": [r.summary() for r in reports()],
        "rows": rows,
    }
    out = args.out or Path(__file__).resolve().parent / "results" / gpu_slug()
    out.mkdir(parents=True, exist_ok=True)
    (out / "dynamic.json").write_text(json.dumps(result, indent=1))
    (out / "dynamic.md").write_text(_md(result))
    print(_md(result))
    return 0


def _md(result: dict) -> str:
    cfg = result["config"]
    v = result["versions"]
    lines = [
        f"# One dynamic-shape graph, decode to prefill, on {result['gpu']}",
        "",
        f"torch {v['torch']}, triton {v['triton']}, transformers {v['transformers']}, CUDA {v['cuda']}. "
        f"Command: `{result['command']}`",
        "",
        f"Llama-2-7B-shaped LlamaModel, {cfg['layers']} layers, fp16, batch 1, no KV cache; every variant "
        f"compiled once with dynamic=True, then called at each token count in this order. Pruned in place "
        f"to {cfg['pattern']} (ABS) before compiling, so every variant computes the same model. hybrid = vnm "
        "backend default (dense_fallback=True: sparse or dense decided in the op at run time); per-graph = "
        "dense_fallback=False (decided once per compiled graph). Median ms of CUDA-graph replays; rel. diff = "
        "||y - y_dense|| / ||y_dense|| (fp16 rounding only).",
        "",
        "| tokens | dense ms | hybrid ms | hybrid speed-up | per-graph ms | per-graph speed-up "
        "| rel. diff hybrid / per-graph | vnm graphs so far |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        ms = r["ms"]
        lines.append(
            f"| {r['tokens']} | {ms['dense']:.3f} | {ms['hybrid']:.3f} | {ms['dense'] / ms['hybrid']:.2f}x "
            f"| {ms['pergraph']:.3f} | {ms['dense'] / ms['pergraph']:.2f}x "
            f"| {r['rel_diff_vs_dense']['hybrid']:.1e} / {r['rel_diff_vs_dense']['pergraph']:.1e} "
            f"| {r['vnm_graphs_so_far']} |"
        )
    lines += ["", "Compile reports:", "", "```", *result["reports"], "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
