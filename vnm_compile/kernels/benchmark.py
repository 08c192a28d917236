"""Linear-layer benchmark: dense cuBLAS vs cuSPARSELt 2:4 vs V:N:M (Triton), one run, CUDA graphs.

Every timing is the median over many replays of one CUDA graph that calls
the op once per weight copy; enough copies are made that the weights of one
replay exceed 3x the L2 cache, so decode numbers measure HBM streaming and
not the cache. Results: linear.json (all numbers + environment + command),
linear.md (tables, targets), linear.png (speed-up vs tokens), speedups.json
(pattern -> speed-up, read by select_pattern). Used by
benchmarks/bench_linear.py and ``vnm bench``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..format import VNMWeight
from ..masks import vnm_mask
from ..pattern import VNMPattern
from .cusparselt import CSLTLinear, cusparselt_available
from .dispatch import gpu_slug
from .sparse_tc import SparseTCWeight, pack_sparse_tc, sparse_tc_available, unsupported
from .vnm_linear import expand_weights, interleave_rows, vnm_linear
from .vnm_triton import autotune_cache

__all__ = [
    "GRIDS",
    "BenchGrid",
    "command_line",
    "custom_grid",
    "environment",
    "environment_line",
    "git_commit",
    "markdown_header",
    "run_benchmark",
    "save_results",
    "save_results_at",
    "versions",
    "write_results",
]

log = logging.getLogger(__name__)

# The model shapes every benchmark reads (benchmarks/ imports them from here): hidden, intermediate,
# attention heads, KV heads, vocab (Meta's configs).
LLAMA_SHAPES = {
    "llama2-7b": (4096, 11008, 32, 32, 32000),
    "llama2-13b": (5120, 13824, 40, 40, 32000),
    "llama2-70b": (8192, 28672, 64, 8, 32000),
    "llama3-8b": (4096, 14336, 32, 8, 128256),
}


def llama_linears(model: str = "llama2-7b") -> list[tuple[int, int, str]]:
    """(out, in, name) of the model's three linear shapes: q/o (and k/v without GQA), gate/up, down."""
    hidden, inter = LLAMA_SHAPES[model][:2]
    return [(hidden, hidden, f"{model} qkvo"), (inter, hidden, f"{model} gate/up"), (hidden, inter, f"{model} down")]


LLAMA2_7B = llama_linears("llama2-7b")
LLAMA2_13B = llama_linears("llama2-13b")
VIT = [
    (768, 768, "vit-b qkvo"), (3072, 768, "vit-b fc1"), (768, 3072, "vit-b fc2"),
    (1024, 1024, "vit-l qkvo"), (4096, 1024, "vit-l fc1"), (1024, 4096, "vit-l fc2"),
    (1280, 1280, "vit-h qkvo"), (5120, 1280, "vit-h fc1"), (1280, 5120, "vit-h fc2"),
]  # fmt: skip
SWEEP_PATTERNS = [f"{v}:2:{m}" for v in (16, 32, 64, 128) for m in (5, 6, 8, 10, 12, 16)]


@dataclass
class BenchGrid:
    """What to measure: (shapes x tokens x patterns) plus a (V, M) sweep at one shape."""

    shapes: list[tuple[int, int, str]]
    tokens: list[int]
    patterns: list[str]
    sweep_shape: tuple[int, int, str] | None = None
    sweep_tokens: list[int] = field(default_factory=list)
    sweep_patterns: list[str] = field(default_factory=list)
    extra_shapes: list[tuple[int, int, str]] = field(default_factory=list)
    extra_tokens: list[int] = field(default_factory=list)


GRIDS = {
    "quick": BenchGrid([LLAMA2_7B[0]], [1, 16, 2048], ["64:2:5", "64:2:8"]),
    "default": BenchGrid(
        LLAMA2_7B,
        [1, 16, 2048, 8192],
        ["64:2:5", "64:2:8", "64:2:16"],
        sweep_shape=LLAMA2_7B[0],
        sweep_tokens=[1, 16, 2048],
        sweep_patterns=SWEEP_PATTERNS,
        extra_shapes=LLAMA2_13B + VIT[2::3] + VIT[1::3],
        extra_tokens=[16, 2048],
    ),  # fmt: skip
    "full": BenchGrid(
        LLAMA2_7B + LLAMA2_13B + VIT,
        [1, 4, 16, 32, 128, 512, 2048, 8192],
        ["64:2:5", "64:2:8", "64:2:16"],
        sweep_shape=LLAMA2_7B[0],
        sweep_tokens=[1, 16, 2048, 8192],
        sweep_patterns=SWEEP_PATTERNS,
    ),  # fmt: skip
}

SHAPE_FAMILIES = {
    "llama2-7b": LLAMA2_7B, "llama2-13b": LLAMA2_13B, "vit-b": VIT[0:3], "vit-l": VIT[3:6], "vit-h": VIT[6:9],
}  # fmt: skip


