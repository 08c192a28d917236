"""The mma.sp decode kernel (few tokens) against dense cuBLAS, cuSPARSELt 2:4 and the Triton op, in one run.

    python benchmarks/bench_sparse_tc_decode.py            # ~3 min on an H200

vnm_compile.kernels.sparse_tc's decode kernel (csrc/vnm_mma_sp.cu, ``vnm_mma_sp_decode``) runs 1-32 tokens
on the sparse tensor cores: A fragments and metadata straight from the packed records into registers, x
read as it is (token-major: each lane's kept column gathered for every token and transposed through shared
memory, XS=2; or each lane's fragment gathered, XS=0; or, XS=1, staged per k-step slice in shared memory),
split over the k-steps with the partial sums reduced in a thread-block cluster or by the last CTA of each V
block. Memory-bound, so the yardstick is the read floor: the time a read-only kernel (benchmark.read_floor_us,
best of its configs, timed the same way) takes to read the same bytes in one launch; `floor ratio` = cuBLAS's
read floor / the packed weight's, the speed-up if both kernels only read their bytes.

Every tile config of sparse_tc.DECODE_GRID (what the op's autotuning times) is timed (CUDA graphs, median of 30 replays, weights rotated through copies > 3x
L2), each checked against a float32 reference first; the table shows the best, the JSON all of them (null: the
config cannot run at that size, e.g. too much shared memory).
Writes sparse_tc_decode.json and .md to --out (default benchmarks/results/<gpu>/).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import time
from pathlib import Path

from vnm_compile.kernels.benchmark import llama_linears

log = logging.getLogger("bench_sparse_tc_decode")
SHAPES = [(name, out_f, in_f) for out_f, in_f, name in llama_linears()] + [("vit-b fc1", 3072, 768)]


def _key(cfg: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in cfg.items() if k != "KERNEL")


def decode_arguments(
    argv: list[str] | None, doc: str, program: str, tokens: list[int], patterns: list[str], candidates=None
):
    """--out, --tokens, --patterns (and, given its choices, --candidates) parsed, logging set up; exits
    unless the decode kernel can run here and the token counts lie within its range."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--tokens", nargs="+", type=int, default=tokens)
    parser.add_argument("--patterns", nargs="+", default=patterns)
    if candidates:
        parser.add_argument("--candidates", choices=candidates, default=candidates[0])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from vnm_compile.kernels.sparse_tc import DECODE_MAX_TOKENS, sparse_tc_available

    if not sparse_tc_available():
        raise SystemExit(f"{program} needs a CUDA GPU of compute capability >= 8.0")
    bad = [t for t in args.tokens if not 1 <= t <= DECODE_MAX_TOKENS]
    if bad:
        raise SystemExit(f"--tokens must lie within 1..{DECODE_MAX_TOKENS}, got {bad}")
    return args


def time_configs(x, packed, ref, configs: list[dict], label: str, required: dict | None = None) -> dict:
    """_key(config) -> microseconds of the decode kernel on x with each config (weights rotated through copies
    of ``packed`` > 3x L2), each checked against ``ref`` first; None where a config cannot run at this size
    (skipped, as autotuning does; an error if it is ``required``)."""
    import torch

    from vnm_compile.kernels.benchmark import _copies, time_graph
    from vnm_compile.kernels.sparse_tc import launch_decode

    copies = [packed] + [
        dataclasses.replace(packed, records=packed.records.clone(), columns=packed.columns.clone())
        for _ in range(_copies(packed.nbytes, x.device) - 1)
    ]
    y = torch.empty(x.shape[0], packed.out_features, device=x.device, dtype=x.dtype)
    configs_us: dict[str, float | None] = {}
    for cfg in configs:
        y.fill_(float("nan"))
        try:
            launch_decode(x, packed, y, None, cfg)
        except ValueError as err:
            if cfg is required:
                raise
            log.info("%s: %s skipped: %s", label, _key(cfg), err)
            configs_us[_key(cfg)] = None
            continue
        err = ((y.float() - ref).norm() / ref.norm()).item()
        if not err < 1e-2:
            raise RuntimeError(f"decode kernel wrong at {label} {cfg}: relative error {err}")
        configs_us[_key(cfg)] = time_graph([lambda pk=pk, cfg=cfg: launch_decode(x, pk, y, None, cfg) for pk in copies])
    return configs_us


