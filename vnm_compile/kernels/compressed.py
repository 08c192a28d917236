"""vnm::compressed_linear — the op a compressed model (``compress_``, ``VNMLinear``) runs.

The weight travels as one small bundle: ``weight`` is the layout's tensors, ``spec`` says how to read
them (``[layout, V, n, M, out_features]``). Two layouts, one held per weight:

- ``LAYOUT_ROWS`` (values, columns, meta): ``VNMWeight``'s row-major storage, what the Triton kernels
  and the CPU reference read;
- ``LAYOUT_TC`` (records, columns): ``SparseTCWeight``'s packing for the sparse tensor cores (mma.sp /
  wgmma.sp decode kernel and GEMMs), on GPUs where they run (fp16/bf16, n = 2, V a multiple of 64);
  ``LAYOUT_TC_COMPACT`` the same packing without the dense mma.sp GEMM's local rows and k-step padding
  (``pack_sparse_tc(compact=True)``: fewer bytes, that GEMM not among the candidates);
  ``LAYOUT_TC_FOLDED`` either packing with an input permutation folded into its columns (absolute input
  features: x is read in its original order, no index op before the op). Only the compiler makes it, for
  graphs whose every call is a decode step of a few tokens (``store_permutations.fold_in_permutations``): the
  decode kernel, the gather and wgmma GEMMs read it; the dense mma.sp GEMM and the Triton dense rebuild do
  not (its dense path rebuilds through the plain-PyTorch reference).

The weights are stored in the coordinates in which they obey the pattern (permutations are applied by
the module around the op; ``LAYOUT_TC_FOLDED`` excepted), so every block's kept columns lie inside its own M-column group: the
kernels read contiguous columns. Either layout may carry one more tensor, ``row_index`` ((stored rows,)
int32: the output row of each stored row, -1 for padding): the kernels then store each output row at its
place (the output permutation applied in the store, no index op after the op; the backend's
``store_out_permutations`` pass adds it where every call is a decode step), and a bias is read in output
coordinates. The optional ``dense_weights`` argument holds a sparsified model's own masked weights (one per
fused sibling, stacked along the rows): where dense wins, cuBLAS runs on them instead of on a rebuilt weight,
and the choice is measured as such (the "vnm" backend passes them for unpermuted layers).

Dense or sparse is decided per call from the token count: up to ``DECODE_TOKENS`` the sparse kernels
(decode is memory-bound: rebuilding the dense weight would read more than dense itself); above it the
sparse path is timed against rebuilding the dense weight into a temporary (the caching allocator hands
every layer the same block: one workspace per device and stream, the size of the largest layer) and
cuBLAS, once per (device, layout, shape, pattern, token bucket), outside CUDA-graph capture, and the
faster is cached (``vnm_triton._choose``; ``VNM_AUTOTUNE=0`` takes the measured table's answer), in
memory and in the user's cache folder (``$VNM_CACHE_DIR``, default ``~/.cache/vnm_compile``:
``<gpu>/paths-torch<version>-cuda<version>.json``), so later processes on that GPU start from the
measured choices; the shipped tables only seed the first measurement.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from ..format import VNMWeight
from ..pattern import VNMPattern
from .sparse_tc import RECORD

__all__ = [
    "LAYOUT_ROWS",
    "LAYOUT_TC",
    "LAYOUT_TC_COMPACT",
    "LAYOUT_TC_FOLDED",
    "LAYOUTS",
    "OP",
    "rebuild_dense",
    "row_index",
    "compressed_linear_reference",
    "choose_path",
    "prewarm_paths",
]

log = logging.getLogger(__name__)

LAYOUT_ROWS, LAYOUT_TC, LAYOUT_TC_COMPACT, LAYOUT_TC_FOLDED = 0, 1, 2, 3
LAYOUTS = {"rows": LAYOUT_ROWS, "tc": LAYOUT_TC, "tc-compact": LAYOUT_TC_COMPACT}  # what a VNMLinear holds
DECODE_TOKENS = 32  # up to this many rows of x the sparse kernels always run (sparse_tc.DECODE_MAX_TOKENS)


class CompressedSpec(NamedTuple):
    """vnm::compressed_linear's ``spec`` by name: ``[layout, V, n, M, out_features]``."""

    layout: int
    v: int
    n: int
    m: int
    out_features: int

    def with_(self, **fields) -> list[int]:
        """The op's spec (a list of ints) with ``fields`` replaced."""
        return list(self._replace(**fields))


