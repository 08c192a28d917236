"""S_{V:N:M}: choosing and checking V:N:M masks (docs/design.md, "The format").

Everything is vectorised over blocks: the whole V x M blocks of a (rows, cols)
matrix are viewed in place as (row_blocks, V, groups, M); only its ragged
edges (rows/columns not divisible by V/M) are zero-padded copies.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .pattern import KEPT_COLUMNS, VNMPattern, as_pattern

__all__ = ["vnm_mask", "is_vnm", "check_permutation", "block_rows"]


def block_rows(pattern: VNMPattern) -> int:
    """Rows per block used by the storage format.

    For N:4 the block rows are irrelevant to the pattern; 64 keeps the
    (trivial) column-index table small.
    """
    return 64 if pattern.is_nm else pattern.v


def _padded(shape: tuple[int, int], rows: int, cols: int) -> tuple[int, int]:
    return -(-shape[0] // rows) * rows, -(-shape[1] // cols) * cols


def _check_2d(t: Tensor, what: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{what} must be 2-D (out_features, in_features), got shape {tuple(t.shape)}")


def check_permutation(perm: Tensor | None, size: int, what: str) -> Tensor | None:
    """Validate an index permutation of ``size`` elements; returns it as int64."""
    if perm is None:
        return None
    if not isinstance(perm, Tensor) or perm.dim() != 1 or perm.is_floating_point():
        raise ValueError(f"{what} must be a 1-D integer tensor")
    if perm.numel() != size:
        raise ValueError(f"{what} has {perm.numel()} entries, expected {size}")
    perm = perm.long()
    seen = torch.zeros(size, dtype=torch.bool, device=perm.device)
    if size and (perm.min() < 0 or perm.max() >= size):
        raise ValueError(f"{what} has indices outside [0, {size})")
    seen[perm] = True
    if not bool(seen.all()):
        raise ValueError(f"{what} is not a permutation (repeated indices)")
    return perm


def _stable_topk_indices(keys: Tensor, k: int) -> Tensor:
    """Indices of the k largest keys along the last dim; ties go to the lower index."""
    return torch.sort(keys, dim=-1, descending=True, stable=True).indices[..., :k]


def vnm_mask(scores: Tensor, pattern: VNMPattern | str) -> Tensor:
    """Boolean V:N:M mask of ``scores.shape`` keeping the most important weights.

    Steps (the paper's S_{V:N:M}):
      1. per V x M block keep the 4 columns with the largest L1 norm of scores;
      2. per row keep the n largest scores among those 4 columns.
    Ties go to the lower column in both steps. Rows/columns not divisible by
    V/M are padded; padded columns are chosen last, so a partial block keeps
    real columns first.

    Scores are compared in their own dtype (integers as float32, float64 in
    float64); L1 norms of half/bfloat16 scores are summed in float32.
    """
    p = as_pattern(pattern)
    _check_2d(scores, "scores")
    if scores.is_meta:
        raise ValueError("scores are on the meta device (no data): materialise the weights before choosing masks")
    s = (scores if scores.is_floating_point() else scores.float()).contiguous()
    if s.numel() == 0:
        return torch.zeros(s.shape, dtype=torch.bool, device=s.device)
    # Non-negative scores (every importance measure) need no abs() copy for the norms.
    return _vnm_mask(s, p, nonneg=bool(s.min() >= 0))


def _vnm_mask(s: Tensor, p: VNMPattern, nonneg: bool, check: bool = True) -> Tensor:
    """vnm_mask of contiguous floating-point scores ``s`` (``nonneg``: all >= 0). ``check=False``: no
    NaN/Inf check, so nothing waits for the device (the caller's scores are finite by construction)."""
    rows, cols = s.shape
    v, m = block_rows(p), p.m
    mask = torch.zeros((rows, cols), dtype=torch.bool, device=s.device)
    # The whole V x M blocks are used in place; only the (thin) ragged edges are padded copies.
    r0, c0 = rows - rows % v, cols - cols % m
    if r0 and c0:
        _mask_whole_blocks(s[:r0, :c0], mask[:r0, :c0], p, v, nonneg, check=check)
    if r0 and c0 < cols:  # last column group, all whole row blocks
        edge = torch.nn.functional.pad(s[:r0, c0:], (0, c0 + m - cols))
        _mask_whole_blocks(edge, mask[:r0, c0:], p, v, nonneg, pad_cols=c0 + m - cols, check=check)
    if r0 < rows:  # last row block, all columns
        cols_p = -(-cols // m) * m
        edge = torch.nn.functional.pad(s[r0:], (0, cols_p - cols, 0, r0 + v - rows))
        _mask_whole_blocks(edge, mask[r0:], p, v, nonneg, pad_cols=cols_p - cols, check=check)
    return mask


def _vnm_mask_no_sync(saliency: Tensor, pattern: VNMPattern) -> Tensor:
    """``vnm_mask`` of non-negative scores without waiting for the device (SparseGPT's column loop):
    no NaN/Inf check, a NaN counts as 0."""
    return _vnm_mask(torch.nan_to_num(saliency, nan=0.0).contiguous(), pattern, nonneg=True, check=False)


def _mask_whole_blocks(
    x: Tensor, out: Tensor, p: VNMPattern, v: int, nonneg: bool, pad_cols: int = 0, check: bool = True
) -> None:
    """S_{V:N:M} of ``x`` (rows a multiple of v, columns of m) written into the zeros ``out``.

    ``out`` may be smaller than ``x``: the rows/columns of ``x`` past it are zero
    padding owned by the caller (the last ``pad_cols`` columns are overwritten with -inf).
    Works on (B, V, G, M) views of ``x``: the large temporaries are the kept
    columns' scores (B, V, 4, G) and two byte tensors of about that shape (plus
    abs(x) when some score is negative). ``check=False`` skips the NaN/Inf check, which waits
    for the device (for callers in a loop whose scores are finite by construction).
    """
    rows, cols = x.shape
    nb, groups = rows // v, cols // p.m
    blocks = x.view(nb, v, groups, p.m)

    # 1. Column choice by L1 norm; padded columns rank below every real one.
    norm_dtype = torch.float32 if x.element_size() < 4 else x.dtype
    col_norm = (blocks if nonneg else blocks.abs()).sum(1, dtype=norm_dtype)  # (B, G, M)
    if check and not bool(torch.isfinite(col_norm).all()):
        raise ValueError("scores contain NaN or Inf (or their column sums overflow)")
    col_norm.abs_()  # a column of -0.0 sums to -0.0 without abs() first; make it +0.0
    if pad_cols:
        col_norm.view(nb, -1)[:, cols - pad_cols :] = -1.0
        x[:, cols - pad_cols :] = float("-inf")  # never among a row's n largest
    kept = _stable_topk_indices(col_norm, KEPT_COLUMNS).sort(dim=-1).values  # (B, G, 4), ascending
    # Absolute column of slot i of group g, laid out (B, 1, 4 * G) so that every
    # step below runs along the contiguous G axis; shared by the V rows of a block.
    first_col = torch.arange(0, cols, p.m, device=x.device).view(1, groups, 1)
    index = (kept + first_col).transpose(1, 2).reshape(nb, 1, -1).expand(-1, v, -1)

    # 2. Per row and group, keep slot i when fewer than n of the other 3 slots beat it:
    #    a higher score beats, an equal score beats only from a lower slot (lower column).
    vals = x.view(nb, v, cols).gather(2, index).view(nb, v, KEPT_COLUMNS, groups)
    # rank = number of slots beating slot i; start from "every lower slot beats slot i".
    rank = torch.arange(KEPT_COLUMNS, dtype=torch.uint8, device=x.device)
    rank = rank.view(1, 1, -1, 1).repeat(nb, v, 1, groups)
    later_wins = torch.empty((nb, v, KEPT_COLUMNS - 1, groups), dtype=torch.bool, device=x.device)
    for k in range(1, KEPT_COLUMNS):
        wins = torch.gt(vals[:, :, k:], vals[:, :, :-k], out=later_wins[:, :, k - 1 :]).view(torch.uint8)
        rank[:, :, :-k] += wins  # slot i + k beats slot i
        rank[:, :, k:] -= wins  # slot i does not beat slot i + k
    keep = rank.lt_(p.n).view(torch.bool)  # in place: 0/1 bytes
    out_rows, out_cols = out.shape
    if (out_rows, out_cols) == (rows, cols):
        out.view(nb, v, cols).scatter_(2, index, keep.view(nb, v, -1))
    else:
        padded = torch.zeros((rows, cols), dtype=torch.bool, device=x.device)
        padded.view(nb, v, cols).scatter_(2, index, keep.view(nb, v, -1))
        out.copy_(padded[:out_rows, :out_cols])


def is_vnm(
    mask: Tensor,
    pattern: VNMPattern | str,
    in_perm: Tensor | None = None,
    out_perm: Tensor | None = None,
) -> bool:
    """True when ``mask`` (after ``mask[out_perm][:, in_perm]``) obeys the pattern.

    Per V x M block at most 4 non-empty columns, and at most n kept per row
    within each M-column group.
    """
    p = as_pattern(pattern)
    _check_2d(mask, "mask")
    rows, cols = mask.shape
    out_perm = check_permutation(out_perm, rows, "out_perm")
    in_perm = check_permutation(in_perm, cols, "in_perm")
    m = mask.bool()
    if out_perm is not None:
        m = m[out_perm]
    if in_perm is not None:
        m = m[:, in_perm]
    v = block_rows(p)
    rows_p, cols_p = _padded((rows, cols), v, p.m)
    padded = torch.zeros((rows_p, cols_p), dtype=torch.bool, device=m.device)
    padded[:rows, :cols] = m
    blocks = padded.view(rows_p // v, v, cols_p // p.m, p.m)
    per_row = blocks.sum(3)  # (B, V, G)
    if bool((per_row > p.n).any()):
        return False
    busy_cols = blocks.any(1).sum(2)  # (B, G)
    return bool((busy_cols <= KEPT_COLUMNS).all())
