"""Experiment: V:N:M prefill on the sparse tensor cores (warp-level mma.sp), against dense cuBLAS and
cuSPARSELt 2:4, in one run.

    python benchmarks/bench_sparse_tc.py                # ~3 min on an H200

Triton has no sparse tensor-core instruction, so the library's prefill kernel runs dense tensor cores
over each block's 4 kept columns per group (at most M/4 over dense). This script asks what the sparse
tensor cores add: vnm_compile.kernels.sparse_tc (csrc/vnm_mma_sp.cu) is a CUDA kernel for n = 2 patterns
with V a multiple of 64 (2:4 inside each block's 4 kept columns is exactly mma.sp's 2:4), compiled at run
time with NVRTC through PyTorch (torch.cuda._utils, a private API: no CUDA toolkit needed, only the GPU
build of PyTorch). Three kernels: "gather" (each V block's 32 kept x^T rows per k-step, its own copy) and
"dense" (the 8 groups' 8M x^T rows once per CTA, shared by its WR V blocks, gathered by ldmatrix's row
addresses), both on the warp-level mma.sp, and on Hopper "wgmma" (gathers like "gather", multiplies with the
warpgroup-level wgmma.mma_async.sp). vnm::linear runs them with the sparse_tensor_cores option (from a
token count up); this script times the kernels alone. The few-token decode kernel has its own script, bench_sparse_tc_decode.py.

Steps, all on the GPU:
1. probe: one mma.sp with per-lane operands pins the metadata layout (which lane and nibble hold which
   row and group) instead of trusting a reading of the PTX manual; the packer uses what it finds;
2. correctness: fresh random V:N:M weights of awkward shapes (rows and columns not multiples of V or M,
   128:2:8, 64:2:7), 1..300 tokens, fp16 and bf16, with and without bias and input/output
   permutations, outputs poisoned with NaN first, against a float32 reference (relative error < 1e-2);
3. peak rates of mma.sp.m16n8k32 and dense mma.sync.m16n8k16 (registers only, every SM busy);
4. timing, CUDA graphs, median of 30 replays: dense cuBLAS, cuSPARSELt 2:4 (feature-major activations,
   its fast layout), and the kernels (every config in CONFIGS, weights rotated through copies > 3x L2;
   the table shows the best) with x^T given and with the transpose of x counted.

Writes sparse_tc.json and sparse_tc.md to --out (default benchmarks/results/<gpu>/).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import math
import time
from pathlib import Path

from vnm_compile.kernels.benchmark import llama_linears

log = logging.getLogger("bench_sparse_tc")
# KERNEL: "gather" (each V block's kept x^T rows) or "dense" (the 8 groups' x^T rows, shared by WR blocks);
# dense: BULK=1 records by bulk copy on mbarriers (sm_90), PF=1 fragments read one k-step ahead; "wgmma" (sm_90
# only): wgmma.mma_async.sp, one warpgroup per V block, WG blocks and TNW tokens per CTA, SHARE=1 (V >= 128)
CONFIGS = [
    dict(KERNEL="gather", WR=1, WN=4, NT=4, STAGES=4, KSUB=1, MINB=4),
    dict(KERNEL="gather", WR=1, WN=4, NT=4, STAGES=3, KSUB=2, MINB=3),
    dict(KERNEL="dense", WR=4, WN=1, NT=8, STAGES=4, KSUB=1, MINB=2, BULK=0),
    dict(KERNEL="dense", WR=4, WN=1, NT=8, STAGES=3, KSUB=2, MINB=2, BULK=0),
    dict(KERNEL="dense", WR=4, WN=1, NT=8, STAGES=3, KSUB=2, MINB=2, BULK=1, PF=1),
    dict(KERNEL="wgmma", WG=1, TNW=256, WST=4, MINB=2),
    dict(KERNEL="wgmma", WG=2, TNW=256, WST=4),
    dict(KERNEL="wgmma", WG=1, TNW=128, WST=4, MINB=4),
    dict(KERNEL="wgmma", WG=1, TNW=128, WST=6, MINB=3),
    dict(KERNEL="wgmma", WG=1, TNW=256, WST=3, MINB=3),
    dict(KERNEL="wgmma", WG=2, TNW=256, WST=4, SHARE=1),
]
KINDS = ("gather", "dense", "wgmma")
LLAMA = [(name, out_f, in_f) for out_f, in_f, name in llama_linears()]
DEIT = [("deit-b qkv", 2304, 768), ("deit-b proj", 768, 768), ("deit-b fc1", 3072, 768), ("deit-b fc2", 768, 3072)]


def gemm_cases(layers: list[str] | None) -> list[tuple[str, int, int, int]]:
    """(name, out, in, tokens) of the GEMM benchmarks: Llama-2-7B at 2048 and 8192 tokens, DeiT-B at 12608
    (batch 64); only layers whose name contains one of ``layers`` if given."""
    cases = [(n, r, c, t) for n, r, c in LLAMA for t in (2048, 8192)] + [(n, r, c, 12608) for n, r, c in DEIT]
    return [case for case in cases if not layers or any(part in case[0] for part in layers)]


def parse_config(text: str) -> dict:
    """ "KERNEL=dense,WR=4,..." -> {"KERNEL": "dense", "WR": 4, ...}"""
    cfg = dict(kv.split("=") for kv in text.split(","))
    return {k: (v if k == "KERNEL" else int(v)) for k, v in cfg.items()}


def launch(cfg: dict, xt, tokens: int, packed, y, bias=None):
    from vnm_compile.kernels.sparse_tc import launch as sp_launch

    sp_launch(xt, tokens, packed, y, bias, cfg)


def runs_here(cfg: dict, packed) -> bool:
    """Whether ``cfg`` applies to this GPU and weight: wgmma on compute capability 9.0 only, SHARE=1 on
    V >= 128 only (the rest runs everywhere sparse_tc does)."""
    from vnm_compile.kernels.sparse_tc import wgmma_available

    if cfg.get("KERNEL") == "wgmma" and not wgmma_available("cuda"):
        return False
    return not cfg.get("SHARE") or packed.block_rows % 128 == 0


# --------------------------------------------------------------------------- steps
def check_correctness() -> tuple[float, int]:
    """The worst relative error over the cases, and how many ran (configs that do not apply are skipped)."""
    import torch

    from vnm_compile.format import VNMWeight
    from vnm_compile.kernels.sparse_tc import feature_major, pack_sparse_tc, sparse_tc_linear
    from vnm_compile.masks import vnm_mask
    from vnm_compile.pattern import VNMPattern

    dev = torch.device("cuda")
    cases = [(64, 40, 5, "64:2:5"), (200, 97, 37, "64:2:8"), (128, 300, 130, "64:2:16"), (257, 515, 300, "128:2:8"),
             (64, 16, 1, "64:2:8"), (448, 1024, 200, "64:2:5"), (192, 512, 129, "64:2:7")]  # fmt: skip
    worst, count = 0.0, 0
    for (rows, cols, tokens, pat), cfg, dtype, perm in itertools.product(
        cases, CONFIGS, (torch.float16, torch.bfloat16), (False, True)
    ):
        p = VNMPattern.parse(pat)
        weight = torch.randn(rows, cols, device=dev)
        ip = torch.randperm(cols, device=dev) if perm else None
        op = torch.randperm(rows, device=dev) if perm else None
        mask_p = vnm_mask((weight.abs()[op][:, ip] if perm else weight.abs()), p)
        mask = torch.zeros_like(mask_p)
        if perm:
            mask[op.unsqueeze(1), ip.unsqueeze(0)] = mask_p
        else:
            mask = mask_p
        w = VNMWeight.from_dense(weight.to(dtype), mask, p, in_perm=ip, out_perm=op)
        x = torch.randn(tokens + 3, cols, device=dev, dtype=dtype)[:tokens]
        bias = torch.randn(rows, device=dev, dtype=dtype)
        ref = x.float() @ w.to_dense().float().t() + bias.float()
        y = torch.full((tokens, rows), float("nan"), device=dev, dtype=dtype)
        packed = pack_sparse_tc(w)
        if not runs_here(cfg, packed):
            continue
        launch(cfg, feature_major(x, packed, cfg), tokens, packed, y, bias)
        err = ((y.float() - ref).norm() / ref.norm()).item()
        if cfg == CONFIGS[0]:  # the public entry point: 3-D input, default config
            y3 = sparse_tc_linear(x.reshape(1, tokens, cols), packed, bias)
            err = max(err, ((y3.reshape(tokens, rows).float() - ref).norm() / ref.norm()).item())
        if not err < 1e-2:
            raise RuntimeError(f"mma.sp kernel wrong: {rows}x{cols} {tokens} tokens {pat} {cfg} {dtype} perm={perm}: "
                               f"relative error {err}")  # fmt: skip
        worst, count = max(worst, err), count + 1
    return worst, count


def peak_rates() -> dict[str, float]:
    """TFLOP/s of the warp-level mma.sp (ordered and plain metadata) and dense mma.sync instructions alone
    (csrc/peak_mma.cu, compiled with the package's kernel source, whose mma_sp it uses)."""
    import torch

    from vnm_compile.kernels.sparse_tc import SOURCE, _Kernels

    probes = _Kernels(SOURCE.read_text() + "\n" + (Path(__file__).parent / "csrc" / "peak_mma.cu").read_text())
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = torch.empty(sms * 8 * 128, device="cuda")
    rates = {}
    for label, name, flops, defines in (
        ("peak_mma_sp", "peak_mma_sp", 16 * 8 * 32 * 2, {"ORDERED": 1}),
        ("peak_mma_sp_unordered", "peak_mma_sp", 16 * 8 * 32 * 2, {"ORDERED": 0}),
        ("peak_mma", "peak_mma", 16 * 8 * 16 * 2, {}),
    ):
        k, iters = probes.get(name, **defines), 4096
        k((sms * 8, 1, 1), (128, 1, 1), [out, iters])
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        k((sms * 8, 1, 1), (128, 1, 1), [out, iters])
        end.record()
        torch.cuda.synchronize()
        rates[label] = sms * 8 * 4 * iters * 8 * flops / start.elapsed_time(end) / 1e9  # TFLOP/s
    return rates


def gemm_case(name: str, rows: int, cols: int, tokens: int, pat: str) -> tuple:
    """One case of the GEMM benchmarks: fp16 weight and x (seeded by the shape), the record with dense
    cuBLAS timed (weights rotated through copies > 3x L2), the float32 reference of the V:N:M weight, its
    packing and copies of that past 3x L2. Returns (rec, weight, x, ref, packed, copies)."""
    import torch
    import torch.nn.functional as F

    from vnm_compile.format import VNMWeight
    from vnm_compile.kernels.benchmark import _copies, time_graph
    from vnm_compile.kernels.sparse_tc import pack_sparse_tc
    from vnm_compile.masks import vnm_mask
    from vnm_compile.pattern import VNMPattern

    dev = torch.device("cuda")
    p = VNMPattern.parse(pat)
    gen = torch.Generator(device=dev).manual_seed(rows + 3 * cols + tokens)
    weight = (torch.randn(rows, cols, device=dev, generator=gen) / math.sqrt(cols)).half()
    x = torch.randn(tokens, cols, device=dev, generator=gen).half()
    rec: dict = {"name": name, "out_features": rows, "in_features": cols, "tokens": tokens, "pattern": pat}
    ws = [weight] + [weight.clone() for _ in range(_copies(weight.numel() * 2, dev) - 1)]
    rec["dense_us"] = time_graph([lambda w=w: F.linear(x, w) for w in ws])
    del ws
    w = VNMWeight.from_dense(weight, vnm_mask(weight.abs().float(), p), p)
    ref = x.float() @ w.to_dense().float().t()
    packed = pack_sparse_tc(w)
    n = _copies(packed.records.numel() * 4, dev)
    copies = [packed] + [
        dataclasses.replace(packed, records=packed.records.clone(), columns=packed.columns.clone())
        for _ in range(n - 1)
    ]
    return rec, weight, x, ref, packed, copies


def time_case(name: str, rows: int, cols: int, tokens: int, pat: str) -> dict:
    import torch

    from vnm_compile.kernels.benchmark import time_graph
    from vnm_compile.kernels.cusparselt import CSLTLinear
    from vnm_compile.kernels.sparse_tc import feature_major
    from vnm_compile.masks import vnm_mask
    from vnm_compile.pattern import VNMPattern

    rec, weight, x, ref, packed, copies = gemm_case(name, rows, cols, tokens, pat)
    c24 = CSLTLinear(weight * vnm_mask(weight.abs().float(), VNMPattern.parse("2:4")))
    x_fm = x.t().contiguous()
    rec["cslt_us"] = time_graph([lambda: c24.feature_major(x_fm)])
    xts = {kind: feature_major(x, packed, {"KERNEL": kind}) for kind in KINDS}
    y = torch.empty(tokens, rows, device=x.device, dtype=torch.half)
    rec["configs_us"] = {}
    by_key = {}  # the configs by their JSON key
    for cfg in CONFIGS:
        if not runs_here(cfg, packed):
            continue
        xt = xts[cfg["KERNEL"]]
        y.fill_(float("nan"))
        launch(cfg, xt, tokens, packed, y)
        err = ((y.float() - ref).norm() / ref.norm()).item()
        if not err < 1e-2:
            raise RuntimeError(f"mma.sp kernel wrong at {name} {tokens} tokens {pat} {cfg}: relative error {err}")
        key = " ".join(f"{k}={v}" for k, v in cfg.items())
        by_key[key] = cfg
        rec["configs_us"][key] = time_graph([lambda pk=pk, cfg=cfg, xt=xt: launch(cfg, xt, tokens, pk, y)
                                             for pk in copies])  # fmt: skip
    for kind in KINDS:
        mine = {k: v for k, v in rec["configs_us"].items() if k.startswith(f"KERNEL={kind} ")}
        rec[f"{kind}_kernel_us"] = min(mine.values()) if mine else float("nan")
    best = min(rec["configs_us"], key=rec["configs_us"].get)
    rec["best_config"], rec["vnm_sp_us"] = best, rec["configs_us"][best]
    cfg = by_key[best]
    rec["vnm_sp_with_transpose_us"] = time_graph(
        [lambda: launch(cfg, feature_major(x, packed, cfg), tokens, packed, y)]
    )
    rec["transpose_us"] = time_graph([lambda: feature_major(x, packed, cfg)])
    return rec


def to_markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        f"# V:N:M on the sparse tensor cores (mma.sp and wgmma.sp GEMMs) — {meta['gpu']}",
        "",
        f"torch {meta['torch']}, CUDA {meta['cuda']}, {meta['dtype']}, {meta['date_utc']} UTC. Command: `{meta['command']}`",
        "",
        "Kernels: vnm_compile/kernels/csrc/vnm_mma_sp.cu (NVRTC, `kernels.sparse_tc`; vnm::linear runs them with the "
        "`sparse_tensor_cores` option). "
        "Timing: CUDA graphs, median of 30 replays, V:N:M weights rotated through copies > 3x L2; each kernel "
        "column is the best of its tile configs (all in the JSON's `configs_us`), `speed-up` the best of both. "
        "2:4 = cuSPARSELt with feature-major activations. `x^T given`: the kernel reads feature-major "
        "activations; `+ transpose`: the transpose of x (one Triton launch) counted in.",
        "",
        f"Correctness: {meta['correctness_cases']} cases (awkward shapes, 1-300 tokens, fp16/bf16, permutations, "
        f"bias), worst relative error {meta['worst_relative_error']:.1e} vs float32.",
        "",
        f"Peak rates measured here (registers only, every SM busy): mma.sp::ordered_metadata.m16n8k32 "
        f"{meta['peak_tflops']['peak_mma_sp']:.0f} TFLOP/s (counting the 32-wide logical K; plain mma.sp "
        f"{meta['peak_tflops'].get('peak_mma_sp_unordered', float('nan')):.0f}), dense mma.sync.m16n8k16 "
        f"{meta['peak_tflops']['peak_mma']:.0f} TFLOP/s. The warp-level sparse path is "
        f"{meta['peak_tflops']['peak_mma_sp'] / meta['peak_tflops']['peak_mma']:.2f}x the warp-level dense one; "
        "cuBLAS's dense wgmma path is faster than both (see `dense TFLOP/s`).",
        "",
        "Kernels: `gather` reads each V block's 32 kept x^T rows per k-step (every block its own copy); "
        "`dense` reads the 8 groups' 8M x^T rows once per CTA, shared by its WR V blocks, and gathers in ldmatrix "
        "(both warp-level mma.sp); `wgmma` (Hopper only) gathers like `gather` and multiplies with the warpgroup "
        "instruction wgmma.mma_async.sp (A from registers, the gathered x^T from shared memory), `SHARE=1` for "
        "V = 128: the two 64-row halves of a V block read one copy. `% of mma.sp peak`: the best kernel's logical "
        "rate against the warp-level instruction's measured peak (the wgmma path can exceed it).",
        "",
        "| layer | out x in | tokens | pattern | dense us | dense TFLOP/s | 2:4 | gather kernel us | dense-tile kernel us "
        "| wgmma kernel us | speed-up (best) | + transpose | % of mma.sp peak | best config |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    peak = meta["peak_tflops"]["peak_mma_sp"]
    for r in results["records"]:
        flops = 2 * r["out_features"] * r["in_features"] * r["tokens"]
        m = int(r["pattern"].split(":")[2])
        sp_flops = flops * 4 / m  # logical (over the 4 kept of M columns)
        lines.append(
            f"| {r['name']} | {r['out_features']}x{r['in_features']} | {r['tokens']} | {r['pattern']} "
            f"| {r['dense_us']:.1f} | {flops / r['dense_us'] / 1e6:.0f} | {r['dense_us'] / r['cslt_us']:.2f}x "
            f"| {r['gather_kernel_us']:.1f} | {r['dense_kernel_us']:.1f} | {r.get('wgmma_kernel_us', float('nan')):.1f} "
            f"| {r['dense_us'] / r['vnm_sp_us']:.2f}x | {r['dense_us'] / r['vnm_sp_with_transpose_us']:.2f}x "
            f"| {100 * sp_flops / r['vnm_sp_us'] / 1e6 / peak:.0f}% | {r['best_config']} |"
        )
    return "\n".join(lines) + "\n"


def gemm_arguments(argv: list[str] | None, doc: str, patterns: list[str], config_help: str) -> argparse.Namespace:
    """The command line of the GEMM benchmarks: --out, --patterns,
    --layers, --config (repeatable)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--patterns", nargs="+", default=patterns)
    parser.add_argument("--layers", nargs="+", default=None, help="only layers whose name contains one of these")
    parser.add_argument("--config", action="append", type=parse_config, default=None, help=config_help)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = gemm_arguments(
        argv, __doc__, ["64:2:5", "64:2:8", "64:2:16"],
        "a tile config to run instead of CONFIGS (repeatable): KERNEL=dense,WR=4,WN=1,NT=8,STAGES=3,KSUB=2,MINB=2",
    )  # fmt: skip
    if args.config:
        CONFIGS[:] = args.config
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch

    from vnm_compile.kernels.benchmark import environment, save_results
    from vnm_compile.kernels.dispatch import gpu_slug, results_dir

    if not torch.cuda.is_available():
        raise SystemExit("bench_sparse_tc needs a CUDA GPU")
    from vnm_compile.kernels.sparse_tc import METADATA_MAP, probe_metadata_map

    t0 = time.time()
    meta_map = probe_metadata_map()
    log.info("metadata layout probed; the packer's METADATA_MAP matches it: %s", meta_map == METADATA_MAP)
    if meta_map != METADATA_MAP:
        raise SystemExit("this GPU's mma.sp metadata layout differs from vnm_compile.kernels.sparse_tc.METADATA_MAP")
    worst, cases_run = check_correctness()
    log.info("correctness: worst relative error %.2e", worst)
    peaks = peak_rates()
    log.info("peak rates (TFLOP/s): %s", {k: round(v) for k, v in peaks.items()})
    records = []
    for (name, rows, cols, tokens), pat in itertools.product(gemm_cases(args.layers), args.patterns):
        rec = time_case(name, rows, cols, tokens, pat)
        records.append(rec)
        log.info("%-18s %5dx%-5d %5d %-7s dense %7.1f  2:4 %.2fx  gather %.2fx  dense-tile %.2fx  wgmma %.2fx "
                 "(+transpose %.2fx) [%s]", name, rows, cols, tokens, pat, rec["dense_us"],
                 rec["dense_us"] / rec["cslt_us"], rec["dense_us"] / rec["gather_kernel_us"],
                 rec["dense_us"] / rec["dense_kernel_us"], rec["dense_us"] / rec["wgmma_kernel_us"],
                 rec["dense_us"] / rec["vnm_sp_with_transpose_us"], rec["best_config"])  # fmt: skip
    meta = environment(torch.device("cuda"), torch.float16)
    meta.update(
        seconds=round(time.time() - t0, 1), date_utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        peak_tflops=peaks, worst_relative_error=worst,
        correctness_cases=cases_run, metadata_map={f"{k[0]},{k[1]}": v for k, v in meta_map.items()},
    )  # fmt: skip
    results = {"meta": meta, "records": records}
    save_results(args.out or results_dir() / gpu_slug(torch.device("cuda")), "sparse_tc", results, to_markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
