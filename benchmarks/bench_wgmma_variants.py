"""Experiment: the Hopper wgmma.sp GEMM's variants, and where its time goes, against dense cuBLAS in one run.

    python benchmarks/bench_wgmma_variants.py            # ~6 min on an H200

For each case (Llama-2-7B and DeiT-base linear shapes at prefill token counts, V:N:M patterns) it times,
CUDA graphs, median of 30 replays, V:N:M weights rotated through copies > 3x L2:

- dense cuBLAS (``F.linear``) and the transpose of x the sparse kernels read (``feature_major``);
- every config in ``--config`` (default CONFIGS: tile shape WG / TNW / WST / MINB, the wgmma instruction
  width WNI and WPIPE, whether a k-step's wgmma stay in flight while the next k-step's operands are read),
  each output first checked against float32 (relative error < 1e-2, outputs poisoned with NaN);
- the bounds of the first config: ``WPROBE=1`` (everything but the wgmma: the gathers of x^T rows and the
  records, the barriers) and ``WPROBE=2`` (everything but the gathers of x^T rows). Their outputs are
  wrong by design and not checked; they say whether the loads or the multiplies limit the kernel.

Before timing, every config runs bench_sparse_tc's correctness cases (awkward shapes, 1-300 tokens,
fp16/bf16, permutations, bias). Writes wgmma_variants.json and .md to --out (default
benchmarks/results/<gpu>/).
"""

from __future__ import annotations

import itertools
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_sparse_tc as bst  # noqa: E402

log = logging.getLogger("bench_wgmma_variants")
_N256 = {"KERNEL": "wgmma", "WG": 1, "TNW": 256, "WST": 4, "MINB": 2}  # WGMMA_CONFIG
_N128 = {"KERNEL": "wgmma", "WG": 1, "TNW": 128}
# the default, then pairs that differ only in WNI or WPIPE, then the rest of WGMMA_GRID
CONFIGS = [
    _N256,
    {**_N256, "WNI": 128},
    {**_N256, "WNI": 128, "WPIPE": 1},
    {**_N128, "WST": 6, "MINB": 3},
    {**_N128, "WST": 6, "MINB": 3, "WNI": 128},
    {**_N128, "WST": 4, "MINB": 4},
    {**_N128, "WST": 4, "MINB": 4, "WPIPE": 1},
    {"KERNEL": "wgmma", "WG": 2, "TNW": 256, "WST": 4},
    {"KERNEL": "wgmma", "WG": 1, "TNW": 256, "WST": 3, "MINB": 3},
]


def key(cfg: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in cfg.items() if k != "KERNEL")


