"""vnm::linear — y = x @ W^T + b with W in the V:N:M compressed format.

This file holds the op's contract: the torch.library definition, its fake
(meta) implementation for torch.compile/export tracing, and the plain PyTorch
reference used on CPU, by tests and by benchmarks. The op's
implementation dispatches: CUDA tensors -> the Triton kernels
(vnm_triton.py); CPU tensors -> the reference, unless TRITON_INTERPRET=1 is
set at call time, then the Triton kernels run under the interpreter.
n != 2 and float64 always take the reference path.

``torch.ops.vnm.hybrid_linear`` (what the compiler lowers to when the
measured table says sparse wins only up to some token count, see
dispatch.sparse_token_limit) takes the model's masked dense weights as well
(one, or one per sibling for a fused launch, stacked along the output rows):
above ``max_sparse_tokens`` rows of x it runs dense GEMMs on them, otherwise
exactly what vnm::linear runs. The switch happens inside the op at run time.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from ..format import VNMWeight, decompress
from ..pattern import VNMPattern
from .vnm_triton import HAS_TRITON, interpret_mode, interpreter_ready, vnm_linear_triton

__all__ = [
    "vnm_linear",
    "vnm_linear_reference",
    "expand_weights",
    "interleave_rows",
    "OP",
    "HYBRID_OP",
    "uses_triton",
    "sparse_tc_args",
]

log = logging.getLogger(__name__)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_LIB = "vnm"


@torch.library.custom_op(f"{_LIB}::linear", mutates_args=())
def _linear_op(
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
    expanded: Tensor | None = None,
    rows_values: Tensor | None = None,
    rows_meta: Tensor | None = None,
    tc_records: Tensor | None = None,
    tc_columns: Tensor | None = None,
    tc_rows: Tensor | None = None,
    tc_mode: int = 0,
    tc_min_tokens: int = 0,
    tc_decode_min: int = 0,
    tc_decode_max: int = 0,
) -> Tensor:
    return _sparse_linear(
        x, values, columns, meta, row_index, bias, v, n, m, out_features, expanded, _pair(rows_values, rows_meta),
        _tc(tc_records, tc_columns, tc_rows, tc_mode, tc_min_tokens, tc_decode_min, tc_decode_max),
    )  # fmt: skip


def _pair(rows_values: Tensor | None, rows_meta: Tensor | None) -> tuple[Tensor, Tensor] | None:
    if (rows_values is None) != (rows_meta is None):
        raise ValueError("vnm::linear: rows_values and rows_meta (interleave_rows) come together or not at all")
    return None if rows_values is None else (rows_values, rows_meta)


# tc_mode: how the op's sparse-tensor-core arguments are laid out (sparse_tc_args)
TC_OFF, TC_GATHER, TC_DENSE, TC_DENSE_IDENTITY = 0, 1, 2, 3


def _tc(records, columns, rows, mode, min_tokens, decode_min=0, decode_max=0) -> tuple | None:
    """The sparse-tensor-core arguments checked, or None (off). The mma.sp kernels run an input of T rows
    when T >= min_tokens (>= 1; 0: never) or decode_min <= T <= decode_max (the decode kernel's token
    counts, 1 <= decode_min <= decode_max <= sparse_tc.DECODE_MAX_TOKENS; 0, 0: none)."""
    if mode == TC_OFF:
        return None
    if mode not in (TC_GATHER, TC_DENSE, TC_DENSE_IDENTITY) or records is None or columns is None:
        raise ValueError(f"vnm::linear: tc_mode={mode} needs tc_records and tc_columns (sparse_tc_args)")
    if mode != TC_GATHER and rows is None:
        raise ValueError(f"vnm::linear: tc_mode={mode} (the dense mma.sp kernel) needs tc_rows")
    from .sparse_tc import DECODE_MAX_TOKENS

    window = (decode_min, decode_max) != (0, 0)
    if window and not 1 <= decode_min <= decode_max <= DECODE_MAX_TOKENS:
        raise ValueError(f"vnm::linear: tc_decode_min..tc_decode_max must lie within 1..{DECODE_MAX_TOKENS} "
                         f"(or be 0, 0), got {decode_min}..{decode_max}")  # fmt: skip
    if min_tokens < 0 or (min_tokens == 0 and not window):
        raise ValueError(f"vnm::linear: tc_min_tokens must be >= 1 (0 with a decode window), got {min_tokens}")
    return records, columns, rows, mode, min_tokens, decode_min, decode_max


def _tc_runs(tc: tuple | None, x: Tensor) -> bool:
    """Whether the mma.sp kernels take this input (see _tc; CUDA only)."""
    if tc is None or not x.is_cuda:
        return False
    tokens = x.numel() // max(x.shape[-1], 1)
    return (tc[4] >= 1 and tokens >= tc[4]) or tc[5] <= tokens <= tc[6]


def _sparse_linear(
    x, values, columns, meta, row_index, bias, v, n, m, out_features, expanded=None, interleaved=None, tc=None
) -> Tensor:
    """vnm::linear's implementation (also hybrid_linear's sparse branch). ``expanded`` (optional,
    vnm_triton.expand_weights of values/meta) only makes the Triton path faster from 2 tokens;
    ``interleaved`` (vnm_triton.interleave_rows of values/meta) only makes it faster at 1-4 tokens;
    ``tc`` (the packed weight for the sparse tensor cores, see sparse_tc_args, and the token counts they
    run, see _tc) runs the mma.sp kernels on CUDA at those token counts."""
    if _tc_runs(tc, x):
        return _sparse_tc_linear(x, row_index, bias, v, m, out_features, tc)
    if uses_triton(x, n):
        return vnm_linear_triton(
            x, values, columns, meta, row_index, bias, v, n, m, out_features, expanded=expanded,
            interleaved=interleaved,
        )  # fmt: skip
    if x.is_cuda:
        log.info("vnm::linear: n=%d / %s takes the reference path (decompress + dense) on CUDA", n, x.dtype)
    return _owned(_reference_from_tensors(x, values, columns, meta, row_index, bias, v, n, m, out_features))


def _sparse_tc_linear(x, row_index, bias, v, m, out_features, tc) -> Tensor:
    from .sparse_tc import SparseTCWeight, sparse_tc_linear

    records, columns, rows, mode = tc[:4]
    packed = SparseTCWeight(
        records, columns, row_index, out_features, x.shape[-1], x.dtype, None if mode == TC_GATHER else rows,
        0 if mode == TC_GATHER else m, mode == TC_DENSE_IDENTITY, block_rows=v,
    )  # fmt: skip
    return sparse_tc_linear(x, packed, bias)


def sparse_tc_args(packed) -> tuple[Tensor, Tensor, Tensor | None, int]:
    """(tc_records, tc_columns, tc_rows, tc_mode) for vnm::linear from a sparse_tc.SparseTCWeight: the
    dense mma.sp kernel's x^T row order where its default config picks it (M <= 8, not on Hopper), else
    only the gather indices (the gather kernel, or on Hopper the wgmma one)."""
    from .sparse_tc import default_config

    if default_config(packed)["KERNEL"] != "dense":
        return packed.records, packed.columns, None, TC_GATHER
    mode = TC_DENSE_IDENTITY if packed.group_identity else TC_DENSE
    return packed.records, packed.columns, packed.group_columns, mode


def _owned(y: Tensor) -> Tensor:
    """A custom op's output must not be a view (autograd forbids in-place ops on such outputs)."""
    return y.clone() if y._base is not None else y


