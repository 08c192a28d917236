"""VNMLinear: a V:N:M-sparse linear that holds only its compressed weight.

What ``compress_`` puts in place of a sparsified ``nn.Linear``. It holds one layout of the weight (buffers,
so ``state_dict``, ``torch.save`` and ``copy.deepcopy`` carry it) and no dense weight or mask:

- ``"tc"`` on a GPU where the sparse-tensor-core kernels run (fp16/bf16, n = 2, V a multiple of 64):
  ``tc_records``, ``tc_columns`` (kernels/sparse_tc.py's packing); ``"tc-compact"`` (asked for, never
  chosen by "auto") the same without the dense mma.sp GEMM's local rows and k-step padding (64:2:5: 1.3 %
  fewer bytes; that GEMM, the pre-Hopper default at M <= 8, does not run it);
- ``"rows"`` elsewhere (CPU, fp32, other patterns): ``values``, ``columns``, ``meta`` (format.VNMWeight).

The weight is stored in the coordinates in which it obeys the pattern, ``W[out_perm][:, in_perm]``, so the
kernels read each block's kept columns inside its own M-column group. The module applies the permutations
around the op, ``y = op(x[..., in_perm])[..., inverse(out_perm)]``: two index ops that inductor fuses into
the ops producing x and consuming y. Where the permutations were chosen jointly with the neighbours
(sparsify_'s joint_permutations: gate/up's output permutation is down_proj's input permutation, with only
element-wise ops between them), ``perm_links`` (int64 [in_linked, out_linked]) says so and the module
skips that index op: a producer returns its output in permuted order, the consumer reads it as it is
(``compress_`` converts such layers together and checks that the permutations pair up). ``vnm_header`` (int64: format version, V, n, M, out, in, layout, dtype)
makes a state dict self-describing: ``load_state_dict`` accepts either layout and converts.

Moving the module (``.to``, ``.cuda()``, ``.half()``) re-lays the weight out for where it lands.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from ..format import VNMWeight, _unpack_meta, groups_per_word
from ..kernels.compressed import LAYOUT_ROWS, LAYOUT_TC, LAYOUT_TC_COMPACT, LAYOUTS, OP, CompressedSpec, unpack
from ..masks import block_rows
from ..pattern import VNMPattern, as_pattern

__all__ = ["VNMLinear", "FORMAT_VERSION", "tc_layout_supported"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
_ROWS_KEYS = ("values", "columns", "meta")
_TC_KEYS = ("tc_records", "tc_columns")
_KEYS = {LAYOUT_ROWS: _ROWS_KEYS, LAYOUT_TC: _TC_KEYS, LAYOUT_TC_COMPACT: _TC_KEYS}


def tc_layout_supported(pattern: VNMPattern, dtype: torch.dtype, in_features: int, device: torch.device) -> bool:
    """Whether the sparse-tensor-core layout can hold (and its kernels run) such a weight on ``device``."""
    if torch.device(device).type != "cuda":
        return False
    from ..kernels.sparse_tc import sparse_tc_available, unsupported

    return unsupported(pattern, dtype, in_features) is None and sparse_tc_available(device)


def _inverse(perm: Tensor) -> Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device, dtype=perm.dtype)
    return inv


class VNMLinear(nn.Module):
    """``y = x W^T + b`` with W V:N:M-compressed (module docstring).

    Build one with :meth:`from_linear` (or ``compress_(model)``); the constructor makes an empty module of
    the right buffer shapes (e.g. on the meta device) for ``load_state_dict``.
    """

    from_conv1d = False  # made from a transformers Conv1D: decompress_ builds a Conv1DLinear (its state_dict layout)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        pattern: VNMPattern | str,
        *,
        bias: bool = True,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
        layout: str = "rows",
        in_permuted: bool = False,
        out_permuted: bool = False,
    ) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"VNMLinear layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
        if dtype not in _DTYPES:
            raise ValueError(f"VNMLinear dtype must be one of {_DTYPES}, got {dtype}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.pattern = as_pattern(pattern)
        self.weight_dtype = dtype
        self.layout = layout
        self.tc_layout = layout if layout != "rows" else "tc"  # the sparse-tensor-core layout a move lands in
        for name, shape, dt in self._buffer_shapes(layout):
            self.register_buffer(name, torch.zeros(shape, dtype=dt, device=device))
        idx = dict(dtype=torch.int64, device=device)
        self.register_buffer("in_perm", torch.arange(in_features, **idx) if in_permuted else None)
        self.register_buffer("out_perm", torch.arange(out_features, **idx) if out_permuted else None)
        self.register_buffer("_out_inv", self.out_perm, persistent=False)
        self.register_buffer("perm_links", None)  # int64 [in_linked, out_linked] (joint permutations), or None
        self._links = (False, False)  # perm_links as Python bools (forward branches on them under torch.compile)
        self.register_buffer("vnm_header", self._header(), persistent=True)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    # ------------------------------------------------------------------ layout bookkeeping
    def _buffer_shapes(self, layout: str) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        p, rows, cols = self.pattern, self.out_features, self.in_features
        v = block_rows(p)
        rows_p, groups = -(-rows // v) * v, -(-cols // p.m)
        if layout == "rows":
            index = torch.int16 if cols <= torch.iinfo(torch.int16).max else torch.int32
            words = -(-groups // groups_per_word(p.n))
            return [
                ("values", (rows_p, groups * p.n), self.weight_dtype),
                ("columns", (rows_p // v, groups, 4), index),
                ("meta", (rows_p, words), torch.int32),
            ]
        compact = layout == "tc-compact"
        steps = -(-groups // 8) if compact else -(-groups // 16) * 2
        return [
            ("tc_records", (rows_p // 64, steps, 576 if compact else 584), torch.int32),
            ("tc_columns", (rows_p // 64, steps, 32), torch.int16),
        ]

    def _header(self) -> Tensor:
        p = self.pattern
        fields = [FORMAT_VERSION, p.v, p.n, p.m, self.out_features, self.in_features, LAYOUTS[self.layout],
                  _DTYPES.index(self.weight_dtype)]  # fmt: skip
        return torch.tensor(fields, dtype=torch.int64, device=self._weight_tensors()[0].device)

    @property
    def _spec(self) -> list[int]:
        p = self.pattern
        return [LAYOUTS[self.layout], block_rows(p), p.n, p.m, self.out_features]

    def _weight_tensors(self) -> list[Tensor]:
        return [getattr(self, k) for k in _KEYS[LAYOUTS[self.layout]]]

    # ------------------------------------------------------------------ building
    @classmethod
    def from_weight(
        cls,
        weight: VNMWeight,
        bias: Tensor | None = None,
        *,
        in_perm: Tensor | None = None,
        out_perm: Tensor | None = None,
        layout: str = "auto",
        links: Tensor | None = None,
    ) -> VNMLinear:
        """From a VNMWeight stored in permuted coordinates (no permutation folded in: ``row_index`` None)
        and the permutations that map them back (``W = P_o^-1 weight P_i^-1``: the original weight is
        ``weight.to_dense()`` with rows ``out_perm`` and columns ``in_perm`` put back)."""
        if weight.row_index is not None:
            raise ValueError("VNMLinear.from_weight takes a weight in permuted coordinates (row_index None)")
        out_f, in_f = weight.shape
        device = weight.device
        layout = cls._resolve_layout(layout, weight.pattern, weight.dtype, in_f, device)
        mod = cls(in_f, out_f, weight.pattern, bias=bias is not None, dtype=weight.dtype, device="meta",
                  layout="rows", in_permuted=in_perm is not None, out_permuted=out_perm is not None)  # fmt: skip
        mod._set_rows(weight, device)
        if in_perm is not None:
            mod.in_perm = in_perm.to(device=device, dtype=torch.int64)
        if out_perm is not None:
            mod.out_perm = out_perm.to(device=device, dtype=torch.int64)
        if links is not None and bool(links.any()):
            mod.perm_links = links.detach().to(device=device, dtype=torch.int64).clone()
        mod._refresh()
        if bias is not None:
            mod.bias = nn.Parameter(
                bias.detach().to(device=device, dtype=weight.dtype), requires_grad=bias.requires_grad
            )
        if layout != "rows":
            mod._to_layout(layout)
        return mod

    @classmethod
    def from_linear(cls, linear: nn.Linear, state=None, *, layout: str = "auto") -> VNMLinear:
        """Compress a sparsified nn.Linear (its recorded state, or ``state``: a LinearSparsity)."""
        from ..state import get_sparsity

        state = state if state is not None else get_sparsity(linear)
        if state is None:
            raise ValueError("VNMLinear.from_linear: the linear has no recorded V:N:M state (run sparsify_ first)")
        w, mask = linear.weight.detach(), state.mask.to(linear.weight.device)
        if state.out_perm is not None:
            w, mask = w[state.out_perm], mask[state.out_perm]
        if state.in_perm is not None:
            w, mask = w[:, state.in_perm], mask[:, state.in_perm]
        packed = VNMWeight.from_dense(w, mask, state.pattern)
        return cls.from_weight(
            packed, linear.bias, in_perm=state.in_perm, out_perm=state.out_perm, layout=layout, links=state.links
        )

    @staticmethod
    def _resolve_layout(layout: str, pattern: VNMPattern, dtype: torch.dtype, in_f: int, device) -> str:
        if layout == "auto":
            return "tc" if tc_layout_supported(pattern, dtype, in_f, device) else "rows"
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be 'auto', 'rows', 'tc' or 'tc-compact', got {layout!r}")
        if layout != "rows" and not tc_layout_supported(pattern, dtype, in_f, device):
            from ..kernels.sparse_tc import unsupported

            why = unsupported(pattern, dtype, in_f) or f"the sparse tensor cores do not run on {device}"
            raise ValueError(f"layout {layout!r} is not available: {why}")
        return layout

    def _set_rows(self, w: VNMWeight, device) -> None:
        for k in _TC_KEYS:
            self._buffers.pop(k, None)
        for k in _ROWS_KEYS:
            self._buffers[k] = getattr(w, k).to(device)
        self.layout, self.weight_dtype = "rows", w.dtype

    def _refresh(self) -> None:
        """Derived state after the stored tensors changed: the inverse output permutation, the header."""
        self._out_inv = None if self.out_perm is None else _inverse(self.out_perm)
        self.vnm_header = self._header()
        links = self.perm_links
        if links is not None and links.device.type != "meta":
            self._links = (bool(links[0]), bool(links[1]))

    def _to_layout(self, layout: str) -> None:
        """Re-lay the weight out in place (same device)."""
        if layout == self.layout:
            return
        w = self.compressed_weight()
        if layout == "rows":
            self._set_rows(w, w.device)
        else:
            from ..kernels.sparse_tc import pack_sparse_tc

            packed = pack_sparse_tc(w, compact=layout == "tc-compact")
            for k in _ROWS_KEYS:
                self._buffers.pop(k, None)
            self._buffers["tc_records"], self._buffers["tc_columns"] = packed.records, packed.columns
            self.layout = self.tc_layout = layout
        self._refresh()

    # ------------------------------------------------------------------ reading the weight
    def compressed_weight(self) -> VNMWeight:
        """The row-major VNMWeight in the stored (permuted) coordinates."""
        return unpack(self._weight_tensors(), self._spec, self.in_features, self.weight_dtype)

    def folded_weight(self) -> VNMWeight:
        """The compressed weight in original coordinates: the input permutation folded into the absolute
        column indices and the output permutation into the row store (what ONNX export holds)."""
        w = self.compressed_weight()
        columns, row_index = w.columns, None
        if self.in_perm is not None:
            columns = self.in_perm[columns.long()].to(columns.dtype)  # padding slots: column 0, value 0
        if self.out_perm is not None:
            row_index = torch.full((w.values.shape[0],), -1, dtype=torch.int32, device=w.device)
            row_index[: self.out_features] = self.out_perm.to(torch.int32)
        return VNMWeight(w.values, columns, w.meta, row_index, w.pattern, w.shape)

    def _to_original(self, t: Tensor) -> Tensor:
        """A (out, in) tensor in stored (permuted) coordinates -> original row and column order."""
        from ..sparsify import _unpermute

        return _unpermute(t, self.in_perm, self.out_perm)

    def to_dense(self) -> Tensor:
        """The masked dense weight in the original row and column order (what the model computes with)."""
        return self._to_original(self.compressed_weight().to_dense())

    def mask(self) -> Tensor:
        """The kept positions (bool, original order), derived from the compressed weight: every stored slot
        on a real column. Equal to the mask sparsify_ recorded for masks built by ``vnm_mask`` (a row that
        kept fewer than n values in a block gets its filler slots back as kept zeros)."""
        w = self.compressed_weight()
        rows_p, slots = w.values.shape
        n, groups = w.pattern.n, slots // w.pattern.n
        pos = _unpack_meta(w.meta, n, groups)  # (Rp, G, n)
        cols = torch.gather(w.columns.long().repeat_interleave(w.block_rows, 0), 2, pos)
        real = cols >= (torch.arange(groups, device=cols.device) * w.pattern.m).view(1, -1, 1)  # padding -> column 0
        ones = VNMWeight(real.to(w.dtype).reshape(rows_p, slots), w.columns, w.meta, None, w.pattern, w.shape)
        return self._to_original(ones.to_dense() != 0)

    @property
    def nbytes(self) -> int:
        """Bytes this module holds (compressed weight, permutations, header, bias)."""
        tensors = [*self._weight_tensors(), self.in_perm, self.out_perm, self._out_inv, self.vnm_header, self.bias]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @property
    def dense_nbytes(self) -> int:
        """Bytes the dense weight (and bias) of this layer would hold."""
        size = _DTYPES[_DTYPES.index(self.weight_dtype)].itemsize
        return (self.out_features * self.in_features + (self.out_features if self.bias is not None else 0)) * size

    # ------------------------------------------------------------------ forward
    @property
    def in_linked(self) -> bool:
        """x arrives in ``in_perm`` order (the producers skip their output index op; joint permutations)."""
        return self._links[0]

    @property
    def out_linked(self) -> bool:
        """The output is returned in ``out_perm`` order, as the consumer reads it (joint permutations)."""
        return self._links[1]

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != self.weight_dtype:
            raise TypeError(f"VNMLinear holds a {self.weight_dtype} weight but got a {x.dtype} input")
        if self.in_perm is not None and not self.in_linked:
            x = x.index_select(-1, self.in_perm)
        if self.out_perm is not None and self.out_linked:
            bias = None if self.bias is None else self.bias.index_select(0, self.out_perm)
            return OP(x, self._weight_tensors(), self._spec, bias)
        if self.out_perm is None:
            return OP(x, self._weight_tensors(), self._spec, self.bias)
        y = OP(x, self._weight_tensors(), self._spec, None).index_select(-1, self._out_inv)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        perms = "in+out" if self.in_perm is not None and self.out_perm is not None else (
            "in" if self.in_perm is not None else "out" if self.out_perm is not None else "none")  # fmt: skip
        linked = "+".join(k for k, on in (("in", self.in_linked), ("out", self.out_linked)) if on)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, pattern={self.pattern}, "
            f"bias={self.bias is not None}, dtype={self.weight_dtype}, layout={self.layout}, permutations={perms}"
            + (f" (linked with neighbours: {linked})" if linked else "")
        )

    # ------------------------------------------------------------------ moving and loading
    def _apply(self, fn, recurse: bool = True):
        device = next(b.device for b in self._weight_tensors())
        probe = fn(torch.empty(0, dtype=self.weight_dtype, device=device))
        moves = probe.device != device or probe.dtype != self.weight_dtype
        if not moves or device.type == "meta":
            super()._apply(fn, recurse)
            if self.layout == "rows":
                self.weight_dtype = self.values.dtype
            self._refresh()
            return self
        # 1. leave the sparse-tensor-core layout, whose values are bits of int32 records
        self._to_layout("rows")
        super()._apply(fn, recurse)
        self.weight_dtype = self.values.dtype
        # 2. the layout for where it landed (the sparse-tensor-core one it last held, if any)
        if tc_layout_supported(self.pattern, self.weight_dtype, self.in_features, probe.device):
            self._to_layout(getattr(self, "tc_layout", "tc"))
        self._refresh()
        return self

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        header = state_dict.get(prefix + "vnm_header")
        if header is not None:
            error = self._check_header(header)
            if error is not None:
                error_msgs.append(f"{prefix or 'VNMLinear'}: {error}")
                return
            layout = {v: k for k, v in LAYOUTS.items()}[int(header[6])]
            if layout != self.layout and all(prefix + k in state_dict for k in _KEYS[LAYOUTS[layout]]):
                self._convert_entries(state_dict, prefix, layout)
        for name in ("in_perm", "out_perm", "perm_links"):  # permutations the empty module was not built with
            if prefix + name in state_dict and getattr(self, name) is None:
                ref = self._weight_tensors()[0]
                self._buffers[name] = torch.zeros_like(state_dict[prefix + name], device=ref.device)
        state_dict[prefix + "vnm_header"] = self._header()  # refreshed below from what was loaded
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._refresh()

    def _check_header(self, header: Tensor) -> str | None:
        h = [int(x) for x in header.tolist()]
        if len(h) != 8 or h[0] != FORMAT_VERSION:
            return f"unknown compressed-weight format {h[:1]} (this vnm_compile reads version {FORMAT_VERSION})"
        p = self.pattern
        if h[1:6] != [p.v, p.n, p.m, self.out_features, self.in_features]:
            return (f"the saved weight is {h[4]}x{h[5]} at {h[1]}:{h[2]}:{h[3]}, this layer is "
                    f"{self.out_features}x{self.in_features} at {p}")  # fmt: skip
        if _DTYPES[h[7]] != self.weight_dtype:
            return f"the saved weight is {_DTYPES[h[7]]}, this layer holds {self.weight_dtype}"
        return None

    def _convert_entries(self, state_dict, prefix: str, saved: str) -> None:
        """Replace the saved layout's entries with this module's layout (rows <-> tc)."""
        tensors = [state_dict.pop(prefix + k) for k in _KEYS[LAYOUTS[saved]]]
        spec = CompressedSpec(*self._spec).with_(layout=LAYOUTS[saved])
        w = unpack(tensors, spec, self.in_features, self.weight_dtype)
        if self.layout != "rows":
            from ..kernels.sparse_tc import pack_sparse_tc

            device = self.tc_records.device
            packed = pack_sparse_tc(w.to(device) if device.type != "meta" else w, compact=self.layout == "tc-compact")
            state_dict[prefix + "tc_records"], state_dict[prefix + "tc_columns"] = packed.records, packed.columns
        else:
            for k in _ROWS_KEYS:
                state_dict[prefix + k] = getattr(w, k)
