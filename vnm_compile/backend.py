"""The "vnm" torch.compile backend: ``torch.compile(model, backend="vnm", options={...})``.

Dynamo hands over an FX graph whose inputs include the model's Parameters; the
passes (``vnm_compile.passes.PASSES``) find the linears, prune the ones that
carry no V:N:M state when a pattern is given, fold permutations into the
compressed weights and replace each with ``torch.ops.vnm.linear``. The rest of
the graph goes to inductor (or runs as is with ``inductor=False``).
Every call's CompileReport is logged and kept (``last_report()``, ``reports()``).
"""

from __future__ import annotations

import collections
import itertools
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from .passes import CompileContext, CompileOptions, CompileReport, run_passes

__all__ = ["vnm_backend", "CompileOptions", "CompileReport", "last_report", "reports", "clear_reports", "register"]

logger = logging.getLogger(__name__)

BACKEND_NAME = "vnm"

# The most recent reports, newest last (one per backend call = per captured graph).
_REPORTS: collections.deque[CompileReport] = collections.deque(maxlen=64)
_GRAPH_IDS = itertools.count()


def vnm_backend(
    gm: fx.GraphModule, example_inputs: list[Any], options: dict[str, Any] | None = None, **kwargs: Any
) -> Callable[..., Any]:
    """Compile one Dynamo graph: lower V:N:M linears to vnm.linear, then inductor.

    Args:
        gm: the graph Dynamo captured (parameters arrive as inputs).
        example_inputs: its example inputs (the real Parameters among them).
        options: see CompileOptions (pattern, score, calibration, alpha, ignore, min_numel,
            strict, inductor); keyword arguments are accepted as options too.
    Returns:
        The compiled callable.
    """
    mode = kwargs.pop("mode", None)
    opts = CompileOptions.from_dict({**(options or {}), **kwargs})
    ctx = CompileContext(opts, list(example_inputs))
    run_passes(gm, ctx)
    report = ctx.report(next(_GRAPH_IDS))
    _REPORTS.append(report)
    logger.info("%s", report.summary())
    logger.debug("\n%s", report.table())
    if not opts.inductor:
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    patches = torch._inductor.list_mode_options(mode) if mode not in (None, "default") else None
    return compile_fx(gm, example_inputs, config_patches=patches)


def last_report() -> CompileReport | None:
    """The report of the most recent vnm backend call (None before the first)."""
    return _REPORTS[-1] if _REPORTS else None


def reports() -> list[CompileReport]:
    """The reports of recent vnm backend calls, oldest first (one per compiled graph)."""
    return list(_REPORTS)


def clear_reports() -> None:
    _REPORTS.clear()


def _setup_context(ctx, inputs, output) -> None:
    x, values, columns, meta, row_index, bias, v, n, m, out_features = inputs
    ctx.save_for_backward(values, columns, meta, row_index)
    ctx.vnm = (v, n, m, out_features, x.shape[-1], bias is not None)


def _backward(ctx, grad):
    """Gradients for x and bias (the compressed weight is a constant of the compiled graph)."""
    from .format import decompress
    from .masks import block_rows
    from .pattern import VNMPattern

    values, columns, meta, row_index = ctx.saved_tensors
    v, n, m, out_features, in_features, has_bias = ctx.vnm
    pattern = VNMPattern(v, n, m)
    if block_rows(pattern) != v:
        pattern = VNMPattern(1, n, m)  # as the op's reference: only N:4 storage has block_rows != v
    dense = decompress(values, columns, meta, row_index, pattern, (out_features, in_features))
    grad_x = grad @ dense.to(grad.dtype) if ctx.needs_input_grad[0] else None
    grad_b = grad.reshape(-1, out_features).sum(0) if has_bias and ctx.needs_input_grad[5] else None
    return grad_x, None, None, None, None, grad_b, None, None, None, None


def _ensure_autograd() -> None:
    """Let graphs that run with grad enabled (trainable neighbours) differentiate through vnm.linear w.r.t. x/bias.

    Registered only when the op has no autograd formula of its own.
    """
    from .kernels.vnm_linear import _linear_op as op

    if getattr(op, "_backward_fn", None) is None:
        op.register_autograd(_backward, setup_context=_setup_context)


def register() -> None:
    """Register "vnm" with torch._dynamo (idempotent; defers to the entry point while it is loading us)."""
    from torch._dynamo.backends import registry

    if BACKEND_NAME in getattr(registry, "_COMPILER_FNS", {}):
        return
    if getattr(registry, "_BACKENDS", {}).get(BACKEND_NAME) is not None:
        # Found through the torch_dynamo_backends entry point: lookup_backend registers what it loads.
        return
    registry.register_backend(vnm_backend, name=BACKEND_NAME)


register()
_ensure_autograd()
