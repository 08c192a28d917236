"""Rebuild the dense weight from the sparse-tensor-core packing (``SparseTCWeight`` records).

A compressed model holds one layout per weight; on GPUs that run the sparse tensor cores that is their
packing. Where the dense GEMM is faster (a prefill at token counts where the sparse GEMM loses), the dense
weight is rebuilt into a temporary and cuBLAS runs on it: this kernel writes it, from the records' A
fragments, metadata and kept-column indices, in one pass that writes every element of the output once,
zeros included, so the temporary (the caching allocator's block, shared by the layers) needs no memset.

1. No autotuning: one program per (64-row block, k-step of 8 groups) writes that tile's 64 rows x 8 M
   columns (the work per program is fixed by the format; M is a compile-time constant, padded to a power
   of two inside the program).
2. ``_tc_to_dense_kernel`` below.
3. ``tc_to_dense`` (launcher: checks, output allocated uninitialised or given as ``out``, launch; CPU tensors
   without TRITON_INTERPRET=1 take the reference).
4. ``tc_to_dense_reference``: ``unpack_sparse_tc`` then ``decompress`` (plain PyTorch).

Only weights stored in the coordinates in which they obey the pattern (no input permutation folded into the
columns, as ``VNMLinear`` stores them): every kept column lies inside its own M-column group. A padding slot
(``from_dense`` points it at column 0 with a zero value) adds zero wherever it lands.
References: the record layout is ``sparse_tc.pack_sparse_tc``'s.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .vnm_triton import HAS_TRITON, interpret_mode, interpreter_ready

__all__ = ["tc_to_dense", "tc_to_dense_reference"]

RECORDS = (584, 576)  # int32 words per (64-row block, k-step): 512 A fragments, 64 metadata (+ 8 x^T row words)

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _tc_to_dense_kernel(
        # pointers: records as int32 and as 16-bit halves (the same memory), kept columns, index tables, output,
        # the output row of each stored row (read only with HAS_ROWS)
        rec_ptr, half_ptr, cols_ptr, a_off_ptr, e_word_ptr, e_shift_ptr, out_ptr, rows_ptr,
        # sizes (REC_W: int32 words per record)
        STEPS, OUT, IN, REC_W,
        # strides (elements) of the output rows
        stride_o,
        # M of the pattern and the next power of two; whether stored rows go to the rows rows_ptr names
        M: tl.constexpr, MP: tl.constexpr, HAS_ROWS: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0)
        s = tl.program_id(1)
        r = tl.arange(0, 64)[:, None]  # row of the tile
        g = tl.arange(0, 8)[None, :]  # group of the k-step
        rg = r * 8 + g
        rec = (b * STEPS + s).to(tl.int64) * REC_W
        # 1. per (row, group): its two kept values and their positions among the block's 4 kept columns
        v0 = tl.load(half_ptr + 2 * rec + tl.load(a_off_ptr + 2 * rg))
        v1 = tl.load(half_ptr + 2 * rec + tl.load(a_off_ptr + 2 * rg + 1))
        word = tl.load(rec_ptr + rec + 512 + tl.load(e_word_ptr + rg))
        code = (word >> tl.load(e_shift_ptr + rg)) & 0xF
        cbase = cols_ptr + (b * STEPS + s).to(tl.int64) * 32 + g * 4
        c0 = tl.load(cbase + (code & 3)).to(tl.int32) & 0xFFFF
        c1 = tl.load(cbase + ((code >> 2) & 3)).to(tl.int32) & 0xFFFF
        # 2. every column of the group: a kept value or zero (a padding slot holds zero: the sum stays exact)
        j = tl.arange(0, MP)[None, None, :]
        col = (s * 8 + g[:, :, None]) * M + j
        zero = tl.zeros([64, 8, MP], dtype=v0.dtype)
        val = tl.where(col == c0[:, :, None], v0[:, :, None], zero)
        val += tl.where(col == c1[:, :, None], v1[:, :, None], zero)
        row = b * 64 + r[:, :, None]
        ok = (row < OUT) & (col < IN) & (j < M)
        if HAS_ROWS:  # 3. stored row -> its output row (-1: a padding row, not written)
            row = tl.load(rows_ptr + row, mask=row < OUT, other=-1)
            ok = ok & (row >= 0)
        tl.store(out_ptr + row.to(tl.int64) * stride_o + col, val.to(out_ptr.dtype.element_ty), mask=ok)


@functools.lru_cache(maxsize=8)
def _tables(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Per (row, group, slot) of a tile: its half-word offset among the A fragments; per (row, group): the
    metadata word and bit shift of its 4-bit code (the packer's layout, sparse_tc.pack_sparse_tc)."""
    from .sparse_tc import METADATA_MAP, selector1_map

    src = torch.arange(64 * 8 * 2).reshape(1, 4, 2, 8, 1, 2, 4, 2).permute(0, 4, 1, 3, 6, 5, 2, 7).reshape(-1)
    a_off = torch.empty(1024, dtype=torch.int32)
    a_off[src] = torch.arange(1024, dtype=torch.int32)
    e_word = torch.empty(64, 8, dtype=torch.int32)
    e_shift = torch.empty(64, 8, dtype=torch.int32)
    for mt in range(4):
        for (lane, field), (r, c) in (selector1_map(METADATA_MAP) if mt % 2 else METADATA_MAP).items():
            e_word[mt * 16 + r, c] = (mt // 2) * 32 + lane
            e_shift[mt * 16 + r, c] = 4 * field
    return a_off.to(device), e_word.flatten().to(device), e_shift.flatten().to(device)


def tc_to_dense_reference(records: Tensor, columns: Tensor, out_features: int, in_features: int, pattern,
                          dtype: torch.dtype) -> Tensor:  # fmt: skip
    """Plain PyTorch: unpack the records, then decompress."""
    from ..format import decompress
    from ..masks import block_rows
    from .sparse_tc import SparseTCWeight, unpack_sparse_tc

    packed = SparseTCWeight(records, columns, None, out_features, in_features, dtype, block_rows=block_rows(pattern))
    w = unpack_sparse_tc(packed, pattern)
    return decompress(w.values, w.columns, w.meta, None, w.pattern, w.shape)


def tc_to_dense(records: Tensor, columns: Tensor, out_features: int, in_features: int, pattern,
                dtype: torch.dtype, out: Tensor | None = None, rows: Tensor | None = None) -> Tensor:  # fmt: skip
    """The dense (out_features, in_features) ``dtype`` weight of a packing in its stored coordinates.

    ``out``: where to write it (every element is written; its contents do not matter), else a fresh
    uninitialised tensor. ``rows`` (int32, at least out_features entries): stored row r is written at output
    row ``rows[r]`` (-1: not written); the first out_features entries must be a permutation of the rows."""
    if records.dim() != 3 or records.shape[2] not in RECORDS or records.dtype != torch.int32:
        raise ValueError(
            f"records must be (blocks, steps, {RECORDS[0]} or {RECORDS[1]}) int32, got {tuple(records.shape)} "
            f"{records.dtype}"
        )
    if columns.shape != (*records.shape[:2], 32) or columns.dtype != torch.int16:
        raise ValueError(
            f"columns must be {(*records.shape[:2], 32)} int16, got {tuple(columns.shape)} {columns.dtype}"
        )
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"the packing holds float16 or bfloat16 values, got {dtype}")
    blocks, steps = records.shape[:2]
    if blocks * 64 < out_features or steps * 8 * pattern.m < in_features:
        raise ValueError(
            f"records of {blocks} 64-row blocks and {steps} k-steps at M = {pattern.m} cannot hold a "
            f"{out_features}x{in_features} weight"
        )
    if out is not None and (
        out.shape != (out_features, in_features) or out.dtype != dtype or out.device != records.device
        or out.stride(1) != 1
    ):  # fmt: skip
        raise ValueError(
            f"out must be a ({out_features}, {in_features}) {dtype} tensor on {records.device} with unit column "
            f"stride, got {tuple(out.shape)} {out.dtype} on {out.device} with strides {out.stride()}"
        )
    _check_rows(rows, out_features, records.device)
    use_triton = HAS_TRITON and (
        records.is_cuda or (records.device.type == "cpu" and interpret_mode() and interpreter_ready())
    )
    if not use_triton:
        dense = tc_to_dense_reference(records, columns, out_features, in_features, pattern, dtype)
        return _place_rows(dense, rows, out)
    if out is None:
        out = torch.empty(out_features, in_features, dtype=dtype, device=records.device)
    if out.numel() == 0:
        return out
    a_off, e_word, e_shift = _tables(records.device)
    halves = records.view(dtype)
    m = pattern.m
    _tc_to_dense_kernel[(blocks, steps)](
        records,
        halves,
        columns,
        a_off,
        e_word,
        e_shift,
        out,
        out if rows is None else rows,
        steps,
        out_features,
        in_features,
        records.shape[2],
        out.stride(0),
        M=m,
        MP=triton.next_power_of_2(m),
        HAS_ROWS=rows is not None,
    )
    return out


def _check_rows(rows: Tensor | None, out_features: int, device: torch.device) -> None:
    if rows is not None and (
        rows.dim() != 1 or rows.dtype != torch.int32 or rows.numel() < out_features or rows.device != device
    ):
        raise ValueError(
            f"rows must be a 1-D int32 tensor of at least {out_features} entries on {device}, got "
            f"{tuple(rows.shape)} {rows.dtype} on {rows.device}"
        )


def _place_rows(dense: Tensor, rows: Tensor | None, out: Tensor | None) -> Tensor:
    """``dense`` (stored rows) into ``out`` (or a new tensor), stored row r at row ``rows[r]`` when given."""
    if rows is None:
        return dense if out is None else out.copy_(dense)
    out = torch.empty_like(dense) if out is None else out
    return out.index_copy_(0, rows[: dense.shape[0]].long(), dense)