def custom_grid(
    base: BenchGrid, shapes: Sequence[str] | None, tokens: Sequence[int] | None, patterns: Sequence[str] | None
) -> BenchGrid:
    """``base`` with its main shapes, tokens or patterns replaced (None keeps the grid's own) and, when any
    is replaced, no sweep and no extra shapes. A shape is a family name (SHAPE_FAMILIES: llama2-7b,
    vit-b, ...) or OUTxIN."""
    if shapes is None and tokens is None and patterns is None:
        return base
    picked: list[tuple[int, int, str]] = []
    for s in shapes or []:
        if s in SHAPE_FAMILIES:
            picked += SHAPE_FAMILIES[s]
            continue
        dims = s.lower().split("x")
        if len(dims) != 2 or not all(d.isdigit() and int(d) > 0 for d in dims):
            raise ValueError(f"shape {s!r}: expected OUTxIN (e.g. 4096x11008) or one of {sorted(SHAPE_FAMILIES)}")
        picked.append((int(dims[0]), int(dims[1]), s))
    if tokens is not None and (not tokens or min(tokens) < 1):
        raise ValueError(f"tokens must be positive counts, got {list(tokens)}")
    for p in patterns or []:
        VNMPattern.parse(p)  # raises a clear error for a malformed pattern
    return BenchGrid(picked or list(base.shapes), list(tokens or base.tokens), list(patterns or base.patterns))


# Issue 4 targets (H100, fp16, Llama-2-7B shapes): (tokens, pattern) -> minimum speed-up vs dense.
TARGETS = {
    (1, "64:2:8"): 2.8, (1, "64:2:5"): 1.8,
    (16, "64:2:8"): 2.4, (16, "64:2:5"): 1.6,
    (2048, "64:2:8"): 1.6, (2048, "64:2:16"): 2.8, (2048, "64:2:5"): 1.1,
    (8192, "64:2:8"): 1.6, (8192, "64:2:16"): 2.8, (8192, "64:2:5"): 1.1,
}  # fmt: skip


# --------------------------------------------------------------------------- timing
def _copies(bytes_per_call: int, device: torch.device, cap: int = 48) -> int:
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return max(1, min(cap, math.ceil(3 * l2 / max(bytes_per_call, 1))))


