"""What the backend's passes share: the validated options, one record per linear call
site found in the graph, and the compile report they fill in.

Not a pass itself: the passes read and write a CompileContext in order
(see ``passes/__init__.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor, fx

from ..calibration.importance import SCORES
from ..calibration.observer import CalibrationStats
from ..format import VNMWeight
from ..pattern import VNMPattern, as_pattern
from ..sparsify import DEFAULT_IGNORE, VNMConfig
from ..state import LinearSparsity

__all__ = ["CompileOptions", "LinearSite", "LayerCompileReport", "CompileReport", "CompileContext", "USER_CHOICES"]

logger = logging.getLogger(__name__)

DEFAULT_MIN_NUMEL = VNMConfig.min_numel

# Reasons for leaving a layer dense that the user chose; every other reason is an
# error under ``strict=True``.
USER_CHOICES = (
    "ignored by name",
    "too small",
    "no V:N:M state and no pattern option",
    "weight tied to",
    "zero-size weight",
)


@dataclass(frozen=True)
class CompileOptions:
    """Options of ``torch.compile(model, backend="vnm", options={...})``.

    Args:
        pattern: prune linears that carry no recorded V:N:M state to this pattern
            ("64:2:5", "2:4"); None lowers only already-sparsified linears.
        score: importance for compile-time pruning: "abs", or "wanda"/"ria" with ``calibration``.
        calibration: calibration batches (each as the model is called: dict -> kwargs, tuple -> args,
            else the single argument), run through the captured graph; or a CalibrationStats.
        alpha: RIA's exponent on the activation norm.
        ignore: layer names (exact, dotted suffix or glob, as in VNMConfig) left dense. Default:
            VNMConfig's ("lm_head", "classifier") for compile-time pruning; layers sparsify_ recorded are lowered.
        min_numel: linears with fewer weights are left dense. Default: VNMConfig's (4096) for
            compile-time pruning; layers sparsify_ recorded are lowered at any size.
        strict: raise instead of leaving an eligible layer dense.
        dense_fallback: where the measured table says V:N:M beats dense only up to some token
            count T (kernels.dispatch.sparse_token_limit), lower to vnm::hybrid_linear, which runs
            dense above T tokens at run time (one graph for decode and prefill); False: decide once
            per graph from the example's token count (dense or vnm::linear).
        fuse_siblings: run sibling V:N:M linears that read the same input (q/k/v, gate/up) as one
            vnm::linear launch on their stacked weights (passes/fuse_siblings.py).
        expand_weights: also hold each lowered weight expanded over its blocks' kept columns
            (4/M of the dense weight's bytes more memory; passes/expand_weights.py): the gather
            GEMM streams it from 2 tokens up instead of rebuilding it per call, so batched decode
            and prefill run sparse where the measured table says that wins.
        interleave_rows: also hold each lowered weight's values and metadata row-interleaved for
            the decode kernel (the compressed bytes once more; passes/interleave_rows.py): faster
            at 1-4 tokens.
        sparse_tensor_cores: the mma.sp / wgmma.sp kernels (kernels/sparse_tc.py) for eligible layers
            (n = 2, V a multiple of 64, fp16/bf16). "auto" (default): on a CUDA device where they run
            (compute capability >= 8.0, PyTorch's NVRTC; kernels.sparse_tc.sparse_tc_available) each
            eligible layer sparsified in place runs vnm::compressed_linear, which decides dense or sparse
            per call by measurement on that GPU (find_linears.measured_compressed; a layer with recorded
            permutations does so under either value), and the rest as True; off elsewhere. True: for
            each eligible layer the token count from which the measured table says the sparse tensor
            cores beat dense (dispatch.sparse_tc_token_floor), and the few-token counts at which their
            decode kernel beats dense and the Triton kernels
            (dispatch.sparse_tc_decode_window); an int T: from T tokens for every eligible layer. Such
            a layer also holds its weight packed for them (about the compressed bytes once more;
            passes/sparse_tc_weights.py) and on CUDA runs inputs of those many rows on them; a layer
            whose Triton kernels never beat dense is then lowered too, running dense at the other
            counts. False (or None): off, the Triton kernels only and no packed copy.
        permutations: how a permuted layer (sparsify_ with permute=True) runs. "index" (default): its
            weight is held in the coordinates in which it obeys the pattern and the permutations become
            index ops on x and on the output (inductor fuses them into the ops producing x and consuming
            the output), so the kernels read contiguous kept columns; the layer runs
            vnm::compressed_linear, which picks sparse or dense per call by measurement (no dense weight
            copy). "fold": the permutations folded into the kernels' column indices and row store (the
            kept columns scattered over the whole input: slower from a few tokens up, measured).

    Developer options (debugging and tests; the README lists them apart from the user's options):

        inductor: hand the rewritten graph to inductor (False: run the FX graph as is).
        force_sparse: lower eligible layers on a device without fast V:N:M kernels too (the CPU: the
            reference path, or the Triton kernels under TRITON_INTERPRET=1; for tests, far slower than
            dense). Default False: there such layers run their masked weights as dense matmuls, and the
            report says so.
    """

    pattern: VNMPattern | str | None = None
    score: str = "abs"
    calibration: Any = None
    alpha: float = 0.5
    ignore: tuple[str, ...] | None = None
    min_numel: int | None = None
    strict: bool = False
    inductor: bool = True
    dense_fallback: bool = True
    fuse_siblings: bool = True
    expand_weights: bool = False
    interleave_rows: bool = False
    sparse_tensor_cores: bool | int | str | None = "auto"
    force_sparse: bool = False
    permutations: str = "index"

    def __post_init__(self) -> None:
        if self.permutations not in ("index", "fold"):
            raise ValueError(f"vnm backend option 'permutations' must be 'index' or 'fold', got {self.permutations!r}")
        if self.pattern is not None:
            object.__setattr__(self, "pattern", as_pattern(self.pattern))
        if self.score not in SCORES:
            raise ValueError(f"vnm backend option 'score' must be one of {SCORES}, got {self.score!r}")
        if self.score != "abs" and self.pattern is not None and self.calibration is None:
            raise ValueError(
                f"vnm backend option score={self.score!r} needs 'calibration' (a list of batches or a "
                "CalibrationStats); use score='abs' to prune without calibration"
            )
        cal = self.calibration
        if cal is not None and not isinstance(cal, CalibrationStats):
            if isinstance(cal, (Tensor, dict, str, bytes)) or not isinstance(cal, Sequence):
                raise TypeError(
                    "vnm backend option 'calibration' must be a list of batches or a CalibrationStats, "
                    f"got {type(cal).__name__}"
                )
            if len(cal) == 0:
                raise ValueError("vnm backend option 'calibration' is an empty list of batches")
            object.__setattr__(self, "calibration", tuple(cal))
        if self.ignore is not None:
            if isinstance(self.ignore, str) or not isinstance(self.ignore, (list, tuple, set, frozenset)):
                raise TypeError(f"vnm backend option 'ignore' must be a list of layer names, got {self.ignore!r}")
            object.__setattr__(self, "ignore", tuple(self.ignore))
            if not all(isinstance(n, str) for n in self.ignore):
                raise TypeError(f"vnm backend option 'ignore' must hold strings, got {self.ignore!r}")
        m = self.min_numel
        if m is not None and (not isinstance(m, int) or isinstance(m, bool) or m < 0):
            raise ValueError(f"vnm backend option 'min_numel' must be an int >= 0, got {self.min_numel!r}")
        t = self.sparse_tensor_cores
        if not (
            t is None or isinstance(t, bool) or (isinstance(t, str) and t == "auto") or (type(t) is int and t >= 1)
        ):
            raise ValueError(
                "vnm backend option 'sparse_tensor_cores' must be 'auto', True, False, None or a token count "
                f">= 1, got {t!r}"
            )
        if not isinstance(self.alpha, (int, float)) or not self.alpha >= 0:
            raise ValueError(f"vnm backend option 'alpha' must be a number >= 0, got {self.alpha!r}")
        for name in (
            "strict",
            "inductor",
            "dense_fallback",
            "fuse_siblings",
            "expand_weights",
            "interleave_rows",
            "force_sparse",
        ):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"vnm backend option {name!r} must be True or False, got {getattr(self, name)!r}")

    def ignore_for(self, recorded: bool) -> tuple[str, ...]:
        """The ignore list for a layer with (``recorded``) or without sparsify_ state."""
        if self.ignore is not None:
            return self.ignore
        return () if recorded else DEFAULT_IGNORE

    def min_numel_for(self, recorded: bool) -> int:
        if self.min_numel is not None:
            return self.min_numel
        return 0 if recorded else DEFAULT_MIN_NUMEL

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> CompileOptions:
        """Validate a user's options dict; unknown keys are rejected by name."""
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown vnm backend option(s) {unknown}; known options: {sorted(known)}")
        return cls(**options)


@dataclass
class LinearSite:
    """One nn.Linear weight in the graph and every call of it (a shared weight may be called twice)."""

    name: str
    weight: Tensor
    nodes: list[fx.Node]
    state: LinearSparsity | None = None
    origin: str = ""  # "recorded" (sparsify_) or "compile (<score>)"
    dense_reason: str | None = None
    tokens: int = 1
    compressed: VNMWeight | None = None
    input_index: int | None = None  # the weight's position among the graph inputs (lifted parameters)
    max_sparse_tokens: int | None = None  # lowered to vnm::hybrid_linear: dense above this many tokens
    fused_with: tuple[str, ...] = ()  # the layers sharing its vnm::linear launch (itself included)
    expanded_bytes: int = 0  # the expanded weights held for it (expand_weights option; shared when fused)
    interleaved_bytes: int = 0  # its row-interleaved copy (interleave_rows option; shared when fused)
    tc_bytes: int = 0  # its weight packed for the sparse tensor cores (sparse_tensor_cores option)
    tc_min_tokens: int | None = None  # run on the sparse tensor cores from this many tokens (same option)
    tc_decode: tuple[int, int] | None = None  # and at these token counts (lo, hi), their decode kernel
    aliases: tuple[str, ...] = ()  # other names of the weight (a tied weight: the calling module, the owner)
    masked_copy: bool = False  # kept dense on a masked copy of the weight (compile-time pruning off the GPU)
    index_perms: bool = False  # permutations run as index ops around vnm::compressed_linear (option)
    held_dense: bool = False  # vnm::compressed_linear holds the model's masked weight for its dense path
    in_perm_readers: list[str] = field(default_factory=list)  # the layers reading its input index op (itself too)
    in_perm_cancelled: tuple[str, ...] = ()  # input permutation cancelled with these producers' output ones
    out_perm_cancelled: tuple[str, ...] = ()  # output permutation cancelled with these consumers' input one
    out_perm_stored: bool = False  # output permutation applied in the kernel's store (store_out_permutations)
    in_perm_folded: bool = False  # input permutation folded into the kernel's columns (fold_in_permutations)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.weight.shape[0]), int(self.weight.shape[1]))


@dataclass
class LayerCompileReport:
    name: str
    shape: tuple[int, int]
    calls: int
    lowered: bool
    pattern: VNMPattern | None = None
    origin: str = ""
    permuted: bool = False
    reason: str | None = None
    dense_bytes: int = 0
    sparse_bytes: int = 0
    max_sparse_tokens: int | None = None
    fused_with: tuple[str, ...] = ()
    expanded_bytes: int = 0
    interleaved_bytes: int = 0
    tc_bytes: int = 0
    tc_min_tokens: int | None = None
    tc_decode: tuple[int, int] | None = None
    index_perms: bool = False
    held_dense: bool = False
    permutations: str = "none"  # how the input and output permutations were applied (CompileContext.report)

    @property
    def mode(self) -> str:
        """How the layer runs: "sparse" (vnm::linear), "dense", or "hybrid (sparse up to T tokens)";
        ", fused x3" appended when it shares one launch with two siblings, ", expanded" when the
        expanded weights are held for it (expand_weights option), ", interleaved" when its
        row-interleaved copy is (interleave_rows option), ", sparse TC from N tokens" when it runs on
        the sparse tensor cores from N tokens (sparse_tensor_cores option; ", sparse TC at A-B tokens and
        from N tokens" when their decode kernel also runs it at A-B tokens)."""
        if not self.lowered:
            return "dense"
        if self.index_perms:
            held = ", dense on its own weight" if self.held_dense else ""
            perms = ", permuted" if self.permuted else ""  # (where each permutation runs: ``permutations``)
            return f"compressed (dense or sparse per call{held}){perms}"
        fused = f", fused x{len(self.fused_with)}" if self.fused_with else ""
        fused += ", expanded" if self.expanded_bytes else ""
        fused += ", interleaved" if self.interleaved_bytes else ""
        if self.tc_bytes:
            parts = [f"at {self.tc_decode[0]}-{self.tc_decode[1]} tokens"] if self.tc_decode else []
            parts += [f"from {self.tc_min_tokens} tokens"] if self.tc_min_tokens else []
            fused += ", sparse TC " + " and ".join(parts)
        if self.max_sparse_tokens is None:
            return "sparse" + fused
        if self.max_sparse_tokens == 0:  # lowered for the sparse tensor cores only
            where = "where the sparse tensor cores do not run" if self.tc_decode else "below the sparse tensor cores"
            return f"hybrid (dense {where})" + fused
        return f"hybrid (sparse up to {self.max_sparse_tokens} tokens)" + fused


@dataclass
class CompileReport:
    """Which linears one backend call lowered to vnm::linear (with which pattern) and which stayed dense, and why."""

    layers: list[LayerCompileReport] = field(default_factory=list)
    graph_id: int = 0
    compressed_calls: int = 0  # vnm::compressed_linear calls of compressed modules (VNMLinear) in the graph
    compressed_launches: int = 0  # the launches they run as after sibling fusion

    @property
    def lowered(self) -> list[LayerCompileReport]:
        return [r for r in self.layers if r.lowered]

    @property
    def dense(self) -> list[LayerCompileReport]:
        return [r for r in self.layers if not r.lowered]

    def __getitem__(self, name: str) -> LayerCompileReport:
        for r in self.layers:
            if r.name == name:
                return r
        raise KeyError(f"no linear named {name!r} in this compile report; known: {[r.name for r in self.layers][:8]}")

    def summary(self) -> str:
        dense = sum(r.dense_bytes for r in self.lowered)
        sparse = sum(r.sparse_bytes for r in self.lowered)
        ratio = f" ({dense / sparse:.2f}x fewer weight bytes)" if sparse else ""
        hybrid = sum(r.max_sparse_tokens is not None for r in self.lowered)
        hybrid_note = (
            f", {hybrid} of them as vnm::hybrid_linear (dense above a token limit; their dense weights stay in memory)"
            if hybrid
            else ""
        )
        fused = [r for r in self.lowered if r.fused_with]
        groups = len({r.fused_with for r in fused})
        fused_note = f", {len(fused)} of them in {groups} fused launches (siblings on one input)" if fused else ""
        # a fused launch's expanded weights are held once for all its members
        expanded = {r.fused_with or (r.name,): r.expanded_bytes for r in self.lowered if r.expanded_bytes}
        expanded_note = f", expanded weights held: {sum(expanded.values()) / 2**20:.1f} MiB" if expanded else ""
        inter = {r.fused_with or (r.name,): r.interleaved_bytes for r in self.lowered if r.interleaved_bytes}
        expanded_note += f", row-interleaved copies held: {sum(inter.values()) / 2**20:.1f} MiB" if inter else ""
        tc = {r.fused_with or (r.name,): r.tc_bytes for r in self.lowered if r.tc_bytes}
        expanded_note += f", sparse-tensor-core packings held: {sum(tc.values()) / 2**20:.1f} MiB" if tc else ""
        compressed = (
            f", {self.compressed_calls} vnm::compressed_linear calls in {self.compressed_launches} launches"
            if self.compressed_calls
            else ""
        )
        return (
            f"vnm graph {self.graph_id}: {len(self.lowered)} linears lowered to vnm::linear{ratio}{hybrid_note}"
            f"{fused_note}{expanded_note}{compressed}, "
            f"{len(self.dense)} left dense"
        )

    def table(self) -> str:
        head = f"{'layer':<48} {'shape':>12} {'calls':>5} {'pattern':>9}  {'mode':<44} {'origin / reason'}"
        lines = [head, "-" * len(head)]
        for r in self.layers:
            shape = f"{r.shape[0]}x{r.shape[1]}"
            if r.lowered:
                note = r.origin + (f"; permutations: {r.permutations}" if r.permuted else "")
                lines.append(f"{r.name:<48} {shape:>12} {r.calls:>5} {str(r.pattern):>9}  {r.mode:<44} {note}")
            else:
                lines.append(f"{r.name:<48} {shape:>12} {r.calls:>5} {'-':>9}  {r.mode:<44} {r.reason}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table() + "\n" + self.summary()


@dataclass
class CompileContext:
    """State shared by the passes of one backend call."""

    options: CompileOptions
    example_inputs: list[Any]
    sites: list[LinearSite] = field(default_factory=list)
    compressed_calls: int = 0
    compressed_launches: int = 0

    def to_lower(self) -> list[LinearSite]:
        return [s for s in self.sites if s.dense_reason is None]

    def keep_dense(self, site: LinearSite, reason: str) -> None:
        """Leave ``site`` dense for ``reason``; under strict, raise unless the user chose it."""
        if self.options.strict and not reason.startswith(USER_CHOICES):
            raise RuntimeError(
                f"vnm backend (strict=True): linear {site.name!r} {site.shape} would stay dense: {reason}"
            )
        site.dense_reason = reason
        logger.debug("%s stays dense: %s", site.name, reason)

    def report(self, graph_id: int = 0) -> CompileReport:
        layers = []
        for s in self.sites:
            r = LayerCompileReport(s.name, s.shape, len(s.nodes), s.dense_reason is None, reason=s.dense_reason)
            r.max_sparse_tokens = s.max_sparse_tokens if r.lowered else None
            r.fused_with = s.fused_with if r.lowered else ()
            r.expanded_bytes = s.expanded_bytes if r.lowered else 0
            r.interleaved_bytes = s.interleaved_bytes if r.lowered else 0
            r.tc_bytes = s.tc_bytes if r.lowered else 0
            r.tc_min_tokens = s.tc_min_tokens if r.tc_bytes else None
            r.tc_decode = s.tc_decode if r.tc_bytes else None
            r.index_perms = s.index_perms and r.lowered
            r.held_dense = s.held_dense and r.lowered
            r.dense_bytes = s.weight.numel() * s.weight.element_size()
            if r.lowered and s.state is not None:
                r.pattern, r.origin = s.state.pattern, s.origin
                r.permuted = s.state.in_perm is not None or s.state.out_perm is not None
                r.permutations = _permutations_applied(s)
                if s.compressed is not None:
                    r.sparse_bytes = s.compressed.nbytes
            layers.append(r)
        return CompileReport(layers, graph_id, self.compressed_calls, self.compressed_launches)


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _permutations_applied(site: LinearSite) -> str:
    """How a lowered layer's permutations run: "in: index op on x shared by 3, out: cancelled with
    down_proj", "in+out: folded into the kernel indices", "none"."""
    state = site.state
    if state is None or (state.in_perm is None and state.out_perm is None):
        return "none"
    if not site.index_perms:
        return "in+out folded into the kernel indices" if state.in_perm is not None and state.out_perm is not None else (
            ("in" if state.in_perm is not None else "out") + " folded into the kernel indices")  # fmt: skip
    parts = []
    if state.in_perm is not None:
        if site.in_perm_cancelled:
            parts.append(f"in: cancelled with {', '.join(map(_short, site.in_perm_cancelled))}")
        elif site.in_perm_folded:
            parts.append("in: in the kernel's columns")
        else:
            n = len(site.in_perm_readers)
            parts.append("in: index op on x" + (f" shared by {n}" if n > 1 else ""))
    if state.out_perm is not None:
        if site.out_perm_cancelled:
            parts.append(f"out: cancelled with {', '.join(map(_short, site.out_perm_cancelled))}")
        elif site.out_perm_stored:
            parts.append("out: in the kernel's store")
        else:
            parts.append("out: index op on y")
    return ", ".join(parts)


def placeholder_source(node: fx.Node):
    """The Dynamo Source a graph input was read from (``L['x']``, ``L['self']...weight``), or None."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    return source if source is not None else getattr(node, "_dynamo_source", None)


def source_name(source) -> str | None:
    if source is None:
        return None
    name = source.name
    return name() if callable(name) else name  # a method in older torch


def is_dtype_supported(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16, torch.float32)