def read_spec(weight: list, spec: list[int]) -> CompressedSpec:
    """The spec checked against the layout's tensor count (clear errors for a malformed call)."""
    if len(spec) != 5:
        raise ValueError(f"vnm::compressed_linear: spec must be [layout, V, n, M, out_features], got {spec}")
    out = CompressedSpec(*(int(s) for s in spec))
    expected = _TENSORS.get(out.layout)
    if expected is None:
        raise ValueError(f"vnm::compressed_linear: unknown layout {out.layout} ({LAYOUTS})")
    if len(weight) not in (expected, expected + 1):
        raise ValueError(
            f"vnm::compressed_linear: layout {out.layout} takes {expected} tensors (and optionally a row_index), "
            f"got {len(weight)}"
        )
    return out


# per layout, without the optional row_index
_TENSORS = {LAYOUT_ROWS: 3, LAYOUT_TC: 2, LAYOUT_TC_COMPACT: 2, LAYOUT_TC_FOLDED: 2}


def row_index(weight: list, spec: list[int]) -> Tensor | None:
    """The weight's optional row_index (output row of each stored row; module docstring), or None."""
    expected = _TENSORS[int(spec[0])]
    return weight[expected] if len(weight) > expected else None


def _stored(weight: list, spec: list[int]) -> list:
    """The layout's own tensors, without the optional row_index."""
    return weight[: _TENSORS[int(spec[0])]]


def _pattern(v: int, n: int, m: int) -> VNMPattern:
    return VNMPattern(v if m > 4 else 1, n, m)


@functools.lru_cache(maxsize=64)
def _identity_rows(rows: int, in_features: int, device: torch.device) -> Tensor:
    """The dense mma.sp kernel's x^T row order for a weight without input permutation: 0, 1, ..., -1 past
    the last feature."""
    table = torch.arange(rows, dtype=torch.int32, device=device)
    return table.masked_fill(table >= in_features, -1)


def _tc_weight(weight: list[Tensor], layout: int, v: int, m: int, out: int, in_features: int, dtype: torch.dtype):
    from .sparse_tc import SparseTCWeight

    records, columns = weight[:2]
    rows_out = weight[2] if len(weight) > 2 else None
    # the dense mma.sp GEMM's x^T rows: only for full records (compact ones have no local rows) on local columns
    identity = layout == LAYOUT_TC and 8 * m <= 256 and records.shape[-1] == RECORD
    rows = _identity_rows(records.shape[1] * 8 * m, in_features, records.device) if identity else None
    return SparseTCWeight(
        records, columns, rows_out, out, in_features, dtype, rows, m if rows is not None else 0, rows is not None,
        block_rows=v,
    )  # fmt: skip


def unpack(weight: list[Tensor], spec: list[int], in_features: int, dtype: torch.dtype) -> VNMWeight:
    """The row-major VNMWeight of either layout."""
    layout, v, n, m, out = read_spec(weight, spec)
    pattern = _pattern(v, n, m)
    if layout == LAYOUT_ROWS:
        values, columns, meta = weight[:3]
        return VNMWeight(values, columns, meta, row_index(weight, spec), pattern, (out, in_features))
    from .sparse_tc import unpack_sparse_tc

    return unpack_sparse_tc(_tc_weight(weight, layout, v, m, out, in_features, dtype), pattern)


def rebuild_dense(weight: list[Tensor], spec: list[int], in_features: int, dtype: torch.dtype) -> Tensor:
    """The dense (out_features, in_features) weight, zeros at pruned positions, in the stored coordinates
    (with a row_index: each stored row at its output row, placed as the rebuild writes it)."""
    layout, v, n, m, out = read_spec(weight, spec)
    rows = row_index(weight, spec)
    if layout == LAYOUT_TC_FOLDED:  # absolute columns: the Triton rebuild writes each group's own columns only
        from .tc_dense import _place_rows, tc_to_dense_reference

        dense = tc_to_dense_reference(weight[0], weight[1], out, in_features, _pattern(v, n, m), dtype)
        return _place_rows(dense, rows, None)
    if layout != LAYOUT_ROWS:
        from .tc_dense import tc_to_dense

        return tc_to_dense(weight[0], weight[1], out, in_features, _pattern(v, n, m), dtype, rows=rows)
    from .rows_dense import rows_to_dense

    return rows_to_dense(unpack(_stored(weight, spec), spec, in_features, dtype), rows_out=rows)