def time_graph(calls: Sequence[Callable[[], object]], replays: int = 30) -> float:
    """Median microseconds per call: one CUDA graph runs every call once; replayed ``replays`` times."""
    for c in calls:  # warm-up outside the capture (compiles, autotunes, cuSPARSELt search)
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls:  # one eager pass on the side stream, as torch.cuda.graphs recommends
            c()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    for s, e in zip(starts, ends, strict=True):
        s.record()
        graph.replay()
        e.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))
    del graph
    return 1000.0 * times[len(times) // 2] / len(calls)


def time_model_ms(fn: Callable[[], object], rep_ms: int = 200) -> float:
    """Median milliseconds of one call of a whole-model step (decode step, prefill, forward): ``fn``
    captured in a CUDA graph and replayed for about ``rep_ms`` ms (``triton.testing.do_bench_cudagraph``).
    Call ``fn`` once before (compile, autotune). Per-kernel timings use time_graph."""
    import triton

    return triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")


def measure_bandwidth(device: torch.device) -> float:
    """HBM bandwidth (bytes/s, read + write) of a large device-to-device copy."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    src.random_()
    us = time_graph([lambda dst=dst, src=src: dst.copy_(src)], replays=10)
    return 2 * (1 << 30) / (us * 1e-6)


@functools.lru_cache(maxsize=1)
def _read_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def read_words(src, out, n, BLOCK: tl.constexpr, STEPS: tl.constexpr):
        """Program p sums the int32 words [p * STEPS * BLOCK, (p + 1) * STEPS * BLOCK) of src: STEPS loads in
        flight per thread, nothing else."""
        base = tl.program_id(0).to(tl.int64) * (STEPS * BLOCK)
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        for s in tl.static_range(STEPS):
            offs = base + s * BLOCK + tl.arange(0, BLOCK)
            acc += tl.load(src + offs, mask=offs < n, other=0)
        tl.store(out + tl.program_id(0), tl.sum(acc, axis=0))

    return read_words


# (BLOCK words, STEPS, num_warps) of the read-only kernel that read_floor_us times
READ_CONFIGS = [(b, s, w) for b in (512, 1024, 2048) for s in (1, 2, 4, 8) for w in (4, 8)]


def read_words(src: torch.Tensor, block: int = 1024, steps: int = 4, num_warps: int = 4) -> torch.Tensor:
    """Per-program sums of the int32 words of ``src`` (1-D, contiguous), each word read once: the read-only
    kernel behind :func:`read_floor_us`."""
    if src.dtype != torch.int32 or src.dim() != 1 or not src.is_contiguous():
        raise ValueError(f"read_words takes a contiguous 1-D int32 tensor, got {src.dtype} {tuple(src.shape)}")
    grid = max(1, -(-src.numel() // (block * steps)))
    out = torch.empty(grid, dtype=torch.int32, device=src.device)
    _read_kernel()[(grid,)](src, out, src.numel(), BLOCK=block, STEPS=steps, num_warps=num_warps)
    return out


def read_floor_us(nbytes: int, device: torch.device) -> tuple[float, str]:
    """Microseconds to only read ``nbytes`` from HBM in one launch, and the config: the best of READ_CONFIGS
    for a read-only Triton kernel, timed as everything here (CUDA graphs, copies rotated past 3x L2). A
    memory-bound kernel's floor at that size, launch, ramp and tail included (which a bandwidth figure
    leaves out: at a few MB they are most of the time)."""
    words = max(1, -(-nbytes // 4))
    copies = [torch.randint(0, 8, (words,), dtype=torch.int32, device=device) for _ in range(_copies(nbytes, device))]
    times = {
        cfg: time_graph([lambda c=c, cfg=cfg: read_words(c, *cfg) for c in copies]) for cfg in READ_CONFIGS
    }  # fmt: skip
    best = min(times, key=times.get)
    return times[best], "BLOCK={} STEPS={} num_warps={}".format(*best)


# --------------------------------------------------------------------------- weights
# The versions the model-level results keep under "versions" (their markdown prints them): a subset of environment().
VERSION_KEYS = ("torch", "triton", "transformers", "cuda", "python")


def versions(env: dict) -> dict:
    """The VERSION_KEYS of ``env`` (an environment()) that it has."""
    return {k: env[k] for k in VERSION_KEYS if k in env}


def environment(device: torch.device | str | None = None, dtype: torch.dtype | None = None, program: str = "") -> dict:
    """The header every benchmark result records: what ran it (GPU or "cpu", versions, machine, CPUs,
    threads, load average), the commit, the date and the command line.

    Args:
        device: the device timed; None: the current CUDA device if there is one, else the CPU.
        dtype: recorded as "dtype" when given.
        program: what ran the script, in front of its command line (``"python "``, ``"torchrun ... "``).

    Returns:
        gpu (name, or "cpu"), gpu_slug (CUDA only), torch, triton, transformers (when importable), cuda,
        python, machine, cpus, threads, load_average (1, 5, 15 minutes; where the OS has one), commit
        (git_commit()), date_utc (when this is called: a script that runs long may overwrite it at its end),
        command (command_line(program)), dtype (when given).
    """
    import triton

    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    env: dict = {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    if device.type == "cuda":
        env["gpu_slug"] = gpu_slug(device)
    env.update(torch=torch.__version__, triton=triton.__version__)
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:  # an optional dependency: the model-level benchmarks need it, the kernel ones do not
        pass
    processor = platform.processor()
    env.update(
        cuda=torch.version.cuda,
        python=platform.python_version(),
        machine=", ".join(dict.fromkeys(x for x in (platform.machine(), processor) if x)),
        # the CPUs this process may run on (a container or taskset may allow fewer than the machine has)
        cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        threads=torch.get_num_threads(),
    )
    if hasattr(os, "getloadavg"):  # not on Windows
        env["load_average"] = [round(x, 2) for x in os.getloadavg()]
    env.update(
        commit=git_commit(), date_utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), command=command_line(program)
    )
    if dtype is not None:
        env["dtype"] = str(dtype).replace("torch.", "")
    return env


def environment_line(env: dict) -> str:
    """An environment() as the one line a result's markdown prints: what ran it (GPU or CPU only, machine,
    CPUs, threads, load average), the versions (VERSION_KEYS), the commit and the date."""
    ran = "CPU only" if env["gpu"] == "cpu" else env["gpu"]
    load = f", load average {env['load_average'][0]:.1f}" if env.get("load_average") else ""
    known = ", ".join(f"{k} {v}" for k, v in versions(env).items() if v is not None)  # no CUDA on a CPU build
    return (
        f"{ran}; {env['machine']}, {env['cpus']} CPUs, {env['threads']} threads{load}; {known}; "
        f"commit {env['commit']}, {env['date_utc']} UTC"
    )


def markdown_header(title: str, env: dict) -> str:
    """The top of a result's markdown, as paragraphs: ``# title``, the command, the environment_line."""
    return f"# {title}\n\nCommand: `{env['command']}`\n\nMachine: {environment_line(env)}\n"


def git_commit(path: str | Path | None = None) -> str:
    """Short hash of the git commit checked out at ``path`` (default: the source tree this package runs
    from, which is the benchmarks' repository), plus " (with uncommitted changes)" when tracked files differ
    from it; "unknown" when git or the repository is missing (nothing printed)."""
    path = Path(path) if path is not None else Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            run = subprocess.run(
                ["git", "-C", str(path), *args], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30
            )
        except (OSError, subprocess.SubprocessError):  # no git, path gone, git hangs
            return None
        return run.stdout.strip() if run.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return commit + (" (with uncommitted changes)" if dirty else "")


