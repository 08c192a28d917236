"""Fuzz every kernel path the dispatcher can pick against a float64 reference (issue 31).

Three parts, sharing one time budget (``--seconds``):

1. Random cases (``--cases``, default 1000): a random V:N:M weight (V in 16..128, M in 4..16,
   shapes up to a few thousand, primes and non-multiples of V and M included), random input/output
   permutations, bias or not, fp16/bf16 (fp32 on some Triton cases), 1..8192 tokens (log-uniform),
   through one kernel path:

   - ``triton``: vnm_linear_triton with a random launch config from candidate_configs (fma, dot with
     and without split-K and feature-major x, gather GEMM), or the autotuned choice;
   - ``triton+expanded`` / ``triton+interleaved``: the same with the optional layouts held
     (expand_weights: the gather GEMM on held weights; interleave_rows: the row-interleaved decode kernel);
   - ``mma.sp decode`` (1..32 tokens, random DECODE_GRID config: cluster or global-memory split-K,
     XS 0/1/2, DP), ``mma.sp gather`` / ``mma.sp dense`` GEMMs and ``wgmma.sp`` (sm_90; random WGMMA
     configs, SHARE where V is a multiple of 128): kernels.sparse_tc's launchers, called directly;
   - ``vnm_linear``: the public entry point with random optional layouts and sparse-tensor-core
     windows (the run-time dispatch itself);
   - ``compressed_linear``: ``vnm::compressed_linear``, what compressed models and permuted layers run (the
     measured choice between the sparse kernels and cuBLAS on a rebuilt or held dense weight), on a random
     layout (rows, the sparse-TC packing with full or compact records, or that packing with the input
     permutation folded into its columns), with a random row_index (output permutation in the store) or
     held dense weights; its output is allocated inside, so the freed block it reuses is filled with NaN
     first.

   Every output the API lets us pass in is filled with NaN first (an element the kernel does not
   write shows up as NaN); outputs allocated inside are checked for NaN. The error against
   ``x.double() @ W.double().T + b`` must be within 2x the error of the same product done by PyTorch
   in the same precision, plus one rounding of the output (flash-attention's three-way check).

2. Streams: the mma.sp decode kernel (split-K partials summed through global memory and arrival
   counters, CL=0) and the Triton split-K dot kernel running the same layer on two CUDA streams at
   once, many times; every result is checked.

3. Dynamic shapes: one ``torch.compile(backend="vnm", dynamic=True)`` model of sparsified linears called
   at random token counts (1..8192) thousands of times: results against eager, no recompile past the
   first dynamic graph (torch._dynamo counters), GPU memory and the autotune cache bounded.

Writes ``<out>/fuzz_kernels.json`` (every failing case in full, per-path counts and worst error ratios)
and ``<out>/fuzz_kernels.md``; exits 1 on any mismatch. On CPU (``TRITON_INTERPRET=1``) only the Triton
paths run, on small shapes: a check of the harness itself.

Usage (GPU):  python tools/fuzz_kernels.py --out benchmarks/results/<gpu>/fuzz --seconds 300
More cases per call (the cases' compiles run in 8 worker processes at once):
              python tools/fuzz_kernels.py --out benchmarks/results/<gpu>/fuzz --seconds 540 --jobs 8
Quick:        python tools/fuzz_kernels.py --out /tmp/fuzz --quick
CPU harness:  TRITON_INTERPRET=1 python tools/fuzz_kernels.py --out /tmp/fuzz --quick --seconds 60
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vnm_compile import VNMPattern, VNMWeight, vnm_mask  # noqa: E402
from vnm_compile.kernels import vnm_triton  # noqa: E402
from vnm_compile.kernels.benchmark import save_results  # noqa: E402

PRIMES = [2, 3, 5, 7, 11, 13, 17, 31, 61, 67, 97, 127, 131, 251, 257, 509, 521, 1021, 1031, 2039, 2053, 4093]
EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-23}


# ------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    index: int
    path: str
    pattern: str
    out_features: int
    in_features: int
    tokens: int
    dtype: str
    bias: bool
    in_perm: bool
    out_perm: bool
    config: str = ""
    err: float = 0.0
    torch_err: float = 0.0
    tol: float = 0.0
    ok: bool = True
    note: str = ""


@dataclass
class Summary:
    device: str
    torch: str
    triton: str
    seconds: float = 0.0
    cases: int = 0
    failures: int = 0
    by_path: dict = field(default_factory=dict)
    streams: dict = field(default_factory=dict)
    dynamic: dict = field(default_factory=dict)
    failed_cases: list = field(default_factory=list)


def _size(rng: random.Random, cap: int) -> int:
    """A layer dimension: a prime, a multiple of 64 (+-small), or uniform; at most ``cap``."""
    r = rng.random()
    if r < 0.35:
        return rng.choice([p for p in PRIMES if p <= cap] or [1])
    if r < 0.6:
        return max(1, min(cap, 64 * rng.randint(1, max(1, cap // 64)) + rng.choice([0, 0, -1, 1, 3])))
    return rng.randint(1, cap)


def _tokens(rng: random.Random, cap: int) -> int:
    return max(1, min(cap, int(round(math.exp(rng.uniform(0, math.log(cap)))))))


def _weight(rng: random.Random, out_f: int, in_f: int, p: VNMPattern, dtype, device, perms: tuple[bool, bool]):
    """A VNMWeight with a random mask that obeys ``p`` after random permutations (when asked)."""
    return _masked(rng, out_f, in_f, p, dtype, device, perms)[0]


def _masked(rng: random.Random, out_f: int, in_f: int, p: VNMPattern, dtype, device, perms: tuple[bool, bool]):
    """(VNMWeight with the permutations folded in, the weight, its mask, in_perm, out_perm): a random mask that
    obeys ``p`` after random permutations (when asked), in original coordinates."""
    g = torch.Generator(device="cpu").manual_seed(rng.randrange(2**31))
    w = torch.randn(out_f, in_f, generator=g)
    in_perm = torch.randperm(in_f, generator=g) if perms[0] else None
    out_perm = torch.randperm(out_f, generator=g) if perms[1] else None
    scores = w.abs()
    permuted = scores
    if out_perm is not None:
        permuted = permuted[out_perm]
    if in_perm is not None:
        permuted = permuted[:, in_perm]
    mask_p = vnm_mask(permuted, p)
    rows = out_perm if out_perm is not None else torch.arange(out_f)
    cols = in_perm if in_perm is not None else torch.arange(in_f)
    mask = torch.empty_like(mask_p)
    mask[rows.unsqueeze(1), cols.unsqueeze(0)] = mask_p
    w, mask = w.to(dtype).to(device), mask.to(device)
    return VNMWeight.from_dense(w, mask, p, in_perm=in_perm, out_perm=out_perm), w, mask, in_perm, out_perm


def _check(y: torch.Tensor, x: torch.Tensor, dense: torch.Tensor, bias, case: Case) -> None:
    """Fill case.err / torch_err / tol / ok: kernel vs float64 and PyTorch (same precision) vs float64, for
    ``y = x @ dense.T + bias`` (``dense``: zeros at pruned positions)."""
    x64, dense64 = x.double(), dense.double()
    ref = torch.nn.functional.linear(x64, dense64, None if bias is None else bias.double())
    same = torch.nn.functional.linear(x, dense.to(x.dtype), bias)
    y64 = y.double()
    finite = bool(torch.isfinite(y64).all())
    case.err = float((y64 - ref).abs().max()) if y.numel() and finite else (0.0 if not y.numel() else math.inf)
    case.torch_err = float((same.double() - ref).abs().max()) if y.numel() else 0.0
    scale = float(ref.abs().max()) if y.numel() else 0.0
    # The kernels accumulate in float32 in their own order (k-steps, split-K), PyTorch's GEMM in another: for
    # float32 inputs the order alone moves the result by about sqrt(terms) * u * sum|x_j w_j| (a random walk
    # of roundings); 4x that allows for it, and is still well below what float32 inputs read as TF32 or
    # bfloat16, or one dropped term, would give.
    if y.numel():
        terms = int((dense != 0).sum(1).max())
        absdot = float((x64.abs() @ dense64.abs().t()).max())
        order = 4 * math.sqrt(terms) * 2.0**-24 * absdot
    else:
        order = 0.0
    case.tol = 2 * case.torch_err + EPS[x.dtype] * scale + order + 1e-6
    case.ok = finite and case.err <= case.tol
    if not finite:
        case.note = f"{int((~torch.isfinite(y)).sum())} NaN/Inf outputs (unwritten elements are NaN)"


def _poisoned(tokens: int, out_f: int, dtype, device) -> torch.Tensor:
    return torch.full((tokens, out_f), float("nan"), dtype=dtype, device=device)


# --------------------------------------------------------------------------------- the paths
def _run_triton(rng, x, cw, bias, case, layout: str) -> torch.Tensor:
    v, tokens = cw.block_rows, x.shape[0]
    expanded = interleaved = None
    r = 0
    if layout == "expanded":
        expanded = vnm_triton.expand_weights(cw.values, cw.meta, x.dtype)
    elif layout == "interleaved":
        interleaved = vnm_triton.interleave_rows(cw.values, cw.meta, v)
        r = vnm_triton._check_interleaved(interleaved, cw.values, v)
    config = None
    if not vnm_triton.interpret_mode() or x.is_cuda:
        cands = vnm_triton.candidate_configs(v, tokens, expanded is not None, r)
        cands = [c for c in cands if c.kind != "rows" or interleaved is not None]
        if rng.random() < 0.85 and cands:  # else the autotuned choice
            config = rng.choice(cands)
    case.config = "autotuned" if config is None else str(config)
    y = _poisoned(tokens, cw.out_features, x.dtype, x.device)
    vnm_triton.vnm_linear_triton(
        x, cw.values, cw.columns, cw.meta, cw.row_index, bias, v, cw.pattern.n, cw.pattern.m, cw.out_features,
        out=y, config=config, expanded=expanded, interleaved=interleaved,
    )  # fmt: skip
    return y


def _run_sparse_tc(rng, x, cw, bias, case, kind: str) -> torch.Tensor:
    from vnm_compile.kernels import sparse_tc as tc

    pw = tc.pack_sparse_tc(cw)
    tokens = x.shape[0]
    y = _poisoned(tokens, cw.out_features, x.dtype, x.device)
    with torch.cuda.device(x.device):
        tc._check_device(x.device)
        if kind == "decode":
            cfg = dict(rng.choice(tc.DECODE_GRID + list(tc.DECODE_CONFIGS.values())))
            if cfg.get("XS", 2) == 1 and not tc._can_stage(x, pw):
                cfg["XS"] = rng.choice([0, 2])
            if cfg.get("DP") and cfg.get("XS", 2) == 1:
                cfg.pop("DP")
            case.config = json.dumps(cfg)
            try:
                tc.launch_decode(x, pw, y, bias, cfg)
            except ValueError as e:  # as the autotuner does: a config this device cannot hold is skipped
                if "shared memory" not in str(e):
                    raise
                cfg = tc.default_decode_config(tokens)
                case.config += f" -> {json.dumps(cfg)} (shared memory)"
                tc.launch_decode(x, pw, y, bias, cfg)
            return y
        if kind == "dense" and (pw.group_columns is None or pw.group_width > 8):
            kind, case.path = "gather", "mma.sp gather"  # a group keeps columns beyond its span: no dense x^T rows
        if kind == "gather":
            cfg = dict(tc.GATHER_CONFIG)
        elif kind == "dense":
            cfg = dict(tc.DENSE_CONFIG)
        else:  # wgmma
            grid = [tc.WGMMA_CONFIG, *tc.WGMMA_GRID] + ([tc.WGMMA_SHARE_CONFIG] if cw.block_rows % 128 == 0 else [])
            cfg = dict(rng.choice(grid))
        case.config = json.dumps(cfg)
        tc.launch(tc.feature_major(x, pw, cfg), tokens, pw, y, bias, cfg)
    return y


def _run_public(rng, x, cw, bias, case) -> torch.Tensor:
    from vnm_compile.kernels import sparse_tc as tc
    from vnm_compile.kernels import vnm_linear

    kw = {}
    if rng.random() < 0.3 and cw.pattern.n == 2:
        kw["expanded"] = vnm_triton.expand_weights(cw.values, cw.meta, x.dtype)
    if rng.random() < 0.3 and cw.pattern.n == 2 and cw.block_rows % 4 == 0:
        kw["interleaved"] = vnm_triton.interleave_rows(cw.values, cw.meta, cw.block_rows)
    tc_ok = x.is_cuda and tc.sparse_tc_available(x.device)
    if tc_ok and tc.unsupported(cw.pattern, x.dtype, cw.in_features) is None and rng.random() < 0.5:
        kw["sparse_tc"] = tc.pack_sparse_tc(cw)
        kw["sparse_tc_min_tokens"] = rng.choice([1, 33, 256, None])
        lo = rng.randint(1, tc.DECODE_MAX_TOKENS)
        kw["sparse_tc_decode_tokens"] = (lo, rng.randint(lo, tc.DECODE_MAX_TOKENS))
    case.config = ",".join(f"{k}={v if isinstance(v, (int, tuple, type(None))) else 'held'}" for k, v in kw.items())
    y = vnm_linear(x, cw, bias, **kw)
    return y


def _poison_allocator(shape: tuple[int, int], dtype, device) -> None:
    """Leave a freed block of this size full of NaN, so an output the op allocates next (the caching allocator
    hands the block back) shows elements its kernel did not write."""
    del_me = torch.full(shape, float("nan"), dtype=dtype, device=device)
    del del_me


def _run_compressed(rng, x, w, mask, in_perm, out_perm, bias, case):
    """vnm::compressed_linear (what compressed models and permuted layers run: the measured choice between the
    sparse kernels and cuBLAS on a rebuilt or held dense weight) on the weight in a random layout: rows, the
    sparse-TC packing (full or compact records) or that packing with the input permutation folded into its
    columns; a random row_index (the output permutation in the store) or held dense weights (one or two
    members). Returns (y, x as passed, the dense weight y comes from, the bias as passed)."""
    from vnm_compile.kernels import compressed as C
    from vnm_compile.kernels import sparse_tc as tc
    from vnm_compile.masks import block_rows
    from vnm_compile.passes.store_permutations import folded_columns

    out_f, in_f = w.shape
    p = VNMPattern.parse(case.pattern)
    ip = in_perm if in_perm is not None else torch.arange(in_f)
    op = out_perm if out_perm is not None else torch.arange(out_f)
    ip, op = ip.to(w.device), op.to(w.device)
    # the weight in the coordinates in which it obeys the pattern (stored rows op, stored columns ip)
    local = VNMWeight.from_dense(w[op][:, ip], mask[op][:, ip], p)
    layouts = ["rows"]
    if tc.unsupported(p, w.dtype, in_f) is None:
        layouts += ["tc", "tc-compact", "tc-folded"]
    layout = rng.choice(layouts)
    spec = C.CompressedSpec(C.LAYOUT_ROWS, block_rows(p), p.n, p.m, out_f)
    if layout == "rows":
        tensors = [local.values, local.columns, local.meta]
    else:
        packed = tc.pack_sparse_tc(local, compact=layout == "tc-compact" or rng.random() < 0.5 and layout != "tc")
        tensors = [packed.records, packed.columns]
        spec = spec._replace(layout=C.LAYOUT_TC if layout == "tc" else C.LAYOUT_TC_COMPACT)
        if layout == "tc-folded":
            tensors[1] = folded_columns(packed.columns, ip)
            spec = spec._replace(layout=C.LAYOUT_TC_FOLDED)
    stored = w * mask
    # x as the op reads it: the input permutation applied, except where it is folded into the columns
    x_in, dense = (x, stored) if layout == "tc-folded" else (x[:, ip], stored[:, ip])
    held = None
    if out_perm is not None and rng.random() < 0.7:  # each stored row written at its output row
        stored_rows = tensors[0].shape[0] * (1 if layout == "rows" else 64)  # padded to whole V (TC: 64-row) blocks
        rows = torch.full((stored_rows,), -1, dtype=torch.int32, device=w.device)
        rows[:out_f] = op.to(torch.int32)
        tensors.append(rows)
        bias_in = bias
    else:  # y in stored order
        dense = dense[op]
        bias_in = None if bias is None else bias[op]
        if rng.random() < 0.4:  # the layer's own dense weights for the dense path (fused siblings: two)
            cut = rng.randint(1, out_f - 1) if out_f > 1 and rng.random() < 0.5 else out_f
            held = [dense[:cut], dense[cut:]] if cut < out_f else [dense]
    case.config = (
        f"layout={layout},row_index={len(tensors) > 2 + (layout == 'rows')},held={held is not None and len(held)}"
    )
    _poison_allocator((x.shape[0], out_f), x.dtype, x.device)
    y = C.OP(x_in, tensors, list(spec), bias_in, held)
    return y, x_in, dense, bias_in


def _paths(device: torch.device, interpret: bool) -> list[str]:
    paths = ["triton", "triton+expanded", "triton+interleaved", "compressed_linear"]
    if interpret:
        return paths + ["vnm_linear"]
    from vnm_compile.kernels import sparse_tc as tc

    paths.append("vnm_linear")
    if tc.sparse_tc_available(device):
        paths += ["mma.sp decode", "mma.sp gather", "mma.sp dense"]
        if tc.wgmma_available(device):
            paths.append("wgmma.sp")
    return paths


def _one_case(i: int, rng: random.Random, path: str, device, interpret: bool) -> Case:
    tc_path = path.startswith(("mma", "wgmma"))
    shape_cap = 96 if interpret else (4096 if rng.random() < 0.15 else 1536)
    token_cap = 40 if interpret else 8192
    # (compressed_linear: mostly V the sparse-TC layouts hold, so that they get most of its cases)
    v = (
        rng.choice([64, 128])
        if tc_path or (path == "compressed_linear" and rng.random() < 0.7)
        else rng.choice([16, 32, 64, 128])
    )
    m = rng.choice([4, 5, 6, 7, 8, 9, 12, 16])
    p = VNMPattern(v, 2, m)
    if path == "triton+interleaved" and p.is_nm:
        p = VNMPattern(v, 2, 5)
    dtypes = [torch.float16, torch.bfloat16] + ([torch.float32] if path.startswith(("triton", "compressed")) else [])
    dtype = rng.choice(dtypes)
    out_f, in_f = _size(rng, shape_cap), _size(rng, shape_cap)
    tokens = _tokens(rng, tc_path_tokens(path, token_cap))
    if tc_path and path != "mma.sp decode":
        tokens = max(tokens, 33)  # the dispatcher runs the sparse-tensor-core GEMMs above the decode kernel's 32
    if path == "mma.sp dense" and m > 8:
        m, p = 8, VNMPattern(v, 2, 8)
    perms = (rng.random() < 0.5, rng.random() < 0.5)
    if path == "mma.sp dense":
        perms = (False, perms[1])  # the dense kernel's x^T rows: kept columns of a group stay in its span
    has_bias = rng.random() < 0.5
    case = Case(i, path, str(p), out_f, in_f, tokens, str(dtype).removeprefix("torch."), has_bias, *perms)
    cw, w, mask, in_perm, out_perm = _masked(rng, out_f, in_f, p, dtype, device, perms)
    g = torch.Generator(device="cpu").manual_seed(rng.randrange(2**31))
    x = torch.randn(tokens, in_f, generator=g).to(dtype).to(device)
    bias = torch.randn(out_f, generator=g).to(dtype).to(device) if has_bias else None
    dense = None
    try:
        if path == "compressed_linear":
            y, x, dense, bias = _run_compressed(rng, x, w, mask, in_perm, out_perm, bias, case)
        elif path.startswith("triton"):
            layout = path.partition("+")[2]
            y = _run_triton(rng, x, cw, bias, case, layout)
        elif path == "vnm_linear":
            y = _run_public(rng, x, cw, bias, case)
        else:
            kind = {"mma.sp decode": "decode", "mma.sp gather": "gather", "mma.sp dense": "dense"}.get(path, "wgmma")
            y = _run_sparse_tc(rng, x, cw, bias, case, kind)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        _check(y, x, cw.to_dense() if dense is None else dense, bias, case)
    except Exception as e:  # noqa: BLE001  (a crash is a failure of the case, recorded with its traceback)
        case.ok, case.note = False, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"
    return case


def tc_path_tokens(path: str, cap: int) -> int:
    """Token cap of a path: the decode kernel takes up to 32 rows (tc.DECODE_MAX_TOKENS)."""
    return min(cap, 32) if path == "mma.sp decode" else cap


# ------------------------------------------------------------------------------------ streams
def _stream_runners(cw: VNMWeight, bias, device) -> list:
    """(name, fn(x, y)) of the split-K launches raced on two streams."""
    from vnm_compile.kernels import sparse_tc as tc

    runners = []
    if tc.sparse_tc_available(device):
        pw = tc.pack_sparse_tc(cw)
        cfg = {"KERNEL": "decode", "DW": 4, "DU": 1, "CTAS_PER_SM": 8, "XS": 2}  # CL=0: split-K in global memory

        def decode(x, y):
            tc.launch_decode(x, pw, y, bias, cfg)

        runners.append(("mma.sp decode CL=0", decode))
    kcfg = vnm_triton.KernelConfig("dot", 16, 32, 16, num_warps=4, split_k=4)

    def dot(x, y):
        vnm_triton.vnm_linear_triton(
            x, cw.values, cw.columns, cw.meta, cw.row_index, bias, cw.block_rows, 2, cw.pattern.m, cw.out_features,
            out=y, config=kcfg,
        )  # fmt: skip

    runners.append(("triton dot split_k=4", dot))
    return runners


def run_streams(device, seconds: float, iters: int = 200) -> dict:
    """The same layer on two CUDA streams at once: mma.sp decode (global-memory split-K, CL=0) and the
    Triton split-K dot kernel. Returns counts and the worst error ratio; any bad result is a failure."""
    from vnm_compile.kernels import sparse_tc as tc

    out = {"runs": 0, "failures": 0, "worst_ratio": 0.0, "notes": []}
    rng = random.Random(1234)
    layers = [(128, 4096, VNMPattern(64, 2, 8)), (192, 8191, VNMPattern(64, 2, 5)), (64, 2048, VNMPattern(128, 2, 8))]
    deadline = time.monotonic() + seconds
    for dtype in (torch.float16, torch.bfloat16):
        for out_f, in_f, p in layers:
            cw = _weight(rng, out_f, in_f, p, dtype, device, (False, True))
            bias = torch.randn(out_f, device=device).to(dtype)
            runners = _stream_runners(cw, bias, device)
            for name, fn in runners:
                if time.monotonic() > deadline:
                    out["notes"].append("time budget reached")
                    return out
                streams = [torch.cuda.Stream(device), torch.cuda.Stream(device)]
                xs = [torch.randn(rng.choice([1, 4, 8, 16]), in_f, device=device).to(dtype) for _ in streams]
                ys = [[_poisoned(x.shape[0], out_f, dtype, device) for _ in range(iters)] for x in xs]
                with torch.cuda.device(device):
                    if tc.sparse_tc_available(device):
                        tc._check_device(device)
                    fn(xs[0], ys[0][0])  # compile / warm up outside the race
                    torch.cuda.synchronize(device)
                    for s in streams:
                        s.wait_stream(torch.cuda.current_stream(device))
                    for it in range(iters):
                        for s, x, yy in zip(streams, xs, ys, strict=True):
                            with torch.cuda.stream(s):
                                fn(x, yy[it])
                    torch.cuda.synchronize(device)
                for x, yy in zip(xs, ys, strict=True):
                    for y in yy:
                        case = Case(0, name, str(p), out_f, in_f, x.shape[0], str(dtype), True, False, True)
                        _check(y, x, cw.to_dense(), bias, case)
                        out["runs"] += 1
                        out["worst_ratio"] = max(out["worst_ratio"], case.err / case.tol if case.tol else 0.0)
                        if not case.ok:
                            out["failures"] += 1
                            if len(out["notes"]) < 10:
                                out["notes"].append(asdict(case))
    return out


# ------------------------------------------------------------------------------ dynamic shapes
def run_dynamic(device, seconds: float, calls: int, token_cap: int) -> dict:
    """One torch.compile(backend="vnm", dynamic=True) model called at random token counts."""
    import torch._dynamo
    from torch import nn

    from vnm_compile import VNMConfig, backend, sparsify_

    torch.manual_seed(5)
    d, f = (256, 512) if device.type == "cpu" else (1024, 2816)
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    model = nn.Sequential(nn.Linear(d, f), nn.GELU(), nn.Linear(f, d)).to(device, dtype).eval()
    sparsify_(model, VNMConfig("64:2:8", score="abs", permute=True, min_numel=0), progress=False)
    torch._dynamo.reset()
    backend.clear_reports()
    vnm_triton.clear_autotune_cache()
    torch._dynamo.utils.counters.clear()
    options = {"force_sparse": True} if device.type != "cuda" else {}
    compiled = torch.compile(model, backend="vnm", dynamic=True, options=options)
    rng = random.Random(99)
    out = {"calls": 0, "failures": 0, "worst_ratio": 0.0, "graphs": 0, "notes": []}
    mem = []
    deadline = time.monotonic() + seconds
    with torch.no_grad():
        for i in range(calls):
            if time.monotonic() > deadline:
                out["notes"].append(f"time budget reached after {i} calls")
                break
            t = _tokens(rng, token_cap)
            x = torch.randn(t, d, device=device, dtype=dtype)
            y = compiled(x)
            out["calls"] += 1
            if i % 25 == 0 or t <= 2:
                ref = model(x)
                err = float((y.double() - ref.double()).abs().max())
                tol = 4 * EPS[dtype] * float(ref.abs().max()) + 1e-3
                out["worst_ratio"] = max(out["worst_ratio"], err / tol)
                if not (err <= tol) or not bool(torch.isfinite(y).all()):
                    out["failures"] += 1
                    out["notes"].append(f"call {i}: {t} tokens, error {err:.3g} > {tol:.3g}")
            if device.type == "cuda" and i % 50 == 0:
                mem.append(torch.cuda.memory_allocated(device))
    graphs = len(backend.reports())
    frames = dict(torch._dynamo.utils.counters["stats"])
    out["graphs"] = graphs
    out["dynamo_stats"] = {k: int(v) for k, v in frames.items()}
    out["autotune_entries"] = len(vnm_triton.autotune_cache())
    # a dynamic graph, plus at most one specialised for a single token (Dynamo specialises size 1)
    if graphs > 2:
        out["failures"] += 1
        out["notes"].append(f"{graphs} graphs compiled (recompiles past the first dynamic one)")
    if mem:
        warm = mem[min(len(mem) - 1, 4)]
        out["memory_mib"] = {"after_warmup": warm / 2**20, "last": mem[-1] / 2**20, "max": max(mem) / 2**20}
        if mem[-1] > warm + 256 * 2**20:
            out["failures"] += 1
            out["notes"].append(f"GPU memory grew from {warm / 2**20:.0f} to {mem[-1] / 2**20:.0f} MiB")
    if out["autotune_entries"] > 200:
        out["failures"] += 1
        out["notes"].append(f"autotune cache holds {out['autotune_entries']} entries (unbounded?)")
    return out


# ------------------------------------------------------------------------------------ reports
def write(summary: Summary, out_dir: Path, command: str) -> None:
    data = asdict(summary) | {"command": command}
    lines = [
        "# Kernel fuzz (tools/fuzz_kernels.py)",
        "",
        f"Command: `{command}`",
        "",
        f"Device: {summary.device}; torch {summary.torch}, triton {summary.triton}; {summary.seconds:.0f} s.",
        "",
        f"**{summary.cases} random cases, {summary.failures} mismatches.**",
        "",
        "| path | cases | failures | worst error / tolerance | tokens | shapes (out x in) |",
        "|---|---:|---:|---:|---|---|",
    ]
    for path, s in sorted(summary.by_path.items()):
        lines.append(
            f"| {path} | {s['cases']} | {s['failures']} | {s['worst_ratio']:.3f} | {s['tokens'][0]}-{s['tokens'][1]} "
            f"| up to {s['max_out']} x {s['max_in']} |"
        )
    st = summary.streams
    if st:
        lines += ["", f"Two CUDA streams, same layer: {st.get('runs', 0)} results, {st.get('failures', 0)} bad, "
                  f"worst error / tolerance {st.get('worst_ratio', 0):.3f}."]  # fmt: skip
    dy = summary.dynamic
    if dy:
        lines += [
            "",
            f"Dynamic shapes (one torch.compile(backend='vnm', dynamic=True) model): {dy.get('calls', 0)} calls, "
            f"{dy.get('graphs', 0)} graphs compiled, {dy.get('failures', 0)} failures, worst error / tolerance "
            f"{dy.get('worst_ratio', 0):.3f}, autotune cache {dy.get('autotune_entries', 0)} entries"
            + (f", memory {dy['memory_mib']}" if "memory_mib" in dy else "")
            + ".",
        ]
        lines += [f"- {n}" for n in dy.get("notes", [])[:10]]
    if summary.failed_cases:
        lines += ["", "## Failures (first 20)", ""]
        for c in summary.failed_cases[:20]:
            lines.append(f"- `{json.dumps({k: c[k] for k in c if k != 'note'})}` {c['note'][:300]}")
    save_results(out_dir, "fuzz_kernels", data, "\n".join(lines) + "\n", echo=False)


def _case_rng(seed: int, i: int) -> random.Random:
    """Case i's own random stream: a case is reproduced from (seed, i) alone, whichever worker ran it."""
    return random.Random(seed * 1_000_003 + i)