def l2_read_bandwidth() -> float:
    """Bytes/s that every SM together reads from a 16 MiB buffer held in L2 (16 KiB per load, 64 loads per
    program, 8 programs per SM; the best of a few shapes): the ceiling for the kernel's gathers, which read
    x^T and the records from L2."""
    import torch
    import triton
    import triton.language as tl

    from vnm_compile.kernels.benchmark import time_graph

    @triton.jit
    def l2_read(src, out, chunks, BLOCK: tl.constexpr, REPS: tl.constexpr):
        pid, nprog = tl.program_id(0), tl.num_programs(0)
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        for r in range(REPS):
            chunk = (pid + r * nprog) % chunks
            acc += tl.load(src + chunk * BLOCK + tl.arange(0, BLOCK))
        tl.store(out + pid, tl.sum(acc, axis=0))

    src = torch.randint(0, 8, (4 << 20,), dtype=torch.int32, device="cuda")
    programs = 8 * torch.cuda.get_device_properties(0).multi_processor_count
    out = torch.empty(programs, dtype=torch.int32, device="cuda")
    best = 0.0
    for block, warps in ((4096, 4), (4096, 8), (2048, 4)):
        reps = 64 * 4096 // block
        us = time_graph([lambda b=block, w=warps, r=reps: l2_read[(programs,)](
            src, out, src.numel() // b, BLOCK=b, REPS=r, num_warps=w)])  # fmt: skip
        best = max(best, programs * reps * block * 4 / (us * 1e-6))
    return best


def load_bytes(packed, tokens: int, cfg: dict) -> int:
    """Bytes the wgmma kernel's gathers read: per CTA and k-step, each of its V blocks' 32 x^T rows of TNW
    tokens and its record (SHARE=1 would halve the rows; not used here)."""
    from vnm_compile.kernels.sparse_tc import REC_BYTES

    blocks, steps = packed.records.shape[:2]
    return blocks * -(-tokens // cfg["TNW"]) * steps * (64 * cfg["TNW"] + REC_BYTES)


def time_case(name: str, rows: int, cols: int, tokens: int, pat: str, configs: list[dict]) -> dict:
    import torch

    from vnm_compile.kernels.benchmark import time_graph
    from vnm_compile.kernels.sparse_tc import feature_major, launch

    rec, _, x, ref, packed, copies = bst.gemm_case(name, rows, cols, tokens, pat)
    xt = feature_major(x)
    rec["transpose_us"] = time_graph([lambda: feature_major(x)])
    y = torch.empty(tokens, rows, device=x.device, dtype=torch.half)
    rec["configs_us"] = {}
    for cfg in configs:
        y.fill_(float("nan"))
        launch(xt, tokens, packed, y, None, cfg)
        err = ((y.float() - ref).norm() / ref.norm()).item()
        if not err < 1e-2:
            raise RuntimeError(f"wgmma kernel wrong at {name} {tokens} tokens {pat} {cfg}: relative error {err}")
        rec["configs_us"][key(cfg)] = time_graph([lambda pk=pk, cfg=cfg: launch(xt, tokens, pk, y, None, cfg)
                                                  for pk in copies])  # fmt: skip
    for probe in (1, 2):
        cfg = {**configs[0], "WPROBE": probe}
        rec[f"probe{probe}_us"] = time_graph([lambda pk=pk, cfg=cfg: launch(xt, tokens, pk, y, None, cfg)
                                              for pk in copies])  # fmt: skip
    best = min(rec["configs_us"], key=rec["configs_us"].get)
    rec["best_config"], rec["best_us"] = best, rec["configs_us"][best]
    rec["c0_load_bytes"] = load_bytes(packed, tokens, configs[0])
    return rec


def to_markdown(results: dict) -> str:
    meta, configs = results["meta"], results["configs"]
    head = " | ".join(f"c{i}" for i in range(len(configs)))
    lines = [
        f"# The wgmma.sp GEMM's variants and bounds — {meta['gpu']}",
        "",
        f"torch {meta['torch']}, CUDA {meta['cuda']}, {meta['dtype']}, {meta['date_utc']} UTC "
        f"({meta['seconds']} s). Command: `{meta['command']}`",
        "",
        "CUDA graphs, median of 30 replays, V:N:M weights rotated through copies > 3x L2; x^T given (the "
        "transpose column is its own launch). Entries c0.. are dense cuBLAS time / config time (same run), each "
        f"output checked against float32 first; correctness cases (bench_sparse_tc's): {meta['correctness_cases']}, "
        f"worst relative error {meta['worst_relative_error']:.1e}. `loads only` / `no x gathers`: c0 with "
        "WPROBE=1 (no wgmma) / WPROBE=2 (no gathers of x^T rows), in us; the kernel is bound by what is "
        "left when the other part is taken out. `loads TB/s`: the bytes c0's gathers read (x^T rows and "
        f"records) / its loads-only time, against {meta['l2_read_TBps']:.1f} TB/s measured here for reading "
        "a buffer held in L2 (all SMs, 16 KiB loads). `loads-only bound`: dense time / loads-only time, "
        "x^T given / with the transpose counted: the speed-up this kernel could not pass with free multiplies.",
        "",
        "Configs: " + "; ".join(f"c{i} = `{key(c)}`" for i, c in enumerate(configs)),
        "",
        f"| layer | out x in | tokens | pattern | dense us | transpose us | {head} | best us | best + transpose "
        "| c0 us | loads only us | no x gathers us | loads TB/s | loads-only bound |",
        "|---|---|---|---|---|---|" + "---|" * len(configs) + "---|---|---|---|---|---|---|",
    ]
    for r in results["records"]:
        cells = " | ".join(
            f"**{r['dense_us'] / r['configs_us'][key(c)]:.2f}**" if key(c) == r["best_config"]
            else f"{r['dense_us'] / r['configs_us'][key(c)]:.2f}"
            for c in configs
        )  # fmt: skip
        c0 = r["configs_us"][key(configs[0])]
        lines.append(
            f"| {r['name']} | {r['out_features']}x{r['in_features']} | {r['tokens']} | {r['pattern']} "
            f"| {r['dense_us']:.1f} | {r['transpose_us']:.1f} | {cells} | {r['best_us']:.1f} "
            f"| {r['dense_us'] / (r['best_us'] + r['transpose_us']):.2f}x | {c0:.1f} | {r['probe1_us']:.1f} "
            f"| {r['probe2_us']:.1f} | {r['c0_load_bytes'] / r['probe1_us'] / 1e6:.1f} "
            f"| {r['dense_us'] / r['probe1_us']:.2f}x / {r['dense_us'] / (r['probe1_us'] + r['transpose_us']):.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = bst.gemm_arguments(
        argv, __doc__, ["64:2:8", "64:2:16", "64:2:5"],
        "a wgmma config to run instead of CONFIGS (repeatable; the first one is probed): "
        "KERNEL=wgmma,WG=1,TNW=256,WST=4,MINB=2,WNI=128,WPIPE=1",
    )  # fmt: skip
    configs = args.config or CONFIGS
    if any(c.get("KERNEL") != "wgmma" or "WPROBE" in c for c in configs):
        raise SystemExit("--config: wgmma configs only (KERNEL=wgmma), without WPROBE (the probes are added)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch

    from vnm_compile.kernels.benchmark import environment
    from vnm_compile.kernels.sparse_tc import wgmma_available

    if not wgmma_available("cuda"):
        raise SystemExit("bench_wgmma_variants needs a Hopper GPU (compute capability 9.0)")
    t0 = time.time()
    l2 = l2_read_bandwidth()
    log.info("L2 read bandwidth: %.1f TB/s", l2 / 1e12)
    bst.CONFIGS[:] = configs
    worst, cases_run = bst.check_correctness()
    log.info("correctness: %d cases, worst relative error %.2e", cases_run, worst)
    records = []
    for (name, rows, cols, tokens), pat in itertools.product(bst.gemm_cases(args.layers), args.patterns):
        if "deit" in name and pat == "64:2:5":
            continue
        rec = time_case(name, rows, cols, tokens, pat, configs)
        records.append(rec)
        log.info("%-18s %5d %-7s dense %7.1f  best %.2fx (%s)  c0 %.1f  loads only %.1f (%.1f TB/s)  "
                 "no x gathers %.1f", name, tokens, pat, rec["dense_us"], rec["dense_us"] / rec["best_us"],
                 rec["best_config"], rec["configs_us"][key(configs[0])], rec["probe1_us"],
                 rec["c0_load_bytes"] / rec["probe1_us"] / 1e6, rec["probe2_us"])  # fmt: skip
    meta = environment(torch.device("cuda"), torch.float16)
    meta.update(seconds=round(time.time() - t0, 1), date_utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                worst_relative_error=worst, correctness_cases=cases_run, l2_read_TBps=l2 / 1e12)  # fmt: skip
    bst.write_results(args.out, "wgmma_variants", {"meta": meta, "configs": configs, "records": records}, to_markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