def compressed_linear_reference(x: Tensor, weight: list[Tensor], spec: list[int], bias: Tensor | None) -> Tensor:
    """Plain PyTorch: rebuild the dense weight, multiply in float32 (float64 for float64 x)."""
    dense = rebuild_dense(weight, spec, x.shape[-1], x.dtype)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = torch.nn.functional.linear(x.to(acc), dense.to(acc), None if bias is None else bias.to(acc))
    return y.to(x.dtype)


def _sparse(x: Tensor, weight: list[Tensor], spec: list[int], bias: Tensor | None) -> Tensor:
    layout, v, n, m, out = read_spec(weight, spec)
    if layout != LAYOUT_ROWS:
        from .sparse_tc import sparse_tc_linear

        return sparse_tc_linear(x, _tc_weight(weight, layout, v, m, out, x.shape[-1], x.dtype), bias)
    from .vnm_linear import OpWeight, _sparse_linear

    w = OpWeight.unpack(_stored(weight, spec), spec)  # vnm::linear's spec starts with this one
    rows = row_index(weight, spec)
    return _sparse_linear(x, w if rows is None else dataclasses.replace(w, row_index=rows), bias)


def _dense(x: Tensor, weight: list[Tensor], spec: list[int], bias: Tensor | None, held=None) -> Tensor:
    """cuBLAS on the held dense weights (a masked model's own, stacked for fused siblings), else on the dense
    weight rebuilt into a temporary."""
    if held:
        from .vnm_linear import _dense_linear

        return _dense_linear(x, held, bias, read_spec(weight, spec).out_features)
    return torch.nn.functional.linear(x, rebuild_dense(weight, spec, x.shape[-1], x.dtype), bias)


def path_cache_file(device: torch.device) -> Path:
    """Where the measured dense-or-sparse choices for this GPU and software are kept."""
    from .dispatch import gpu_slug
    from .tables import cache_dir

    name = f"paths-torch{torch.__version__.split('+')[0]}-cuda{torch.version.cuda}.json"
    return cache_dir() / gpu_slug(device) / name


@functools.lru_cache(maxsize=8)
def _disk_choices(path: str) -> dict[str, str]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {k: v for k, v in data.items() if v in ("sparse", "dense")} if isinstance(data, dict) else {}


def _remember(path: Path, key: str, choice: str) -> None:
    """Add a measured choice to the cache file (written whole, atomically; a read-only cache is skipped)."""
    choices = _disk_choices(str(path))
    choices[key] = choice
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(choices, indent=0, sort_keys=True))
        tmp.replace(path)
    except OSError as err:
        log.debug("cannot write %s: %s", path, err)


def _path_key(
    device: torch.device, layout: int, dtype, out: int, in_f: int, v: int, n: int, m: int, bucket: int, held=False
):
    """The in-memory key of a dense-or-sparse choice (its tail, ``_disk_key``, is the cache file's key).
    ``held``: the dense side is cuBLAS on held dense weights, not on a rebuilt one (another choice)."""
    return ("vnm_path", device.index, layout, dtype, out, in_f, v, n, m, bucket) + (("held",) if held else ())


def _disk_key(key: tuple) -> str:
    return "|".join(str(k) for k in key[2:])


def _seed(layout: int, out: int, in_f: int, pattern: VNMPattern, tokens: int, device: torch.device) -> str:
    """What the shipped table predicts: timed first, kept unless the other path is clearly faster."""
    from . import dispatch

    if layout != LAYOUT_ROWS:
        floor = dispatch.sparse_tc_token_floor(out, in_f, pattern, device)
        return "sparse" if floor is not None and tokens >= floor else "dense"
    limit = dispatch.sparse_token_limit(out, in_f, pattern, device)
    return "sparse" if limit is None or tokens <= limit else "dense"