def _run_cases(seed: int, indices: list[int], deadline: float, device: str, interpret: bool) -> list[Case]:
    """The cases ``indices`` (in order) until the wall-clock ``deadline`` (time.time())."""
    device = torch.device(device)
    paths = _paths(device, interpret)
    done = []
    for i in indices:
        if time.time() > deadline:
            break
        done.append(_one_case(i, _case_rng(seed, i), paths[i % len(paths)], device, interpret))
    return done


def _cases(seed: int, n: int, deadline: float, device: torch.device, interpret: bool, jobs: int):
    """Cases 0..n-1 run in this process (jobs 1) or split over ``jobs`` worker processes (case i on worker
    i mod jobs; each compiles its own kernels, so compile-bound runs go that many times faster)."""
    if jobs <= 1:
        yield from _run_cases(seed, list(range(n)), deadline, str(device), interpret)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn (CUDA cannot be forked); a worker that dies raises BrokenProcessPool here instead of hanging
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = [list(range(k, n, jobs)) for k in range(jobs)]
        futures = [pool.submit(_run_cases, seed, part, deadline, str(device), interpret) for part in parts]
        for f in futures:
            yield from f.result()


def _tally(summary: Summary, case: Case) -> None:
    summary.cases += 1
    s = summary.by_path.setdefault(
        case.path, {"cases": 0, "failures": 0, "worst_ratio": 0.0, "tokens": [10**9, 0], "max_out": 0, "max_in": 0}
    )
    s["cases"] += 1
    s["tokens"] = [min(s["tokens"][0], case.tokens), max(s["tokens"][1], case.tokens)]
    s["max_out"], s["max_in"] = max(s["max_out"], case.out_features), max(s["max_in"], case.in_features)
    if case.tol:
        s["worst_ratio"] = max(s["worst_ratio"], case.err / case.tol)
    if not case.ok:
        s["failures"] += 1
        summary.failures += 1
        summary.failed_cases.append(asdict(case))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory for fuzz_kernels.json and fuzz_kernels.md")
    ap.add_argument("--cases", type=int, default=None, help="random cases (default 1000; --quick 60)")
    ap.add_argument("--seconds", type=float, default=300.0, help="total time budget (default 300)")
    ap.add_argument("--quick", action="store_true", help="few cases, short stream and dynamic runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1,
                    help="worker processes for the random cases (compiles dominate: 8 on a 16-core GPU host)")  # fmt: skip
    ap.add_argument("--dynamic-calls", type=int, default=None, help="calls of the dynamic run (default 3000)")
    args = ap.parse_args(argv)

    interpret = vnm_triton.interpret_mode()
    device = torch.device("cuda" if torch.cuda.is_available() and not interpret else "cpu")
    if device.type == "cpu" and not interpret:
        print("no CUDA device: run with TRITON_INTERPRET=1 to check the harness on the CPU", file=sys.stderr)
        return 2
    if args.jobs < 1:
        ap.error(f"--jobs must be at least 1, got {args.jobs}")
    n_cases = args.cases if args.cases is not None else (60 if args.quick else 1000)
    dyn_calls = args.dynamic_calls if args.dynamic_calls is not None else (200 if args.quick else 3000)
    if interpret:
        dyn_calls = min(dyn_calls, 12)
    if device.type == "cuda":
        os.environ.setdefault("VNM_AUTOTUNE", "1")
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor()}, interpreter)"
    summary = Summary(name, torch.__version__, triton.__version__)
    start = time.monotonic()
    # budget: 70 % random cases, 10 % streams, 20 % dynamic shapes
    case_deadline = time.time() + 0.7 * args.seconds
    for i, case in enumerate(_cases(args.seed, n_cases, case_deadline, device, interpret, args.jobs)):
        _tally(summary, case)
        if not case.ok:
            print(f"MISMATCH {json.dumps(asdict(case))[:600]}", flush=True)
        if (i + 1) % 50 == 0:
            print(f"{i + 1} cases, {summary.failures} mismatches, {time.monotonic() - start:.0f} s", flush=True)
    if summary.cases < n_cases:
        print(f"time budget: {summary.cases} of {n_cases} cases ran", flush=True)
    left = args.seconds - (time.monotonic() - start)
    if device.type == "cuda":
        summary.streams = run_streams(device, max(5.0, left / 3), iters=50 if args.quick else 200)
        summary.failures += summary.streams["failures"]
    left = args.seconds - (time.monotonic() - start)
    summary.dynamic = run_dynamic(device, max(5.0, left), dyn_calls, 64 if interpret else 8192)
    summary.failures += summary.dynamic["failures"]
    summary.seconds = time.monotonic() - start
    command = "python tools/fuzz_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if interpret:
        command = "TRITON_INTERPRET=1 " + command
    write(summary, Path(args.out), command)
    print(Path(args.out, "fuzz_kernels.md").read_text())
    return 1 if summary.failures else 0


if __name__ == "__main__":
    sys.exit(main())
