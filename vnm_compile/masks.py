"""S_{V:N:M}: choosing and checking V:N:M masks (DESIGN.md, "The format").

Everything is vectorised over blocks: a (rows, cols) matrix is zero-padded to
multiples of (V, M) and viewed as (row_blocks, V, groups, M).
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
    Rows/columns not divisible by V/M are padded; padded columns are chosen
    last, so a partial block keeps real columns first.
    """
    p = as_pattern(pattern)
    _check_2d(scores, "scores")
    if not scores.is_floating_point():
        scores = scores.float()
    rows, cols = scores.shape
    v = block_rows(p)
    rows_p, cols_p = _padded((rows, cols), v, p.m)
    s = scores.float()
    if (rows_p, cols_p) != (rows, cols):
        s = torch.nn.functional.pad(s, (0, cols_p - cols, 0, rows_p - rows))  # zeros add nothing to norms
    groups = cols_p // p.m
    blocks = s.view(rows_p // v, v, groups, p.m)  # (B, V, G, M), no copy

    # 1. Column choice by L1 norm; padded columns rank below every real one.
    col_id = torch.arange(cols_p, device=s.device).view(1, groups, p.m)
    col_norm = blocks.abs().sum(1)  # (B, G, M): V times smaller than scores, cheap to check
    if not bool(torch.isfinite(col_norm).all()):
        raise ValueError("scores contain NaN or Inf (or overflow float32 when summed)")
    col_norm = col_norm.masked_fill(col_id >= cols, -1.0)
    kept_cols = _stable_topk_indices(col_norm, KEPT_COLUMNS)  # (B, G, 4)
    candidate = torch.zeros(col_norm.shape, dtype=torch.bool, device=s.device).scatter_(2, kept_cols, True)
    candidate &= col_id < cols

    # 2. Per row, the n largest scores among the kept columns (others and padding never win).
    cand = blocks.masked_fill(~candidate.unsqueeze(1), float("-inf"))
    kept_pos = torch.topk(cand, p.n, dim=-1).indices  # (B, V, G, n)

    mask = torch.zeros((rows_p, cols_p), dtype=torch.bool, device=s.device)
    mask.view(blocks.shape).scatter_(3, kept_pos, True)
    return mask[:rows, :cols].contiguous()


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
