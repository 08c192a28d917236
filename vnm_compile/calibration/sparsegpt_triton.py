"""One group of M columns of SparseGPT's V:N:M pass in one launch (``sparsegpt_prune``'s steps 1 and 2).

Per group the torch step issues 25-35 small launches (the mask: ``masks._vnm_mask``, then M rank-1
updates and M error columns), so on a GPU the pass is bound by launch latency (an H100, 4096 x 11008:
2.0-2.6 s). The kernel does the same work in one launch; the group's errors onto the rest of the block
(one addmm) and the block's onto the later columns stay in torch.

1. Rows per program: whole V-row blocks (the mask's column choice spans a block), at least 32 rows
   (``_blocks_per_program``); the group's columns padded to a power of two, unrolled.
2. ``_group_kernel`` below.
3. ``sparsegpt_group_`` (launcher: float32 and strides checked, one launch). It mutates its inputs
   and runs eagerly inside calibration, so it is not a ``torch.library`` op (nothing traces it).
4. ``sparsegpt_group_reference_``: the same step in plain PyTorch, the CPU, float64 and test path.

The mask is ``masks._vnm_mask``'s on the group's OBS saliency w² / d² (d: the group's diagonal of
the H⁻¹ factor; NaN counts as 0, +Inf as the largest float, as ``torch.nan_to_num``): per V x M
block the 4 columns of largest L1 norm (ties to the lower column, columns past the matrix's last
rank below every real one, a partial last row block's missing rows count as 0), then per row the n
largest saliencies among them (ties to the lower column). Deviations: a block's column norms are
summed in another order than torch's (two norms within rounding of each other may rank the other
way), and the compiled kernel may fuse the rank-1 updates' multiply and subtract (FMA).

References: Frantar & Alistarh, "SparseGPT" (ICML 2023), github.com/IST-DASLab/sparsegpt.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels.vnm_triton import HAS_TRITON, interpret_mode, interpreter_ready
from ..masks import _vnm_mask_no_sync, block_rows
from ..pattern import KEPT_COLUMNS, VNMPattern

__all__ = ["group_kernel_available", "sparsegpt_group_", "sparsegpt_group_reference_"]

MIN_ROWS = 32  # rows per program at least: small V packs several V-row blocks into one program

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["col0", "ecol0", "GW"])
    def _group_kernel(
        # pointers: the weight (rows, cols), updated in place; the upper Cholesky factor of H⁻¹
        # (cols, cols); the block's errors (rows, block width); the mask (rows, cols) as bytes
        w_ptr, h_ptr, e_ptr, k_ptr,
        # sizes: rows, the group's first column in w / h / mask and in the errors, its width (<= M)
        ROWS, col0, ecol0, GW,
        # strides (elements)
        stride_w0, stride_w1, stride_h0, stride_h1, stride_e0, stride_e1, stride_k0, stride_k1,
        # pattern (V rows per block, N kept per row), tile (B blocks of VP >= V rows, MP >= M columns),
        # CHOOSE: choose the group's mask (else read it)
        V: tl.constexpr, N: tl.constexpr, B: tl.constexpr, VP: tl.constexpr, MP: tl.constexpr,
        KEPT: tl.constexpr, CHOOSE: tl.constexpr,
    ):  # fmt: skip
        b = tl.arange(0, B)[:, None, None]
        v = tl.arange(0, VP)[None, :, None]
        j = tl.arange(0, MP)[None, None, :]  # the group's columns
        r = (tl.program_id(0) * B + b) * V + v  # (B, VP, 1) rows
        col_ok = j < GW
        ok = (v < V) & (r < ROWS) & col_ok
        r64 = r.to(tl.int64)
        hcol = (col0 + j).to(tl.int64)
        w_off = r64 * stride_w0 + hcol * stride_w1
        k_off = r64 * stride_k0 + hcol * stride_k1
        w = tl.load(w_ptr + w_off, mask=ok, other=0.0)
        if CHOOSE:
            # 1. Saliency w² / d² (NaN -> 0, +Inf -> the largest float); rows outside count as 0.
            d = tl.load(h_ptr + hcol * (stride_h0 + stride_h1), mask=col_ok, other=1.0)
            s = tl.math.div_rn(w * w, d * d)
            s = tl.where(s != s, 0.0, tl.minimum(s, 3.4028234663852886e38))
            s = tl.where(ok, s, 0.0)
            # 2. Per V-row block, the KEPT columns of largest L1 norm: a column is kept when fewer than
            #    KEPT columns beat it (a larger norm, or an equal one at a lower column).
            norm = tl.where(col_ok, tl.sum(s, axis=1, keep_dims=True), -1.0)  # (B, 1, MP)
            beaten = tl.zeros([B, 1, MP], dtype=tl.int32)
            for c in tl.static_range(MP):
                nc = tl.sum(tl.where(j == c, norm, 0.0), axis=2, keep_dims=True)  # exact: one term
                beaten += ((nc > norm) | ((nc == norm) & (j > c))).to(tl.int32)
            kept_col = (beaten < KEPT) & col_ok
            # 3. Per row, the N largest saliencies among the kept columns, by the same rule.
            sk = tl.where(kept_col, s, float("-inf"))
            beaten_r = tl.zeros([B, VP, MP], dtype=tl.int32)
            for c in tl.static_range(MP):
                sc = tl.sum(tl.where(j == c, sk, 0.0), axis=2, keep_dims=True)
                beaten_r += ((sc > sk) | ((sc == sk) & (j > c))).to(tl.int32)
            keep = kept_col & (beaten_r < N)
            tl.store(k_ptr + k_off, keep.to(tl.uint8), mask=ok)
        else:
            keep = tl.load(k_ptr + k_off, mask=ok, other=0) != 0
        # 4. Columns fixed left to right, each one's error spread over the group's later columns.
        drop = tl.where(keep, 0.0, 1.0)
        err = tl.zeros([B, VP, MP], dtype=tl.float32)
        for i in tl.static_range(MP):
            d_i = tl.load(h_ptr + (col0 + i).to(tl.int64) * (stride_h0 + stride_h1), mask=i < GW, other=1.0)
            w_i = tl.sum(tl.where(j == i, w, 0.0), axis=2, keep_dims=True)  # exact: one term
            drop_i = tl.sum(tl.where(j == i, drop, 0.0), axis=2, keep_dims=True)
            err_i = tl.math.div_rn(w_i * drop_i, d_i)
            later = (j > i) & col_ok
            h_i = tl.load(h_ptr + (col0 + i).to(tl.int64) * stride_h0 + hcol * stride_h1, mask=later, other=0.0)
            w = tl.where(later, w - err_i * h_i, w)  # where: an Inf error leaves earlier columns alone
            err = tl.where(j == i, err_i, err)
        tl.store(w_ptr + w_off, w, mask=ok)
        tl.store(e_ptr + r64 * stride_e0 + (ecol0 + j).to(tl.int64) * stride_e1, err, mask=ok)


def _blocks_per_program(v: int) -> int:
    """V-row blocks per program: a power of two, at least MIN_ROWS rows in all."""
    return triton.next_power_of_2(-(-MIN_ROWS // v))


def group_kernel_available(w: Tensor) -> bool:
    """Whether ``sparsegpt_group_`` can run on ``w``: float32 and Triton, on CUDA or (CPU) under
    its interpreter (TRITON_INTERPRET=1 set before triton was imported)."""
    if not HAS_TRITON or w.dtype != torch.float32:
        return False
    return w.is_cuda or (w.device.type == "cpu" and interpret_mode() and interpreter_ready())


def sparsegpt_group_reference_(
    w: Tensor, hinv_upper: Tensor, err1: Tensor, chosen: Tensor, c1: int, c2: int, e1: int, pattern: VNMPattern,
    choose: bool,
) -> None:  # fmt: skip
    """SparseGPT's step for the columns c1:c2 (one group of at most M) of ``w``, in place, in PyTorch.

    Args:
        w: the (rows, cols) weight being pruned, updated in place (its columns c1:c2).
        hinv_upper: the upper Cholesky factor of H⁻¹ (cols, cols).
        err1: the block's errors; columns e1:e1 + (c2 - c1) receive the group's.
        chosen: the (rows, cols) bool mask; with ``choose`` its columns c1:c2 are chosen here from the
            saliency of ``w`` as it is now, else they are read.
        pattern: the V:N:M pattern.
    """
    wg, hg = w[:, c1:c2], hinv_upper[c1:c2, c1:c2]
    d = hg.diagonal()
    # 1. The group's mask, from the saliency of the weights as updated so far.
    if choose:
        chosen[:, c1:c2] = _vnm_mask_no_sync(wg.square() / d.square(), pattern)
    drop = ~chosen[:, c1:c2]
    # 2. Fix the group's columns one by one, each one's error spread over the group's later ones.
    for i in range(c2 - c1):
        err = wg[:, i] * drop[:, i] / d[i]
        wg[:, i + 1 :].addr_(err, hg[i, i + 1 :], alpha=-1)
        err1[:, e1 + i] = err


def sparsegpt_group_(
    w: Tensor, hinv_upper: Tensor, err1: Tensor, chosen: Tensor, c1: int, c2: int, e1: int, pattern: VNMPattern,
    choose: bool,
) -> None:  # fmt: skip
    """``sparsegpt_group_reference_`` in one Triton launch (float32; ``group_kernel_available``)."""
    rows = w.shape[0]
    gw = c2 - c1
    if not 0 < gw <= pattern.m:
        raise ValueError(f"a group spans 1 to {pattern.m} columns, got {c1}:{c2}")
    if not (w.dtype == hinv_upper.dtype == err1.dtype == torch.float32 and chosen.dtype == torch.bool):
        raise TypeError(
            f"w, hinv_upper and err1 must be float32 and chosen bool, got {w.dtype}, {hinv_upper.dtype}, "
            f"{err1.dtype}, {chosen.dtype}"
        )
    if rows == 0:
        return
    v = block_rows(pattern)
    blocks = _blocks_per_program(v)
    grid = (triton.cdiv(rows, v * blocks),)
    keep = chosen.view(torch.uint8)
    _group_kernel[grid](
        w, hinv_upper, err1, keep,
        rows, c1, e1, gw,
        w.stride(0), w.stride(1), hinv_upper.stride(0), hinv_upper.stride(1), err1.stride(0), err1.stride(1),
        keep.stride(0), keep.stride(1),
        V=v, N=pattern.n, B=blocks, VP=triton.next_power_of_2(v), MP=triton.next_power_of_2(pattern.m),
        KEPT=KEPT_COLUMNS, CHOOSE=choose,
    )  # fmt: skip
