"""Triton kernels for vnm::linear: y = x @ W^T + b, W in the V:N:M format (n = 2).

The kernels read the compressed tensors of format.py directly:
values (Rp, 2G) contiguous per row, meta (Rp, ceil(G/8)) int32 words of
8 groups x 4 bits, columns (B, G, 4) absolute input columns (the input
permutation is folded in), row_index (Rp,) optional output permutation
(folded into the store). No extra launch for permutations or bias.

- ``_fma_kernel`` (decode, few tokens): one program = BLOCK_R rows of one
  V-block x one token. Streams contiguous values, expands the metadata words
  in registers, reads a group's 4 column indices as one 8-byte word (two for
  int32 columns), gathers x at them once for all BLOCK_R rows and picks each
  row's two inputs with selects; fp32 elementwise accumulation, one reduction
  at the end. Memory-bound: the goal is the compressed bytes at HBM bandwidth.
  Its loop issues ~20-26 instructions per kept value (sm_90 SASS), a large
  share of the time at 1 token: the packed column words and int32 gather
  offsets took 12-20 % of them out and made it 0.5-7 % faster (H100, 10
  decode shapes incl. the fused q/k/v and gate/up ones, side by side);
  what remains is mostly address arithmetic and the shared-memory layout
  conversion that broadcasts x to the rows.
- ``_rows_kernel`` (decode, 1-4 tokens, when the caller holds ``interleave_rows``
  of the weights: the values and metadata once more, R = 4/8/16 rows of a group
  contiguous): one thread's 16-byte loads hold R rows x 2 values of one group and
  one metadata word their R codes, so x is gathered once per thread for R rows
  and no shared-memory transposition is left (~20-26 instead of ~36-38 loop
  instructions per row and group). H100, 1 token, 64:2:8 11008x4096: 13.2 us vs
  16.0 us (benchmarks/results/<gpu>/decode_layout.md).
- ``_dot_kernel`` (tensor cores, from 2 tokens): one program = BLOCK_R rows of one
  V-block x BLOCK_T tokens. Per chunk of GC groups it rebuilds the dense
  (BLOCK_R x 4GC) weight tile over the kept columns from values + metadata
  in registers (``_dense_tile``), gathers x at those 4GC absolute columns
  (token-major x, lanes along the columns) and runs tl.dot: 4/M of a dense
  GEMM's MACs.
- ``_expand_kernel`` + ``_gather_kernel`` (many tokens): the whole weight is
  rebuilt once per call into the dense weights over each block's kept columns
  (Rp, 4G) (a workspace, 4/M of the dense weight's bytes), x is copied
  feature-major (``_transpose_kernel``, tokens padded to whole tiles), and a
  GEMM gathers rows of x^T at each block's kept columns: Triton pipelines the
  gathers and the weight tiles as 16-byte cp.async copies into wgmma. The
  output width stays specialised so the stores are 16-byte vectors (2-byte
  scalars before: the whole op took 1.2-1.9x longer at 2048-12672 tokens).
  With ``expand_weights`` held by the caller the rebuild is skipped and the
  gather GEMM pays from 2 tokens (mid-token configs, 16-64 token tiles).

Autotuning times each candidate as a CUDA-graph replay with L2 flushed (a
config of two launches, transpose + GEMM, is not charged a launch latency a
compiled model under graphs never pays) and caches the winner per shape, dtype,
flags and token bucket.

Loop bounds are runtime ints when compiled (one binary serves every shape)
and constexpr under TRITON_INTERPRET=1 (Triton 3.6's interpreter cannot loop
to a runtime bound).

Measured on an H100 (benchmarks/results/nvidia-h100-80gb-hbm3/linear.md and
decode_layout.md, fp16, CUDA graphs, weights streamed from HBM), speed-up over cuBLAS
at Llama-2-7B shapes: 1 token 64:2:8 2.2-2.6x row-major (57-70 % of the
compressed-bytes floor), 2.3-3.1x on the row-interleaved layout, 64:2:5 1.4-1.7x /
1.6-1.9x; 16 tokens 64:2:8 0.8-1.0x, 1.1-1.6x with the expanded weights held,
64:2:16 1.6-1.8x / 1.9-2.6x; 2048-8192 tokens (expand + gather) 64:2:16 1.2-1.5x,
64:2:8 0.7-0.8x, 64:2:5 0.45-0.55x (the previous prefill kernel, ``_dot_kernel`` with
feature-major x: 0.6-0.7x, 0.4x and 0.25-0.28x). Where the speed-up is below 1,
prefer_sparse() keeps the layer dense.
Why prefill stays below the M/4 bound (4096x4096, 2048 tokens, 64:2:8, ncu): the
gather GEMM moves ~820 MB through L2 for 34 GFLOP (every 64-row block gathers its own
x rows: a V = 64 block caps the tile that shares one gather at 64 rows), ~2x the
traffic of cuBLAS's 128x256 tiles on the reduced K; 128-row tiles (V = 128) are
25-40 % faster on the same weights (128:2:8 0.94x, 128:2:16 1.57x at 2048 tokens).
Without sparse tensor cores (not reachable from Triton) the 2:4 half of each
block's kept columns is multiplied as zeros.
What was tried and not kept, with the measurements: docs/experiments.md.

References: VENOM (Castro et al., SC'23) for the format; the Triton
matmul tutorial (03-matrix-multiplication.py) for the tile loop.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

import torch
from torch import Tensor

try:  # Triton is optional on CPU-only installs; the reference path needs none.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "KernelConfig",
    "interpret_mode",
    "interpreter_ready",
    "expand_weights",
    "interleave_rows",
    "vnm_linear_triton",
    "clear_autotune_cache",
]

log = logging.getLogger(__name__)

GROUPS_PER_WORD = 8  # n = 2: 8 groups x 4 bits per int32 metadata word


def interpret_mode() -> bool:
    """True when TRITON_INTERPRET=1 is set now (checked at call time)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def interpreter_ready() -> bool:
    """Whether Triton's interpreter can run our kernels in this process.

    Triton builds its own library functions (tl.sum, ...) for the interpreter only
    when TRITON_INTERPRET=1 was set when triton was first imported.
    """
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.standard.sum, InterpretedFunction)


# --------------------------------------------------------------------------- kernels
def _dense_tile(vals, words, BLOCK_R: tl.constexpr, GC: tl.constexpr):
    """(BLOCK_R, 2GC) kept values + (BLOCK_R, GC/8) metadata words -> the (BLOCK_R, 4GC)
    dense tile over the block's kept columns (each group: its two values at their
    2-bit positions, zeros at the other two)."""
    cc = tl.arange(0, 4)
    shifts = 4 * tl.arange(0, 8)
    v0, v1 = tl.split(tl.reshape(vals, (BLOCK_R, GC, 2)))
    codes = tl.reshape((words[:, :, None] >> shifts[None, None, :]) & 15, (BLOCK_R, GC))
    p0 = (codes & 3)[:, :, None]
    p1 = ((codes >> 2) & 3)[:, :, None]
    w4 = tl.where(p0 == cc[None, None, :], v0[:, :, None], 0.0) + tl.where(p1 == cc[None, None, :], v1[:, :, None], 0.0)
    return tl.reshape(w4, (BLOCK_R, 4 * GC))


if HAS_TRITON:  # a device function: jitted (or interpreted, under TRITON_INTERPRET=1) like tl.sum
    _dense_tile = triton.jit(_dense_tile)


def _dest_rows(rows, ridx_ptr, OUT, HAS_RIDX: tl.constexpr):
    """(output row, stored?) of each stored row: through the output permutation (row index; -1 and
    padding rows are dropped)."""
    if HAS_RIDX:
        dest = tl.load(ridx_ptr + rows)
        ok = (dest >= 0) & (dest < OUT)
    else:
        dest = rows
        ok = rows < OUT
    return dest, ok