def uses_triton(x: Tensor, n: int) -> bool:
    """Whether vnm::linear runs the Triton kernels for this input (decided at call time)."""
    if not HAS_TRITON or n != 2 or x.dtype not in _KERNEL_DTYPES:
        return False
    if x.is_cuda:
        return True
    if x.device.type != "cpu" or not interpret_mode():
        return False
    if not interpreter_ready():
        log.warning("TRITON_INTERPRET=1 was set after triton was imported: using the reference path")
        return False
    return True


@_linear_op.register_fake
def _(
    x, values, columns, meta, row_index, bias, v, n, m, out_features, expanded=None, rows_values=None, rows_meta=None,
    tc_records=None, tc_columns=None, tc_rows=None, tc_mode=0, tc_min_tokens=0, tc_decode_min=0, tc_decode_max=0,
):  # fmt: skip
    return x.new_empty((*x.shape[:-1], out_features))


OP = torch.ops.vnm.linear.default


@torch.library.custom_op(f"{_LIB}::hybrid_linear", mutates_args=())
def _hybrid_linear_op(
    x: Tensor,
    dense_weights: list[Tensor],
    values: Tensor,
    columns: Tensor,
    meta: Tensor,
    row_index: Tensor | None,
    bias: Tensor | None,
    v: int,
    n: int,
    m: int,
    out_features: int,
    max_sparse_tokens: int,
    expanded: Tensor | None = None,
    rows_values: Tensor | None = None,
    rows_meta: Tensor | None = None,
    tc_records: Tensor | None = None,
    tc_columns: Tensor | None = None,
    tc_rows: Tensor | None = None,
    tc_mode: int = 0,
    tc_min_tokens: int = 0,
    tc_decode_min: int = 0,
    tc_decode_max: int = 0,
) -> Tensor:
    # The token count is read here, at run time: one dynamic-shape graph serves decode and prefill
    # without a guard (and a recompile) per size. dense_weights are the masked weights in original
    # row/column order whose rows stacked are the compressed weight's rows (several for a fused
    # launch of sibling linears), so both branches compute the same function up to rounding.
    tokens = x.numel() // max(x.shape[-1], 1)
    tc = _tc(tc_records, tc_columns, tc_rows, tc_mode, tc_min_tokens, tc_decode_min, tc_decode_max)
    if tokens > max_sparse_tokens and not _tc_runs(tc, x):
        return _dense_linear(x, dense_weights, bias, out_features)
    return _sparse_linear(
        x, values, columns, meta, row_index, bias, v, n, m, out_features, expanded, _pair(rows_values, rows_meta), tc
    )


