"""Experiment: V:N:M prefill on the sparse tensor cores (warp-level mma.sp), against dense cuBLAS and
cuSPARSELt 2:4, in one run.

    python benchmarks/bench_sparse_tc.py                # ~2 min on an H200

Triton has no sparse tensor-core instruction, so the library's prefill kernel runs dense tensor cores
over each block's 4 kept columns per group (at most M/4 over dense). This script asks what the sparse
tensor cores add: benchmarks/csrc/vnm_mma_sp.cu is a CUDA kernel for n = 2 patterns with V a multiple of
64 (2:4 inside each block's 4 kept columns is exactly mma.sp's 2:4), compiled at run time with NVRTC
through PyTorch (torch.cuda._utils, a private API: no CUDA toolkit needed, only the GPU build of PyTorch).
It is not wired into vnm::linear; see the result file for what it reaches.

Steps, all on the GPU:
1. probe: one mma.sp with per-lane operands pins the metadata layout (which lane and nibble hold which
   row and group) instead of trusting a reading of the PTX manual; the packer uses what it finds;
2. correctness: fresh random V:N:M weights of awkward shapes (rows and columns not multiples of V or M,
   128:2:8, 64:2:7), 1..300 tokens, fp16 and bf16, with and without bias and input/output
   permutations, outputs poisoned with NaN first, against a float32 reference (relative error < 1e-2);
3. peak rates of mma.sp.m16n8k32 and dense mma.sync.m16n8k16 (registers only, every SM busy);
4. timing, CUDA graphs, median of 30 replays: dense cuBLAS, cuSPARSELt 2:4 (feature-major activations,
   its fast layout), and the kernel (best of a few tile configs, weights rotated through copies > 3x L2)
   with x^T given and with the transpose of x counted.

Writes sparse_tc.json and sparse_tc.md to --out (default benchmarks/results/<gpu>/).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import time
from pathlib import Path

log = logging.getLogger("bench_sparse_tc")
SRC = Path(__file__).parent / "csrc" / "vnm_mma_sp.cu"
CONFIGS = [
    dict(WR=1, WN=4, NT=4, STAGES=4, KSUB=1, MINB=1),
    dict(WR=1, WN=4, NT=4, STAGES=4, KSUB=1, MINB=4),
    dict(WR=1, WN=4, NT=4, STAGES=3, KSUB=2, MINB=3),
    dict(WR=2, WN=2, NT=4, STAGES=4, KSUB=1, MINB=1),
    dict(WR=2, WN=4, NT=4, STAGES=3, KSUB=1, MINB=2),
]
LLAMA = [("llama2-7b qkvo", 4096, 4096), ("llama2-7b gate/up", 11008, 4096), ("llama2-7b down", 4096, 11008)]
DEIT = [("deit-b qkv", 2304, 768), ("deit-b proj", 768, 768), ("deit-b fc1", 3072, 768), ("deit-b fc2", 768, 3072)]


class Kernels:
    """NVRTC-compiled entry points of vnm_mma_sp.cu, one module per set of compile-time defines."""

    def __init__(self) -> None:
        import torch
        from torch.cuda._utils import _cuda_load_module, _nvrtc_compile

        self._compile, self._load = _nvrtc_compile, _cuda_load_module
        self._src = SRC.read_text()
        self._cache: dict = {}
        self.max_smem = getattr(torch.cuda.get_device_properties(0), "shared_memory_per_block_optin", 48 << 10)

    def get(self, name: str, **defines):
        key = (name, tuple(sorted(defines.items())))
        if key not in self._cache:
            code, mangled = self._compile(self._src, name, None, None, [f"-D{k}={v}" for k, v in defines.items()])
            k = self._load(code, [mangled])[mangled]
            if name == "vnm_mma_sp_gemm":
                k.set_shared_memory_config(self.max_smem)
            self._cache[key] = k
        return self._cache[key]


# --------------------------------------------------------------------------- metadata layout probe
def probe_metadata_map(kern: Kernels) -> dict[tuple[int, int], tuple[int, int]]:
    """{(lane, nibble): (row, group)} of the mma.sp.m16n8k32 f16 metadata operand (selector 0), measured:
    every nibble of every lane is flipped from positions (0, 1) to (2, 3) and the output rows that move say
    which row and which 4-column group it encodes. Also checks the A (compressed 16x16 in the dense
    m16n8k16 layout), B and C fragment layouts the packer assumes."""
    import torch

    dev = torch.device("cuda")
    k = kern.get("probe_mma_sp")
    gen = torch.Generator().manual_seed(0)
    vals = torch.randn(16, 8, 2, generator=gen).half()  # compressed A: row, group, slot
    bmat = torch.randn(32, 8, generator=gen).half()  # logical K x N
    a = torch.empty(32, 4, 2, dtype=torch.half)
    b = torch.empty(32, 4, 2, dtype=torch.half)
    for lane in range(32):
        g, q = divmod(lane, 4)
        a[lane] = torch.stack([vals[g, q], vals[g + 8, q], vals[g, q + 4], vals[g + 8, q + 4]])
        for r in range(4):
            b[lane, r] = bmat[2 * q + 8 * r : 2 * q + 8 * r + 2, g]
    a_u, b_u = a.view(torch.int32).view(32, 4).to(dev), b.view(torch.int32).view(32, 4).to(dev)

    def run(meta_words: list[int]) -> torch.Tensor:
        meta = torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in meta_words], dtype=torch.int32, device=dev)
        d = torch.full((32, 4), float("nan"), device=dev)
        k((1, 1, 1), (32, 1, 1), [a_u, b_u, meta, d])
        d = d.cpu()
        out = torch.empty(16, 8)
        for lane in range(32):
            g, q = divmod(lane, 4)
            out[g, 2 * q : 2 * q + 2], out[g + 8, 2 * q : 2 * q + 2] = d[lane, :2], d[lane, 2:]
        return out

    def dense_a(moved: tuple[int, int] | None) -> torch.Tensor:
        full = torch.zeros(16, 32)
        for r, c in itertools.product(range(16), range(8)):
            base = 4 * c + (2 if (r, c) == moved else 0)
            full[r, base : base + 2] = vals[r, c].float()
        return full

    ref0 = dense_a(None) @ bmat.float()
    d0 = run([0x44444444] * 32)
    err = (d0 - ref0).abs().max().item()
    if not err < 1e-2:
        raise RuntimeError(f"mma.sp probe: A/B/C fragment layouts differ from the assumed ones (max error {err})")
    found: dict[tuple[int, int], tuple[int, int]] = {}
    for lane, nib in itertools.product(range(32), range(8)):
        words = [0x44444444] * 32
        words[lane] = (words[lane] & ~(0xF << (4 * nib))) | (0xE << (4 * nib))
        delta = run(words) - d0
        if delta.abs().max() < 1e-3:
            continue
        hits = [
            (r, c)
            for r in (delta.abs().amax(1) > 1e-3).nonzero().flatten().tolist()
            for c in range(8)
            if ((dense_a((r, c)) @ bmat.float() - ref0)[r] - delta[r]).abs().max() < 1e-2
        ]
        if len(hits) != 1:
            raise RuntimeError(f"mma.sp probe: lane {lane} nibble {nib} is ambiguous: {hits}")
        found[(lane, nib)] = hits[0]
    if sorted(found.values()) != [(r, c) for r in range(16) for c in range(8)]:
        raise RuntimeError(f"mma.sp probe: metadata map incomplete ({len(found)} of 128 entries)")
    return found


# --------------------------------------------------------------------------- packing
def pack(w, meta_map: dict) -> tuple:
    """VNMWeight (n = 2, V a multiple of 64) -> (records (nb, nkc, 640) int32, indices (nb, nkc, 32) int16,
    nb, nkc): per 64-row block and k-step of 8 groups, the mma.sp A fragments of the 4 m16 tiles (lane-major
    16 bytes each) then their metadata words, and the 32 kept input columns. nkc is padded to even."""
    import torch

    from vnm_compile.format import _unpack_meta

    if w.pattern.n != 2 or w.block_rows % 64:
        raise ValueError(f"mma.sp kernel needs n = 2 and V a multiple of 64, got {w.pattern}")
    rows_p, groups = w.values.shape[0], w.columns.shape[1]
    nb, nkc = rows_p // 64, -(-groups // 16) * 2
    gp = nkc * 8
    vals = w.values.view(rows_p, groups, 2)
    pos = _unpack_meta(w.meta, 2, groups)
    order = pos.argsort(-1)  # mma.sp wants the two positions ascending
    pos, vals = pos.gather(-1, order), vals.gather(-1, order)
    cols = w.columns.long().repeat_interleave(w.block_rows // 64, 0)
    if gp != groups:  # zero groups reading column 0
        vals = torch.cat([vals, vals.new_zeros(rows_p, gp - groups, 2)], 1)
        pos = torch.cat([pos, torch.tensor([0, 1], device=pos.device).expand(rows_p, gp - groups, 2)], 1)
        cols = torch.cat([cols, cols.new_zeros(nb, gp - groups, 4)], 1)
    # A: row = mt*16 + h*8 + g, group = kc*8 + gh*4 + q -> lane (g, q), register (gh, h), two halves
    a = vals.reshape(nb, 4, 2, 8, nkc, 2, 4, 2).permute(0, 4, 1, 3, 6, 5, 2, 7).contiguous()
    afrag = a.view(torch.int32).reshape(nb, nkc, 512)
    code = (pos[..., 0] | (pos[..., 1] << 2)).reshape(nb, 4, 16, nkc, 8)  # (nb, mt, row, kc, group)
    e = torch.zeros(nb, nkc, 4, 32, dtype=torch.int64, device=pos.device)
    for (lane, nib), (r, c) in meta_map.items():
        e[:, :, :, lane] |= code[:, :, r, :, c].permute(0, 2, 1) << (4 * nib)
    efrag = torch.where(e >= 2**31, e - 2**32, e).to(torch.int32).reshape(nb, nkc, 128)
    if int(cols.max()) >= 1 << 16:
        raise ValueError("mma.sp kernel: input columns must fit in 16 bits")
    idx = cols.reshape(nb, nkc, 32)
    idx = torch.where(idx >= 1 << 15, idx - (1 << 16), idx).to(torch.int16)
    return torch.cat([afrag, efrag], -1).contiguous(), idx.contiguous(), nb, nkc


def smem_bytes(cfg: dict, nkc: int) -> int:
    tn = 8 * cfg["NT"] * cfg["WN"]
    pipe = cfg["STAGES"] * cfg["WR"] * cfg["KSUB"] * (32 * tn * 2 + 2560) + cfg["WR"] * nkc * 64
    return max(pipe, cfg["WR"] * cfg["WN"] * 8 * cfg["NT"] * 144)


def launch(kern: Kernels, cfg: dict, xt, tokens: int, packed, out_features: int, y, bias=None, row_index=None):
    rec, idx, nb, nkc = packed
    k = kern.get("vnm_mma_sp_gemm", **cfg)
    tn = 8 * cfg["NT"] * cfg["WN"]
    k(
        (-(-nb // cfg["WR"]), -(-tokens // tn), 1), (cfg["WR"] * cfg["WN"] * 32, 1, 1),
        [xt, xt.stride(0), tokens, rec, idx, nb, nkc, y, y.stride(0), out_features,
         y if bias is None else bias, int(bias is not None), idx if row_index is None else row_index,
         int(row_index is not None)],
        shared_mem=smem_bytes(cfg, nkc),
    )  # fmt: skip


def feature_major(x):
    from vnm_compile.kernels.vnm_triton import _feature_major

    return _feature_major(x, -(-x.shape[0] // 8) * 8, False)


# --------------------------------------------------------------------------- steps
def check_correctness(kern: Kernels, meta_map: dict) -> float:
    import torch

    from vnm_compile.format import VNMWeight
    from vnm_compile.masks import vnm_mask
    from vnm_compile.pattern import VNMPattern

    dev = torch.device("cuda")
    cases = [(64, 40, 5, "64:2:5"), (200, 97, 37, "64:2:8"), (128, 300, 130, "64:2:16"), (257, 515, 300, "128:2:8"),
             (64, 16, 1, "64:2:8"), (448, 1024, 200, "64:2:5"), (192, 512, 129, "64:2:7")]  # fmt: skip
    worst = 0.0
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
        launch(kern, dict(cfg, BF16=int(dtype == torch.bfloat16)), feature_major(x), tokens, pack(w, meta_map), rows,
               y, bias, w.row_index)  # fmt: skip
        err = ((y.float() - ref).norm() / ref.norm()).item()
        if not err < 1e-2:
            raise RuntimeError(f"mma.sp kernel wrong: {rows}x{cols} {tokens} tokens {pat} {cfg} {dtype} perm={perm}: "
                               f"relative error {err}")  # fmt: skip
        worst = max(worst, err)
    return worst


def peak_rates(kern: Kernels) -> dict[str, float]:
    import torch

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = torch.empty(sms * 8 * 128, device="cuda")
    rates = {}
    for label, name, flops, defines in (
        ("peak_mma_sp", "peak_mma_sp", 16 * 8 * 32 * 2, {"ORDERED": 1}),
        ("peak_mma_sp_unordered", "peak_mma_sp", 16 * 8 * 32 * 2, {"ORDERED": 0}),
        ("peak_mma", "peak_mma", 16 * 8 * 16 * 2, {}),
    ):
        k, iters = kern.get(name, **defines), 4096
        k((sms * 8, 1, 1), (128, 1, 1), [out, iters])
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        k((sms * 8, 1, 1), (128, 1, 1), [out, iters])
        end.record()
        torch.cuda.synchronize()
        rates[label] = sms * 8 * 4 * iters * 8 * flops / start.elapsed_time(end) / 1e9  # TFLOP/s
    return rates


def time_case(kern: Kernels, meta_map: dict, name: str, rows: int, cols: int, tokens: int, pat: str) -> dict:
    import torch
    import torch.nn.functional as F

    from vnm_compile.format import VNMWeight
    from vnm_compile.kernels.benchmark import _copies, time_graph
    from vnm_compile.kernels.cusparselt import CSLTLinear
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
    c24 = CSLTLinear(weight * vnm_mask(weight.abs().float(), VNMPattern.parse("2:4")))
    x_fm = x.t().contiguous()
    rec["cslt_us"] = time_graph([lambda: c24.feature_major(x_fm)])
    w = VNMWeight.from_dense(weight, vnm_mask(weight.abs().float(), p), p)
    ref = x.float() @ w.to_dense().float().t()
    packed, xt = pack(w, meta_map), feature_major(x)
    y = torch.empty(tokens, rows, device=dev, dtype=torch.half)
    rec["configs_us"] = {}
    n = _copies(packed[0].numel() * 4, dev)
    copies = [packed] + [(packed[0].clone(), packed[1].clone(), *packed[2:]) for _ in range(n - 1)]
    for cfg in CONFIGS:
        cfg = dict(cfg, BF16=0)
        y.fill_(float("nan"))
        launch(kern, cfg, xt, tokens, packed, rows, y)
        err = ((y.float() - ref).norm() / ref.norm()).item()
        if not err < 1e-2:
            raise RuntimeError(f"mma.sp kernel wrong at {name} {tokens} tokens {pat} {cfg}: relative error {err}")
        key = " ".join(f"{k}={v}" for k, v in cfg.items() if k != "BF16")
        rec["configs_us"][key] = time_graph([lambda pk=pk, cfg=cfg: launch(kern, cfg, xt, tokens, pk, rows, y)
                                             for pk in copies])  # fmt: skip
    best = min(rec["configs_us"], key=rec["configs_us"].get)
    rec["best_config"], rec["vnm_sp_us"] = best, rec["configs_us"][best]
    cfg = dict({k: int(v) for k, v in (kv.split("=") for kv in best.split())}, BF16=0)
    rec["vnm_sp_with_transpose_us"] = time_graph([lambda: launch(kern, cfg, feature_major(x), tokens, packed, rows, y)])
    rec["transpose_us"] = time_graph([lambda: feature_major(x)])
    return rec


def to_markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        f"# V:N:M on the sparse tensor cores (mma.sp experiment) — {meta['gpu']}",
        "",
        f"torch {meta['torch']}, CUDA {meta['cuda']}, {meta['dtype']}, {meta['date_utc']} UTC. Command: `{meta['command']}`",
        "",
        "Kernel: benchmarks/csrc/vnm_mma_sp.cu (NVRTC), not used by vnm::linear. Timing: CUDA graphs, median of 30 "
        "replays, V:N:M weights rotated through copies > 3x L2; best of the tile configs listed in the JSON. "
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
        "| layer | out x in | tokens | pattern | dense us | dense TFLOP/s | 2:4 | V:N:M mma.sp us (x^T given) "
        "| speed-up | + transpose | % of mma.sp peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    peak = meta["peak_tflops"]["peak_mma_sp"]
    for r in results["records"]:
        flops = 2 * r["out_features"] * r["in_features"] * r["tokens"]
        m = int(r["pattern"].split(":")[2])
        sp_flops = flops * 4 / m  # logical (over the 4 kept of M columns)
        lines.append(
            f"| {r['name']} | {r['out_features']}x{r['in_features']} | {r['tokens']} | {r['pattern']} "
            f"| {r['dense_us']:.1f} | {flops / r['dense_us'] / 1e6:.0f} | {r['dense_us'] / r['cslt_us']:.2f}x "
            f"| {r['vnm_sp_us']:.1f} | {r['dense_us'] / r['vnm_sp_us']:.2f}x "
            f"| {r['dense_us'] / r['vnm_sp_with_transpose_us']:.2f}x | {100 * sp_flops / r['vnm_sp_us'] / 1e6 / peak:.0f}% |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--patterns", nargs="+", default=["64:2:5", "64:2:8", "64:2:16"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch

    from vnm_compile.kernels.benchmark import environment
    from vnm_compile.kernels.dispatch import gpu_slug, results_dir

    if not torch.cuda.is_available():
        raise SystemExit("bench_sparse_tc needs a CUDA GPU")
    t0 = time.time()
    kern = Kernels()
    meta_map = probe_metadata_map(kern)
    log.info("metadata layout probed: lane 4g holds rows g / g+8 of groups 0-3, lane 4g+1 groups 4-7: %s",
             all(meta_map[(4 * (r % 8) + c // 4, c % 4 + 4 * (r // 8))] == (r, c)
                 for r in range(16) for c in range(8)))  # fmt: skip
    worst = check_correctness(kern, meta_map)
    log.info("correctness: worst relative error %.2e", worst)
    peaks = peak_rates(kern)
    log.info("peak rates (TFLOP/s): %s", {k: round(v) for k, v in peaks.items()})
    records = []
    cases = [(n, r, c, t) for n, r, c in LLAMA for t in (2048, 8192)] + [(n, r, c, 12608) for n, r, c in DEIT]
    for (name, rows, cols, tokens), pat in itertools.product(cases, args.patterns):
        rec = time_case(kern, meta_map, name, rows, cols, tokens, pat)
        records.append(rec)
        log.info("%-18s %5dx%-5d %5d %-7s dense %7.1f  2:4 %.2fx  mma.sp %7.1f %.2fx (+transpose %.2fx) [%s]",
                 name, rows, cols, tokens, pat, rec["dense_us"], rec["dense_us"] / rec["cslt_us"], rec["vnm_sp_us"],
                 rec["dense_us"] / rec["vnm_sp_us"], rec["dense_us"] / rec["vnm_sp_with_transpose_us"],
                 rec["best_config"])  # fmt: skip
    meta = environment(torch.device("cuda"), torch.float16)
    meta.update(
        seconds=round(time.time() - t0, 1), date_utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        peak_tflops=peaks, worst_relative_error=worst,
        correctness_cases=7 * len(CONFIGS) * 4, metadata_map={f"{k[0]},{k[1]}": v for k, v in meta_map.items()},
    )  # fmt: skip
    results = {"meta": meta, "records": records}
    out = args.out or results_dir() / gpu_slug(torch.device("cuda"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "sparse_tc.json").write_text(json.dumps(results, indent=1))
    (out / "sparse_tc.md").write_text(to_markdown(results))
    print(to_markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
