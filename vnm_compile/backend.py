"""The "vnm" torch.compile backend: ``torch.compile(model, backend="vnm", options={...})``.

Dynamo hands over an FX graph whose inputs include the model's Parameters; the
passes (``vnm_compile.passes.PASSES``) find the linears, prune the ones that
carry no V:N:M state when a pattern is given, fold permutations into the
compressed weights and replace each with ``torch.ops.vnm.linear``, or with
``torch.ops.vnm.hybrid_linear`` where the measured speed table says sparse
wins only up to some token count (dense above it, switched at run time;
option ``dense_fallback``). The rest of the graph goes to inductor (or runs as
is with ``inductor=False``).
Every call's CompileReport is logged and kept (``last_report()``, ``reports()``).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import itertools
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from .passes import CompileContext, CompileOptions, CompileReport, run_passes
from .passes.context import placeholder_source

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
            strict, inductor, dense_fallback); keyword arguments are accepted as options too.
    Returns:
        The compiled callable.
    """
    mode = kwargs.pop("mode", None)
    try:
        opts = CompileOptions.from_dict({**(options or {}), **kwargs})
    except (ValueError, TypeError) as e:  # Dynamo wraps this; say whose error it is
        raise type(e)(f"{e} (vnm_compile: a bad option of torch.compile(backend='vnm'), not a PyTorch bug)") from None
    inputs = list(example_inputs)
    pristine = _Snapshot(gm)
    fn, ctx = _lower_and_compile(gm, inputs, opts, mode)
    # the lowered weights, and those kept dense on a masked copy, depend on the weights' values
    lowered = [s for s in ctx.to_lower() if s.compressed is not None] + [s for s in ctx.sites if s.masked_copy]
    watched = sorted({s.input_index for s in lowered if s.input_index is not None})
    if not watched:
        return fn
    return _WeightGuard(fn, watched, inputs, pristine, opts, mode)


def _lower_and_compile(
    gm: fx.GraphModule, inputs: list[Any], opts: CompileOptions, mode: str | None
) -> tuple[Callable[..., Any], CompileContext]:
    ctx = CompileContext(opts, inputs)
    run_passes(gm, ctx)
    if opts.inductor:
        from torch._inductor.compile_fx import compile_fx

        patches = torch._inductor.list_mode_options(mode) if mode not in (None, "default") else None
        # Inductor may make Dynamo trace the frame again (e.g. to turn Python float scalars of a
        # dynamic graph into tensors): the exception leaves here and this attempt's report is dropped,
        # the next attempt's kept.
        with torch.compiler.config.patch(cache_key_tag=_cache_key_tag()):
            fn = compile_fx(gm, inputs, config_patches=patches)
    else:
        fn = gm.forward
    report = ctx.report(next(_GRAPH_IDS))
    _REPORTS.append(report)
    logger.info("%s", report.summary())
    logger.debug("\n%s", report.table())
    return fn, ctx


def _cache_key_tag() -> str:
    """Inductor's cache key tag for graphs holding vnm ops: the user's tag plus the ops' schemas, so that a
    compiled graph cached by another version of vnm_compile (whose generated code calls the ops with other
    arguments) is never loaded by this one."""
    import hashlib

    from .kernels.compressed import OP as COMPRESSED_OP
    from .kernels.vnm_linear import HYBRID_OP, OP

    schemas = "|".join(str(op._schema) for op in (OP, HYBRID_OP, COMPRESSED_OP))
    tag = "vnm-" + hashlib.sha256(schemas.encode()).hexdigest()[:16]
    user = torch.compiler.config.cache_key_tag
    return f"{user}+{tag}" if user else tag


