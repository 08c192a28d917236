"""VNMWeight: the compressed V:N:M storage the kernels read (docs/design.md, "The format").

For a weight W (R x C) with pattern V:N:M, after optional permutations
P = W[out_perm][:, in_perm], zero-padded to (Rp, Cp) = multiples of (V, M);
G = Cp / M groups, B = Rp / V row blocks:

- ``values``  (Rp, G * n), weight dtype: the n kept values of each row in each
  group, contiguous per row (row-major: what a decode kernel streams).
- ``columns`` (B, G, 4), int16 (int32 when C > 32767): the 4 kept columns of
  each block, as *absolute column indices of the original input* (in_perm is
  folded in here), ascending within a block when unpermuted.
- ``meta``    (Rp, ceil(G / gpw)) int32: for every (row, group) the positions
  (0..3, 2 bits each) of its n values among the block's 4 columns, packed
  ``gpw = 16 // n`` groups per 32-bit word (8 groups x 4 bits for n = 2),
  group g at bit ``(g % gpw) * 2n``, value slot k at ``+ 2k``.
- ``row_index`` (Rp,) int32 or None: with an output permutation, the original
  output row each stored row writes to (-1 for padding rows). The kernel
  scatters its store through it, so the permutation costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .masks import block_rows, check_permutation, is_vnm
from .pattern import KEPT_COLUMNS, VNMPattern, as_pattern

__all__ = ["VNMWeight", "cat_rows", "compressed_nbytes", "decompress", "groups_per_word"]


def groups_per_word(n: int) -> int:
    """How many groups' metadata (2 bits per kept value) share one int32 word."""
    return 16 // n


