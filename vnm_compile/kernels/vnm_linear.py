"""vnm::linear — y = x @ W^T + b with W in the V:N:M compressed format.

This file holds the op's contract: the torch.library definition, its fake
(meta) implementation for torch.compile/export tracing, and the plain PyTorch
reference used on CPU, by tests and by benchmarks. The op takes
``(x, weight, spec, bias)``: the compressed weight and the layouts held beside it
travel as one bundle, a list of tensors and a list of ints, which
``op_weight.OpWeight`` names (``OpWeight.from_vnm(w, ...).pack()``). The op's
implementation dispatches: CUDA tensors -> the Triton kernels
(vnm_triton.py); CPU tensors -> the reference, unless TRITON_INTERPRET=1 is
set at call time, then the Triton kernels run under the interpreter.
n != 2 and float64 always take the reference path.

``torch.ops.vnm.hybrid_linear`` (what the compiler lowers to when the
measured table says sparse wins only up to some token count, see
dispatch.sparse_token_limit) takes the model's masked dense weights as well
(one, or one per sibling for a fused launch, stacked along the output rows)
before its weight bundle: above ``OpWeight.max_sparse_tokens`` rows of x it runs dense GEMMs on them, otherwise
exactly what vnm::linear runs. The switch happens inside the op at run time.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from ..format import VNMWeight, decompress
from ..pattern import VNMPattern
from .op_weight import TC_DENSE, TC_DENSE_IDENTITY, TC_GATHER, TC_OFF, OpWeight, sparse_tc_args
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
    "OpWeight",
    "TC_OFF",
    "TC_GATHER",
    "TC_DENSE",
    "TC_DENSE_IDENTITY",
]

log = logging.getLogger(__name__)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_LIB = "vnm"


@torch.library.custom_op(f"{_LIB}::linear", mutates_args=())
def _linear_op(x: Tensor, weight: list[Tensor], spec: list[int], bias: Tensor | None) -> Tensor:
    w = OpWeight.unpack(weight, spec)
    if w.max_sparse_tokens is not None:
        raise ValueError(f"vnm::linear: spec {list(spec)} sets max_sparse_tokens, which vnm::hybrid_linear takes")
    return _sparse_linear(x, w, bias)


def _tc_runs(w: OpWeight, x: Tensor) -> bool:
    """Whether the mma.sp kernels take this input (OpWeight.tc_runs; CUDA only)."""
    return x.is_cuda and w.tc_runs(x.numel() // max(x.shape[-1], 1))


def _sparse_linear(x: Tensor, w: OpWeight, bias: Tensor | None) -> Tensor:
    """vnm::linear's implementation (also hybrid_linear's sparse branch and compressed_linear's row-major
    one). ``w.expanded`` (optional, vnm_triton.expand_weights of values/meta) only makes the Triton path
    faster from 2 tokens; ``w.interleaved`` (vnm_triton.interleave_rows of values/meta) only makes it
    faster at 1-4 tokens; the ``tc_*`` fields (the packed weight for the sparse tensor cores, see
    sparse_tc_args, and the token counts they run) run the mma.sp kernels on CUDA at those token counts."""
    if _tc_runs(w, x):
        from .sparse_tc import sparse_tc_linear

        return sparse_tc_linear(x, w.sparse_tc_weight(x.shape[-1], x.dtype), bias)
    args = (x, w.values, w.columns, w.meta, w.row_index, bias, w.v, w.n, w.m, w.out_features)
    if uses_triton(x, w.n):
        return vnm_linear_triton(*args, expanded=w.expanded, interleaved=w.interleaved)
    if x.is_cuda:
        log.info("vnm::linear: n=%d / %s takes the reference path (decompress + dense) on CUDA", w.n, x.dtype)
    return _owned(_reference_from_tensors(*args))


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


def _traced_weight(weight: list[Tensor], spec: list[int]) -> OpWeight:
    """The fakes' view of the weight: a malformed bundle fails at trace time, and the spec's entries
    become constants of the graph (under dynamic=True, Dynamo makes the ints of the objects a traced
    function reads symbolic; int() specializes them, as the kernels' choices depend on them)."""
    return OpWeight.unpack(weight, [int(s) for s in spec])


@_linear_op.register_fake
def _(x, weight, spec, bias):
    return x.new_empty((*x.shape[:-1], _traced_weight(weight, spec).out_features))


OP = torch.ops.vnm.linear.default


@torch.library.custom_op(f"{_LIB}::hybrid_linear", mutates_args=())
def _hybrid_linear_op(
    x: Tensor, dense_weights: list[Tensor], weight: list[Tensor], spec: list[int], bias: Tensor | None
) -> Tensor:
    # The token count is read here, at run time: one dynamic-shape graph serves decode and prefill
    # without a guard (and a recompile) per size. dense_weights are the masked weights in original
    # row/column order whose rows stacked are the compressed weight's rows (several for a fused
    # launch of sibling linears), so both branches compute the same function up to rounding.
    w = _hybrid_weight(OpWeight.unpack(weight, spec))
    tokens = x.numel() // max(x.shape[-1], 1)
    if tokens > w.max_sparse_tokens and not _tc_runs(w, x):
        return _dense_linear(x, dense_weights, bias, w.out_features)
    return _sparse_linear(x, w, bias)


def _hybrid_weight(w: OpWeight) -> OpWeight:
    if w.max_sparse_tokens is None:
        raise ValueError(
            "vnm::hybrid_linear: the spec has no max_sparse_tokens (OpWeight.max_sparse_tokens; -1 is None)"
        )
    return w


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
def _(x, dense_weights, weight, spec, bias):
    return x.new_empty((*x.shape[:-1], _hybrid_weight(_traced_weight(weight, spec)).out_features))


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
    weight = OpWeight.from_vnm(
        w, expanded=expanded, interleaved=interleaved, sparse_tc=sparse_tc, sparse_tc_min_tokens=sparse_tc_min_tokens,
        sparse_tc_decode_tokens=sparse_tc_decode_tokens,
    )  # fmt: skip
    return _linear_op(x, *weight.pack(), bias)


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