def _dense_linear(x: Tensor, weights: list[Tensor], bias: Tensor | None, out_features: int) -> Tensor:
    """x @ cat(weights)^T + bias; several weights write column slices of one output (no concatenation)."""
    if len(weights) == 1:
        return _owned(torch.nn.functional.linear(x, weights[0], bias))
    if sum(w.shape[0] for w in weights) != out_features:
        raise ValueError(f"hybrid_linear: dense weights have {[w.shape[0] for w in weights]} rows, not {out_features}")
    x2 = x.reshape(-1, x.shape[-1])
    out = x.new_empty((*x.shape[:-1], out_features))
    out2 = out.view(-1, out_features)
    start = 0
    for w in weights:
        stop = start + w.shape[0]
        if bias is None:
            torch.mm(x2, w.t(), out=out2[:, start:stop])
        else:
            torch.addmm(bias[start:stop], x2, w.t(), out=out2[:, start:stop])
        start = stop
    return out


@_hybrid_linear_op.register_fake
def _(
    x, dense_weights, values, columns, meta, row_index, bias, v, n, m, out_features, max_sparse_tokens, expanded=None,
    rows_values=None, rows_meta=None, tc_records=None, tc_columns=None, tc_rows=None, tc_mode=0, tc_min_tokens=0,
    tc_decode_min=0, tc_decode_max=0,
):  # fmt: skip
    return x.new_empty((*x.shape[:-1], out_features))


HYBRID_OP = torch.ops.vnm.hybrid_linear.default


def _reference_from_tensors(x, values, columns, meta, row_index, bias, v, n, m, out_features):
    # decompress reads only block_rows(pattern) and n: for N:4 storage that is 64 whatever v says.
    pattern = VNMPattern(v, n, m)
    dense = decompress(values, columns, meta, row_index, pattern, (out_features, x.shape[-1]))
    out_dtype = x.dtype
    # Accumulate in float32 (float64 for float64 inputs), as the kernels do.
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = torch.nn.functional.linear(x.to(acc), dense.to(acc), None if bias is None else bias.to(acc))
    return y.to(out_dtype)


def vnm_linear_reference(x: Tensor, w: VNMWeight, bias: Tensor | None = None) -> Tensor:
    """Plain PyTorch: decompress and multiply in float32."""
    return _reference_from_tensors(
        x, w.values, w.columns, w.meta, w.row_index, bias, w.block_rows, w.pattern.n, w.pattern.m, w.out_features
    )