def _pack_meta(pos: Tensor, n: int) -> Tensor:
    """pos: (Rp, G, n) int64 in 0..3 -> (Rp, ceil(G / gpw)) int32."""
    rows, groups, _ = pos.shape
    gpw = groups_per_word(n)
    words = -(-groups // gpw)
    code = (pos << (2 * torch.arange(n, device=pos.device))).sum(-1)  # (Rp, G), 2n bits each
    padded = torch.zeros(rows, words * gpw, dtype=torch.int64, device=pos.device)
    padded[:, :groups] = code
    shifts = 2 * n * torch.arange(gpw, device=pos.device)
    packed = (padded.view(rows, words, gpw) << shifts).sum(-1)
    # Wrap into int32 range (bit 31 may be set).
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def _unpack_meta(meta: Tensor, n: int, groups: int) -> Tensor:
    """Inverse of _pack_meta: -> (Rp, G, n) int64 positions."""
    gpw = groups_per_word(n)
    words = meta.to(torch.int64) & 0xFFFFFFFF
    shifts = 2 * n * torch.arange(gpw, device=meta.device)
    codes = ((words.unsqueeze(-1) >> shifts) & ((1 << (2 * n)) - 1)).reshape(meta.shape[0], -1)[:, :groups]
    slot_shift = 2 * torch.arange(n, device=meta.device)
    return (codes.unsqueeze(-1) >> slot_shift) & 3


def decompress(
    values: Tensor,
    columns: Tensor,
    meta: Tensor,
    row_index: Tensor | None,
    pattern: VNMPattern,
    shape: tuple[int, int],
) -> Tensor:
    """Rebuild the dense (masked) weight of ``shape`` in original row/column order.

    The plain-PyTorch inverse of the format; the reference path of the kernels.
    """
    rows, cols = shape
    v, n = block_rows(pattern), pattern.n
    rows_p, slots = values.shape
    groups = slots // n
    pos = _unpack_meta(meta, n, groups)  # (Rp, G, n)
    block_cols = columns.long().repeat_interleave(v, dim=0)  # (Rp, G, 4)
    abs_cols = torch.gather(block_cols, 2, pos)  # (Rp, G, n)
    if row_index is None:
        dst_rows = torch.arange(rows_p, device=values.device)
    else:
        dst_rows = row_index.long()
    dense = torch.zeros(rows_p + 1, cols, dtype=values.dtype, device=values.device)
    dst_rows = torch.where((dst_rows >= 0) & (dst_rows < rows), dst_rows, torch.full((), rows_p, device=values.device))
    flat = dst_rows.view(-1, 1, 1) * cols + abs_cols
    vals = values.view(rows_p, groups, n)
    # Every (row, column) is written at most once with a kept value. Unused slots hold +0.0 and may
    # repeat a kept column: they (and kept +0.0s, which change nothing) go to the scratch row rows_p,
    # so the kept values land bit-exact (-0.0, inf and NaN included) with no sum in between.
    unused = (vals == 0) & ~torch.signbit(vals)
    flat = torch.where(unused, torch.full((), rows_p * cols, device=values.device), flat)
    dense.view(-1).scatter_(0, flat.reshape(-1), vals.reshape(-1))
    return dense[:rows]


@dataclass
class VNMWeight:
    """A V:N:M-compressed weight (see module docstring for the layout)."""

    values: Tensor
    columns: Tensor
    meta: Tensor
    row_index: Tensor | None
    pattern: VNMPattern
    shape: tuple[int, int]

    # ------------------------------------------------------------------ build
    @classmethod
    def from_dense(
        cls,
        weight: Tensor,
        mask: Tensor,
        pattern: VNMPattern | str,
        *,
        in_perm: Tensor | None = None,
        out_perm: Tensor | None = None,
    ) -> VNMWeight:
        """Compress ``weight * mask``; the mask must obey ``pattern`` after the permutations.

        ``in_perm``/``out_perm`` say in which coordinates the mask is V:N:M
        (``mask[out_perm][:, in_perm]``); they are folded into the column
        indices and the row store, so to_dense() returns original order.
        """
        p = as_pattern(pattern)
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D tensor, got {getattr(weight, 'shape', type(weight))}")
        if not weight.is_floating_point():
            raise ValueError(f"weight must be floating point, got {weight.dtype}")
        if not isinstance(mask, Tensor) or mask.shape != weight.shape:
            raise ValueError(
                f"mask must have the weight's shape {tuple(weight.shape)}, got {getattr(mask, 'shape', None)}"
            )
        rows, cols = weight.shape
        in_perm = check_permutation(in_perm, cols, "in_perm")
        out_perm = check_permutation(out_perm, rows, "out_perm")
        mask = mask.to(device=weight.device, dtype=torch.bool)
        # the state may have been recorded on another device (sparsified on the CPU, then model.cuda())
        in_perm = None if in_perm is None else in_perm.to(weight.device)
        out_perm = None if out_perm is None else out_perm.to(weight.device)
        if not is_vnm(mask, p, in_perm, out_perm):
            raise ValueError(f"mask does not obey the {p} pattern (after the given permutations)")

        # 1. Move to the coordinates in which the pattern holds and pad. (where, not weight * mask:
        #    a pruned NaN or inf is dropped, not turned into a NaN; kept values are copied bit-exact.)
        w = torch.where(mask, weight.detach(), torch.zeros((), dtype=weight.dtype, device=weight.device))
        m = mask
        if out_perm is not None:
            w, m = w[out_perm], m[out_perm]
        if in_perm is not None:
            w, m = w[:, in_perm], m[:, in_perm]
        v = block_rows(p)
        rows_p, cols_p = -(-rows // v) * v, -(-cols // p.m) * p.m
        groups = cols_p // p.m
        wp = torch.zeros(rows_p, cols_p, dtype=weight.dtype, device=weight.device)
        mp = torch.zeros(rows_p, cols_p, dtype=torch.bool, device=weight.device)
        wp[:rows, :cols], mp[:rows, :cols] = w, m
        wb = wp.view(rows_p // v, v, groups, p.m).permute(0, 2, 1, 3)  # (B, G, V, M)
        mb = mp.view(rows_p // v, v, groups, p.m).permute(0, 2, 1, 3)

        # 2. The block's 4 columns: used ones first, then unused fillers; sorted.
        idx = torch.arange(p.m, device=weight.device)
        busy = mb.any(2)  # (B, G, M)
        key = busy.to(torch.int64) * (2 * p.m) - idx  # busy first, then low index
        kept_cols = torch.sort(torch.topk(key, KEPT_COLUMNS, dim=-1).indices, dim=-1).values  # (B, G, 4)

        # 3. Per row, the n slots: kept positions first (ascending), then fillers.
        expand = kept_cols.unsqueeze(2).expand(-1, -1, v, -1)
        cand_m = torch.gather(mb, 3, expand)  # (B, G, V, 4)
        cand_w = torch.gather(wb, 3, expand)
        slot_key = cand_m.to(torch.int64) * 8 - torch.arange(KEPT_COLUMNS, device=weight.device)
        pos = torch.sort(torch.topk(slot_key, p.n, dim=-1).indices, dim=-1).values  # (B, G, V, n)
        zero = torch.zeros((), dtype=weight.dtype, device=weight.device)
        vals = torch.gather(torch.where(cand_m, cand_w, zero), 3, pos)  # filler slots: +0.0

        # 4. Absolute original column indices (padding columns point at column 0, value 0).
        abs_cols = kept_cols + (torch.arange(groups, device=weight.device) * p.m).view(1, -1, 1)
        abs_cols = torch.where(abs_cols < cols, abs_cols, torch.zeros((), dtype=abs_cols.dtype, device=weight.device))
        if in_perm is not None:
            abs_cols = in_perm[abs_cols]
        index_dtype = torch.int16 if cols <= torch.iinfo(torch.int16).max else torch.int32

        values = vals.permute(0, 2, 1, 3).reshape(rows_p, groups * p.n).contiguous()
        meta = _pack_meta(pos.permute(0, 2, 1, 3).reshape(rows_p, groups, p.n), p.n)
        row_index = None
        if out_perm is not None:
            row_index = torch.full((rows_p,), -1, dtype=torch.int32, device=weight.device)
            row_index[:rows] = out_perm.to(torch.int32)
        return cls(values, abs_cols.to(index_dtype).contiguous(), meta, row_index, p, (rows, cols))

    # ------------------------------------------------------------------- use
    def to_dense(self) -> Tensor:
        """Exactly ``weight * mask`` in the original shape and order: every kept value bit for bit
        (-0.0, inf, NaN), +0.0 at every pruned position (also where the weight held NaN or inf there)."""
        return decompress(self.values, self.columns, self.meta, self.row_index, self.pattern, self.shape)

    @property
    def block_rows(self) -> int:
        return block_rows(self.pattern)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    def tensors(self) -> dict[str, Tensor]:
        """The stored tensors by name (row_index only when present)."""
        out = {"values": self.values, "columns": self.columns, "meta": self.meta}
        if self.row_index is not None:
            out["row_index"] = self.row_index
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of every stored tensor."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, *args, **kwargs) -> VNMWeight:
        """Move to a device / cast the values (indices keep their integer types)."""
        values = self.values.to(*args, **kwargs)
        dev = values.device
        return VNMWeight(
            values,
            self.columns.to(dev),
            self.meta.to(dev),
            None if self.row_index is None else self.row_index.to(dev),
            self.pattern,
            self.shape,
        )

    # ---------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Tensor]:
        """Plain tensors only (safetensors-friendly); ``header`` holds v, n, m, out, in."""
        header = torch.tensor([self.pattern.v, self.pattern.n, self.pattern.m, *self.shape], dtype=torch.int64)
        return {**self.tensors(), "header": header}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> VNMWeight:
        missing = {"values", "columns", "meta", "header"} - set(state)
        if missing:
            raise ValueError(f"VNMWeight state is missing {sorted(missing)}")
        v, n, m, rows, cols = (int(x) for x in state["header"].tolist())
        return cls(
            state["values"], state["columns"], state["meta"], state.get("row_index"), VNMPattern(v, n, m), (rows, cols)
        )

    def __repr__(self) -> str:
        return (
            f"VNMWeight(pattern={self.pattern}, shape={self.shape}, dtype={self.dtype}, "
            f"device={self.device}, nbytes={self.nbytes}, permuted_rows={self.row_index is not None})"
        )


def _cat_key(w: VNMWeight) -> tuple:
    return (str(w.pattern), w.in_features, w.dtype, w.device, w.columns.dtype)


def cat_rows(weights: list[VNMWeight] | tuple[VNMWeight, ...]) -> VNMWeight:
    """One VNMWeight computing ``torch.cat([w.to_dense() for w in weights])``: the weights stacked along
    their output rows, for one kernel launch over sibling linears that read the same input.

    Every weight needs the same pattern, in_features, dtype and device. Row blocks stay whole
    (each weight's padded rows are a multiple of V), so values, meta and columns concatenate as
    they are; the result has a row_index (each weight's stored rows shifted to its output slice,
    padding rows -1) unless no weight has padding rows or a permutation.
    """
    weights = list(weights)
    if not weights or not all(isinstance(w, VNMWeight) for w in weights):
        raise TypeError(f"cat_rows needs a non-empty list of VNMWeights, got {weights!r}")
    first = weights[0]
    for w in weights[1:]:
        if _cat_key(w) != _cat_key(first):
            raise ValueError(
                "cat_rows needs the same pattern, in_features, dtype, device and index dtype: "
                f"{_cat_key(first)} vs {_cat_key(w)}"
            )
    total = sum(w.out_features for w in weights)
    plain = all(w.row_index is None and w.values.shape[0] == w.out_features for w in weights[:-1])
    plain = plain and weights[-1].row_index is None
    row_index = None
    if not plain:
        parts, offset = [], 0
        for w in weights:
            if w.row_index is None:
                local = torch.arange(w.values.shape[0], dtype=torch.int32, device=w.device)
                local = torch.where(local < w.out_features, local, torch.full_like(local, -1))
            else:
                local = w.row_index.to(torch.int32)
            ok = (local >= 0) & (local < w.out_features)
            parts.append(torch.where(ok, local + offset, torch.full_like(local, -1)))
            offset += w.out_features
        row_index = torch.cat(parts)
    return VNMWeight(
        torch.cat([w.values for w in weights]),
        torch.cat([w.columns for w in weights]),
        torch.cat([w.meta for w in weights]),
        row_index,
        first.pattern,
        (total, first.in_features),
    )


def compressed_nbytes(out_features: int, in_features: int, pattern: VNMPattern | str, dtype: torch.dtype) -> int:
    """Bytes of the VNMWeight of an (out_features, in_features) ``dtype`` weight (values, columns, meta; no
    permutation folded in): what a compressed layer holds for its weight."""
    p = as_pattern(pattern)
    v = block_rows(p)
    rows_p, groups = -(-out_features // v) * v, -(-in_features // p.m)
    index = 2 if in_features <= torch.iinfo(torch.int16).max else 4
    itemsize = torch.empty((), dtype=dtype).element_size()
    words = -(-groups // groups_per_word(p.n))
    return rows_p * groups * p.n * itemsize + (rows_p // v) * groups * 4 * index + rows_p * words * 4