def dense_case(rows: int, cols: int, tokens: int):
    """A seeded random fp16 weight (rows, cols) and x (tokens, cols) on the GPU, and cuBLAS's time on them
    (weights rotated through copies > 3x L2)."""
    import torch
    import torch.nn.functional as F

    from vnm_compile.kernels.benchmark import _copies, time_graph

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(rows + cols + tokens)
    weight = (torch.randn(rows, cols, device=dev, generator=gen) / cols**0.5).half()
    x = torch.randn(tokens, cols, device=dev, generator=gen).half()
    ws = [weight] + [weight.clone() for _ in range(_copies(weight.numel() * 2, dev) - 1)]
    return weight, x, time_graph([lambda w=w: F.linear(x, w) for w in ws])


def time_case(
    name: str, rows: int, cols: int, tokens: int, patterns: list[str], bandwidth: float, read_floor
) -> list[dict]:
    """Every pattern at this shape and token count; ``read_floor(nbytes)`` -> microseconds (cached by the caller)."""
    import torch

    from vnm_compile.format import VNMWeight
    from vnm_compile.kernels.benchmark import _clone_vnm, _copies, time_graph
    from vnm_compile.kernels.cusparselt import CSLTLinear
    from vnm_compile.kernels.sparse_tc import DECODE_GRID, default_decode_config, pack_sparse_tc
    from vnm_compile.kernels.vnm_linear import vnm_linear
    from vnm_compile.masks import vnm_mask
    from vnm_compile.pattern import VNMPattern

    dev = torch.device("cuda")
    weight, x, dense_us = dense_case(rows, cols, tokens)
    cslt_us = None
    if tokens >= 8:  # cuSPARSELt's smallest supported token count
        c24 = CSLTLinear(weight * vnm_mask(weight.abs().float(), VNMPattern.parse("2:4")))
        x_fm = x.t().contiguous()
        cslt_us = time_graph([lambda: c24.feature_major(x_fm)])
        del c24
    records = []
    for pat in patterns:
        p = VNMPattern.parse(pat)
        w = VNMWeight.from_dense(weight, vnm_mask(weight.abs().float(), p), p)
        ref = x.float() @ w.to_dense().float().t()
        copies = [w] + [_clone_vnm(w) for _ in range(_copies(w.nbytes, dev) - 1)]
        triton_us = time_graph([lambda w=w: vnm_linear(x, w) for w in copies])
        del copies
        packed = pack_sparse_tc(w)
        default = default_decode_config(tokens)
        label = f"{name} {rows}x{cols} {tokens} tokens {pat}"
        configs_us = time_configs(x, packed, ref, [default, *DECODE_GRID], label, required=default)
        ran = {k: v for k, v in configs_us.items() if v is not None}
        best = min(ran, key=ran.get)
        records.append(
            {
                "name": name, "out_features": rows, "in_features": cols, "tokens": tokens, "pattern": pat,
                "dense_us": dense_us, "cslt_us": cslt_us, "triton_us": triton_us, "configs_us": configs_us,
                "best_config": best, "decode_us": configs_us[best], "default_config": _key(default),
                "default_us": configs_us[_key(default)], "vnm_bytes": w.nbytes, "packed_bytes": packed.nbytes,
                "floor_us": w.nbytes / bandwidth * 1e6, "read_floor_us": read_floor(packed.nbytes),
                "dense_read_floor_us": read_floor(rows * cols * 2),
            }
        )  # fmt: skip
        r = records[-1]
        log.info("%-18s %5dx%-5d %2d %-7s dense %6.1f  triton %.2fx  decode %.2fx (default %.2fx) [%s]",
                 name, rows, cols, tokens, pat, dense_us, dense_us / triton_us, dense_us / r["decode_us"],
                 dense_us / r["default_us"], best)  # fmt: skip
    return records