def prewarm_paths(
    shapes,
    patterns,
    tokens,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float16,
    *,
    timer=None,
    progress: bool = True,
) -> dict[str, str]:
    """Measure and store the dense-or-sparse choice of vnm::compressed_linear for these shapes, so a model's
    first prefill calls find them decided (``vnm bench --prewarm``). Returns {cache key: choice} of the
    entries measured now (those already in the cache file are kept as they are).

    Args:
        shapes: (out_features, in_features) pairs (a model's sparsified linears, or the standard shapes).
        patterns: V:N:M patterns ("64:2:8").
        tokens: token counts; each is measured for its bucket (the next power of two), and only above
            ``DECODE_TOKENS`` (below it the sparse kernels always run).
        device: the CUDA device (default: the current one).
        timer: ``timer(path, fn) -> ms`` for path "sparse" or "dense" (default: fn timed as a CUDA-graph
            replay, vnm_triton._replay_ms); tests pass a fake one to check the cache logic without a GPU.
    Each (shape, pattern, bucket) is measured in the layout compress_ holds on ``device``: the sparse
    tensor cores' packing where they run, else the row-major one; twice, the dense side once on a rebuilt
    weight (a compressed model's layers) and once on a held one (a sparsified model's own weight, the
    "vnm" backend's ``dense_weights``). The cache file is
    ``path_cache_file(device)``, the one choose_path reads.
    """
    from tqdm.auto import tqdm

    from ..deploy.linear import tc_layout_supported
    from ..masks import block_rows, vnm_mask
    from .vnm_triton import _AUTOTUNE_CACHE, _replay_ms, _token_bucket

    device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    timer = timer or (lambda _path, fn: _replay_ms(fn))
    file = path_cache_file(device)
    done: dict[str, str] = {}
    buckets = sorted({_token_bucket(int(t)) for t in tokens if int(t) > DECODE_TOKENS})
    cases = [(int(o), int(i), VNMPattern.parse(str(p)), b) for o, i in shapes for p in patterns for b in buckets]
    for out, in_f, pattern, bucket in tqdm(cases, desc="prewarm paths", disable=not progress, leave=False):
        tc = tc_layout_supported(pattern, dtype, in_f, device)
        layout = LAYOUT_TC if tc else LAYOUT_ROWS
        v = block_rows(pattern)
        # the dense side on a rebuilt weight (compressed models) and on a held one (a sparsified model's own)
        keys = {held: _path_key(device, layout, dtype, out, in_f, v, pattern.n, pattern.m, bucket, held)
                for held in (False, True)}  # fmt: skip
        keys = {held: key for held, key in keys.items() if _disk_key(key) not in _disk_choices(str(file))}
        if not keys:
            continue
        # 1. a random weight of this shape in that layout, and x of the bucket's token count
        gen = torch.Generator(device=device).manual_seed(out * 7 + in_f)
        dense = torch.randn(out, in_f, device=device, dtype=dtype, generator=gen)
        mask = vnm_mask(dense.abs().float(), pattern)
        w = VNMWeight.from_dense(dense, mask, pattern)
        weight, spec = [w.values, w.columns, w.meta], [LAYOUT_ROWS, w.block_rows, pattern.n, pattern.m, out]
        if tc:
            from .sparse_tc import pack_sparse_tc

            packed = pack_sparse_tc(w)
            weight, spec = [packed.records, packed.columns], CompressedSpec(*spec).with_(layout=LAYOUT_TC)
        x = torch.randn(bucket, in_f, device=device, dtype=dtype, generator=gen)
        seed = _seed(layout, out, in_f, pattern, bucket, device)
        for held, key in keys.items():
            # 2. time both paths, the table's prediction first (kept unless the other is > 3 % faster)
            disk_key = _disk_key(key)
            paths = {"sparse": _sparse, "dense": functools.partial(_dense, held=[dense * mask] if held else None)}
            best, best_ms = seed, float("inf")
            for path in (seed, "dense" if seed == "sparse" else "sparse"):
                try:
                    ms = timer(path, functools.partial(paths[path], x, weight, spec, None))
                except (RuntimeError, ValueError) as err:
                    log.debug("prewarm %s %s: %s", disk_key, path, err)
                    continue
                if ms < 0.97 * best_ms:
                    best, best_ms = path, ms
            # 3. stored where choose_path looks: this process's cache and the GPU's cache file
            _AUTOTUNE_CACHE[key] = best
            _remember(file, disk_key, best)
            done[disk_key] = best
    return done


