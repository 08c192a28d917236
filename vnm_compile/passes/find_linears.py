"""Find the linear layers in the graph Dynamo hands over and decide which can be lowered.

In current PyTorch Dynamo lifts parameters to graph inputs, so a linear's
weight is a placeholder whose example input is the model's real Parameter: the
V:N:M state recorded by sparsify_ is looked up by that Parameter's identity,
and the layer's name is read from the placeholder's source
(``L['self']._modules['layers']._modules['0']._parameters['weight']`` ->
``layers.0``). Older graphs that keep parameters as ``get_attr`` are handled too.
The pass only annotates (``ctx.sites``); it does not change the graph.

Dense or sparse is decided from the measured speed table (kernels.dispatch).
With ``dense_fallback`` (the default) the question is up to how many tokens
V:N:M wins (sparse_token_limit): never -> dense; always (or no table, or not
CUDA) -> vnm::linear; up to T -> vnm::hybrid_linear, which switches at run
time, so one dynamic-shape graph serves decode and prefill. Where every call's
token count is static in the graph (Dynamo specialised it; another size
recompiles) the switch is resolved here instead. Without ``dense_fallback``
the example's token count decides once per graph (prefer_sparse).
"""

from __future__ import annotations

import logging
import math
import re

import torch
from torch import Tensor, fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from ..sparsify import matches_ignore
from ..state import get_sparsity
from .context import CompileContext, LinearSite, is_dtype_supported, placeholder_source, source_name

__all__ = ["find_linears", "is_linear", "LINEAR_TARGETS"]

logger = logging.getLogger(__name__)

# What nn.Linear / F.linear become in a Dynamo graph (torch IR) or after decomposition (aten).
LINEAR_TARGETS = (torch._C._nn.linear, torch.nn.functional.linear, torch.ops.aten.linear.default)
# What a transformers Conv1D (GPT-2; weight (in, out)) becomes: addmm(bias, x, weight).
_ADDMM_TARGETS = (torch.addmm, torch.ops.aten.addmm.default)
_EMBEDDING_TARGETS = (torch.nn.functional.embedding, torch.ops.aten.embedding.default)
CONV1D_REASON = (
    "transformers Conv1D (weight stored transposed) is not lowered at compile time: sparsify_ prunes it "
    "and converts it to nn.Linear, which is"
)

_KEY = re.compile(r"\[['\"]([^'\"]+)['\"]\]|\[(\d+)\]|\.([A-Za-z_]\w*)")
_CONTAINERS = {"_modules", "_parameters", "_buffers"}
_STACK_PATH = re.compile(r"^L\[[^\]]*\](?:\[\d+\])*\.?(.*)$")  # nn_module_stack: the frame's root, then the path


def is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in LINEAR_TARGETS


def _arg(node: fx.Node, index: int, name: str):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name)


def module_name_from_source(source: str) -> str:
    """``L['self']._modules['layers']._modules['0']._parameters['weight']`` -> ``layers.0``.

    The root object is the frame's variable and any indexing into it before the first attribute:
    ``L['self']``, ``L['model']``, or ``L['args'][0]`` when a decorator's wrapper calls the forward
    (transformers 5 does) -- its name is not part of the layer's."""
    tokens = _KEY.findall(source)
    start = 1
    while start < len(tokens) and not tokens[start][2]:
        start += 1
    parts = [a or b or c for a, b, c in tokens[start:]]
    parts = [p for p in parts if p not in _CONTAINERS]
    if parts and parts[-1] == "weight":
        parts = parts[:-1]
    return ".".join(parts)


def module_name_from_placeholder(name: str) -> str:
    """Fallback on the placeholder's mangled name: ``l_self_modules_fc_parameters_weight_`` -> ``fc``."""
    name = name.strip("_")
    for prefix in ("l_self_modules_", "L_self_modules_", "l_self_", "L_self_"):
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    name = name.replace("_parameters_weight", "").replace("_modules_", ".")
    return name