def check_inputs(x: Tensor, w: VNMWeight, bias: Tensor | None) -> None:
    """Clear errors for inputs the op cannot take."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(w, VNMWeight):
        raise TypeError(f"w must be a VNMWeight, got {type(w).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point (fp16, bf16 or fp32), got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != w.in_features:
        raise ValueError(
            f"x has {x.shape[-1] if x.dim() else 0} features in its last dim, the weight expects {w.in_features}"
        )
    if x.device != w.device:
        raise ValueError(f"x is on {x.device} but the weight is on {w.device}")
    if bias is not None:
        if bias.shape != (w.out_features,):
            raise ValueError(f"bias must have shape ({w.out_features},), got {tuple(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")


def vnm_linear(
    x: Tensor,
    w: VNMWeight,
    bias: Tensor | None = None,
    *,
    expanded: Tensor | None = None,
    interleaved: tuple[Tensor, Tensor] | None = None,
    sparse_tc=None,
    sparse_tc_min_tokens: int | None = 1,
    sparse_tc_decode_tokens: tuple[int, int] | None = None,
) -> Tensor:
    """``F.linear(x, w.to_dense(), bias)`` computed from the compressed weight.

    x: (..., in_features), fp16/bf16/fp32. On CUDA the Triton kernels run; on
    CPU the reference path (or, with TRITON_INTERPRET=1, the Triton kernels
    under the interpreter). ``expanded = expand_weights(w)``, kept by the caller,
    trades 4/M of the dense weight's bytes of memory for speed from 2 tokens up
    (the gather GEMM then streams it instead of rebuilding it per call).
    ``interleaved = interleave_rows(w)``, kept by the caller, is a second copy of
    the values and metadata (their bytes again) laid out for the decode kernel:
    faster at 1-4 tokens. ``sparse_tc = sparse_tc.pack_sparse_tc(w)`` (kept by the
    caller; about the compressed bytes again): on CUDA, from
    ``sparse_tc_min_tokens`` rows of x up (None: never), and at the row counts ``lo..hi`` of
    ``sparse_tc_decode_tokens = (lo, hi)`` (within 1..sparse_tc.DECODE_MAX_TOKENS), run the mma.sp (sparse
    tensor core) kernels: up to DECODE_MAX_TOKENS rows the decode kernel, above them the GEMM.
    """
    check_inputs(x, w, bias)
    tc_args: tuple = (None, None, None, TC_OFF, 0, 0, 0)
    if sparse_tc is not None:
        from .sparse_tc import SparseTCWeight

        if not isinstance(sparse_tc, SparseTCWeight):
            raise TypeError(f"sparse_tc must be a SparseTCWeight (pack_sparse_tc(w)), got {type(sparse_tc).__name__}")
        if (sparse_tc.out_features, sparse_tc.in_features) != w.shape or sparse_tc.device != w.device:
            raise ValueError("sparse_tc was packed from another weight (shape or device differs)")
        if sparse_tc_min_tokens is not None and (
            isinstance(sparse_tc_min_tokens, bool)
            or not isinstance(sparse_tc_min_tokens, int)
            or sparse_tc_min_tokens < 1
        ):
            raise ValueError(f"sparse_tc_min_tokens must be an int >= 1 or None, got {sparse_tc_min_tokens!r}")
        window = (0, 0)
        if sparse_tc_decode_tokens is not None:
            from .sparse_tc import DECODE_MAX_TOKENS

            ok = isinstance(sparse_tc_decode_tokens, tuple) and len(sparse_tc_decode_tokens) == 2
            ok = ok and all(isinstance(t, int) and not isinstance(t, bool) for t in sparse_tc_decode_tokens)
            if not ok or not 1 <= sparse_tc_decode_tokens[0] <= sparse_tc_decode_tokens[1] <= DECODE_MAX_TOKENS:
                raise ValueError(f"sparse_tc_decode_tokens must be a tuple (lo, hi) of ints with 1 <= lo <= hi <= "
                                 f"{DECODE_MAX_TOKENS}, got {sparse_tc_decode_tokens!r}")  # fmt: skip
            window = sparse_tc_decode_tokens
        if sparse_tc_min_tokens is None and window == (0, 0):
            raise ValueError("sparse_tc given with sparse_tc_min_tokens=None and no sparse_tc_decode_tokens: it "
                             "would never run")  # fmt: skip
        tc_args = (*sparse_tc_args(sparse_tc), sparse_tc_min_tokens or 0, *window)
    rows_values = rows_meta = None
    if interleaved is not None:
        from .vnm_triton import _check_interleaved

        _check_interleaved(interleaved, w.values, w.block_rows)  # on every path: a bad pair fails here, not later
        rows_values, rows_meta = interleaved
    return _linear_op(
        x, w.values, w.columns, w.meta, w.row_index, bias, w.block_rows, w.pattern.n, w.pattern.m, w.out_features,
        expanded, rows_values, rows_meta, *tc_args,
    )  # fmt: skip


def expand_weights(w: VNMWeight, dtype: torch.dtype | None = None) -> Tensor:
    """The dense weights over each V-block's kept columns, (Rp, 4G) in ``dtype`` (default the
    weight's; pass x's dtype): what ``vnm_linear(..., expanded=)`` streams. n = 2 only."""
    if w.pattern.n != 2:
        raise ValueError(f"expand_weights supports n = 2 only, got {w.pattern}")
    from .vnm_triton import expand_weights as _expand

    return _expand(w.values, w.meta, dtype)


def interleave_rows(w: VNMWeight, rows: int | None = None) -> tuple[Tensor, Tensor]:
    """The values and metadata re-laid for the decode kernel (``rows`` = R of 4/8/16 consecutive
    rows of a group contiguous; default by layer height): what ``vnm_linear(..., interleaved=)``
    reads at 1-4 tokens. n = 2 and V divisible by 4 only."""
    if w.pattern.n != 2:
        raise ValueError(f"interleave_rows supports n = 2 only, got {w.pattern}")
    from .vnm_triton import interleave_rows as _interleave

    return _interleave(w.values, w.meta, w.block_rows, rows)