class _Snapshot:
    """The captured graph before the passes (plus its inputs' sources), to lower it again for other weights."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.root = gm
        self.graph = copy.deepcopy(gm.graph)
        # Dynamo's tracing context (its fake mode and shape environment): compiling again inside it
        # keeps the sizes the first compile treated as dynamic symbolic.
        self.tracing = torch._guards.TracingContext.try_get()
        self.sources = [placeholder_source(n) for n in gm.graph.nodes if n.op == "placeholder"]

    def fresh(self) -> fx.GraphModule:
        gm = fx.GraphModule(self.root, copy.deepcopy(self.graph))
        for node, source in zip((n for n in gm.graph.nodes if n.op == "placeholder"), self.sources, strict=False):
            node._dynamo_source = source
        return gm


@contextlib.contextmanager
def _own_float_specializations():
    """Dynamo's record of the float inputs aot_autograd asked it to specialize (a global set, cleared after each
    frame), as it was before: what a compile outside Dynamo adds to it does not leak into the next frame."""
    state = getattr(torch._dynamo.symbolic_convert, "TensorifyState", None)
    names = getattr(state, "force_specializations", set())
    before = set(names)
    try:
        yield
    finally:
        names.clear()
        names |= before


def _version(t: Any) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors carry no version counter
        return -1


class _WeightGuard:
    """The compiled graph holds compressed copies of the weights it was compiled with.

    Dynamo reuses one graph for every module instance running the same code (parameters are
    graph inputs, not guarded by identity), and in-place updates keep the Parameter object. So
    each call checks that the lowered weights are the same tensors at the same version; if not,
    the pristine graph is lowered again for the weights it was called with (kept per weight set).
    """

    MAX_VARIANTS = 16

    def __init__(self, fn, watched: list[int], inputs: list[Any], pristine: _Snapshot, opts, mode) -> None:
        self.watched = watched
        self.inputs = inputs
        self.pristine = pristine
        self.opts = opts
        self.mode = mode
        self.variants: list[tuple[tuple[tuple[Any, int], ...], Callable[..., Any]]] = [(self._key(inputs), fn)]

    def _key(self, args) -> tuple[tuple[Any, int], ...]:
        return tuple((args[i], _version(args[i])) for i in self.watched)

    def _matches(self, key, args) -> bool:
        return all(args[i] is w and _version(args[i]) == v for i, (w, v) in zip(self.watched, key, strict=True))

    def __call__(self, *args: Any) -> Any:
        for key, fn in self.variants:
            if self._matches(key, args):
                return fn(*args)
        return self._recompile(args)(*args)

    def _recompile(self, args) -> Callable[..., Any]:
        logger.info(
            "vnm: the lowered weights differ from the compiled ones (another module or an in-place update): lowering again"
        )
        inputs = list(self.inputs)
        for i in self.watched:
            inputs[i] = args[i]
        # In a dynamic graph aot_autograd may ask Dynamo to restart the frame's analysis with some float
        # scalars specialized (floats the first compile specialized after its check). No Dynamo frame is
        # running here: the request has marked them specialized, so the snapshot is compiled again.
        restart = torch._dynamo.exc.TensorifyScalarRestartAnalysis
        with torch._guards.tracing(self.pristine.tracing), _own_float_specializations():
            for attempt in range(3):
                try:
                    fn, _ = _lower_and_compile(self.pristine.fresh(), inputs, self.opts, self.mode)
                    break
                except restart:
                    if attempt == 2:
                        raise
                    logger.debug("vnm: aot_autograd asked to specialize float scalars; compiling again")
                except torch._subclasses.fake_tensor.DataDependentOutputException as err:
                    raise RuntimeError(
                        "vnm: a compiled graph met weights other than those it was compiled with (another model "
                        "of the same class, or weights replaced in place) and cannot be lowered again outside "
                        "Dynamo: this dynamic graph reads Python float attributes as tensors. Compile it with "
                        "fullgraph=True, or call torch._dynamo.reset() before compiling the other model."
                    ) from err
        self.variants.append((self._key(args), fn))
        if len(self.variants) > self.MAX_VARIANTS:
            logger.warning("vnm: more than %d weight sets seen by one graph; dropping the oldest", self.MAX_VARIANTS)
            self.variants.pop(0)
        return fn


def last_report() -> CompileReport | None:
    """The report of the most recent vnm backend call (None before the first)."""
    return _REPORTS[-1] if _REPORTS else None


def reports() -> list[CompileReport]:
    """The reports of recent vnm backend calls, oldest first (one per compiled graph)."""
    return list(_REPORTS)


def clear_reports() -> None:
    _REPORTS.clear()


def _setup_context(ctx, inputs, output) -> None:
    x, weight, spec, bias = inputs
    ctx.save_for_backward(*weight)
    ctx.vnm = (list(spec), x.shape[-1], bias is not None)


def _input_grads(ctx, grad, dense, bias_index: int, has_bias: bool):
    """grad w.r.t. x (input 0) and bias (input ``bias_index``) of y = x @ dense^T + bias."""
    grad_x = grad @ dense.to(grad.dtype) if ctx.needs_input_grad[0] else None
    grad_b = grad.reshape(-1, dense.shape[0]).sum(0) if has_bias and ctx.needs_input_grad[bias_index] else None
    return grad_x, grad_b


def _backward(ctx, grad):
    """Gradients for x and bias (the compressed weight is a constant of the compiled graph)."""
    from .format import decompress
    from .kernels.op_weight import OpWeight
    from .masks import block_rows
    from .pattern import VNMPattern

    spec, in_features, has_bias = ctx.vnm
    w = OpWeight.unpack(list(ctx.saved_tensors), spec)
    pattern = VNMPattern(w.v, w.n, w.m)
    if block_rows(pattern) != w.v:
        pattern = VNMPattern(1, w.n, w.m)  # as the op's reference: only N:4 storage has block_rows != v
    dense = decompress(w.values, w.columns, w.meta, w.row_index, pattern, (w.out_features, in_features))
    grad_x, grad_b = _input_grads(ctx, grad, dense, 3, has_bias)
    return grad_x, [None] * len(ctx.saved_tensors), None, grad_b


def _setup_hybrid_context(ctx, inputs, output) -> None:
    dense_weights, weight, bias = inputs[1], inputs[2], inputs[4]  # (x, dense_weights, weight, spec, bias)
    ctx.save_for_backward(*dense_weights)
    ctx.counts, ctx.has_bias = (len(dense_weights), len(weight)), bias is not None


def _hybrid_backward(ctx, grad):
    """hybrid_linear: gradients for x and bias from the masked dense weights (both branches compute
    x @ W^T + b with the same W, the weights stacked); none for the weights, which are frozen."""
    weights = ctx.saved_tensors
    dense = weights[0] if len(weights) == 1 else torch.cat(weights)
    grad_x, grad_b = _input_grads(ctx, grad, dense, 4, ctx.has_bias)
    return grad_x, [None] * ctx.counts[0], [None] * ctx.counts[1], None, grad_b


def _ensure_autograd() -> None:
    """Let graphs that run with grad enabled (trainable neighbours) differentiate through vnm.linear and
    vnm.hybrid_linear w.r.t. x/bias.

    Registered only when an op has no autograd formula of its own.
    """
    from .kernels.vnm_linear import _hybrid_linear_op, _linear_op

    for op, backward, setup in (
        (_linear_op, _backward, _setup_context),
        (_hybrid_linear_op, _hybrid_backward, _setup_hybrid_context),
    ):
        if getattr(op, "_backward_fn", None) is None:
            op.register_autograd(backward, setup_context=setup)


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
