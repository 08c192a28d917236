"""The weight of ``vnm::linear`` / ``vnm::hybrid_linear`` as one object.

An op schema carries tensors, lists of tensors and ints, not objects, so the weight travels as two
arguments: ``weight`` (a list of tensors) and ``spec`` (a list of ints). ``OpWeight`` names what they
hold and converts both ways (``pack`` / ``unpack``); ``OpWeight.from_vnm`` builds it from a VNMWeight
and the layout choices (held copies, sparse-tensor-core packing, token counts). A new layout adds a
field here; the ops, their fakes and the compiler passes read fields by name.

``spec`` is ``[layout, V, n, M, out_features, has_row_index, has_expanded, has_interleaved, tc_mode,
tc_min_tokens, tc_decode_min, tc_decode_max, max_sparse_tokens]``. Its first five entries are
vnm::compressed_linear's spec (kernels/compressed.py) for the row-major layout, and a five-entry spec
unpacks as that layout with nothing else held. ``weight`` is ``[values, columns, meta]``, then, where
present, ``row_index``, ``expanded``, ``rows_values, rows_meta``, ``tc_records, tc_columns`` (tc_mode
not off) and ``tc_rows`` (the dense mma.sp kernel's modes).

In an FX graph the same object holds the nodes that produce the tensors (passes/graph.op_weight).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import Tensor

from ..format import VNMWeight

__all__ = ["OpWeight", "SPEC", "TC_OFF", "TC_GATHER", "TC_DENSE", "TC_DENSE_IDENTITY", "sparse_tc_args"]

SPEC = (
    "layout", "v", "n", "m", "out_features", "has_row_index", "has_expanded", "has_interleaved", "tc_mode",
    "tc_min_tokens", "tc_decode_min", "tc_decode_max", "max_sparse_tokens",
)  # fmt: skip
_ROWS_SPEC = 5  # [layout, V, n, M, out_features]: vnm::compressed_linear's row-major spec
# kernels.compressed.LAYOUT_ROWS, not imported: compressed.py loads the sparse-tensor-core module, and the
# passes import this one (tests/kernels/test_op_weight.py runs compressed_linear's rows spec through unpack)
_LAYOUT_ROWS = 0
_NO_LIMIT = -1  # max_sparse_tokens in the spec of a vnm::linear call (None)

# tc_mode: how the sparse-tensor-core tensors are laid out (sparse_tc_args)
TC_OFF, TC_GATHER, TC_DENSE, TC_DENSE_IDENTITY = 0, 1, 2, 3

_TENSORS = ("values", "columns", "meta", "row_index", "expanded", "rows_values", "rows_meta")
_TC_TENSORS = ("tc_records", "tc_columns", "tc_rows")


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: fields may be tensors
class OpWeight:
    """What vnm::linear / vnm::hybrid_linear read besides x and bias.

    values, columns, meta, row_index: the VNMWeight (row_index: its output permutation, or None);
    v, n, m, out_features: its block rows (``VNMWeight.block_rows``), pattern and height;
    expanded: ``vnm_triton.expand_weights`` (faster gather GEMM from 2 tokens), or None;
    rows_values, rows_meta: ``vnm_triton.interleave_rows`` (the decode kernel at 1-4 tokens), or None;
    tc_*: the packing for the sparse tensor cores (sparse_tc_args) and the token counts they run: from
    tc_min_tokens (>= 1; 0: never) and at tc_decode_min..tc_decode_max (0, 0: none);
    max_sparse_tokens: hybrid_linear's switch (dense above this many rows of x); None for vnm::linear.
    """

    values: Any
    columns: Any
    meta: Any
    v: int
    n: int
    m: int
    out_features: int
    row_index: Any = None
    expanded: Any = None
    rows_values: Any = None
    rows_meta: Any = None
    tc_records: Any = None
    tc_columns: Any = None
    tc_rows: Any = None
    tc_mode: int = TC_OFF
    tc_min_tokens: int = 0
    tc_decode_min: int = 0
    tc_decode_max: int = 0
    max_sparse_tokens: int | None = None

    def __post_init__(self) -> None:
        if (self.rows_values is None) != (self.rows_meta is None):
            raise ValueError("vnm::linear: rows_values and rows_meta (interleave_rows) come together or not at all")
        if self.max_sparse_tokens is not None and self.max_sparse_tokens < 0:
            raise ValueError(f"vnm::hybrid_linear: max_sparse_tokens must be >= 0, got {self.max_sparse_tokens}")
        self._check_tc()

    def _check_tc(self) -> None:
        """The mma.sp kernels run an input of T rows when T >= tc_min_tokens (>= 1; 0: never) or
        tc_decode_min <= T <= tc_decode_max (the decode kernel's token counts, within
        1..sparse_tc.DECODE_MAX_TOKENS; 0, 0: none)."""
        if self.tc_mode == TC_OFF:
            if any(t is not None for t in (self.tc_records, self.tc_columns, self.tc_rows)):
                raise ValueError("vnm::linear: sparse-tensor-core tensors given with tc_mode=0 (off)")
            return
        if (
            self.tc_mode not in (TC_GATHER, TC_DENSE, TC_DENSE_IDENTITY)
            or self.tc_records is None
            or self.tc_columns is None
        ):
            raise ValueError(f"vnm::linear: tc_mode={self.tc_mode} needs tc_records and tc_columns (sparse_tc_args)")
        if (self.tc_mode != TC_GATHER) != (self.tc_rows is not None):
            raise ValueError(f"vnm::linear: tc_mode={self.tc_mode} takes tc_rows only for the dense mma.sp kernel "
                             f"(modes {TC_DENSE}, {TC_DENSE_IDENTITY})")  # fmt: skip
        from .sparse_tc import DECODE_MAX_TOKENS

        lo, hi = self.tc_decode_min, self.tc_decode_max
        window = (lo, hi) != (0, 0)
        if window and not 1 <= lo <= hi <= DECODE_MAX_TOKENS:
            raise ValueError(f"vnm::linear: tc_decode_min..tc_decode_max must lie within 1..{DECODE_MAX_TOKENS} "
                             f"(or be 0, 0), got {lo}..{hi}")  # fmt: skip
        if self.tc_min_tokens < 0 or (self.tc_min_tokens == 0 and not window):
            raise ValueError(
                f"vnm::linear: tc_min_tokens must be >= 1 (0 with a decode window), got {self.tc_min_tokens}"
            )

    @property
    def interleaved(self) -> tuple[Any, Any] | None:
        return None if self.rows_values is None else (self.rows_values, self.rows_meta)

    def tc_runs(self, tokens: int) -> bool:
        """Whether the sparse tensor cores take an input of ``tokens`` rows (on CUDA)."""
        if self.tc_mode == TC_OFF:
            return False
        return (self.tc_min_tokens >= 1 and tokens >= self.tc_min_tokens) or (
            self.tc_decode_min <= tokens <= self.tc_decode_max
        )

    def pack(self) -> tuple[list, list[int]]:
        """(weight, spec): the op's two arguments."""
        limit = _NO_LIMIT if self.max_sparse_tokens is None else self.max_sparse_tokens
        flags = [int(t is not None) for t in (self.row_index, self.expanded, self.rows_values)]
        spec = [_LAYOUT_ROWS, self.v, self.n, self.m, self.out_features, *flags, self.tc_mode]
        spec += [self.tc_min_tokens, self.tc_decode_min, self.tc_decode_max, limit]
        names = [*_TENSORS, *_TC_TENSORS]
        return [getattr(self, k) for k in names if getattr(self, k) is not None], [int(s) for s in spec]

    @classmethod
    def unpack(cls, weight: list, spec: list[int]) -> OpWeight:
        """The inverse of ``pack`` (also of vnm::compressed_linear's row-major ``(weight, spec)``). Runs on
        every op call: plain indexing, no per-field dictionaries."""
        if len(spec) == len(SPEC):
            layout, v, n, m, out, has_rows, has_expanded, has_interleaved, mode, floor, lo, hi, limit = spec
        elif len(spec) == _ROWS_SPEC:
            (layout, v, n, m, out), has_rows, has_expanded, has_interleaved = spec, 0, 0, 0
            mode, floor, lo, hi, limit = TC_OFF, 0, 0, 0, _NO_LIMIT
        else:
            raise ValueError(f"vnm::linear: spec must hold {len(SPEC)} ints {list(SPEC)}, got {list(spec)}")
        if layout != _LAYOUT_ROWS:
            raise ValueError(f"vnm::linear: spec {list(spec)}: only the row-major layout ({_LAYOUT_ROWS}) is taken")
        held = (1, 1, 1, has_rows, has_expanded, has_interleaved, has_interleaved, mode != TC_OFF, mode != TC_OFF,
                mode in (TC_DENSE, TC_DENSE_IDENTITY))  # fmt: skip
        if len(weight) != sum(held):
            names = [k for k, there in zip((*_TENSORS, *_TC_TENSORS), held, strict=True) if there]
            raise ValueError(
                f"vnm::linear: spec {list(spec)} takes {len(names)} tensors ({', '.join(names)}), got {len(weight)}"
            )
        it = iter(weight)
        t = [next(it) if there else None for there in held]
        return cls(t[0], t[1], t[2], v, n, m, out, t[3], t[4], t[5], t[6], t[7], t[8], t[9], mode, floor, lo, hi,
                   None if limit < 0 else limit)  # fmt: skip

    def map_tensors(self, fn: Callable[[str, Any], Any]) -> OpWeight:
        """A copy with every tensor ``t`` (not None) of field ``name`` replaced by ``fn(name, t)``."""
        names = [*_TENSORS, *_TC_TENSORS]
        return dataclasses.replace(self, **{k: fn(k, getattr(self, k)) for k in names if getattr(self, k) is not None})

    def sparse_tc_weight(self, in_features: int, dtype):
        """The sparse_tc.SparseTCWeight the mma.sp kernels run for an x of ``in_features`` and ``dtype``."""
        from .sparse_tc import SparseTCWeight

        gather = self.tc_mode == TC_GATHER
        return SparseTCWeight(
            self.tc_records, self.tc_columns, self.row_index, self.out_features, in_features, dtype,
            None if gather else self.tc_rows, 0 if gather else self.m, self.tc_mode == TC_DENSE_IDENTITY,
            block_rows=self.v,
        )  # fmt: skip

    @classmethod
    def from_vnm(
        cls,
        w: VNMWeight,
        *,
        expanded: Tensor | None = None,
        interleaved: tuple[Tensor, Tensor] | None = None,
        sparse_tc=None,
        sparse_tc_min_tokens: int | None = 1,
        sparse_tc_decode_tokens: tuple[int, int] | None = None,
        max_sparse_tokens: int | None = None,
    ) -> OpWeight:
        """The op's weight for ``w`` with the layouts the caller holds (``vnm_linear``'s keywords: what each
        costs and buys is in its docstring); ``max_sparse_tokens`` for vnm::hybrid_linear."""
        tc: dict = {}
        if sparse_tc is not None:
            _check_sparse_tc(w, sparse_tc, sparse_tc_min_tokens, sparse_tc_decode_tokens)
            records, columns, rows, mode = sparse_tc_args(sparse_tc)
            lo, hi = sparse_tc_decode_tokens or (0, 0)
            tc = {"tc_records": records, "tc_columns": columns, "tc_rows": rows, "tc_mode": mode,
                  "tc_min_tokens": sparse_tc_min_tokens or 0, "tc_decode_min": lo, "tc_decode_max": hi}  # fmt: skip
        if interleaved is not None:
            from .vnm_triton import _check_interleaved

            _check_interleaved(interleaved, w.values, w.block_rows)  # on every path: a bad pair fails here
        rows_values, rows_meta = interleaved if interleaved is not None else (None, None)
        return cls(
            w.values, w.columns, w.meta, w.block_rows, w.pattern.n, w.pattern.m, w.out_features, w.row_index,
            expanded, rows_values, rows_meta, **tc, max_sparse_tokens=max_sparse_tokens,
        )  # fmt: skip