def _weight_of(gm: fx.GraphModule, node, inputs: dict[fx.Node, object]) -> tuple[Tensor | None, str | None]:
    """The weight tensor behind a linear's weight argument and the layer's name, if it is a parameter."""
    if not isinstance(node, fx.Node):
        return None, None
    if node.op == "placeholder":
        value = inputs.get(node)
        source = source_name(placeholder_source(node))
        name = module_name_from_source(source) if isinstance(source, str) else module_name_from_placeholder(node.name)
        return (value if isinstance(value, Tensor) else None), name
    if node.op == "get_attr":
        value = gm
        for attr in str(node.target).split("."):
            value = getattr(value, attr, None)
        name = str(node.target).removesuffix(".weight").removesuffix("weight").rstrip(".")
        return (value if isinstance(value, Tensor) else None), name
    return None, None


def _caller(node: fx.Node) -> tuple[str | None, str | None]:
    """(name, class name) of the module whose forward made this call (Dynamo's nn_module_stack), if known."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None, None
    path, cls = list(stack.values())[-1]
    name = None
    if isinstance(path, str):  # "L['self'].layers.0.mlp" (numeric parts as attributes), or a Source's form
        m = _STACK_PATH.match(path)
        name = m.group(1) if m and "[" not in m.group(1) else module_name_from_source(path)
    return name or None, getattr(cls, "__name__", None) if not isinstance(cls, str) else cls.rsplit(".", 1)[-1]


def _feeds_embedding(node) -> bool:
    return isinstance(node, fx.Node) and any(
        u.op == "call_function" and u.target in _EMBEDDING_TARGETS for u in node.users
    )


def _outside_mask(weight: Tensor, mask: Tensor) -> int:
    """Nonzero (or NaN) weights where the recorded mask is False."""
    with torch.no_grad():
        return int(torch.count_nonzero(weight.detach().masked_fill(mask.to(weight.device, torch.bool), 0)))


def _example(x):
    val = x.meta.get("example_value", x.meta.get("val")) if isinstance(x, fx.Node) else None
    return val if isinstance(val, Tensor) and val.dim() >= 1 else None


def _tokens(x) -> int:
    """Rows the linear multiplies (product of the input's leading dims), from its fake value's size hints."""
    val = _example(x)
    if val is None:
        return 1
    dims = []
    for d in val.shape[:-1]:
        if isinstance(d, torch.SymInt):
            hint = getattr(d.node, "hint", None)
            d = hint if isinstance(hint, int) else 1
        dims.append(int(d))
    return max(1, math.prod(dims))


def _static_tokens(x) -> int | None:
    """The linear's token count when the graph fixes it (no symbolic leading dim), else None."""
    val = _example(x)
    if val is None or not all(is_concrete_int(d) for d in val.shape[:-1]):
        return None
    return max(1, math.prod(int(d) for d in val.shape[:-1]))


def _sparse_limit(
    site: LinearSite, device: torch.device, pattern, dense_fallback: bool, expanded: bool = False
) -> int | None:
    """Up to how many tokens the layer runs sparse: None = always, 0 = never (from kernels.dispatch;
    ``expanded``: with the expanded weights the expand_weights option holds)."""
    from .. import kernels
    from ..kernels import dispatch

    kw = {"expanded": True} if expanded else {}  # (only when set: keeps older stand-ins of these working)
    if dense_fallback:
        return dispatch.sparse_token_limit(site.shape[0], site.shape[1], pattern, device, **kw)
    return None if kernels.prefer_sparse(site.shape[0], site.shape[1], pattern, site.tokens, device, **kw) else 0


def find_linears(gm: fx.GraphModule, ctx: CompileContext) -> bool:
    """Record every linear call as a LinearSite in ``ctx.sites``, with the reason if it must stay dense."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = dict(zip(placeholders, ctx.example_inputs, strict=False))
    by_weight: dict[int, LinearSite] = {}
    opts = ctx.options
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _ADDMM_TARGETS and _caller(node)[1] == "Conv1D":
            _conv1d_site(gm, node, inputs, opts, ctx)
            continue
        if not is_linear(node):
            continue
        weight, name = _weight_of(gm, _arg(node, 1, "weight"), inputs)
        caller = _caller(node)[0]
        if weight is None:
            site = LinearSite(name or node.name, torch.empty(0, 0), [node])
            ctx.sites.append(site)
            ctx.keep_dense(site, "weight is computed in the graph, not a parameter")
            continue
        if id(weight) in by_weight:  # the same weight called again (weight sharing)
            by_weight[id(weight)].nodes.append(node)
            continue
        site = by_weight[id(weight)] = LinearSite(name, weight, [node], tokens=_tokens(_arg(node, 0, "input")))
        if caller and caller != name:  # a tied weight: report it under the linear that calls it
            site.name, site.aliases = caller, (name,)
        w_node = _arg(node, 1, "weight")
        if w_node in inputs:
            site.input_index = placeholders.index(w_node)
        ctx.sites.append(site)
        _decide(site, opts, ctx, tied=name if _feeds_embedding(w_node) else None)
    _check_masks(ctx)
    for site in ctx.to_lower():  # after every call of a shared weight is known
        _dispatch(site, opts, ctx)
    logger.debug("find_linears: %d linear layers, %d to lower", len(ctx.sites), len(ctx.to_lower()))
    return False


def _conv1d_site(gm: fx.GraphModule, node: fx.Node, inputs: dict, opts, ctx: CompileContext) -> None:
    """A transformers Conv1D call: reported (dense, with the reason), never lowered."""
    weight, name = _weight_of(gm, _arg(node, 2, "mat2"), inputs)
    if weight is None or weight.dim() != 2:
        return
    site = LinearSite(_caller(node)[0] or name, weight.t(), [node], tokens=_tokens(_arg(node, 1, "mat1")))
    ctx.sites.append(site)
    _decide(site, opts, ctx)
    if site.dense_reason is None:
        ctx.keep_dense(site, f"{CONV1D_REASON} (option pattern={opts.pattern})")


def _check_masks(ctx: CompileContext) -> None:
    """Recorded layers whose weights have nonzeros outside their mask (trained, reloaded or edited after
    sparsify_) would silently compute another function once lowered: refuse them, naming every one."""
    bad = []
    for site in ctx.to_lower():
        if site.origin == "recorded":
            n = _outside_mask(site.weight, site.state.mask)
            if n:
                bad.append(f"{site.name!r} ({n} of {site.weight.numel()})")
    if bad:
        raise ValueError(
            f"vnm backend: {len(bad)} sparsified layer(s) have nonzero weights outside their recorded V:N:M mask: "
            f"{', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}. The weights changed after sparsify_ (optimizer "
            "steps, load_state_dict of dense weights, in-place edits), so the compiled model would differ from "
            "eager. Fix: vnm_compile.recovery.apply_masks_(model) to zero them (train with fix_masks_ to keep "
            "them), sparsify_(model, VNMConfig(..., overwrite=True)) to choose new masks, or "
            "vnm_compile.state.clear_sparsity(module) to run the layer dense"
        )


def _decide(site: LinearSite, opts, ctx: CompileContext, tied: str | None = None) -> None:
    """Keep ``site`` dense for the first reason that applies (``tied``: the embedding its weight is tied to)."""
    weight = site.weight
    recorded = get_sparsity(weight) is not None
    if any(matches_ignore(n, opts.ignore_for(recorded)) for n in (site.name, *site.aliases)):
        return ctx.keep_dense(site, "ignored by name")
    if tied is not None and not recorded:  # the default never prunes embeddings
        return ctx.keep_dense(site, f"weight tied to the embedding {tied!r}, which is never pruned")
    if weight.dim() != 2:
        return ctx.keep_dense(site, f"unsupported weight shape {tuple(weight.shape)}")
    if weight.numel() == 0:
        return ctx.keep_dense(site, f"zero-size weight {tuple(weight.shape)}")
    if not recorded and opts.pattern is None:
        return ctx.keep_dense(site, "no V:N:M state and no pattern option")
    min_numel = opts.min_numel_for(recorded)
    if weight.numel() < min_numel:
        return ctx.keep_dense(site, f"too small ({weight.numel()} < min_numel={min_numel})")
    if not weight.is_floating_point():
        return ctx.keep_dense(site, f"non-float weight ({weight.dtype})")
    if not is_dtype_supported(weight.dtype):
        return ctx.keep_dense(site, f"unsupported dtype {weight.dtype} (vnm::linear takes fp16, bf16, fp32)")
    site.state = get_sparsity(weight)
    if site.state is not None:
        site.origin = "recorded"
        if tuple(site.state.mask.shape) != site.shape:
            return ctx.keep_dense(site, f"recorded mask {tuple(site.state.mask.shape)} does not fit the weight")
    return None


def _tc_eligible(site: LinearSite, pattern) -> bool:
    """Whether the mma.sp kernels take this layer (kernels.sparse_tc.unsupported)."""
    from ..kernels.sparse_tc import unsupported

    return pattern is not None and unsupported(pattern, site.weight.dtype, site.shape[1]) is None


def tc_option(option, device: torch.device) -> bool | int | None:
    """The sparse_tensor_cores option as it applies to a weight on ``device``: True, a token count, or
    None (off). "auto" is True where the kernels run (kernels.sparse_tc.sparse_tc_available), else off."""
    if isinstance(option, str):  # "auto" (CompileOptions validates it)
        from ..kernels.sparse_tc import sparse_tc_available

        return True if device.type == "cuda" and sparse_tc_available(device) else None
    return None if option is None or option is False else option


def _tc_floor(site: LinearSite, device: torch.device, pattern, option: bool | int | None) -> int | None:
    """From how many tokens the layer runs on the sparse tensor cores (``option``: tc_option's), or
    None: option off, a layer the mma.sp kernels do not take, or (True) no measured win."""
    from ..kernels import dispatch

    if option is None or not _tc_eligible(site, pattern):
        return None
    if option is True:
        return dispatch.sparse_tc_token_floor(site.shape[0], site.shape[1], pattern, device)
    return int(option)


def _tc_decode(site: LinearSite, device: torch.device, pattern, option, opts) -> tuple[int, int] | None:
    """At which token counts (lo, hi) the sparse tensor cores' decode kernel runs the layer (``option`` True and
    a measured win over dense and the Triton kernels with the layouts the options hold,
    dispatch.sparse_tc_decode_window), or None."""
    from ..kernels import dispatch

    if option is not True or not _tc_eligible(site, pattern):
        return None
    held = {"expanded": bool(opts.expand_weights), "interleaved": bool(opts.interleave_rows)}
    return dispatch.sparse_tc_decode_window(site.shape[0], site.shape[1], pattern, device, **held)


def index_lowered(site: LinearSite, opts) -> bool:
    """Whether the layer runs vnm::compressed_linear: a permuted layer, its permutations as index ops around it
    (option permutations "index"), or an unpermuted one on a GPU with the sparse tensor cores (measured_compressed)."""
    state = site.state
    if opts.permutations != "index" or state is None:
        return False
    return state.in_perm is not None or state.out_perm is not None or measured_compressed(site, opts)


def _sparse_tc_gpu(device: torch.device) -> bool:
    """A CUDA device where the sparse tensor cores run."""
    return device.type == "cuda" and tc_option("auto", device) is True


def measured_compressed(site: LinearSite, opts) -> bool:
    """An unpermuted sparsified layer on a GPU where the sparse tensor cores run it, with the default options:
    it runs vnm::compressed_linear with its own masked weight held for the dense path. Up to DECODE_TOKENS
    rows the decode kernel runs (autotuned on this GPU); above, the sparse GEMM is timed against cuBLAS on
    that weight once per shape and token bucket on this GPU, and the faster kept (kernels/compressed.py).
    That replaces the shipped table's prediction for vnm::linear (on an H100 the table predates these kernels
    and kept 20 of 28 Llama-3-8B linears dense at 1 token). Options that ask for the table path's layouts
    (expand_weights, interleave_rows, sparse_tensor_cores other than "auto", dense_fallback off) keep it."""
    if site.state is None or site.state.in_perm is not None or site.state.out_perm is not None:
        return False
    if opts.sparse_tensor_cores != "auto" or opts.expand_weights or opts.interleave_rows or not opts.dense_fallback:
        return False
    return _sparse_tc_gpu(site.weight.device) and _tc_eligible(site, site.state.pattern)


def _dispatch_index(site: LinearSite, ctx: CompileContext) -> None:
    """A permuted layer with recorded state runs vnm::compressed_linear (dense or sparse per call, by
    measurement) -- except where every call's token count is fixed in the graph above the decode range and
    the measured table gives the sparse tensor cores no win there: the model holds its own dense (masked)
    weight, so such a layer runs it, as a dense layer (no rebuild of the dense weight per call). An
    unpermuted layer (measured_compressed) always runs the op, its own weight held for the dense path."""
    from ..kernels import dispatch
    from ..kernels.compressed import DECODE_TOKENS

    static = [_static_tokens(_arg(node, 0, "input")) for node in site.nodes]
    device = site.weight.device
    held = measured_compressed(site, ctx.options)  # the op holds the model's own weight: it measures both
    if device.type == "cuda" and not held and None not in static and min(static) > DECODE_TOKENS:
        floor = dispatch.sparse_tc_token_floor(site.shape[0], site.shape[1], site.state.pattern, device)
        if floor is None or min(static) < floor:
            where = "no measured sparse win" if floor is None else f"the sparse tensor cores win from {floor}"
            return ctx.keep_dense(
                site, f"its own masked weight runs dense at {min(static)} tokens ({where} on {device.type})"
            )
    site.index_perms, site.held_dense = True, held
    return None


def _dispatch(site: LinearSite, opts, ctx: CompileContext) -> None:
    """Dense, vnm::linear or vnm::hybrid_linear (``site.max_sparse_tokens``) from the measured table,
    and from how many tokens the sparse tensor cores take over (``site.tc_min_tokens``, option) and at
    which token counts their decode kernel does (``site.tc_decode``).

    A layer kept dense here runs its weight as it is: a weight pruned in place
    (sparsify_) stays pruned, but one the ``pattern`` option would have pruned at
    compile time is left unpruned, and the reason says so.
    """
    if index_lowered(site, opts):
        return _dispatch_index(site, ctx)
    device = site.weight.device
    pattern = site.state.pattern if site.state is not None else opts.pattern
    option = tc_option(opts.sparse_tensor_cores, device)
    site.tc_min_tokens = tc = _tc_floor(site, device, pattern, option)
    site.tc_decode = window = _tc_decode(site, device, pattern, option, opts)
    limit = _sparse_limit(site, device, pattern, opts.dense_fallback, opts.expand_weights)
    if limit is None:
        return None
    notes = "" if site.state is not None else "; not pruned"
    if option is True and tc is None and window is None and _tc_eligible(site, pattern):
        # say why the option changed nothing here (a GPU's table from before vnm_tc_us has no such timings)
        notes += "; sparse tensor cores: no measured win on this device (`vnm bench` measures them on a GPU)"

    def on_tc(tokens: int) -> bool:
        return (tc is not None and tokens >= tc) or (window is not None and window[0] <= tokens <= window[1])

    if not opts.dense_fallback:
        if on_tc(site.tokens):
            return None  # the sparse tensor cores win at this token count
        return ctx.keep_dense(
            site, f"the kernel dispatcher prefers dense at {site.tokens} tokens on {device.type}{notes}"
        )
    if limit <= 0 and tc is None and window is None:
        return ctx.keep_dense(
            site, f"the kernel dispatcher prefers dense at every measured token count on {device.type}{notes}"
        )
    static = [_static_tokens(_arg(node, 0, "input")) for node in site.nodes]
    if None not in static and min(static) > limit and not any(on_tc(t) for t in static):
        tc_note = "" if tc is None else f", sparse tensor cores from {tc}"
        tc_note += "" if window is None else f", their decode kernel at {window[0]}-{window[1]}"
        return ctx.keep_dense(
            site,
            f"the kernel dispatcher prefers dense at {max(static)} tokens on {device.type} "
            f"(sparse up to {limit}{tc_note}){notes}",
        )
    if None in static or max(static) > limit:
        site.max_sparse_tokens = int(limit)
    return None