def to_markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        f"# The mma.sp decode kernel (1-32 tokens) — {meta['gpu']}",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, {meta['dtype']}, {meta['date_utc']} UTC. "
        f"Command: `{meta['command']}`",
        "",
        "Timing: CUDA graphs, median of 30 replays, weights rotated through copies > 3x L2. `decode` is the best "
        "of the tile configs (all in the JSON's `configs_us`), `default` the config `sparse_tc_linear` picks for "
        "that token count without autotuning (`default_decode_config`; the op autotunes over the same grid). `Triton` = `vnm_linear` without held layouts (autotuned). "
        "`read floor` = the time a read-only kernel takes to read the packed weight's bytes (records and "
        "column indices) in one launch (`benchmark.read_floor_us`: the best of its configs, timed the same way; "
        "launch, ramp and tail included), `% read` = read floor / time, for the decode kernel and for cuBLAS "
        "(its floor: the dense weight's bytes); `floor ratio` = the two floors' ratio, the speed-up if both only "
        "read their bytes. 2:4 = cuSPARSELt (feature-major activations), from 8 tokens.",
        "",
        "| layer | out x in | tokens | pattern | dense us | 2:4 | Triton | decode us | decode | default "
        "| read floor us | % read | cuBLAS % read | floor ratio | best config |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["records"]:
        d = r["dense_us"]
        cslt = f"{d / r['cslt_us']:.2f}x" if r["cslt_us"] else "n/a"
        lines.append(
            f"| {r['name']} | {r['out_features']}x{r['in_features']} | {r['tokens']} | {r['pattern']} | {d:.1f} "
            f"| {cslt} | {d / r['triton_us']:.2f}x | {r['decode_us']:.1f} | {d / r['decode_us']:.2f}x "
            f"| {d / r['default_us']:.2f}x | {r['read_floor_us']:.1f} | {100 * r['read_floor_us'] / r['decode_us']:.0f}% "
            f"| {100 * r['dense_read_floor_us'] / d:.0f}% | {r['dense_read_floor_us'] / r['read_floor_us']:.2f}x "
            f"| {r['best_config']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = decode_arguments(argv, __doc__, "bench_sparse_tc_decode", [1, 4, 8, 16, 32], ["64:2:5", "64:2:8", "64:2:16"])

    import torch

    from vnm_compile.kernels.benchmark import environment, measure_bandwidth, read_floor_us, save_results
    from vnm_compile.kernels.dispatch import gpu_slug, results_dir

    t0 = time.time()
    dev = torch.device("cuda")
    bandwidth = measure_bandwidth(dev)
    floors: dict[int, float] = {}

    def read_floor(nbytes: int) -> float:
        if nbytes not in floors:
            floors[nbytes], cfg = read_floor_us(nbytes, dev)
            log.info("read floor of %d bytes: %.2f us (%s)", nbytes, floors[nbytes], cfg)
        return floors[nbytes]

    records = []
    for (name, rows, cols), tokens in itertools.product(SHAPES, args.tokens):
        records += time_case(name, rows, cols, tokens, args.patterns, bandwidth, read_floor)
    meta = environment(dev, torch.float16)
    meta.update(
        seconds=round(time.time() - t0, 1), date_utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        bandwidth_gbs=bandwidth / 1e9,
    )  # fmt: skip
    results = {"meta": meta, "records": records}
    save_results(args.out or results_dir() / gpu_slug(dev), "sparse_tc_decode", results, to_markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