def _check_sparse_tc(w: VNMWeight, sparse_tc, min_tokens, decode_tokens) -> None:
    from .sparse_tc import DECODE_MAX_TOKENS, SparseTCWeight

    if not isinstance(sparse_tc, SparseTCWeight):
        raise TypeError(f"sparse_tc must be a SparseTCWeight (pack_sparse_tc(w)), got {type(sparse_tc).__name__}")
    if (sparse_tc.out_features, sparse_tc.in_features) != w.shape or sparse_tc.device != w.device:
        raise ValueError("sparse_tc was packed from another weight (shape or device differs)")
    if min_tokens is not None and (isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 1):
        raise ValueError(f"sparse_tc_min_tokens must be an int >= 1 or None, got {min_tokens!r}")
    if decode_tokens is not None:
        ok = isinstance(decode_tokens, tuple) and len(decode_tokens) == 2
        ok = ok and all(isinstance(t, int) and not isinstance(t, bool) for t in decode_tokens)
        if not ok or not 1 <= decode_tokens[0] <= decode_tokens[1] <= DECODE_MAX_TOKENS:
            raise ValueError(f"sparse_tc_decode_tokens must be a tuple (lo, hi) of ints with 1 <= lo <= hi <= "
                             f"{DECODE_MAX_TOKENS}, got {decode_tokens!r}")  # fmt: skip
    if min_tokens is None and decode_tokens is None:
        raise ValueError("sparse_tc given with sparse_tc_min_tokens=None and no sparse_tc_decode_tokens: it would "
                         "never run")  # fmt: skip


def sparse_tc_args(packed) -> tuple[Tensor, Tensor, Tensor | None, int]:
    """(tc_records, tc_columns, tc_rows, tc_mode) from a sparse_tc.SparseTCWeight: the dense mma.sp kernel's
    x^T row order where its default config picks it (M <= 8, not on Hopper), else only the gather indices
    (the gather kernel, or on Hopper the wgmma one)."""
    from .sparse_tc import default_config

    if default_config(packed)["KERNEL"] != "dense":
        return packed.records, packed.columns, None, TC_GATHER
    mode = TC_DENSE_IDENTITY if packed.group_identity else TC_DENSE
    return packed.records, packed.columns, packed.group_columns, mode
