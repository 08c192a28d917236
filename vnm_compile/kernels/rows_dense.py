"""Rebuild the dense weight from the row-major compressed layout (``VNMWeight``: values, columns, meta).

The "rows" layout of a compressed model (``VNMLinear`` on GPUs or patterns without the sparse-tensor-core
packing: fp32, n != 2, V not a multiple of 64) runs its dense path (a prefill where cuBLAS on the dense
weight wins) on a rebuilt weight, like the packed layout (tc_dense.py): one pass that writes every element
of the output once, zeros included, so the temporary needs no memset.

1. No autotuning: one program per (BR rows, GB groups) tile writes its BR x GB * M elements; BR = 32 and
   GB = 8 keep a tile at 2-4 K elements for the M of the patterns in use (M up to 16).
2. ``_rows_to_dense_kernel`` below.
3. ``rows_to_dense`` (launcher: checks, output allocated uninitialised or given as ``out``, launch; CPU
   tensors without TRITON_INTERPRET=1 take the reference).
4. ``format.decompress`` is the reference (plain PyTorch).

Only weights stored in the coordinates in which they obey the pattern (no permutation folded in: row_index
None, each kept column inside its own M-column group, as ``VNMLinear`` stores them); an output permutation
(vnm::compressed_linear's row_index) is applied as the rows are written (``rows_out``). A padding slot
(``from_dense`` points it at column 0 with a zero value) adds zero wherever it lands.
References: the layout is ``format.VNMWeight``'s (``_pack_meta``: 2 bits per kept value, 16 / n groups a word).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..format import VNMWeight, decompress, groups_per_word
from .vnm_triton import HAS_TRITON, interpret_mode, interpreter_ready

__all__ = ["rows_to_dense"]

BR, GB = 32, 8  # rows and groups of one program's tile

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rows_to_dense_kernel(
        # pointers: kept values (rows_p, groups * N), kept columns (row blocks, groups, 4), metadata words
        # (rows_p, words), output, the output row of each stored row (read only with HAS_ROWS)
        val_ptr, col_ptr, meta_ptr, out_ptr, rows_ptr,
        # sizes
        OUT, IN, GROUPS, V,
        # strides (elements)
        stride_v, stride_c0, stride_c1, stride_m, stride_o,
        # pattern (N kept per row and group, M columns per group, MP the next power of two) and tile
        N: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, GPW: tl.constexpr, BR: tl.constexpr,
        GB: tl.constexpr, HAS_ROWS: tl.constexpr,
    ):  # fmt: skip
        r = tl.program_id(0) * BR + tl.arange(0, BR)[:, None]  # (BR, 1) rows
        g = tl.program_id(1) * GB + tl.arange(0, GB)[None, :]  # (1, GB) groups
        inside = (r < OUT) & (g < GROUPS)
        word = tl.load(meta_ptr + r.to(tl.int64) * stride_m + g // GPW, mask=inside, other=0)
        code = word >> ((g % GPW) * (2 * N))
        cbase = col_ptr + (r // V).to(tl.int64) * stride_c0 + g * stride_c1
        j = tl.arange(0, MP)[None, None, :]
        col = (g * M)[:, :, None] + j  # (1, GB, MP) columns of each group
        acc = tl.zeros([BR, GB, MP], dtype=val_ptr.dtype.element_ty)
        for k in tl.static_range(N):  # 1. each kept value of the row in this group, at its column
            pos = (code >> (2 * k)) & 3
            c = tl.load(cbase + pos, mask=inside, other=-1).to(tl.int32)
            v = tl.load(val_ptr + r.to(tl.int64) * stride_v + g * N + k, mask=inside, other=0)
            acc += tl.where(col == c[:, :, None], v[:, :, None], tl.zeros_like(acc))  # 2. zero elsewhere
        rr = r[:, :, None]
        ok = (rr < OUT) & (col < IN) & (j < M)
        if HAS_ROWS:  # 3. stored row -> its output row (-1: a padding row, not written)
            rr = tl.load(rows_ptr + rr, mask=rr < OUT, other=-1)
            ok = ok & (rr >= 0)
        tl.store(out_ptr + rr.to(tl.int64) * stride_o + col, acc.to(out_ptr.dtype.element_ty), mask=ok)


def rows_to_dense(w: VNMWeight, out: Tensor | None = None, rows_out: Tensor | None = None) -> Tensor:
    """The dense (out_features, in_features) weight of ``w`` in its stored coordinates (``w.row_index`` None).

    ``out``: where to write it (every element is written; its contents do not matter), else a fresh
    uninitialised tensor. ``rows_out`` (int32): stored row r is written at output row ``rows_out[r]`` (as
    ``tc_dense.tc_to_dense``'s ``rows``)."""
    from .tc_dense import _check_rows, _place_rows

    if not isinstance(w, VNMWeight):
        raise TypeError(f"rows_to_dense takes a VNMWeight, got {type(w).__name__}")
    if w.row_index is not None:
        raise ValueError("rows_to_dense takes a weight in its stored coordinates (row_index None)")
    rows, cols = w.shape
    _check_rows(rows_out, rows, w.device)
    if out is not None and (
        out.shape != (rows, cols) or out.dtype != w.dtype or out.device != w.device or out.stride(1) != 1
    ):
        raise ValueError(
            f"out must be a ({rows}, {cols}) {w.dtype} tensor on {w.device} with unit column stride, got "
            f"{tuple(out.shape)} {out.dtype} on {out.device} with strides {out.stride()}"
        )
    on_cpu = w.device.type == "cpu" and interpret_mode() and interpreter_ready()
    if not (HAS_TRITON and (w.values.is_cuda or on_cpu)):
        return _place_rows(decompress(w.values, w.columns, w.meta, None, w.pattern, w.shape), rows_out, out)
    if out is None:
        out = torch.empty(rows, cols, dtype=w.dtype, device=w.device)
    if out.numel() == 0:
        return out
    p = w.pattern
    groups = w.columns.shape[1]
    values, columns, meta = (t if t.stride(-1) == 1 else t.contiguous() for t in (w.values, w.columns, w.meta))
    grid = (triton.cdiv(rows, BR), triton.cdiv(groups, GB))
    _rows_to_dense_kernel[grid](
        values, columns, meta, out, out if rows_out is None else rows_out,
        rows, cols, groups, w.block_rows,
        values.stride(0), columns.stride(0), columns.stride(1), meta.stride(0), out.stride(0),
        N=p.n, M=p.m, MP=triton.next_power_of_2(p.m), GPW=groups_per_word(p.n), BR=BR, GB=GB,
        HAS_ROWS=rows_out is not None,
    )  # fmt: skip
    return out