def _store_rows(y, rows, t, y_ptr, stride_yt, ridx_ptr, bias_ptr, OUT, HAS_RIDX: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Token t's outputs of the stored ``rows`` at their output rows (_dest_rows), plus the bias, cast to
    y's dtype."""
    dest, ok = _dest_rows(rows, ridx_ptr, OUT, HAS_RIDX)
    if HAS_BIAS:
        y += tl.load(bias_ptr + dest, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + t * stride_yt + dest, y.to(y_ptr.dtype.element_ty), mask=ok)


def _store_tile(acc, dest, ok, toks, T, y_ptr, stride_yt, bias_ptr, HAS_BIAS: tl.constexpr):
    """A (rows, tokens) fp32 tile at its output rows (_dest_rows) and tokens ``toks`` (those < T), plus
    the bias, cast to y's dtype."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + dest, mask=ok, other=0.0).to(tl.float32)[:, None]
    y_ptrs = y_ptr + toks.to(tl.int64)[None, :] * stride_yt + dest[:, None]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=ok[:, None] & (toks < T)[None, :])


def _dot_acc(acc, w, xg, IN_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """acc + w @ xg on the tensor cores (DOT_UPCAST, interpreter only: in fp32, its bf16 dot is wrong)."""
    if DOT_UPCAST:
        return tl.dot(w.to(tl.float32), xg.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(w, xg, acc, input_precision=IN_PREC)


def _gather_x4(x_row, cw0, cw1, stride_xk, COL_BITS: tl.constexpr):
    """x (fp32, one value per group) at every group's 4 kept columns, unpacked from its column words: one
    int64 word per group for 16-bit columns (cw1 = cw0), two for 32-bit ones."""
    cmask = (1 << COL_BITS) - 1
    c0 = (cw0 & cmask).to(tl.int32)
    c1 = ((cw0 >> COL_BITS) & cmask).to(tl.int32)
    c2 = ((cw1 >> (64 - 2 * COL_BITS)) & cmask).to(tl.int32)
    c3 = ((cw1 >> (64 - COL_BITS)) & cmask).to(tl.int32)
    xa = tl.load(x_row + c0 * stride_xk).to(tl.float32)
    xb = tl.load(x_row + c1 * stride_xk).to(tl.float32)
    xc = tl.load(x_row + c2 * stride_xk).to(tl.float32)
    xd = tl.load(x_row + c3 * stride_xk).to(tl.float32)
    return xa, xb, xc, xd


def _select2(codes, xa, xb, xc, xd):
    """The x values under each row's two kept values: each 4-bit code holds their 2-bit positions p0, p1
    among the group's 4 columns, whose x values are xa..xd (a select tree picks them)."""
    p0 = codes & 3
    p1 = (codes >> 2) & 3
    xs0 = tl.where((p0 & 2) != 0, tl.where((p0 & 1) != 0, xd, xc), tl.where((p0 & 1) != 0, xb, xa))
    xs1 = tl.where((p1 & 2) != 0, tl.where((p1 & 1) != 0, xd, xc), tl.where((p1 & 1) != 0, xb, xa))
    return xs0, xs1


def _fma_chunk(acc, vals, words, shifts, xa, xb, xc, xd, BLOCK_R: tl.constexpr, GC: tl.constexpr):
    """One chunk of _fma_kernel: values (BLOCK_R, 2GC) -> two slots, metadata 4 bits per (row, group)."""
    v0, v1 = tl.split(tl.reshape(vals, (BLOCK_R, GC, 2)))
    codes = tl.reshape((words[:, :, None] >> shifts[None, None, :]) & 15, (BLOCK_R, GC))
    xs0, xs1 = _select2(codes, xa[None, :], xb[None, :], xc[None, :], xd[None, :])
    return acc + (v0.to(tl.float32) * xs0 + v1.to(tl.float32) * xs1)  # this order of rounding: as before


if HAS_TRITON:
    _dest_rows = triton.jit(_dest_rows)
    _gather_x4 = triton.jit(_gather_x4)
    _select2 = triton.jit(_select2)
    _fma_chunk = triton.jit(_fma_chunk)
    _store_rows = triton.jit(_store_rows)
    _store_tile = triton.jit(_store_tile)
    _dot_acc = triton.jit(_dot_acc)


def _fma_kernel(
    # pointers
    x_ptr,  # (T, K) activations, any strides
    val_ptr,  # (Rp, 2G) kept values, contiguous per row
    col_ptr,  # (B, G, 4) absolute input columns viewed as int64 words: (B, G) for int16, (B, G, 2) for int32
    meta_ptr,  # (Rp, W) int32, 8 groups x 4 bits per word
    ridx_ptr,  # (Rp,) int32 destination row (-1 = padding) or dummy
    bias_ptr,  # (OUT,) or dummy
    y_ptr,  # (T, OUT) output
    # sizes
    OUT,
    G,
    NUM_CHUNKS,  # full chunks G // GC (runtime when compiled)
    V,  # rows per column block
    # strides
    stride_xt,
    stride_xk,
    stride_vr,
    stride_mr,
    stride_yt,
    # constexprs
    CHUNKS_CONST: tl.constexpr,  # NUM_CHUNKS under the interpreter, None when compiled
    GC: tl.constexpr,  # groups per chunk (multiple of 8)
    BLOCK_R: tl.constexpr,  # rows per program (divides V)
    EVEN_G: tl.constexpr,  # G % GC == 0: no masks in the loop
    VAL_ALIGN: tl.constexpr,  # power of two dividing the values row stride (vector width hint)
    HAS_RIDX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    COL_BITS: tl.constexpr,  # 16: a group's 4 columns are one int64 word; 32: two words
):
    pid_r = tl.program_id(0)
    t = tl.program_id(1)
    r0 = pid_r * BLOCK_R
    rows = r0 + tl.arange(0, BLOCK_R)
    blk = r0 // V
    gg = tl.arange(0, GC)
    jj = tl.arange(0, 2 * GC)
    ww = tl.arange(0, GC // 8)
    shifts = 4 * tl.arange(0, 8)
    n_words = (G + 7) // 8

    acc = tl.zeros((BLOCK_R, GC), dtype=tl.float32)
    x_row = x_ptr + t * stride_xt
    val_rows = val_ptr + tl.multiple_of(rows.to(tl.int64) * stride_vr, VAL_ALIGN)[:, None]
    meta_rows = meta_ptr + rows.to(tl.int64)[:, None] * stride_mr
    # One 8-byte load per group (two for int32 columns) instead of four 2-byte loads, and int32
    # gather offsets: 2-7 % faster at 1 token on an H100 (fewer address instructions per value).
    wpg = COL_BITS // 16  # int64 words per group
    col_blk = col_ptr + blk.to(tl.int64) * G * wpg

    # Full chunks run unmasked (16-byte vector loads); a partial last chunk runs once after the loop.
    n_full = G // GC
    # Software pipelining by hand: chunk i+1's values, metadata and column indices are in
    # flight while chunk i computes, so each program keeps HBM and L2 loads outstanding.
    # Prologue: chunk 0, masked (G may be smaller than GC; then the loop does not run).
    gm = gg < G
    vals = tl.load(val_rows + jj[None, :], mask=(jj < 2 * G)[None, :], other=0.0)
    words = tl.load(meta_rows + ww[None, :], mask=(ww < n_words)[None, :], other=0)
    cw0 = tl.load(col_blk + gg * wpg, mask=gm, other=0)
    cw1 = tl.load(col_blk + gg * wpg + (wpg - 1), mask=gm, other=0)  # = cw0 for int16 columns
    for i in range(0, NUM_CHUNKS if CHUNKS_CONST is None else CHUNKS_CONST):  # = n_full
        # 1. x at the current chunk's 4 columns per group (gathered once for all BLOCK_R rows)
        xa, xb, xc, xd = _gather_x4(x_row, cw0, cw1, stride_xk, COL_BITS)
        # 2. prefetch the next full chunk (the last iteration re-reads its own chunk: cache hits)
        g0 = (i + 1 - (i + 1) // n_full) * GC
        vals_n = tl.load(val_rows + (2 * g0 + jj)[None, :])
        words_n = tl.load(meta_rows + (g0 // 8 + ww)[None, :])
        cw0n = tl.load(col_blk + (g0 + gg) * wpg)
        cw1n = tl.load(col_blk + (g0 + gg) * wpg + (wpg - 1))
        # 3. each row's two values times the inputs its metadata selects
        acc = _fma_chunk(acc, vals, words, shifts, xa, xb, xc, xd, BLOCK_R, GC)
        vals, words, cw0, cw1 = vals_n, words_n, cw0n, cw1n

    if not EVEN_G:  # the partial last chunk, masked
        g0 = n_full * GC
        gm = g0 + gg < G
        vals = tl.load(val_rows + (2 * g0 + jj)[None, :], mask=(2 * g0 + jj < 2 * G)[None, :], other=0.0)
        words = tl.load(meta_rows + (g0 // 8 + ww)[None, :], mask=(g0 // 8 + ww < n_words)[None, :], other=0)
        cw0 = tl.load(col_blk + (g0 + gg) * wpg, mask=gm, other=0)
        cw1 = tl.load(col_blk + (g0 + gg) * wpg + (wpg - 1), mask=gm, other=0)
        xa, xb, xc, xd = _gather_x4(x_row, cw0, cw1, stride_xk, COL_BITS)  # masked groups read column 0
        acc = _fma_chunk(acc, vals, words, shifts, xa, xb, xc, xd, BLOCK_R, GC)

    y = tl.sum(acc, axis=1)
    _store_rows(y, rows, t, y_ptr, stride_yt, ridx_ptr, bias_ptr, OUT, HAS_RIDX, HAS_BIAS)


def _dot_kernel(
    # pointers (as in _fma_kernel)
    x_ptr,
    val_ptr,
    col_ptr,
    meta_ptr,
    ridx_ptr,
    bias_ptr,
    y_ptr,
    ws_ptr,  # (NSPLIT, T, OUT) fp32 split-K partial sums, or dummy
    # sizes
    T,
    OUT,
    G,
    NUM_CHUNKS,  # full chunks per split: (G // GC) / NSPLIT
    NSPLIT,  # split-K programs along dim 2 (each takes NUM_CHUNKS consecutive chunks)
    V,
    # strides
    stride_xt,
    stride_xk,
    stride_vr,
    stride_mr,
    stride_yt,
    # constexprs
    CHUNKS_CONST: tl.constexpr,
    GC: tl.constexpr,  # groups per chunk: the dot's K is 4 * GC
    BLOCK_R: tl.constexpr,  # weight rows per program (divides V, >= 16)
    BLOCK_T: tl.constexpr,  # tokens per program (>= 16)
    EVEN_T: tl.constexpr,  # T % BLOCK_T == 0: no token masks on the gathers
    EVEN_G: tl.constexpr,
    VAL_ALIGN: tl.constexpr,
    HAS_RIDX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IN_PREC: tl.constexpr,  # tl.dot input precision ("ieee" for fp32 inputs)
    DOT_UPCAST: tl.constexpr,  # interpreter only: its bf16 tl.dot is wrong, run the dot in fp32 (exact products)
    SPLIT: tl.constexpr,  # NSPLIT > 1: write fp32 partials to ws, _splitk_reduce_kernel finishes
):
    pid_t = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    r0 = pid_r * BLOCK_R
    rows = r0 + tl.arange(0, BLOCK_R)
    blk = r0 // V
    toks = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = toks < T
    jj = tl.arange(0, 2 * GC)
    kk = tl.arange(0, 4 * GC)
    ww = tl.arange(0, GC // 8)
    n_words = (G + 7) // 8

    acc = tl.zeros((BLOCK_R, BLOCK_T), dtype=tl.float32)
    # Gathered activations are (4GC, BLOCK_T) tiles: x[toks, cols]. Token-major x: with the
    # columns on dim 0 Triton puts the lanes along the columns of one token row (the
    # (BLOCK_T, 4GC) orientation put them along tokens: 32 lines per load, ~20x slower).
    # Feature-major x (stride_xt == 1, the prefill configs): 16-byte loads along tokens.
    x_toks = x_ptr + toks.to(tl.int64)[None, :] * stride_xt
    val_rows = val_ptr + tl.multiple_of(rows.to(tl.int64) * stride_vr, VAL_ALIGN)[:, None]
    meta_rows = meta_ptr + rows.to(tl.int64)[:, None] * stride_mr
    col_blk = col_ptr + blk.to(tl.int64) * G * 4
    n_full = G // GC
    gs = pid_s * NUM_CHUNKS * GC  # first group of this split
    # Prologue: the split's first chunk (masked: G may be smaller than GC). Then each iteration
    # gathers x for chunk i (its column indices arrived one iteration earlier), prefetches i+1.
    cols = tl.load(col_blk + gs * 4 + kk, mask=gs * 4 + kk < 4 * G, other=0)
    vals = tl.load(val_rows + (2 * gs + jj)[None, :], mask=(2 * gs + jj < 2 * G)[None, :], other=0.0)
    words = tl.load(meta_rows + (gs // 8 + ww)[None, :], mask=(gs // 8 + ww < n_words)[None, :], other=0)
    for i in range(0, NUM_CHUNKS if CHUNKS_CONST is None else CHUNKS_CONST):
        # 1. x gathered at the chunk's 4GC absolute columns
        if EVEN_T:  # no token mask: 16-byte vector loads along tokens when x is feature-major
            xg = tl.load(x_toks + cols.to(tl.int64)[:, None] * stride_xk)
        else:
            xg = tl.load(x_toks + cols.to(tl.int64)[:, None] * stride_xk, mask=tmask[None, :], other=0.0)
        # 2. prefetch the next full chunk (the last iteration re-reads its own: cache hits)
        g0 = gs + (i + 1 - (i + 1) // NUM_CHUNKS) * GC
        cols_n = tl.load(col_blk + g0 * 4 + kk)
        vals_n = tl.load(val_rows + (2 * g0 + jj)[None, :])
        words_n = tl.load(meta_rows + (g0 // 8 + ww)[None, :])
        # 3. the dense (BLOCK_R, 4GC) weight tile over the kept columns
        w4 = _dense_tile(vals, words, BLOCK_R, GC).to(xg.dtype)
        # 4. tensor cores: acc (BLOCK_R, BLOCK_T) += w4 @ xg
        if DOT_UPCAST:
            acc = tl.dot(w4.to(tl.float32), xg.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(w4, xg, acc, input_precision=IN_PREC)
        cols, vals, words = cols_n, vals_n, words_n

    if not EVEN_G:  # the partial last chunk, masked, done by the last split
        g0 = n_full * GC
        last = pid_s == NSPLIT - 1
        cols = tl.load(col_blk + g0 * 4 + kk, mask=(g0 * 4 + kk < 4 * G) & last, other=0)
        vals = tl.load(val_rows + (2 * g0 + jj)[None, :], mask=((2 * g0 + jj < 2 * G) & last)[None, :], other=0.0)
        words = tl.load(meta_rows + (g0 // 8 + ww)[None, :], mask=(g0 // 8 + ww < n_words)[None, :], other=0)
        if EVEN_T:  # no token mask: 16-byte vector loads along tokens when x is feature-major
            xg = tl.load(x_toks + cols.to(tl.int64)[:, None] * stride_xk)
        else:
            xg = tl.load(x_toks + cols.to(tl.int64)[:, None] * stride_xk, mask=tmask[None, :], other=0.0)
        w4 = _dense_tile(vals, words, BLOCK_R, GC).to(xg.dtype)
        acc = _dot_acc(acc, w4, xg, IN_PREC, DOT_UPCAST)

    dest, ok = _dest_rows(rows, ridx_ptr, OUT, HAS_RIDX)
    if SPLIT:
        ws_ptrs = ws_ptr + (pid_s * T + toks.to(tl.int64))[None, :] * OUT + dest[:, None]
        tl.store(ws_ptrs, acc, mask=ok[:, None] & tmask[None, :])
    else:
        _store_tile(acc, dest, ok, toks, T, y_ptr, stride_yt, bias_ptr, HAS_BIAS)


def _rows_chunk(
    acc,
    vals,
    m,
    cw0,
    cw1,
    x_row,
    stride_xk,
    BLOCK_Q: tl.constexpr,
    GC: tl.constexpr,
    R: tl.constexpr,
    COL_BITS: tl.constexpr,
):
    """One chunk of _rows_kernel: x at the chunk's 4 columns per group, gathered once for the
    R rows a thread holds; each row picks its two inputs from its 4-bit code."""
    # (loaded and broadcast one by one, not through _gather_x4: that order keeps the compiled code as measured)
    cmask = (1 << COL_BITS) - 1
    xa = tl.load(x_row + (cw0 & cmask).to(tl.int32) * stride_xk).to(tl.float32)[None, :, None]
    xb = tl.load(x_row + ((cw0 >> COL_BITS) & cmask).to(tl.int32) * stride_xk).to(tl.float32)[None, :, None]
    xc = tl.load(x_row + ((cw1 >> (64 - 2 * COL_BITS)) & cmask).to(tl.int32) * stride_xk).to(tl.float32)[None, :, None]
    xd = tl.load(x_row + ((cw1 >> (64 - COL_BITS)) & cmask).to(tl.int32) * stride_xk).to(tl.float32)[None, :, None]
    v0, v1 = tl.split(tl.reshape(vals, (BLOCK_Q, GC, R, 2)))
    codes = (m[:, :, None] >> (4 * tl.arange(0, R))[None, None, :]) & 15
    xs0, xs1 = _select2(codes, xa, xb, xc, xd)
    return acc + v0.to(tl.float32) * xs0 + v1.to(tl.float32) * xs1


if HAS_TRITON:
    _rows_chunk = triton.jit(_rows_chunk)


def _rows_kernel(
    x_ptr,  # (T, K) activations, any strides
    val_ptr,  # (Rp / R, G, R, 2) kept values, row-interleaved (interleave_rows)
    col_ptr,  # (B, G, 4) absolute input columns viewed as int64 words (as _fma_kernel)
    meta_ptr,  # (Rp / R, G) one word per R rows of a group: 4 bits per row (int16 / int32 / int64)
    ridx_ptr,  # (Rp,) int32 destination row (-1 = padding) or dummy
    bias_ptr,  # (OUT,) or dummy
    y_ptr,  # (T, OUT) output
    OUT,
    G,
    NUM_CHUNKS,  # full chunks G // GC (runtime when compiled)
    V,
    stride_xt,
    stride_xk,
    stride_yt,
    CHUNKS_CONST: tl.constexpr,  # NUM_CHUNKS under the interpreter, None when compiled
    GC: tl.constexpr,  # groups per chunk
    BLOCK_Q: tl.constexpr,  # R-row units per program
    R: tl.constexpr,  # rows interleaved per unit (4, 8 or 16; divides V)
    EVEN_G: tl.constexpr,
    HAS_RIDX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    COL_BITS: tl.constexpr,
):
    """Decode on the row-interleaved layout: one thread's 16-byte loads hold R rows x 2 values of
    one group and one metadata word their R codes, so x is gathered once per thread for R rows and
    the values need no shared-memory transposition (the FMA kernel's row-major tile does)."""
    pid = tl.program_id(0)
    t = tl.program_id(1)
    q0 = pid * BLOCK_Q
    qq = q0 + tl.arange(0, BLOCK_Q)
    blk = (q0 * R) // V
    gg = tl.arange(0, GC)
    ee = tl.arange(0, 2 * R)
    acc = tl.zeros((BLOCK_Q, GC, R), dtype=tl.float32)
    x_row = x_ptr + t * stride_xt
    val_units = val_ptr + tl.multiple_of(qq.to(tl.int64) * G * (2 * R), 2 * R)[:, None, None]
    meta_units = meta_ptr + (qq.to(tl.int64) * G)[:, None]
    wpg = COL_BITS // 16  # int64 words per group
    col_blk = col_ptr + blk.to(tl.int64) * G * wpg
    n_full = G // GC
    # chunk 0 (the loop prefetches chunk i + 1 while chunk i computes, as in _fma_kernel)
    vals = tl.load(val_units + (gg * (2 * R))[None, :, None] + ee[None, None, :])
    m = tl.load(meta_units + gg[None, :])
    cw0 = tl.load(col_blk + gg * wpg)
    cw1 = tl.load(col_blk + gg * wpg + (wpg - 1))
    for i in range(0, NUM_CHUNKS if CHUNKS_CONST is None else CHUNKS_CONST):  # = n_full >= 1
        g0 = (i + 1 - (i + 1) // n_full) * GC  # the last iteration re-reads its own chunk: cache hits
        vals_n = tl.load(val_units + ((g0 + gg) * (2 * R))[None, :, None] + ee[None, None, :])
        m_n = tl.load(meta_units + (g0 + gg)[None, :])
        cw0n = tl.load(col_blk + (g0 + gg) * wpg)
        cw1n = tl.load(col_blk + (g0 + gg) * wpg + (wpg - 1))
        acc = _rows_chunk(acc, vals, m, cw0, cw1, x_row, stride_xk, BLOCK_Q, GC, R, COL_BITS)
        vals, m, cw0, cw1 = vals_n, m_n, cw0n, cw1n
    if not EVEN_G:  # the partial last chunk, masked
        g0 = n_full * GC
        gm = g0 + gg < G
        vals = tl.load(
            val_units + ((g0 + gg) * (2 * R))[None, :, None] + ee[None, None, :], mask=gm[None, :, None], other=0.0
        )
        m = tl.load(meta_units + (g0 + gg)[None, :], mask=gm[None, :], other=0)
        cw0 = tl.load(col_blk + (g0 + gg) * wpg, mask=gm, other=0)
        cw1 = tl.load(col_blk + (g0 + gg) * wpg + (wpg - 1), mask=gm, other=0)
        acc = _rows_chunk(acc, vals, m, cw0, cw1, x_row, stride_xk, BLOCK_Q, GC, R, COL_BITS)

    y = tl.reshape(tl.sum(acc, axis=1), (BLOCK_Q * R,))
    rows = q0 * R + tl.arange(0, BLOCK_Q * R)
    _store_rows(y, rows, t, y_ptr, stride_yt, ridx_ptr, bias_ptr, OUT, HAS_RIDX, HAS_BIAS)


def _expand_kernel(
    val_ptr,  # (Rp, 2G) kept values
    meta_ptr,  # (Rp, W) int32 metadata words
    wc_ptr,  # (Rp, 4G) out: dense weights over each block's 4 kept columns per group
    G,
    stride_vr,
    stride_mr,
    stride_wr,
    GC: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    g0 = tl.program_id(1) * GC
    jj = 2 * g0 + tl.arange(0, 2 * GC)
    ww = g0 // 8 + tl.arange(0, GC // 8)
    kk = 4 * g0 + tl.arange(0, 4 * GC)
    rows64 = rows.to(tl.int64)[:, None]
    vals = tl.load(val_ptr + rows64 * stride_vr + jj[None, :], mask=(jj < 2 * G)[None, :], other=0.0)
    words = tl.load(meta_ptr + rows64 * stride_mr + ww[None, :], mask=(ww < (G + 7) // 8)[None, :], other=0)
    w4 = _dense_tile(vals, words, BLOCK_R, GC).to(wc_ptr.dtype.element_ty)
    tl.store(wc_ptr + rows64 * stride_wr + kk[None, :], w4, mask=(kk < 4 * G)[None, :])


def _gather_kernel(
    xt_ptr,  # (K, TP) feature-major x, TP = tokens padded to a multiple of BLOCK_T
    wc_ptr,  # (Rp, K4) from _expand_kernel, K4 = 4G
    col_ptr,  # (B, G, 4) absolute input columns, read flat per block: (B, K4)
    ridx_ptr,
    bias_ptr,
    y_ptr,
    T,
    OUT,
    K4,
    NUM_K,  # full BLOCK_K steps: K4 // BLOCK_K (runtime when compiled)
    V,
    stride_xk,  # = TP: specialised on divisibility by 16 (16-byte cp.async gathers)
    stride_wr,
    stride_yt,
    K_CONST: tl.constexpr,  # NUM_K under the interpreter, None when compiled
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_R: tl.constexpr,  # row tiles per program group (all their token tiles run together)
    EVEN_K: tl.constexpr,
    HAS_RIDX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IN_PREC: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    # Grouped program order: GROUP_R row tiles x every token tile, so concurrent programs
    # share weight tiles and gathered activation rows in L2.
    pid = tl.program_id(0)
    n_t = tl.cdiv(T, BLOCK_T)
    n_r = tl.num_programs(0) // n_t
    per_group = GROUP_R * n_t
    first_r = (pid // per_group) * GROUP_R
    group_size = tl.minimum(n_r - first_r, GROUP_R)
    pid_r = first_r + (pid % per_group) % group_size
    pid_t = (pid % per_group) // group_size
    r0 = pid_r * BLOCK_R
    rows = r0 + tl.arange(0, BLOCK_R)
    toks = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # < TP: the padded tokens are read, never stored
    kk = tl.arange(0, BLOCK_K)
    col_blk = col_ptr + (r0 // V).to(tl.int64) * K4
    w_rows = wc_ptr + rows.to(tl.int64)[:, None] * stride_wr
    acc = tl.zeros((BLOCK_R, BLOCK_T), dtype=tl.float32)
    # Plain loads: Triton's pipeliner turns the gathers (rows of x^T at the kept columns) and the
    # weight tiles into multi-stage cp.async copies feeding wgmma on Hopper. The column indices
    # are loaded one step ahead, at the end of the previous step: loaded at the top of the step,
    # the pipeliner put a synchronous index load right before each gather's copy (ncu showed
    # long-scoreboard stalls dominating); this order alone changed the time by < 3 % (H100).
    last = (NUM_K if K_CONST is None else K_CONST) - 1
    cols = tl.load(col_blk + kk, mask=kk < K4, other=0)  # step 0
    for i in range(0, NUM_K if K_CONST is None else K_CONST):
        xg = tl.load(xt_ptr + cols.to(tl.int64)[:, None] * stride_xk + toks[None, :])
        w = tl.load(w_rows + (i * BLOCK_K + kk)[None, :])
        acc = _dot_acc(acc, w, xg, IN_PREC, DOT_UPCAST)
        cols = tl.load(col_blk + tl.minimum(i + 1, last) * BLOCK_K + kk)
    if not EVEN_K:
        k0 = (K4 // BLOCK_K) * BLOCK_K
        km = k0 + kk < K4
        cols = tl.load(col_blk + k0 + kk, mask=km, other=0).to(tl.int64)
        xg = tl.load(xt_ptr + cols[:, None] * stride_xk + toks[None, :], mask=km[:, None], other=0.0)
        w = tl.load(w_rows + (k0 + kk)[None, :], mask=km[None, :], other=0.0)
        acc = _dot_acc(acc, w, xg, IN_PREC, DOT_UPCAST)
    dest, ok = _dest_rows(rows, ridx_ptr, OUT, HAS_RIDX)
    _store_tile(acc, dest, ok, toks, T, y_ptr, stride_yt, bias_ptr, HAS_BIAS)


def _splitk_reduce_kernel(
    ws_ptr,  # (NSPLIT, T, OUT) fp32 partial sums
    bias_ptr,  # (OUT,) or dummy
    y_ptr,  # (T, OUT) output
    N,  # T * OUT
    OUT,
    stride_yt,
    NSPLIT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.load(ws_ptr + offs, mask=mask, other=0.0)
    for s in tl.static_range(1, NSPLIT):
        acc += tl.load(ws_ptr + s * N + offs, mask=mask, other=0.0)
    t = offs // OUT
    r = offs % OUT
    if HAS_BIAS:
        acc += tl.load(bias_ptr + r, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + t * stride_yt + r, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _transpose_kernel(
    x_ptr,  # (T, K) any strides
    y_ptr,  # (KO, TP) feature-major copy, TP >= T (columns T..TP-1 are padding: zeros)
    rows_ptr,  # (KO,) int32 source feature of each output row, -1 for a zero row (when HAS_ROWS)
    T,
    TP,
    K,
    KO,
    stride_xt,
    stride_xk,
    stride_yk,
    HAS_ROWS: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
):
    # torch's x.t().contiguous() ran at ~0.5 TB/s here (64 us for 2048 x 4096 fp16, H100);
    # a tiled copy with both sides coalesced (Triton converts the layout in shared memory).
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    k = tl.program_id(1) * BK + tl.arange(0, BK)
    if HAS_ROWS:
        src = tl.load(rows_ptr + k, mask=k < KO, other=-1)
    else:
        src = k
    tile = tl.load(
        x_ptr + t.to(tl.int64)[:, None] * stride_xt + src.to(tl.int64)[None, :] * stride_xk,
        mask=(t < T)[:, None] & ((src >= 0) & (src < K))[None, :],
        other=0.0,
    )
    tl.store(y_ptr + k.to(tl.int64)[None, :] * stride_yk + t[:, None], tile, mask=(t < TP)[:, None] & (k < KO)[None, :])


_KERNEL_FNS = {
    "fma": _fma_kernel,
    "rows": _rows_kernel,
    "dot": _dot_kernel,
    "expand": _expand_kernel,
    "gather": _gather_kernel,
    "reduce": _splitk_reduce_kernel,
    "transpose": _transpose_kernel,
}
# Sizes vary per layer: no specialisation on their values where it buys nothing (one binary per
# config). Strides and the output width stay specialised: Triton then knows their divisibility by
# 16, which vectorises the gathers (16-byte cp.async) and the output stores (masked on OUT: without
# it the gather kernel stored 2-byte scalars, 64 stores per thread instead of 8).
_NO_SPECIALIZE = {
    "fma": ["OUT", "G", "NUM_CHUNKS", "V"],
    "rows": ["OUT", "G", "NUM_CHUNKS", "V"],
    "dot": ["T", "G", "NUM_CHUNKS", "NSPLIT", "V"],
    "expand": ["G"],
    "gather": ["NUM_K", "V"],
    "reduce": ["N", "OUT"],
    "transpose": [],  # sizes specialised: divisibility by 16 aligns its masked stores (3-4x faster)
}
_BUILT: dict[tuple[str, bool], object] = {}
_BUILD_LOCK = threading.Lock()


def _kernel(kind: str, interpret: bool):
    """The jitted (or interpreted) kernel; both variants come from the same Python function."""
    key = (kind, interpret)
    if key not in _BUILT:
        with _BUILD_LOCK:
            if interpret:
                from triton.runtime.interpreter import InterpretedFunction

                _BUILT[key] = InterpretedFunction(_KERNEL_FNS[kind])
            else:
                from triton.runtime.jit import JITFunction

                _BUILT[key] = JITFunction(_KERNEL_FNS[kind], do_not_specialize=_NO_SPECIALIZE[kind])
    return _BUILT[key]


# --------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration: kernel kind and its tile sizes."""

    kind: str  # "fma", "dot" or "gather"
    block_r: int
    gc: int  # groups per chunk (gather: its K step is 4 * gc kept columns)
    block_t: int = 1
    num_warps: int = 4
    num_stages: int = 2
    fm: bool = False  # dot only: transpose x to feature-major first (coalesced 16-byte gathers)
    split_k: int = 1  # dot only: up to this many K splits (fp32 partials + one reduce launch)

    def fits(self, v: int, tokens: int) -> bool:
        if v % self.block_r:
            return False
        if self.kind in ("dot", "gather"):
            return self.block_r >= 16 and self.block_t >= 16
        return True


# Why these: decode wants many programs with >= 4 KB of values in flight each
# (BLOCK_R x 2GC x 2 B) and no cross-thread reduction inside the loop; prefill
# wants the largest V-block tile as the shared-columns dimension (64/128 rows)
# and 64-256 tokens so each gathered x tile feeds enough MACs. Few configs:
# every one compiles once per dtype/flag set (shapes are runtime ints).
_FMA_CONFIGS = [
    KernelConfig("fma", 4, 128, num_warps=4),
    KernelConfig("fma", 2, 256, num_warps=4),
    KernelConfig("fma", 4, 256, num_warps=4),
    KernelConfig("fma", 8, 64, num_warps=4),
    KernelConfig("fma", 4, 64, num_warps=2),
]
_SMALL_DOT_CONFIGS = [
    KernelConfig("dot", 32, 64, 16, num_warps=4),
    KernelConfig("dot", 16, 32, 16, num_warps=4),
    KernelConfig("dot", 16, 32, 16, num_warps=4, split_k=4),
    KernelConfig("dot", 32, 64, 16, num_warps=4, split_k=4),
    KernelConfig("dot", 64, 32, 16, num_warps=4, split_k=8),
    KernelConfig("dot", 32, 32, 32, num_warps=4, split_k=4),
    KernelConfig("dot", 64, 16, 64, num_warps=4, fm=True),
]
_PREFILL_CONFIGS = [
    KernelConfig("dot", 64, 16, 128, num_warps=4, num_stages=3, fm=True),
    KernelConfig("dot", 64, 32, 128, num_warps=8, num_stages=2, fm=True),
    KernelConfig("dot", 64, 16, 256, num_warps=8, num_stages=2, fm=True),
    KernelConfig("dot", 64, 32, 256, num_warps=8, num_stages=2, fm=True),
    KernelConfig("dot", 128, 16, 128, num_warps=8, num_stages=2, fm=True),
    KernelConfig("dot", 128, 16, 256, num_warps=8, num_stages=2, fm=True),
    # V = 16 / 32: the shared-columns tile is at most V rows
    KernelConfig("dot", 32, 32, 128, num_warps=4, num_stages=3, fm=True),
    KernelConfig("dot", 32, 16, 256, num_warps=4, num_stages=3, fm=True),
    KernelConfig("dot", 16, 32, 128, num_warps=4, num_stages=3, fm=True),
]
# Expand + gather GEMM (many tokens): the whole weight is rebuilt once per call, so these pay
# off from a few hundred tokens. Picked from a sweep of 14 tile/stage/grouping variants
# (H100, Llama-2-7B and DeiT-base shapes, 2048-12672 tokens): 128 tokens x 64 kept columns
# per step with 3 stages won at V = 64; 256-token tiles were 15-40 % slower; a TMA
# descriptor for the weight tile changed nothing (+-5 %); 128-row tiles (V = 128) were 25-40 %
# faster than 64-row ones on the same weights (half the gathered activation traffic).
_GATHER_CONFIGS = [
    KernelConfig("gather", 128, 16, 128, num_warps=8, num_stages=3),
    KernelConfig("gather", 64, 16, 128, num_warps=4, num_stages=3),
    KernelConfig("gather", 64, 8, 128, num_warps=4, num_stages=4),
    KernelConfig("gather", 64, 8, 256, num_warps=8, num_stages=4),  # won at M = 5 in the sweep
    KernelConfig("gather", 32, 16, 128, num_warps=4, num_stages=3),
    KernelConfig("gather", 16, 16, 128, num_warps=4, num_stages=3),
]
# The gather GEMM on expanded weights the caller holds (no rebuild per call), 2-64 tokens: it
# streams 4/M of the dense weight's bytes. The best of 9 configs per case (H100, Llama-2-7B
# shapes, 8-64 tokens, weights streamed from HBM) was one of these five.
_GATHER_MID_CONFIGS = [
    KernelConfig("gather", 32, 64, 16, num_warps=4, num_stages=3),
    KernelConfig("gather", 64, 32, 16, num_warps=4, num_stages=4),
    KernelConfig("gather", 16, 32, 32, num_warps=4, num_stages=4),
    KernelConfig("gather", 32, 32, 32, num_warps=4, num_stages=4),
    KernelConfig("gather", 64, 32, 32, num_warps=4, num_stages=3),
]


# The decode kernel on the row-interleaved layout (interleave_rows), 1-4 tokens; block_r = R x
# units per program. The best per case of 9 configs (H100, Llama-2-7B shapes incl. fused q/k/v
# and gate/up, 64:2:8 and 64:2:5, 1 token, weights streamed) was one of these.
_ROWS_CONFIGS = [
    KernelConfig("rows", 4, 128, num_warps=4),
    KernelConfig("rows", 8, 128, num_warps=4),
    KernelConfig("rows", 8, 64, num_warps=2),
    KernelConfig("rows", 16, 64, num_warps=4),
    KernelConfig("rows", 16, 32, num_warps=2),
    KernelConfig("rows", 16, 128, num_warps=4),
]


def _pow2_divisor(v: int, cap: int) -> int:
    d = 1
    while d * 2 <= cap and v % (d * 2) == 0:
        d *= 2
    return d


def _token_bucket(tokens: int) -> int:
    return 1 << max(0, (tokens - 1).bit_length())


def candidate_configs(v: int, tokens: int, expanded: bool = False, rows: int = 0) -> list[KernelConfig]:
    """Configs worth timing for V = v rows per block and this many tokens (``expanded``: the
    caller holds the expanded weights, so the gather GEMM needs no rebuild and pays from 2 tokens;
    ``rows``: the caller holds the values interleaved by this many rows, interleave_rows)."""
    # The first candidate is what runs without timing (VNM_AUTOTUNE=0, or a first call inside a CUDA-graph
    # capture) and what the autotuner keeps unless another is clearly faster, so each list leads with
    # the kind that won most often on the H100/H200 (benchmarks/results/*/linear.json, meta.autotune):
    # the interleaved decode kernel where its layout is held, the gather GEMM on held expanded weights
    # at 2-64 tokens and for many tokens (2x faster than the first dot prefill config at 2048 tokens
    # on the Llama-2-7B shapes, H200).
    cands: list[KernelConfig] = []
    if tokens <= 4:
        if rows:
            cands += [c for c in _ROWS_CONFIGS if c.block_r % rows == 0]
        cands += _FMA_CONFIGS
    if expanded and 1 < tokens <= 64:
        cands += [c for c in _GATHER_MID_CONFIGS if c.block_t <= max(16, _token_bucket(tokens))]
    if tokens <= 64:
        cands += [c for c in _SMALL_DOT_CONFIGS if c.block_t <= max(16, _token_bucket(tokens))]
    if tokens > (64 if expanded else 128):
        cands += _GATHER_CONFIGS
    if tokens > 32:
        cands += _PREFILL_CONFIGS
    cands = [c for c in cands if c.fits(v, tokens)]
    if not cands:  # V with a small power-of-two factor: per-token FMA kernel always fits
        cands = [KernelConfig("fma", _pow2_divisor(v, 16), 64)]
    return cands


def _interpret_config(v: int, tokens: int, rows: int = 0) -> KernelConfig:
    """Interpreter: fewest programs (each program costs Python time)."""
    if rows and tokens <= 4:
        return KernelConfig("rows", rows * (_pow2_divisor(v, 32) // rows or 1), 32)
    br = _pow2_divisor(v, 64)
    if br >= 16 and tokens > 32:
        return KernelConfig("gather", br, 4, 32)
    if br >= 16 and tokens > 2:
        return KernelConfig("dot", br, 16, 16 if tokens <= 16 else 32)
    return KernelConfig("fma", _pow2_divisor(v, 32), 32)


# --------------------------------------------------------------------------- launch
def _feature_major(
    x2: Tensor, padded_tokens: int, interpret: bool, rows: Tensor | None = None, out_rows: int | None = None
) -> Tensor:
    """x (T, K) -> (K, padded_tokens) contiguous copy, zeros past T (one transpose launch). With ``rows``
    (int32, -1 for a zero row), output row i is input feature rows[i]; without, ``out_rows`` (>= K) pads
    with zero rows."""
    tokens, k = x2.shape
    ko = rows.numel() if rows is not None else (out_rows or k)
    xt = torch.empty((ko, padded_tokens), dtype=x2.dtype, device=x2.device)
    grid = (triton.cdiv(padded_tokens, 64), triton.cdiv(ko, 64))
    _kernel("transpose", interpret)[grid](
        x2, xt, x2 if rows is None else rows, tokens, padded_tokens, k, ko, x2.stride(0), x2.stride(1), xt.stride(0),
        HAS_ROWS=rows is not None, BT=64, BK=64,
    )  # fmt: skip
    return xt


def expand_weights(values: Tensor, meta: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """The dense weights over each block's 4 kept columns per group, (Rp, 4G), from the compressed
    values and metadata (what the gather GEMM multiplies). Rows are padded to a multiple of 64
    elements in memory (the result is a view), so every row starts 16-byte aligned: the GEMM's
    weight loads are then 16-byte copies whatever G is (with 4G = 8808, 64:2:5 at 11008 inputs,
    they were not, and that layer ran 2-3x slower)."""
    rows_p, slots = values.shape
    groups = slots // 2
    interpret = not values.is_cuda
    k4 = 4 * groups
    buf = torch.empty((rows_p, max(64, -(-k4 // 64) * 64)), dtype=dtype or values.dtype, device=values.device)
    wc = buf[:, :k4]
    if not values.is_cuda and not (HAS_TRITON and interpret_mode() and interpreter_ready()):
        from ..format import _unpack_meta

        pos = _unpack_meta(meta, 2, groups)  # (Rp, G, 2) positions among the block's 4 columns
        dense = torch.zeros((rows_p, groups, 4), dtype=wc.dtype, device=wc.device)
        dense.scatter_(2, pos, values.reshape(rows_p, groups, 2).to(wc.dtype))
        wc.copy_(dense.view(rows_p, k4))
        return wc
    if rows_p and groups:
        block_r = _pow2_divisor(rows_p, 32)
        _kernel("expand", interpret)[(rows_p // block_r, triton.cdiv(groups, 32))](
            values, meta, wc, groups, values.stride(0), meta.stride(0), wc.stride(0), GC=32, BLOCK_R=block_r
        )
    return wc


_META_WORD = {4: torch.int16, 8: torch.int32, 16: torch.int64}


def default_interleave(rows_p: int, v: int) -> int:
    """Rows per unit for interleave_rows: 8 from 8192 padded rows up (enough programs at 1 token),
    else 4; never more than the largest of 4/8/16 that divides V (0: none does)."""
    want = 8 if rows_p >= 8192 else 4
    fits = [r for r in (16, 8, 4) if r <= want and v % r == 0 and rows_p % r == 0]
    return fits[0] if fits else 0


def interleave_rows(values: Tensor, meta: Tensor, v: int, rows: int | None = None) -> tuple[Tensor, Tensor]:
    """The values and metadata re-laid for the decode kernel ``_rows_kernel`` (same bytes).

    ``rows`` (R: 4, 8 or 16, dividing V; default ``default_interleave``) consecutive rows of each
    group become contiguous: values (Rp / R, G, R, 2) and one metadata word (int16 / int32 / int64)
    of R 4-bit codes per (unit, group). A thread then loads R rows x 2 values of one group at once,
    gathers x once for them, and needs no shared-memory transposition (H100, 1 token, 11008 x 4096
    64:2:8: 12.9 us vs 16.0 us on the row-major layout; benchmarks/results/<gpu>/decode_layout.md).
    """
    rows_p, slots = values.shape
    groups = slots // 2
    r = default_interleave(rows_p, v) if rows is None else rows
    if r not in _META_WORD or v % r or rows_p % r:
        raise ValueError(f"rows must be 4, 8 or 16 and divide V={v} and the {rows_p} padded rows, got {r}")
    from ..format import _unpack_meta

    pos = _unpack_meta(meta, 2, groups)  # (Rp, G, 2)
    codes = (pos[..., 0] | (pos[..., 1] << 2)).reshape(rows_p // r, r, groups).transpose(1, 2)  # (Q, G, R)
    shifts = 4 * torch.arange(r, device=values.device, dtype=torch.int64)
    words = (codes << shifts).sum(-1)  # < 2 ** (4R): the top bit wraps to the sign of the word
    bits = 4 * r
    if bits < 64:
        words = torch.where(words >= 2 ** (bits - 1), words - 2**bits, words)
    inter = values.reshape(rows_p // r, r, groups, 2).transpose(1, 2).contiguous()
    return inter, words.to(_META_WORD[r]).contiguous()


def _launch_rows(cfg: KernelConfig, x2: Tensor, interleaved, columns, row_index, bias, y, v: int, interpret) -> None:
    vals, words = interleaved
    units, groups, r, _ = vals.shape
    if cfg.block_r % r or units % (cfg.block_r // r):
        raise ValueError(f"config {cfg} does not fit values interleaved by {r} rows ({units} units)")
    n_full = groups // cfg.gc
    if n_full == 0:  # fewer groups than one chunk: the kernel's loop needs one full chunk
        cfg = KernelConfig("rows", cfg.block_r, 1 << (groups.bit_length() - 1), num_warps=1)
        n_full = groups // cfg.gc
    tokens = x2.shape[0]
    dummy = vals
    opts = {} if interpret else dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    _kernel("rows", interpret)[(units // (cfg.block_r // r), tokens)](
        x2, vals, columns.view(torch.int64), words, row_index if row_index is not None else dummy,
        bias if bias is not None else dummy, y, y.shape[1], groups, n_full, v, x2.stride(0), x2.stride(1), y.stride(0),
        CHUNKS_CONST=n_full if interpret else None, GC=cfg.gc, BLOCK_Q=cfg.block_r // r, R=r,
        EVEN_G=groups % cfg.gc == 0, HAS_RIDX=row_index is not None, HAS_BIAS=bias is not None,
        COL_BITS=8 * columns.element_size(), **opts,
    )  # fmt: skip


def _launch_gather(
    cfg: KernelConfig, x2: Tensor, values, columns, meta, row_index, bias, y, v: int, interpret, expanded=None
) -> None:
    """Gather GEMM over the expanded weights (rebuilt here, once per call, unless given)."""
    tokens, _ = x2.shape
    rows_p = values.shape[0]
    # Feature-major x padded to whole token tiles: every gathered row is BLOCK_T contiguous
    # tokens with a 16-byte-aligned stride, so the token dimension needs no mask.
    xt = _feature_major(x2, triton.cdiv(tokens, cfg.block_t) * cfg.block_t, interpret)
    wc = expanded if expanded is not None else expand_weights(values, meta, x2.dtype)
    block_k = 4 * cfg.gc
    n_k = wc.shape[1] // block_k
    dummy = values
    grid = (triton.cdiv(tokens, cfg.block_t) * (rows_p // cfg.block_r),)
    launch_opts = {} if interpret else dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    _kernel("gather", interpret)[grid](
        xt, wc, columns, row_index if row_index is not None else dummy, bias if bias is not None else dummy, y,
        tokens, y.shape[1], wc.shape[1], n_k, v, xt.stride(0), wc.stride(0), y.stride(0),
        K_CONST=n_k if interpret else None, BLOCK_R=cfg.block_r, BLOCK_T=cfg.block_t, BLOCK_K=block_k, GROUP_R=8,
        EVEN_K=wc.shape[1] % block_k == 0, HAS_RIDX=row_index is not None, HAS_BIAS=bias is not None,
        IN_PREC="ieee" if x2.dtype == torch.float32 else "tf32", DOT_UPCAST=interpret and x2.dtype == torch.bfloat16,
        **launch_opts,
    )  # fmt: skip


def _launch(
    cfg: KernelConfig, x2: Tensor, values, columns, meta, row_index, bias, y, v: int, interpret: bool, expanded=None,
    interleaved=None,
) -> None:  # fmt: skip
    tokens, _ = x2.shape
    rows_p, slots = values.shape
    groups = slots // 2
    n_full = groups // cfg.gc  # both kernels loop over full chunks, then one masked tail
    if cfg.kind == "gather":
        _launch_gather(cfg, x2, values, columns, meta, row_index, bias, y, v, interpret, expanded)
        return
    if cfg.kind == "rows":
        if interleaved is None:
            raise ValueError("a 'rows' config needs the interleaved values (interleave_rows)")
        _launch_rows(cfg, x2, interleaved, columns, row_index, bias, y, v, interpret)
        return
    if cfg.fm and x2.stride(0) != 1 and tokens > 1:
        # Feature-major copy of x (one transpose launch, T x K x 2 bytes each way): the gathers
        # then read 16-byte runs of tokens per kept column instead of scattered elements.
        x2 = _feature_major(x2, tokens, interpret).t()
    dummy = values  # never read when the HAS_* flag is off
    common = dict(
        CHUNKS_CONST=n_full if interpret else None,
        GC=cfg.gc,
        BLOCK_R=cfg.block_r,
        EVEN_G=groups % cfg.gc == 0,
        VAL_ALIGN=_pow2_divisor(values.stride(0), 16),
        HAS_RIDX=row_index is not None,
        HAS_BIAS=bias is not None,
    )
    launch_opts = {} if interpret else dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    ptrs = (
        x2,
        values,
        columns,
        meta,
        row_index if row_index is not None else dummy,
        bias if bias is not None else dummy,
        y,
    )
    strides = (x2.stride(0), x2.stride(1), values.stride(0), meta.stride(0), y.stride(0))
    if cfg.kind == "fma":
        grid = (rows_p // cfg.block_r, tokens)
        col_bits = 8 * columns.element_size()
        ptrs = (ptrs[0], ptrs[1], columns.view(torch.int64), *ptrs[3:])  # 8-byte column words
        _kernel("fma", interpret)[grid](
            *ptrs, y.shape[1], groups, n_full, v, *strides, **common, COL_BITS=col_bits, **launch_opts
        )
    else:
        # split-K: the largest divisor of the full-chunk count up to cfg.split_k (uniform splits)
        nsplit = max(d for d in range(1, max(1, min(cfg.split_k, n_full)) + 1) if n_full % d == 0)
        per_split = n_full // nsplit
        ws = torch.empty((nsplit, tokens, y.shape[1]), dtype=torch.float32, device=y.device) if nsplit > 1 else dummy
        if interpret:
            common["CHUNKS_CONST"] = per_split
        grid = (triton.cdiv(tokens, cfg.block_t), rows_p // cfg.block_r, nsplit)
        prec = "ieee" if x2.dtype == torch.float32 else "tf32"
        _kernel("dot", interpret)[grid](
            *ptrs, ws, tokens, y.shape[1], groups, per_split, nsplit, v, *strides, **common, BLOCK_T=cfg.block_t,
            IN_PREC=prec, EVEN_T=tokens % cfg.block_t == 0, DOT_UPCAST=interpret and x2.dtype == torch.bfloat16,
            SPLIT=nsplit > 1, **launch_opts,
        )  # fmt: skip
        if nsplit > 1:
            n = tokens * y.shape[1]
            _kernel("reduce", interpret)[(triton.cdiv(n, 1024),)](
                ws, bias if bias is not None else dummy, y, n, y.shape[1], y.stride(0), NSPLIT=nsplit,
                HAS_BIAS=bias is not None, BLOCK=1024,
            )  # fmt: skip


_AUTOTUNE_CACHE: dict[tuple, KernelConfig] = {}


def clear_autotune_cache() -> None:
    _AUTOTUNE_CACHE.clear()


def autotune_cache() -> dict[tuple, KernelConfig]:
    """The chosen config per (device, dtype, shape, V, token bucket, flags) key."""
    return dict(_AUTOTUNE_CACHE)


def _replay_ms(fn) -> float:
    """Median ms of one CUDA-graph replay of ``fn`` (do_bench flushes L2 before each replay).

    Timing the graph rather than the eager call charges every config one launch: eagerly, a
    config of two kernels (transpose + gather GEMM) paid a second launch latency that a compiled
    model under CUDA graphs never pays, and the autotuner kept slower single-kernel configs
    (H100, 16 tokens: 36 us chosen where 23 us was available)."""
    fn()  # compile and warm up outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    try:
        return triton.testing.do_bench(graph.replay, warmup=5, rep=40, return_mode="median")
    finally:
        del graph


def _choose(key: tuple, cands: list[KernelConfig], run) -> KernelConfig:
    """Time each candidate once per key (median of a short do_bench of a CUDA-graph replay, L2
    flushed before each, so decode configs are timed streaming from HBM) and cache the winner."""
    if key in _AUTOTUNE_CACHE:
        return _AUTOTUNE_CACHE[key]
    if len(cands) == 1 or torch.cuda.is_current_stream_capturing() or os.environ.get("VNM_AUTOTUNE") == "0":
        return cands[0]  # never benchmark inside a CUDA-graph capture; VNM_AUTOTUNE=0: first candidate
    best, best_ms = cands[0], float("inf")
    for cfg in cands:
        try:
            ms = _replay_ms(lambda cfg=cfg: run(cfg))
        except (RuntimeError, ValueError, triton.compiler.errors.CompilationError) as err:  # e.g. out of resources
            log.debug("config %s failed: %s", cfg, err)
            continue
        if ms < 0.97 * best_ms:  # earlier candidates are the heuristic favourites: switch only on a clear win
            best, best_ms = cfg, ms
    log.info("vnm autotune %s -> %s (%.4f ms)", key, best, best_ms)
    _AUTOTUNE_CACHE[key] = best
    return best


def _check_interleaved(interleaved, values: Tensor, v: int) -> int:
    """R of a valid interleave_rows result for these values, else a ValueError naming what is wrong."""
    rows_p, slots = values.shape
    try:
        vals, words = interleaved
    except (TypeError, ValueError):
        raise ValueError("interleaved must be the (values, meta) pair interleave_rows returns") from None
    r = vals.shape[2] if vals.dim() == 4 else 0
    want_vals = (rows_p // r, slots // 2, r, 2) if r in _META_WORD else None
    if (
        want_vals is None or v % r or tuple(vals.shape) != want_vals or vals.dtype != values.dtype
        or vals.device != values.device or not vals.is_contiguous() or tuple(words.shape) != want_vals[:2]
        or words.dtype != _META_WORD[r] or words.device != values.device or not words.is_contiguous()
    ):  # fmt: skip
        raise ValueError(
            f"interleaved must be interleave_rows(values, meta, V={v}) for values {tuple(values.shape)} "
            f"{values.dtype} on {values.device}: got values {tuple(vals.shape)} {vals.dtype} on {vals.device} "
            f"and metadata {tuple(words.shape)} {words.dtype} on {words.device}"
        )
    return r


def vnm_linear_triton(
    x: Tensor,
    values: Tensor,
    columns: Tensor,
    meta: Tensor,
    row_index: Tensor | None,
    bias: Tensor | None,
    v: int,
    n: int,
    m: int,
    out_features: int,
    *,
    out: Tensor | None = None,
    config: KernelConfig | None = None,
    expanded: Tensor | None = None,
    interleaved: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Launch the Triton kernels (compiled on CUDA, interpreted under TRITON_INTERPRET=1).

    ``out`` (tokens, out_features) may be passed to check that every element
    is written; ``config`` forces a launch configuration (tests, benchmarks);
    ``expanded`` is ``expand_weights(values, meta)`` held by the caller: the
    gather GEMM then skips its per-call rebuild (2 tokens and up);
    ``interleaved`` is ``interleave_rows(values, meta, v)`` held by the caller:
    the autotuner then also times the decode kernel on it (1-4 tokens).
    """
    if not HAS_TRITON:
        raise RuntimeError("vnm_linear_triton needs triton")
    if n != 2:
        raise ValueError(f"the Triton kernels support n = 2 only, got n={n}")
    interpret = interpret_mode() and not x.is_cuda
    if not x.is_cuda and not interpret:
        raise ValueError("vnm_linear_triton runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1)")
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x must be fp16, bf16 or fp32, got {x.dtype}")
    tokens = x2.shape[0]
    values = values.contiguous()
    columns = columns.contiguous()
    meta = meta.contiguous()
    if row_index is not None:
        row_index = row_index.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    if expanded is not None:
        want = (values.shape[0], 2 * values.shape[1])
        bad = tuple(expanded.shape) != want or expanded.dtype != x.dtype or expanded.device != x.device
        if bad or expanded.stride(-1) != 1:
            raise ValueError(
                f"expanded must be a row-major {want} {x.dtype} tensor on {x.device} "
                f"(expand_weights(values, meta, x.dtype)), got {tuple(expanded.shape)} {expanded.dtype} "
                f"on {expanded.device} with strides {expanded.stride()}"
            )
    r = 0
    if interleaved is not None:
        r = _check_interleaved(interleaved, values, v)
    if out is None:  # allocated in x's leading shape: the tensor returned is not a view
        result = torch.empty((*x.shape[:-1], out_features), dtype=x.dtype, device=x.device)
        out = result.view(tokens, out_features)
    else:
        result = out.reshape(*x.shape[:-1], out_features)
    if tokens == 0 or out_features == 0:
        return result
    if k == 0 or values.shape[1] == 0:
        out.zero_()
        if bias is not None:
            out += bias.to(out.dtype)
        return result

    target = out
    if interpret and out.dtype == torch.bfloat16:
        # The interpreter rounds fp32 -> bf16 toward zero (GPUs round to nearest even):
        # store fp32 (NaN-poisoned, so unwritten elements still show) and let torch round.
        target = torch.full(out.shape, float("nan"), dtype=torch.float32)

    def run(cfg: KernelConfig) -> None:
        _launch(cfg, x2, values, columns, meta, row_index, bias, target, v, interpret, expanded, interleaved)

    if config is None:
        if interpret:
            config = _interpret_config(v, tokens, r)
        else:
            key = (
                x.device.index, x.dtype, values.dtype, values.shape[0], values.shape[1], v,
                _token_bucket(tokens), row_index is not None, bias is not None, expanded is not None, r,
            )  # fmt: skip
            config = _choose(key, candidate_configs(v, tokens, expanded is not None, r), run)
    elif not config.fits(v, tokens):
        raise ValueError(f"config {config} does not fit V={v}")
    run(config)
    if target is not out:
        out.copy_(target)
    return result
