"""Decode (1-4 tokens): the FMA kernel on the row-major compressed layout vs the decode kernel on
the row-interleaved layout (vnm_triton.interleave_rows), against dense cuBLAS, in one run.

    python benchmarks/bench_decode_layout.py            # ~1 min on an H100

Both V:N:M columns are the autotuned choice (the library's own candidate configs; with the
interleaved layout held, the autotuner times the FMA configs and the row-interleaved ones).
Timing as bench_linear: CUDA graphs, weights streamed from HBM (copies > 3x L2), median of 30.
Writes decode_layout.json and decode_layout.md to --out (default benchmarks/results/<gpu>/).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

SHAPES = [
    ("llama2-7b qkvo", 4096, 4096),
    ("llama2-7b gate/up", 11008, 4096),
    ("llama2-7b down", 4096, 11008),
    ("llama2-7b q/k/v fused", 12288, 4096),
    ("llama2-7b gate/up fused", 22016, 4096),
]
PATTERNS = ("64:2:5", "64:2:8", "64:2:16")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)

    import torch
    import torch.nn.functional as F

    from vnm_compile.kernels.benchmark import _clone_vnm, _copies, _random_vnm, environment, time_graph
    from vnm_compile.kernels.dispatch import gpu_slug, results_dir
    from vnm_compile.kernels.vnm_linear import vnm_linear
    from vnm_compile.kernels.vnm_triton import autotune_cache, interleave_rows, vnm_linear_triton
    from vnm_compile.pattern import VNMPattern

    if not torch.cuda.is_available():
        raise SystemExit("bench_decode_layout needs a CUDA GPU")
    device = torch.device("cuda")
    dtype = torch.float16
    t0 = time.time()
    records = []
    for name, out_f, in_f in SHAPES:
        gen = torch.Generator(device=device).manual_seed(out_f + 3 * in_f)
        weight = torch.randn(out_f, in_f, device=device, dtype=dtype, generator=gen) / math.sqrt(in_f)
        for tokens in args.tokens:
            x = torch.randn(tokens, in_f, device=device, dtype=dtype, generator=gen)
            ws = [weight] + [weight.clone() for _ in range(_copies(weight.numel() * 2, device) - 1)]
            rec = {"name": name, "out_features": out_f, "in_features": in_f, "tokens": tokens}
            rec["dense_us"] = time_graph([lambda w=w, x=x: F.linear(x, w) for w in ws])
            del ws
            for pat in PATTERNS:
                vw, mask = _random_vnm(weight, VNMPattern.parse(pat))
                copies = [vw] + [_clone_vnm(vw) for _ in range(_copies(vw.nbytes, device) - 1)]
                inter = [interleave_rows(c.values, c.meta, c.block_rows) for c in copies]
                # correctness first: both paths against the dense product
                ref = F.linear(x.float(), (weight * mask).float())
                got = vnm_linear_triton(
                    x, vw.values, vw.columns, vw.meta, vw.row_index, None, vw.block_rows, 2, vw.pattern.m, out_f,
                    interleaved=inter[0],
                )  # fmt: skip
                err = ((got.float() - ref).abs().max() / ref.abs().max()).item()
                if not err < 1e-2:
                    raise RuntimeError(f"{name} {pat} t={tokens}: interleaved result off by {err:.3g} (relative)")
                row_major = time_graph([lambda c=c, x=x: vnm_linear(x, c) for c in copies])
                interleaved = time_graph(
                    [
                        lambda c=c, i=i, x=x, o=out_f: vnm_linear_triton(
                            x, c.values, c.columns, c.meta, c.row_index, None, c.block_rows, 2, c.pattern.m, o,
                            interleaved=i,
                        )
                        for c, i in zip(copies, inter, strict=True)
                    ]
                )  # fmt: skip
                rec[pat] = {"row_major_us": row_major, "interleaved_us": interleaved, "rows": inter[0][0].shape[2]}
                logging.info("%s t=%d %s: dense %.1f row-major %.1f interleaved %.1f", name, tokens, pat,
                             rec["dense_us"], row_major, interleaved)  # fmt: skip
                del copies, inter
            records.append(rec)
            torch.cuda.empty_cache()
    meta = environment(device, dtype)
    meta.update(
        seconds=time.time() - t0,
        date_utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        autotune={" ".join(map(str, k)): str(c) for k, c in autotune_cache().items()},
    )
    out = args.out or results_dir() / gpu_slug(device)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_layout.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    (out / "decode_layout.md").write_text(_md(meta, records))
    print(_md(meta, records))
    return 0


def _md(meta: dict, records: list[dict]) -> str:
    lines = [
        f"# Decode on the row-interleaved layout, {meta['gpu']}",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, {meta['dtype']}, {meta['date_utc']} UTC.",
        f"Command: `{meta['command']}`",
        "",
        "Row-major: vnm_linear (the FMA decode kernel, autotuned). Interleaved: the same op with the values and",
        "metadata re-laid by `interleave_rows` (R rows of a group contiguous; R in the table), autotuned over the",
        "FMA and row-interleaved configs. CUDA graphs, weights streamed from HBM, median of 30. Speed-up = dense",
        "cuBLAS time / time, same run.",
        "",
        "| layer | out x in | tokens | dense us | pattern | row-major us | speed-up | interleaved us (R) | speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        for pat in PATTERNS:
            p = r[pat]
            lines.append(
                f"| {r['name']} | {r['out_features']}x{r['in_features']} | {r['tokens']} | {r['dense_us']:.1f} | {pat} "
                f"| {p['row_major_us']:.1f} | {r['dense_us'] / p['row_major_us']:.2f}x "
                f"| {p['interleaved_us']:.1f} ({p['rows']}) | {r['dense_us'] / p['interleaved_us']:.2f}x |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