def choose_path(x: Tensor, weight: list[Tensor], spec: list[int], bias: Tensor | None, held=None) -> str:
    """ "sparse" or "dense" for this call (module docstring; ``held``: the dense weights the dense path runs,
    else it rebuilds one)."""
    layout, v, n, m, out = read_spec(weight, spec)
    if not x.is_cuda:
        return "sparse" if layout == LAYOUT_ROWS else "dense"  # the sparse-TC kernels run on CUDA only
    tokens = x.numel() // max(x.shape[-1], 1)
    if tokens <= DECODE_TOKENS:
        return "sparse"
    from .vnm_triton import _AUTOTUNE_CACHE, _choose, _token_bucket

    key = _path_key(x.device, layout, x.dtype, out, x.shape[-1], v, n, m, _token_bucket(tokens), bool(held))
    known = _AUTOTUNE_CACHE.get(key)  # 1. decided earlier in this process: nothing else on the hot path
    if known is not None:
        return known
    file = path_cache_file(x.device)  # 2. measured by an earlier process on this GPU and software
    disk_key = _disk_key(key)
    known = _disk_choices(str(file)).get(disk_key)
    if known is not None:
        _AUTOTUNE_CACHE[key] = known
        return known
    # 3. measure, the measured table's answer first (kept unless the other path is clearly faster)
    seed = _seed(layout, out, x.shape[-1], _pattern(v, n, m), tokens, x.device)
    cands = [seed, "dense" if seed == "sparse" else "sparse"]
    x2 = x.reshape(-1, x.shape[-1])
    paths = {"sparse": _sparse, "dense": functools.partial(_dense, held=held)}
    measured = not torch.cuda.is_current_stream_capturing() and os.environ.get("VNM_AUTOTUNE") != "0"
    choice = _choose(key, cands, lambda path: paths[path](x2, weight, spec, bias))
    if measured:
        _remember(file, disk_key, choice)  # once per key (inside a capture, or with autotuning off, not measured)
    return choice


def _check_held(weight: list[Tensor], spec: list[int], held: list[Tensor] | None) -> None:
    """Held dense weights must stack to the weight's rows, in its (stored = output) order."""
    if not held:
        return
    s = read_spec(weight, spec)
    if row_index(weight, spec) is not None:
        raise ValueError("vnm::compressed_linear: dense_weights and a row_index exclude each other")
    rows = sum(d.shape[0] for d in held)
    if rows != s.out_features or any(d.dim() != 2 for d in held):
        raise ValueError(
            f"vnm::compressed_linear: dense_weights must be 2-D and stack to {s.out_features} rows, got shapes "
            f"{[tuple(d.shape) for d in held]}"
        )


@torch.library.custom_op(
    "vnm::compressed_linear",
    mutates_args=(),
    schema="(Tensor x, Tensor[] weight, int[] spec, Tensor? bias, Tensor[]? dense_weights=None) -> Tensor",
)
def _compressed_linear_op(
    x: Tensor, weight: list[Tensor], spec: list[int], bias: Tensor | None, dense_weights: list[Tensor] | None = None
) -> Tensor:
    """``dense_weights`` (optional): the layer's own dense (masked) weights, stacked along the rows as the
    compressed weight holds them (siblings fused into one call each bring theirs); where dense wins, cuBLAS
    runs on them instead of on a rebuilt weight (a sparsified model compiled by the "vnm" backend)."""
    _check_held(weight, spec, dense_weights)
    path = choose_path(x, weight, spec, bias, dense_weights)
    if path == "dense" and not dense_weights and not x.is_cuda:
        return compressed_linear_reference(x, weight, spec, bias)
    y = _sparse(x, weight, spec, bias) if path == "sparse" else _dense(x, weight, spec, bias, dense_weights)
    return y.clone() if y._base is not None else y  # a custom op's output must not be a view


@_compressed_linear_op.register_fake
def _(x, weight, spec, bias, dense_weights=None):
    _check_held(weight, spec, dense_weights)
    return x.new_empty((*x.shape[:-1], read_spec(weight, spec).out_features))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, spec, bias, *rest = inputs
    ctx.save_for_backward(*weight)
    ctx.spec, ctx.in_features, ctx.has_bias = list(spec), x.shape[-1], bias is not None
    # the gradient structure of what reached autograd: the dispatcher drops dense_weights=None (its default)
    ctx.held = [[None] * len(d) for d in rest if d is not None]


def _backward(ctx, grad):
    """Gradients for x and bias (the compressed weight and the held dense weights are constants)."""
    dense = rebuild_dense(list(ctx.saved_tensors), ctx.spec, ctx.in_features, grad.dtype)
    grad_x = grad @ dense.to(grad.dtype) if ctx.needs_input_grad[0] else None
    grad_b = grad.reshape(-1, dense.shape[0]).sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
    return grad_x, [None] * len(ctx.saved_tensors), None, grad_b, *ctx.held


_compressed_linear_op.register_autograd(_backward, setup_context=_setup_context)

OP = torch.ops.vnm.compressed_linear.default