_COMMAND_ENV = ("VNM_AUTOTUNE", "VNM_BENCH_RESULTS", "TRITON_INTERPRET")


def command_line(program: str = "") -> str:
    """This process's command line as a benchmark records it, with the settings that change what runs in
    front (VNM_AUTOTUNE=0: the Triton kernels' first candidate config instead of the autotuned one)."""
    env = [f"{k}={os.environ[k]}" for k in _COMMAND_ENV if k in os.environ]
    return " ".join([*env, program + shlex.join(sys.argv)])


def save_results(
    out_dir: Path, stem: str, result: dict | list, markdown: str | None = None, echo: bool = True
) -> list[Path]:
    """Write a benchmark's result: ``stem``.json (``json.dumps(result, indent=1)``, the format of every file
    under benchmarks/results) and, when ``markdown`` is given, ``stem``.md; the folder is created.

    Args:
        echo: print ``markdown`` too (a script's stdout is its report); nothing is printed without markdown.

    Returns:
        The paths written: the JSON file, then the markdown file when there is one.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json"]
    # default=str: a value JSON cannot hold (a dtype, a device) is written as its string rather than losing a
    # long run's numbers; everything JSON can hold is written as before
    paths[0].write_text(json.dumps(result, indent=1, default=str))
    if markdown is not None:
        paths.append(out_dir / f"{stem}.md")
        paths[1].write_text(markdown)
        if echo:
            print(markdown)
    return paths


def save_results_at(
    path: str | Path, result: dict | list, markdown: str | None = None, echo: bool = True
) -> list[Path]:
    """save_results for a result named by a file path (a script's ``--out FILE.md`` or ``--json FILE.json``):
    ``path``'s folder and its name without the suffix, so FILE.json (and FILE.md) are written."""
    path = Path(path)
    return save_results(path.parent, path.stem, result, markdown, echo)


def _random_vnm(weight: torch.Tensor, pattern: VNMPattern) -> tuple[VNMWeight, torch.Tensor]:
    mask = vnm_mask(weight.abs().float(), pattern)
    return VNMWeight.from_dense(weight, mask, pattern), mask


PERMUTE_MODES = ("none", "random", "calibrated")


def _permutations(weight: torch.Tensor, pattern: VNMPattern, mode: str, seed: int) -> tuple:
    """(in_perm, out_perm, search seconds) for ``mode``: "none" (None, None), "random" (random permutations,
    as scattered as what a search returns), "calibrated" (the permutation search on |W|, timed)."""
    if mode == "none" or pattern.is_nm:
        return None, None, 0.0
    rows, cols = weight.shape
    if mode == "random":
        gen = torch.Generator().manual_seed(seed)
        return torch.randperm(cols, generator=gen), torch.randperm(rows, generator=gen), 0.0
    from ..calibration.permutation import find_permutation

    start = time.perf_counter()
    in_perm, out_perm = find_permutation(weight.abs().float(), pattern)
    return in_perm.cpu(), out_perm.cpu(), time.perf_counter() - start


def _clone_vnm(w: VNMWeight) -> VNMWeight:
    return VNMWeight(
        w.values.clone(), w.columns.clone(), w.meta.clone(),
        None if w.row_index is None else w.row_index.clone(), w.pattern, w.shape,
    )  # fmt: skip


def _time_case(
    out_f: int,
    in_f: int,
    tokens: int,
    patterns: Sequence[str],
    device,
    dtype,
    with_cslt: bool,
    with_held: bool,
    permute: str = "none",
) -> dict:
    """One (shape, tokens) row: dense, cuSPARSELt 2:4 and every pattern (``with_held``: also with the layout an
    option holds: the row-interleaved copy at 1-4 tokens, the expanded weights above).

    ``permute`` "random" / "calibrated": each pattern's mask is chosen inside input and output permutations
    (PERMUTE_MODES) and the weight held in the coordinates in which it obeys the pattern, as the backend's
    default (permutations="index") and VNMLinear hold it; "vnm_us" times the op on it, "vnm_index_us" the op
    with its two index ops around it as separate launches (the compiled model fuses them into neighbouring
    ops: an upper bound), "search_s" the permutation search."""
    gen = torch.Generator(device=device).manual_seed(out_f * 7 + in_f * 13 + tokens)
    weight = torch.randn(out_f, in_f, device=device, dtype=dtype, generator=gen) / math.sqrt(in_f)
    x = torch.randn(tokens, in_f, device=device, dtype=dtype, generator=gen)
    rec: dict = {
        "out_features": out_f, "in_features": in_f, "tokens": tokens, "vnm_us": {}, "vnm_bytes": {},
        "vnm_expanded_us": {}, "vnm_interleaved_us": {}, "vnm_tc_us": {}, "permute": permute,
        "vnm_index_us": {}, "search_s": {},
    }  # fmt: skip

    dense_bytes = weight.numel() * weight.element_size()
    ws = [weight] + [weight.clone() for _ in range(_copies(dense_bytes, device) - 1)]
    rec["dense_us"] = time_graph([lambda w=w: F.linear(x, w) for w in ws])
    rec["dense_bytes"] = dense_bytes
    del ws

    rec["cslt_us"] = None
    if with_cslt:
        try:
            w24, _ = _random_vnm(weight, VNMPattern.parse("2:4"))
            c = CSLTLinear(w24.to_dense())
            x_fm = x.t().contiguous()  # cuSPARSELt's fast layout: feature-major activations
            cs = [c] + [CSLTLinear(w24.to_dense()) for _ in range(_copies(dense_bytes * 9 // 16, device, cap=8) - 1)]
            rec["cslt_us"] = time_graph([lambda c=c: c.feature_major(x_fm) for c in cs])
            del cs
        except RuntimeError as err:  # e.g. cuSPARSELt refuses 1 token
            log.info("cuSPARSELt %dx%d, %d tokens: %s", out_f, in_f, tokens, str(err).splitlines()[0])

    for p in patterns:
        in_perm, out_perm, rec["search_s"][p] = _permutations(weight, VNMPattern.parse(p), permute, out_f + in_f)
        held = weight if in_perm is None else weight[out_perm.to(device)][:, in_perm.to(device)]
        w, mask = _random_vnm(held, VNMPattern.parse(p))
        y = vnm_linear(x, w)
        ref = F.linear(x.float(), (held * mask).float())
        rel = ((y.float() - ref).norm() / ref.norm()).item()
        if not rel < 2e-2:
            raise RuntimeError(f"V:N:M {p} {out_f}x{in_f} {tokens} tokens: relative error {rel:.3g}")
        copies = [w] + [_clone_vnm(w) for _ in range(_copies(w.nbytes, device) - 1)]
        rec["vnm_us"][p] = time_graph([lambda w=w: vnm_linear(x, w) for w in copies])
        rec["vnm_bytes"][p] = w.nbytes
        if in_perm is not None:  # x[..., in_perm] -> op -> y[..., out_perm^-1], three launches
            i_p, o_p = in_perm.to(device), out_perm.to(device)
            o_inv = torch.argsort(o_p)
            original = torch.empty_like(held)  # the masked weight in original coordinates
            original[o_p.unsqueeze(1), i_p.unsqueeze(0)] = held * mask
            y_orig = vnm_linear(x.index_select(-1, i_p), w).index_select(-1, o_inv)
            ref_orig = F.linear(x.float(), original.float())
            rel = ((y_orig.float() - ref_orig).norm() / ref_orig.norm()).item()
            if not rel < 2e-2:
                raise RuntimeError(f"V:N:M {p} {out_f}x{in_f} {tokens} tokens, permuted: relative error {rel:.3g}")
            rec["vnm_index_us"][p] = time_graph(
                [lambda w=w, i=i_p, o=o_inv: vnm_linear(x.index_select(-1, i), w).index_select(-1, o) for w in copies]
            )
        del copies
        if not with_held or w.pattern.n != 2:
            continue
        if tokens <= 4 and w.block_rows % 4 == 0:  # the row-interleaved copy (interleave_rows option)
            rec["vnm_interleaved_us"][p] = _time_held(x, w, ref, "interleaved", lambda c: interleave_rows(c))
        elif tokens > 1:  # the expanded weights (expand_weights option)
            rec["vnm_expanded_us"][p] = _time_held(x, w, ref, "expanded", lambda c: expand_weights(c, x.dtype))
        if unsupported(w.pattern, w.dtype, w.in_features) is None and sparse_tc_available():
            # the sparse tensor cores (sparse_tensor_cores option; dispatch.tc_token_floor and
            # tc_decode_window read these): the decode kernel up to sparse_tc.DECODE_MAX_TOKENS, the GEMM above
            rec["vnm_tc_us"][p] = _time_held(x, w, ref, "sparse_tc", pack_sparse_tc)
    return rec


def _time_held(x: torch.Tensor, w: VNMWeight, ref: torch.Tensor, kind: str, make) -> float:
    """Microseconds per call of vnm_linear(x, w, <kind>=make(w)), checked against ``ref`` first."""
    held = make(w)
    rel = ((vnm_linear(x, w, **{kind: held}).float() - ref).norm() / ref.norm()).item()
    if not rel < 2e-2:
        raise RuntimeError(f"V:N:M {w.pattern} {kind} {tuple(w.shape)} {x.shape[0]} tokens: relative error {rel:.3g}")
    if isinstance(held, SparseTCWeight):
        held_bytes = held.nbytes
    else:
        held_bytes = sum(t.numel() * t.element_size() for t in (held if isinstance(held, tuple) else (held,)))
    n = _copies(w.nbytes + held_bytes, x.device)
    copies = [(w, held)] + [(c, make(c)) for c in (_clone_vnm(w) for _ in range(n - 1))]
    return time_graph([lambda w=w, h=h: vnm_linear(x, w, **{kind: h}) for w, h in copies])


# --------------------------------------------------------------------------- run
def run_benchmark(
    grid: BenchGrid,
    device: torch.device | str | None = None,
    dtype=torch.float16,
    progress: bool = True,
    checkpoint: Path | None = None,
    permute: str = "none",
) -> dict:
    """Measure the grid; returns the JSON-able results dict (also written to ``checkpoint`` after each case).
    ``permute``: how the V:N:M weights are permuted (PERMUTE_MODES, _time_case)."""
    if permute not in PERMUTE_MODES:
        raise ValueError(f"permute must be one of {PERMUTE_MODES}, got {permute!r}")
    from tqdm import tqdm

    device = torch.device(device or "cuda")
    with_cslt = cusparselt_available(device)
    cases = [(o, i, name, t, grid.patterns, "main") for (o, i, name) in grid.shapes for t in grid.tokens]
    if grid.sweep_shape is not None:
        o, i, name = grid.sweep_shape
        cases += [(o, i, name, t, grid.sweep_patterns, "sweep") for t in grid.sweep_tokens]
    cases += [(o, i, name, t, grid.patterns, "extra") for (o, i, name) in grid.extra_shapes for t in grid.extra_tokens]

    bw = measure_bandwidth(device)
    t_start = time.time()
    meta = {
        **environment(device, dtype),
        "measured_copy_bandwidth_GBps": bw / 1e9,
        "timing": "median of 30 CUDA-graph replays; each replay calls the op once per weight copy "
        "(copies > 3x L2) and the time is divided by the copies",
        "cslt_layout": "feature-major activations (in, tokens), algorithm searched per token count",
        "permute": permute,
    }
    records: list[dict] = []
    for o, i, name, t, pats, part in tqdm(cases, disable=not progress, desc="bench_linear"):
        rec = _time_case(o, i, t, pats, device, dtype, with_cslt and part != "sweep", part != "sweep", permute)
        rec.update(name=name, part=part)
        records.append(rec)
        log.info("%s %dx%d t=%d dense %.1fus %s", name, o, i, t, rec["dense_us"], rec["vnm_us"])
        torch.cuda.empty_cache()
        meta.update(seconds=time.time() - t_start, date_utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()))
        meta["autotune"] = {
            f"values {k[3]}x{k[4]} V={k[5]} tokens<={k[6]} {str(k[1]).replace('torch.', '')}"
            + (" expanded" if k[-2] else "")
            + (f" interleaved R={k[-1]}" if k[-1] else ""): str(c)
            for k, c in autotune_cache().items()
        }
        if checkpoint is not None:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            checkpoint.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    return {"meta": meta, "records": records}


def _speedups_for_sweep(results: dict) -> dict[str, float]:
    """pattern -> geometric mean speed-up over the sweep's token counts (what select_pattern reads)."""
    per: dict[str, list[float]] = {}
    for r in results["records"]:
        if r["part"] != "sweep":
            continue
        for p, us in r["vnm_us"].items():
            per.setdefault(p, []).append(r["dense_us"] / us)
    return {p: round(math.exp(sum(map(math.log, s)) / len(s)), 4) for p, s in per.items()}


def _held(rec: dict, pattern: str) -> tuple[float | None, str]:
    """(microseconds, layout name) of the held-layout timing of one record, or (None, "")."""
    for kind in ("interleaved", "expanded"):
        us = rec.get(f"vnm_{kind}_us", {}).get(pattern)
        if us:
            return us, kind
    return None, ""


def _met(speedups: list[float], target: float) -> str:
    """Two table cells: the speed-ups, and whether the smallest meets the target ("n/a |" without any)."""
    if not speedups:
        return "n/a | "
    return f"{', '.join(f'{g:.2f}x' for g in speedups)} | {'yes' if min(speedups) >= target else 'no'}"


def _md(results: dict) -> str:
    meta = results["meta"]
    bw = meta["measured_copy_bandwidth_GBps"] * 1e9
    lines = [
        f"# Linear-layer benchmark on {meta['gpu']}",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, {meta['dtype']}, {meta['date_utc']} UTC.",
        f"Command: `{meta['command']}`",
        f"Timing: {meta['timing']}. Measured copy bandwidth {bw / 1e9:.0f} GB/s (read + write).",
        f"cuSPARSELt 2:4: {meta['cslt_layout']}.",
        "",
        "Speed-up = dense cuBLAS time / time (same run). %floor (tokens <= 32) = compressed bytes at the measured",
        "copy bandwidth / time. %M/4 (tokens >= 512) = (dense time x 4/M) / time. Where the speed-up is < 1,",
        "vnm_compile.kernels.prefer_sparse answers False (nearest measured point) and the compiler keeps dense.",
        "",
        "Held layout: the same op with the layout a compiler option holds: at 1-4 tokens the row-interleaved copy",
        "of values and metadata (`interleave_rows`, the compressed bytes again; the decode kernel on it), from 2",
        "tokens up the expanded weights (`expand_weights`, 4/M of the dense bytes; the gather GEMM without its",
        "per-call rebuild).",
        "",
        "Sparse TC: the same op with the packing for the sparse tensor cores held (`sparse_tensor_cores`",
        "option, on by default on GPUs that run them; `kernels.sparse_tc`): up to 32 tokens the mma.sp decode",
        "kernel (x as it is, split over k), above them the GEMM on x^T, the transpose of x included (on Hopper",
        "the wgmma.sp kernel, elsewhere mma.sp; rows measured before that kernel existed hold the mma.sp GEMM:",
        "the command says which).",
        "",
        "| layer | out x in | tokens | dense us | 2:4 cuSPARSELt | pattern | V:N:M us | speed-up | % bound "
        "| held layout us | held speed-up | sparse TC us | TC speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["records"]:
        if r["part"] == "sweep":
            continue
        cs = f"{r['dense_us'] / r['cslt_us']:.2f}x" if r.get("cslt_us") else "n/a"
        for p, us in r["vnm_us"].items():
            pat = VNMPattern.parse(p)
            if r["tokens"] <= 32:
                io = (r["tokens"] * (r["in_features"] + r["out_features"])) * 2
                bound = f"{100 * (r['vnm_bytes'][p] + io) / bw * 1e6 / us:.0f}% floor"
            elif r["tokens"] >= 512:
                bound = f"{100 * r['dense_us'] * 4 / pat.m / us:.0f}% M/4"
            else:
                bound = ""
            ex, kind = _held(r, p)
            ex_cells = f"{ex:.1f} ({kind}) | {r['dense_us'] / ex:.2f}x" if ex else "n/a | n/a"
            tc = r.get("vnm_tc_us", {}).get(p)
            tc_cells = f"{tc:.1f} | {r['dense_us'] / tc:.2f}x" if tc else "n/a | n/a"
            lines.append(
                f"| {r['name']} | {r['out_features']}x{r['in_features']} | {r['tokens']} | {r['dense_us']:.1f} | {cs} "
                f"| {p} | {us:.1f} | {r['dense_us'] / us:.2f}x | {bound} | {ex_cells} | {tc_cells} |"
            )
    lines += [
        "",
        "## Targets (issue 4, Llama-2-7B shapes)",
        "",
        "| tokens | pattern | target | measured (per shape) | met | with the held layout | met "
        "| with the sparse TC | met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (t, p), tgt in TARGETS.items():
        rows = [
            r
            for r in results["records"]
            if r["part"] == "main" and r["tokens"] == t and p in r["vnm_us"] and r["name"].startswith("llama2-7b")
        ]
        got = [r["dense_us"] / r["vnm_us"][p] for r in rows]
        ex = [r["dense_us"] / _held(r, p)[0] for r in rows if _held(r, p)[0]]
        tc = [r["dense_us"] / r["vnm_tc_us"][p] for r in rows if r.get("vnm_tc_us", {}).get(p)]
        if got:
            lines.append(f"| {t} | {p} | {tgt}x | {_met(got, tgt)} | {_met(ex, tgt)} | {_met(tc, tgt)} |")
    m16 = [r for r in results["records"] if r["part"] == "main" and r["tokens"] == 16 and r.get("cslt_us")]
    if m16:
        lines += [
            "",
            "16 tokens, V:N:M vs cuSPARSELt 2:4 (time ratio cslt / vnm, > 1 = V:N:M faster; in brackets with the "
            "sparse TC):",
            "",
        ]
        for r in m16:
            tc = r.get("vnm_tc_us") or {}
            lines.append(
                f"- {r['name']}: "
                + ", ".join(
                    f"{p} {r['cslt_us'] / us:.2f}" + (f" ({r['cslt_us'] / tc[p]:.2f})" if tc.get(p) else "")
                    for p, us in r["vnm_us"].items()
                )
            )
    sweep = [r for r in results["records"] if r["part"] == "sweep"]
    if sweep:
        pats = list(sweep[0]["vnm_us"])
        lines += [
            "",
            f"## (V, M) sweep at {sweep[0]['out_features']}x{sweep[0]['in_features']} (speed-up vs dense)",
            "",
        ]
        lines.append("| pattern | " + " | ".join(f"{r['tokens']} tok" for r in sweep) + " | geomean |")
        lines.append("|---" * (len(sweep) + 2) + "|")
        sp = _speedups_for_sweep(results)
        for p in pats:
            lines.append(
                f"| {p} | " + " | ".join(f"{r['dense_us'] / r['vnm_us'][p]:.2f}x" for r in sweep) + f" | {sp[p]:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [r for r in results["records"] if r["part"] == "main"]
    names = sorted({r["name"] for r in main}, key=[r["name"] for r in main].index)
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=False):
        rs = sorted((r for r in main if r["name"] == name), key=lambda r: r["tokens"])
        toks = [r["tokens"] for r in rs]
        for p in rs[0]["vnm_us"]:
            ax.plot(toks, [r["dense_us"] / r["vnm_us"][p] for r in rs], marker="o", label=f"V:N:M {p}")
        for p in rs[0]["vnm_us"]:
            tc = [(r["tokens"], r["dense_us"] / r["vnm_tc_us"][p]) for r in rs if r.get("vnm_tc_us", {}).get(p)]
            if tc:
                ax.plot(*zip(*tc, strict=True), marker="^", linestyle=":", label=f"V:N:M {p} sparse TC")
        cs = [(r["tokens"], r["dense_us"] / r["cslt_us"]) for r in rs if r.get("cslt_us")]
        if cs:
            ax.plot(*zip(*cs, strict=True), marker="s", linestyle="--", label="cuSPARSELt 2:4")
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
        ax.set_ylabel("speed-up vs dense cuBLAS")
        ax.set_title(f"{name} ({rs[0]['out_features']}x{rs[0]['in_features']})")
        ax.legend(fontsize=7)
    fig.suptitle(f"{results['meta']['gpu']}, {results['meta']['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(results: dict, out_dir: Path) -> list[Path]:
    """Write linear.json, linear.md, linear.png and speedups.json into out_dir."""
    paths = save_results(out_dir, "linear", results, _md(results), echo=False)
    paths.append(out_dir / "speedups.json")
    speedups = _speedups_for_sweep(results)
    if not speedups:  # no sweep: use the main grid's records
        per: dict[str, list[float]] = {}
        for r in results["records"]:
            for p, us in r["vnm_us"].items():
                per.setdefault(p, []).append(r["dense_us"] / us)
        speedups = {p: round(math.exp(sum(map(math.log, s)) / len(s)), 4) for p, s in per.items()}
    paths[2].write_text(json.dumps(speedups, indent=1, sort_keys=True))
    try:
        _plot(results, out_dir / "linear.png")
        paths.append(out_dir / "linear.png")
    except ImportError:
        log.warning("matplotlib missing: no linear.png")
    except (ValueError, KeyError, TypeError, RuntimeError) as err:  # the numbers matter more than the plot
        log.warning("could not draw linear.png: %s", err)
    return paths


def config_report(
    shapes: Sequence[tuple[int, int]], tokens: Sequence[int], patterns: Sequence[str], device=None, dtype=torch.float16
) -> list[dict]:
    """Time every autotune candidate (not only the winner) next to dense: for tuning the config lists."""
    from .vnm_triton import candidate_configs, vnm_linear_triton

    device = torch.device(device or "cuda")
    rows = []
    for out_f, in_f in shapes:
        weight = torch.randn(out_f, in_f, device=device, dtype=dtype) / math.sqrt(in_f)
        for t in tokens:
            x = torch.randn(t, in_f, device=device, dtype=dtype)
            dense_bytes = weight.numel() * weight.element_size()
            ws = [weight] + [weight.clone() for _ in range(_copies(dense_bytes, device) - 1)]
            dense_us = time_graph([lambda w=w, x=x: F.linear(x, w) for w in ws])
            del ws
            for p in patterns:
                w, _ = _random_vnm(weight, VNMPattern.parse(p))
                copies = [w] + [_clone_vnm(w) for _ in range(_copies(w.nbytes, device) - 1)]
                for cfg in candidate_configs(w.block_rows, t):

                    def call(w, cfg=cfg, x=x, out_f=out_f):
                        return vnm_linear_triton(
                            x, w.values, w.columns, w.meta, w.row_index, None, w.block_rows, 2, w.pattern.m, out_f,
                            config=cfg,
                        )  # fmt: skip

                    try:
                        us = time_graph([lambda w=w: call(w) for w in copies])
                    except Exception as err:  # noqa: BLE001 - a config may not compile or launch here; report it
                        log.warning("%s failed: %s", cfg, err)
                        us = float("nan")
                    rows.append(
                        {"out": out_f, "in": in_f, "tokens": t, "pattern": p, "config": str(cfg), "us": us,
                         "dense_us": dense_us, "speedup": dense_us / us, "GBps": w.nbytes / us / 1e3}
                    )  # fmt: skip
                    print(f"{out_f}x{in_f} t={t} {p} {cfg}: {us:.1f}us dense {dense_us:.1f}us -> {dense_us / us:.2f}x")
                del copies
    return rows
