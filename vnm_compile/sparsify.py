"""VNMConfig and sparsify_: one call that prunes every eligible linear in place."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from .calibration.importance import SCORES, importance
from .calibration.observer import CalibrationStats
from .calibration.reconstruct import METHODS as RECONSTRUCT_METHODS
from .linears import is_conv1d, is_linear_like, linear_like_modules, to_linear
from .masks import vnm_mask
from .pattern import VNMPattern, as_pattern
from .state import LinearSparsity, clear_sparsity, get_sparsity, set_sparsity

__all__ = ["VNMConfig", "LayerReport", "SparsifyReport", "sparsify_", "eligible_linears", "matches_ignore"]

logger = logging.getLogger(__name__)

DEFAULT_IGNORE = ("lm_head", "classifier")
ALREADY = "already sparsified"
CONFIG_SCORES = (*SCORES, "obs")  # "obs": second-order saliency, from calibration data (sparsify_'s data)


@dataclass(frozen=True)
class VNMConfig:
    """How to sparsify a model.

    Args:
        pattern: the V:N:M pattern ("64:2:5", or "2:4" for the N:4 baseline).
        score: importance score, "abs", "wanda" or "ria" (the latter two need calibration stats).
        alpha: RIA's exponent on the activation norm.
        permute: search V:N:M channel permutations (paper section 4.2) before pruning.
        permute_rounds: alternating assignment rounds of the permutation search.
        permute_outputs: with ``permute``, also search each linear's output permutation. False: input
            permutations only (and the output permutations ``joint_permutations`` links to a consumer's input),
            so no output permutation runs at inference: no index op after the layer and no scattered store.
            The input permutation carries most of the search's gain, but not all: on MiniLM, one-shot OBS +
            reconstruct, the embedding cosine is 0.7212 instead of 0.7261 at 64:2:5 and 0.5219 instead of
            0.5422 at 64:2:8 (no permutation: 0.7022 / 0.5150)
            (benchmarks/results/cpu/output_permutations_minilm.md).
        ignore: module names (exact, dotted suffix or glob) left dense.
        min_numel: linears with fewer weights than this are left dense.
        overwrite: re-prune linears that are already sparsified (from their current, masked weights);
            False: such a layer recorded with another pattern is an error, one with this pattern is kept.
        reconstruct: re-solve the kept weights of each row from the layer input's second
            moments H = XᵀX (with any score); needs ``data`` in sparsify_.
        sequential: with second moments, calibrate each layer on what the already-pruned
            layers before it produce (False: on the dense model's activations).
        damp: dampening of H, a fraction of its mean diagonal.
        reconstruct_method: "auto", "sparsegpt" or "exact" (calibration/reconstruct.py).
        joint_permutations: with ``permute``, linears joined by element-wise ops only (gate/up -> down_proj,
            fc1 -> fc2; traced by calibrate(), calibration/chains.py) share one permutation: the consumer's
            input permutation, searched first, is the producers' output permutation, so the compiled and
            compressed models pass the activation between them in that order with no index op. Off by
            default: the producers then cannot choose their own output permutation, which cost MiniLM (RIA)
            0.37 % (64:2:5) and 0.83 % (64:2:8) of the MLP importance kept, relative
            (benchmarks/results/cpu/joint_permutation_minilm.md). Attention too: o_proj's input permutation,
            searched per head (shared by the query heads of one kv head), is v_proj's output permutation
            (pairs proven by calibrate(), calibration/attention.py; sparsify_(..., attention=[]) keeps them
            independent), which cost MiniLM another 1.27 % (64:2:5) and 2.59 % (64:2:8) of the attention
            layers' importance kept, relative (same file). Not used by the second-order path
            (score "obs" or reconstruct=True), whose permutations are chosen block by block.
        layer_patterns: per-layer patterns, ``{name or glob: pattern or "dense"}`` (e.g. from
            ``plan_patterns(...).layer_patterns``); a layer takes the first entry that matches its name
            or a dotted suffix of it (exactly or as a glob: "layers.0.*" matches
            "model.layers.0.mlp.up_proj"), else ``pattern``. "dense" (or None)
            leaves it dense. Layers that read one input share an input permutation only with those
            of the same pattern.
        mask_blocksize: with score "obs" and reconstruct, the columns whose mask is chosen at once on
            the updated weights (None: M, each group of M columns; 128: SparseGPT's lazy-update block).
        dense_target: with reconstruct and sequential, fit each layer to the dense model's outputs
            from the pruned model's inputs (calibration/dense_target.py; one dense forward pass per
            block, before it is pruned, and each stage's dense input held until the stage is pruned).
    """

    pattern: VNMPattern | str = "64:2:5"
    score: str = "ria"
    alpha: float = 0.5
    permute: bool = True
    permute_rounds: int = 2
    permute_outputs: bool = True
    ignore: tuple[str, ...] = field(default=DEFAULT_IGNORE)
    min_numel: int = 4096
    overwrite: bool = False
    reconstruct: bool = False
    sequential: bool = True
    damp: float = 0.01
    reconstruct_method: str = "auto"
    joint_permutations: bool = False
    layer_patterns: tuple[tuple[str, VNMPattern | None], ...] = ()
    mask_blocksize: int | None = None
    dense_target: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", as_pattern(self.pattern))
        object.__setattr__(self, "layer_patterns", _parse_layer_patterns(self.layer_patterns))
        if isinstance(self.ignore, str):
            raise ValueError("VNMConfig.ignore must be a list of names, not a single string")
        object.__setattr__(self, "ignore", tuple(self.ignore))
        if self.score not in CONFIG_SCORES:
            raise ValueError(f"VNMConfig.score must be one of {CONFIG_SCORES}, got {self.score!r}")
        if not self.alpha >= 0:
            raise ValueError(f"VNMConfig.alpha must be >= 0, got {self.alpha}")
        if not isinstance(self.permute_outputs, bool):
            raise TypeError(f"VNMConfig.permute_outputs must be True or False, got {self.permute_outputs!r}")
        if self.permute_rounds < 0:
            raise ValueError(f"VNMConfig.permute_rounds must be >= 0, got {self.permute_rounds}")
        if self.min_numel < 0:
            raise ValueError(f"VNMConfig.min_numel must be >= 0, got {self.min_numel}")
        if not self.damp > 0:
            raise ValueError(f"VNMConfig.damp must be > 0, got {self.damp}")
        if self.mask_blocksize is not None and self.mask_blocksize < 1:
            raise ValueError(f"VNMConfig.mask_blocksize must be >= 1 or None, got {self.mask_blocksize}")
        if self.reconstruct_method not in RECONSTRUCT_METHODS:
            raise ValueError(
                f"VNMConfig.reconstruct_method must be one of {RECONSTRUCT_METHODS}, got {self.reconstruct_method!r}"
            )

    @property
    def needs_second_moments(self) -> bool:
        """Score "obs" or reconstruct=True: sparsify_ calibrates layer by layer on ``data``."""
        return self.score == "obs" or self.reconstruct

    def pattern_for(self, name: str) -> VNMPattern | None:
        """The pattern of layer ``name``: its first matching ``layer_patterns`` entry, else ``pattern``
        (None: left dense)."""
        parts = name.split(".")
        suffixes = [".".join(parts[i:]) for i in range(len(parts))]
        for key, pattern in self.layer_patterns:
            if any(fnmatch.fnmatchcase(suffix, key) for suffix in suffixes):
                return pattern
        return self.pattern

    def for_pattern(self, pattern: VNMPattern) -> VNMConfig:
        """This config with one pattern for every layer (what each layer is pruned with)."""
        if pattern == self.pattern and not self.layer_patterns:
            return self
        return replace(self, pattern=pattern, layer_patterns=())

    def to_json(self) -> str:
        d = asdict(self)
        d["pattern"] = str(self.pattern)
        d["ignore"] = list(self.ignore)
        d["layer_patterns"] = {k: DENSE if p is None else str(p) for k, p in self.layer_patterns}
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> VNMConfig:
        return cls(**json.loads(text))


DENSE = "dense"  # a layer_patterns value: keep the layer dense


def _parse_layer_patterns(value) -> tuple[tuple[str, VNMPattern | None], ...]:
    """VNMConfig.layer_patterns as ((name or glob, pattern or None), ...), from a mapping or pairs."""
    if isinstance(value, str):
        raise ValueError("VNMConfig.layer_patterns must map layer names (or globs) to patterns, not be a string")
    items = value.items() if isinstance(value, Mapping) else value
    parsed = []
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2 or not isinstance(item[0], str):
            raise ValueError(f"VNMConfig.layer_patterns entries must be (name or glob, pattern) pairs, got {item!r}")
        key, pattern = item
        if pattern is None or (isinstance(pattern, str) and pattern.strip().lower() == DENSE):
            parsed.append((key, None))
            continue
        try:
            parsed.append((key, as_pattern(pattern)))
        except ValueError as e:
            raise ValueError(f"VNMConfig.layer_patterns[{key!r}]: {e} (or 'dense')") from None
    return tuple(parsed)


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    pattern: VNMPattern | None = None
    density: float = 1.0
    importance_kept: float | None = None
    permuted: bool = False
    skipped: str | None = None
    shares_input_perm: tuple[str, ...] = ()  # other layers reading the same tensor (one shared in_perm)
    # joint permutations: the producers whose output permutation is this layer's input permutation, and the
    # consumers whose input permutation is this layer's output permutation
    in_perm_from: tuple[str, ...] = ()
    out_perm_to: tuple[str, ...] = ()
    note: str = ""  # e.g. "Conv1D converted to nn.Linear"
    dense_bytes: int = 0  # the weight as it is (dense), in the model's dtype
    mask_bytes: int = 0  # what the masked form holds beyond it: the bool mask and the permutations
    compressed_bytes: int = 0  # what compress_ holds instead of both (weight, permutations)
    # Relative output error tr(dW H dWᵀ) / tr(W H Wᵀ) on the calibration data (configs with second moments):
    error_masked: float | None = None  # of the plain masked weight
    error: float | None = None  # of the weight kept (after reconstruction, when on)


@dataclass
class SparsifyReport:
    """Per-linear outcome of sparsify_: pattern and importance kept, or why it was skipped."""

    config: VNMConfig
    layers: list[LayerReport] = field(default_factory=list)

    @property
    def sparsified(self) -> list[LayerReport]:
        return [r for r in self.layers if r.skipped is None]

    @property
    def skipped(self) -> list[LayerReport]:
        return [r for r in self.layers if r.skipped is not None]

    @property
    def dense(self) -> list[LayerReport]:
        """Skipped layers that stay dense (not those skipped because they are sparsified already)."""
        return [r for r in self.skipped if r.skipped != ALREADY]

    def __getitem__(self, name: str) -> LayerReport:
        for r in self.layers:
            if r.name == name:
                return r
        raise KeyError(name)

    def mean_importance_kept(self) -> float:
        kept = [r.importance_kept for r in self.sparsified if r.importance_kept is not None]
        return sum(kept) / len(kept) if kept else float("nan")

    def summary(self) -> str:
        n_params = sum(r.shape[0] * r.shape[1] for r in self.sparsified)
        kept = sum(r.shape[0] * r.shape[1] * r.density for r in self.sparsified)
        already = len(self.skipped) - len(self.dense)
        already_note = f", {already} already sparsified (kept)" if already else ""
        counts: dict[str, int] = {}
        for r in self.sparsified:
            counts[str(r.pattern)] = counts.get(str(r.pattern), 0) + 1
        at = " / ".join(f"{p} x{n}" for p, n in counts.items()) if len(counts) > 1 else next(iter(counts), None)
        at = at or str(self.config.pattern)
        return (
            f"{len(self.sparsified)} linears sparsified at {at} "
            f"({n_params - kept:,.0f} of {n_params:,} weights zeroed){already_note}, {len(self.dense)} left dense; "
            f"mean importance kept {self.mean_importance_kept():.3f}"
        )

    def memory(self) -> str:
        """Bytes each sparsified layer holds as dense, masked (weight + mask + permutations) and compressed
        (``compress_``), and the totals."""
        head = f"{'layer':<48} {'dense MiB':>10} {'masked MiB':>11} {'compressed MiB':>15} {'ratio':>6}"
        lines = [head, "-" * len(head)]
        for r in self.sparsified:
            masked = r.dense_bytes + r.mask_bytes
            lines.append(f"{r.name:<48} {r.dense_bytes / 2**20:>10.2f} {masked / 2**20:>11.2f} "
                         f"{r.compressed_bytes / 2**20:>15.2f} {r.compressed_bytes / max(r.dense_bytes, 1):>6.3f}")  # fmt: skip
        dense = sum(r.dense_bytes for r in self.sparsified)
        masked = dense + sum(r.mask_bytes for r in self.sparsified)
        comp = sum(r.compressed_bytes for r in self.sparsified)
        lines.append(f"{'total':<48} {dense / 2**20:>10.2f} {masked / 2**20:>11.2f} {comp / 2**20:>15.2f} "
                     f"{comp / max(dense, 1):>6.3f}")  # fmt: skip
        return "\n".join(lines)

    def table(self) -> str:
        head = f"{'layer':<48} {'shape':>12} {'pattern':>9} {'density':>8} {'kept':>6}  note"
        lines = [head, "-" * len(head)]
        for r in self.layers:
            shape = f"{r.shape[0]}x{r.shape[1]}"
            if r.skipped is not None:
                lines.append(f"{r.name:<48} {shape:>12} {'dense':>9} {1.0:>8.3f} {'':>6}  {r.skipped}")
            else:
                kept = "" if r.importance_kept is None else f"{r.importance_kept:.3f}"
                note = ", ".join(x for x in (r.note, "permuted" if r.permuted else "") if x)
                if r.shares_input_perm:
                    note += f" (input perm shared by {len(r.shares_input_perm) + 1})"
                if r.in_perm_from or r.out_perm_to:
                    note += f" (joint perm with {', '.join(_short(n) for n in r.in_perm_from + r.out_perm_to)})"
                if r.error is not None:
                    note += f" output error {r.error_masked:.4f} -> {r.error:.4f}"
                lines.append(f"{r.name:<48} {shape:>12} {str(r.pattern):>9} {r.density:>8.3f} {kept:>6}  {note}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table() + "\n" + self.summary()


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def matches_ignore(name: str, ignore: tuple[str, ...]) -> bool:
    """A module name matches an ignore entry exactly, as a dotted suffix, or as a glob."""
    return any(name == pat or name.endswith("." + pat) or fnmatch.fnmatchcase(name, pat) for pat in ignore)


def _weight_holders(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """Every (name, module) holding each ``weight`` Parameter directly: tied weights have several."""
    holders: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        w = module._parameters.get("weight")
        if isinstance(w, torch.Tensor):
            holders.setdefault(id(w), []).append((name, module))
    return holders


def _out_in(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of an nn.Linear or a transformers Conv1D (weight (in, out))."""
    w = module.weight
    return (int(w.shape[1]), int(w.shape[0])) if is_conv1d(module) else (int(w.shape[0]), int(w.shape[1]))


def _skip_reason(name: str, module: nn.Module, holders: list[tuple[str, nn.Module]], config: VNMConfig) -> str | None:
    """Why a linear stays dense (None: eligible, or already sparsified; see eligible_linears)."""
    if matches_ignore(name, config.ignore):
        return "ignored by name"
    ignored = [n for n, _ in holders if matches_ignore(n, config.ignore)]
    if ignored:  # a tied weight is ignored when any of its names is
        return f"ignored by name (its weight is tied to {ignored[0]!r})"
    tied = [(n, m) for n, m in holders if not is_linear_like(m)]
    if tied:
        return f"weight tied to {tied[0][0]!r} ({type(tied[0][1]).__name__}), which is never pruned"
    w = module.weight
    if not w.is_floating_point():
        return f"non-float weight ({w.dtype})"
    if w.numel() == 0:
        return f"zero-size weight {tuple(w.shape)}"
    if w.numel() < config.min_numel:
        return f"too small ({w.numel()} < min_numel={config.min_numel})"
    if w.is_meta:
        raise ValueError(
            f"sparsify_: layer {name!r} is on the meta device (no weights): materialise and load the model's "
            "weights (e.g. model.to_empty(device=...) then load_state_dict) first"
        )
    return None


def eligible_linears(model: nn.Module, config: VNMConfig) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Split the model's nn.Linear and transformers Conv1D layers into eligible ones and skipped ones (with reasons).

    A layer already sparsified is skipped with the same pattern, eligible with ``config.overwrite``,
    and an error (naming every such layer) with another pattern.
    """
    eligible: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    holders = _weight_holders(model)
    first_of: dict[int, str] = {}
    conflicts = []
    for name, module in linear_like_modules(model):  # a shared module is sparsified once, under its first name
        w = module.weight
        same = holders.get(id(w), [(name, module)])
        reason = _skip_reason(name, module, same, config)
        if reason is None and id(w) in first_of:
            reason = f"shares its weight with {first_of[id(w)]!r} (pruned there)"
        pattern, state = config.pattern_for(name), get_sparsity(module)
        if reason is None and pattern is None and state is not None:  # its zeros cannot be undone here
            conflicts.append(f"{name} ({state.pattern}, asked dense)")
            continue
        if reason is None and pattern is None:
            reason = "dense by VNMConfig.layer_patterns"
        if reason is not None:
            skipped[name] = reason
            continue
        first_of[id(w)] = name
        if state is not None and not config.overwrite:
            if state.pattern != pattern:
                conflicts.append(f"{name} ({state.pattern})")
            skipped[name] = ALREADY
            continue
        eligible[name] = module
    if conflicts:
        raise ValueError(
            f"sparsify_ at {config.pattern}: {len(conflicts)} layer(s) are already sparsified with another pattern: "
            f"{', '.join(conflicts[:6])}{' ...' if len(conflicts) > 6 else ''}. Pass VNMConfig(..., overwrite=True) "
            "to prune them again from their current (masked) weights, or vnm_compile.state.clear_sparsity(module) "
            "and reload the dense weights first"
        )
    return eligible, skipped


def _check_stats(stats: CalibrationStats | None, eligible: dict[str, nn.Module], config: VNMConfig) -> None:
    """Calibration statistics of another model would leave every layer dense: say so."""
    if stats is None or config.score == "abs" or not eligible:
        return
    if not any(name in stats for name in eligible):
        known = list(getattr(stats, "observers", {}))
        raise ValueError(
            f"the calibration statistics match none of the model's {len(eligible)} eligible linears "
            f"(stats hold {known[:3]}{' ...' if len(known) > 3 else ''}; the model has {list(eligible)[:3]} ...): "
            "run calibrate() on this model"
        )


@contextlib.contextmanager
def _layer_errors(name: str, shape: tuple[int, int]) -> Iterator[None]:
    """Name the layer in an error raised while pruning it (ValueError reworded, anything else annotated)."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f"sparsify_: layer {name!r} {shape[0]}x{shape[1]}: {e}") from e
    except Exception as e:
        e.add_note(f"(raised by sparsify_ while pruning layer {name!r} {shape[0]}x{shape[1]})")
        raise


def _weight_2d(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in), a view: a transformers Conv1D stores it transposed."""
    w = module.weight
    w = w.t() if is_conv1d(module) else w
    if not bool(torch.isfinite(w).all()):
        nan, inf = int(torch.isnan(w).sum()), int(torch.isinf(w).sum())
        raise ValueError(f"the weight holds {nan} NaN and {inf} Inf values; fix or reload the weights first")
    return w


def _act_norm(stats: CalibrationStats | None, name: str, config: VNMConfig) -> torch.Tensor | None:
    if config.score == "abs":
        return None
    if stats is None:
        raise ValueError(
            f"score {config.score!r} needs calibration statistics: pass stats=calibrate(model, batches), or use score='abs'"
        )
    return stats.act_norm(name) if name in stats else None


Perms = tuple[torch.Tensor | None, torch.Tensor | None]


def _permutations(
    scores: dict[str, torch.Tensor],
    config: VNMConfig,
    fixed_out: dict[str, torch.Tensor] | None = None,
    heads=None,
) -> dict[str, Perms]:
    """(in_perm, out_perm) per layer of one unit; layers of a unit share in_perm. None = identity.
    ``fixed_out``: layers whose output permutation is given (joint permutations), not searched.
    ``heads``: the AttentionLink of a unit that is one o_proj: its input permutation stays per head."""
    if not config.permute or config.permute_rounds == 0 or config.pattern.is_nm or not scores:
        return {name: (None, None) for name in scores}
    from .calibration.permutation import find_shared_permutation

    fixed_out = fixed_out or {}
    fixed = {i: fixed_out[n] for i, n in enumerate(scores) if n in fixed_out}
    if not config.permute_outputs:  # every output permutation that no joint link gives stays the identity
        ids = {
            i: torch.arange(len(s), device=s.device) for i, (n, s) in enumerate(scores.items()) if n not in fixed_out
        }
        fixed.update(ids)
    constraint = {}
    if heads is not None:
        constraint = {"in_segments": heads.segments(), "in_ties": heads.ties() if heads.n_rep > 1 else None}
    in_perm, out_perms = find_shared_permutation(
        list(scores.values()), config.pattern, rounds=config.permute_rounds, fixed_out=fixed, **constraint
    )
    return {
        name: (_none_if_identity(in_perm), _none_if_identity(fixed_out.get(name, o)))
        for name, o in zip(scores, out_perms, strict=True)
    }


def _none_if_identity(perm: torch.Tensor) -> torch.Tensor | None:
    return None if torch.equal(perm, torch.arange(perm.numel(), device=perm.device)) else perm


def _permutation_units(
    names: list[str], config: VNMConfig, stats: CalibrationStats | None, groups: Sequence[Sequence[str]] | None
) -> list[list[str]]:
    """Split the eligible linears into units that share one input permutation, in model order.

    Groups come from ``groups`` if given, else from ``stats.input_groups`` (traced by
    calibrate()); without either, every layer gets its own input permutation.
    """
    if not config.permute:
        return [[n] for n in names]
    if groups is None:
        groups = getattr(stats, "input_groups", None)
        if groups is None:
            logger.info(
                "permute=True without calibration stats: input permutations are per layer; pass "
                "groups=find_input_groups(model, batch) to share them across layers that read the same tensor"
            )
            groups = []
    unit_of: dict[str, list[str]] = {}
    eligible = set(names)
    for group in groups:  # one input permutation per pattern among the layers reading one tensor
        members = [n for n in group if n in eligible and n not in unit_of]
        for n in members:
            unit_of.setdefault(n, [m for m in members if config.pattern_for(m) == config.pattern_for(n)])
    units, done = [], set()
    for n in names:
        if n in done:
            continue
        unit = unit_of.get(n, [n])
        done.update(unit)
        units.append(unit)
    return units


Chain = tuple[tuple[str, ...], tuple[str, ...]]


def _joint_chains(units: list[list[str]], config: VNMConfig, stats, chains) -> list[Chain]:
    """The chains (producers, consumers) whose permutation is chosen jointly: every layer eligible, the
    consumers exactly one permutation unit (one shared input permutation)."""
    if not (config.permute and config.joint_permutations) or config.pattern.is_nm or config.permute_rounds == 0:
        return []
    chains = chains if chains is not None else getattr(stats, "chains", None) or []
    unit_of = {n: tuple(u) for u in units for n in u}
    out = []
    for producers, consumers in chains:
        producers, consumers = tuple(producers), tuple(consumers)
        if not all(n in unit_of for n in producers + consumers) or unit_of[consumers[0]] != consumers:
            logger.debug("joint permutation skipped for %s -> %s (not all eligible, or grouped otherwise)",
                         producers, consumers)  # fmt: skip
            continue
        if set(producers) & {n for u in (unit_of[c] for c in consumers) for n in u}:
            continue
        if any(config.pattern_for(n).is_nm for n in producers + consumers):  # layer_patterns: N:4 never permutes
            continue
        out.append((producers, consumers))
    return out


def _joint_attention(units: list[list[str]], config: VNMConfig, stats, attention, joint: list[Chain]) -> list:
    """The attention pairs (calibration/attention.py's AttentionLink) whose v/o permutation is chosen jointly:
    both eligible, o_proj alone in its unit, neither in an MLP chain nor N:4."""
    if not (config.permute and config.joint_permutations) or config.pattern.is_nm or config.permute_rounds == 0:
        return []
    attention = attention if attention is not None else getattr(stats, "attention", None) or []
    unit_of = {n: tuple(u) for u in units for n in u}
    in_chains = {n for ps, cs in joint for n in ps + cs}
    out = []
    for link in attention:
        if link.v not in unit_of or unit_of.get(link.o) != (link.o,) or {link.v, link.o} & in_chains:
            logger.debug("joint attention permutation skipped for %s -> %s (not eligible, o_proj shares its input, "
                         "or in an MLP chain)", link.v, link.o)  # fmt: skip
            continue
        if config.pattern_for(link.v).is_nm or config.pattern_for(link.o).is_nm:
            continue
        out.append(link)
    return out


def _consumers_first(units: list[list[str]], joint: list[Chain]) -> list[list[str]]:
    """``units`` with each chain's consumer unit moved before the first unit holding one of its producers."""
    if not joint:
        return units
    units = list(units)
    for producers, consumers in joint:
        cons = next(u for u in units if list(u) == list(consumers))
        first = min(i for i, u in enumerate(units) if set(u) & set(producers))
        if units.index(cons) > first:
            units.remove(cons)
            units.insert(first, cons)
    return units


def _links(plans, joint: list[Chain], reports: dict[str, LayerReport], attention=()) -> dict[str, torch.Tensor]:
    """Per layer the LinearSparsity links [in_linked, out_linked] of the chains (and attention v/o pairs) whose
    every layer was planned with the shared permutation (a layer left without calibration data breaks its
    chain: no link)."""
    perms = {name: p for name, _, p in plans}
    flags: dict[str, list[int]] = {}
    for producers, consumers in joint:
        if not all(n in perms for n in producers + consumers):
            continue
        shared = perms[consumers[0]][0]
        if shared is None or not all(perms[p][1] is shared for p in producers):
            continue
        for p in producers:
            flags.setdefault(p, [0, 0])[1] = 1
            reports[p].out_perm_to = consumers
        for c in consumers:
            flags.setdefault(c, [0, 0])[0] = 1
            reports[c].in_perm_from = producers
    for link in attention:  # v_proj's output permutation is o_proj's input one, per kv head
        if link.v not in perms or link.o not in perms:
            continue
        v_out, o_in = perms[link.v][1], perms[link.o][0]
        if v_out is None or o_in is None or not torch.equal(link.o_perm(v_out), o_in):
            continue
        flags.setdefault(link.v, [0, 0])[1] = 1
        reports[link.v].out_perm_to = (link.o,)
        flags.setdefault(link.o, [0, 0])[0] = 1
        reports[link.o].in_perm_from = (link.v,)
    return {n: torch.tensor(f, dtype=torch.int64, device=perms[n][0 if f[0] else 1].device) for n, f in flags.items()}


@torch.no_grad()
def sparsify_(
    model: nn.Module,
    config: VNMConfig | None = None,
    stats: CalibrationStats | None = None,
    *,
    groups: Sequence[Sequence[str]] | None = None,
    progress: bool = True,
    data: Iterable | None = None,
    chains: Sequence[tuple[Sequence[str], Sequence[str]]] | None = None,
    attention: Sequence | None = None,
) -> SparsifyReport:
    """Prune every eligible nn.Linear (and transformers Conv1D) of ``model`` **in place** to ``config.pattern``.

    Each weight is multiplied by its V:N:M mask; the mask and permutations are
    recorded (``vnm_compile.get_sparsity(module)``) so torch.compile's "vnm"
    backend, export and recovery training find them. The model's function is
    that of the masked weights: permutations only choose the mask.

    With ``config.permute``, linears that read the same tensor share one input
    permutation: the groups are those traced by ``calibrate()`` (in ``stats``),
    or ``groups`` (e.g. ``find_input_groups(model, batch)``) when given; with
    neither (score="abs" without stats), input permutations are per layer.
    With ``config.joint_permutations`` too, linears joined by element-wise ops
    (``stats.chains``, or ``chains``: e.g. ``find_chains(model, batch)``) share one
    permutation between the producers' outputs and the consumers' inputs, and so do attention value and
    output projections (``stats.attention``, or ``attention``: ``find_attention_links(model, batch)``), per head.

    All masks are chosen before any weight changes: an error (naming the layer) leaves the model
    as it was. A transformers ``Conv1D`` that is pruned is replaced by an equivalent nn.Linear
    (``vnm_compile.linears.Conv1DLinear``, its state_dict still in Conv1D's layout): an optimizer
    made before sparsify_ holds its old Parameter. A tied weight (an LM head tied to the embedding)
    is never pruned. Editing a weight afterwards (training, load_state_dict) must keep its zeros:
    ``torch.compile(backend="vnm")`` refuses weights with nonzeros outside their recorded mask.
    With ``config.score == "obs"`` or ``config.reconstruct``, ``data`` (calibration
    batches, as for ``calibrate``) is required: calibration then runs layer by
    layer (calibration/sequential.py), each layer on what the already-pruned
    layers before it produce (``config.sequential``), from the second moments
    H = XᵀX of its input; ``stats`` and ``groups`` are not used (the layers that
    share an input are traced block by block). The report then gives each
    layer's output error on the calibration data before and after reconstruction.

    Returns:
        SparsifyReport listing every linear with its pattern or the reason it was left dense.
    """
    from tqdm.auto import tqdm

    config = config or VNMConfig()
    eligible, skipped = eligible_linears(model, config)
    if not eligible and not skipped:
        raise ValueError("the model has no nn.Linear (or transformers Conv1D) layers to sparsify")
    report = SparsifyReport(config)
    reports = {name: LayerReport(name, _out_in(m)) for name, m in linear_like_modules(model)}
    for name, why in skipped.items():
        reports[name].skipped = why
    if config.needs_second_moments:
        if data is None:
            raise ValueError(
                f"VNMConfig(score={config.score!r}, reconstruct={config.reconstruct}) needs the layer inputs' "
                "second moments: pass data=<calibration batches> to sparsify_"
            )
        from .calibration.second_order import sparsify_second_order

        _convert_conv1ds(model, eligible, reports)  # the layer-by-layer driver takes nn.Linear layers
        sparsify_second_order(model, config, data, eligible, reports, progress)
        report.layers = list(reports.values())
        logger.info("%s", report.summary())
        return report
    _check_stats(stats, eligible, config)
    units = _permutation_units(list(eligible), config, stats, groups)
    joint = _joint_chains(units, config, stats, chains)
    heads = {link.o: link for link in _joint_attention(units, config, stats, attention, joint)}
    units = _consumers_first(units, joint + [((link.v,), (link.o,)) for link in heads.values()])
    # 1. Choose every mask; the model is not touched, so an error leaves it as it was.
    plans: list[tuple[str, torch.Tensor, Perms]] = []
    fixed_out: dict[str, torch.Tensor] = {}  # producer -> its output permutation (its consumers' input one)
    for unit in tqdm(units, desc=f"sparsify {config.pattern}", disable=not progress, leave=False):
        unit_config = config.for_pattern(config.pattern_for(unit[0]))  # a unit's layers share one pattern
        scores = {}
        for name in unit:
            with _layer_errors(name, reports[name].shape):
                norm = _act_norm(stats, name, config)
                if config.score != "abs" and norm is None:
                    reports[name].skipped = "no calibration data (layer never called during calibrate)"
                    continue
                scores[name] = importance(_weight_2d(eligible[name]), config.score, norm, config.alpha)
        link = heads.get(unit[0]) if list(scores) == [unit[0]] else None
        with _layer_errors(", ".join(scores), reports[next(iter(scores))].shape if scores else (0, 0)):
            perms = _permutations(scores, unit_config, fixed_out, link)
        v_perm = link.v_perm(perms[link.o][0]) if link is not None and perms[link.o][0] is not None else None
        if v_perm is not None:  # searched first: v_proj writes in its order
            fixed_out[link.v] = v_perm
        for producers, consumers in joint:
            # searched first: its input permutation becomes the producers' output permutation
            if list(scores) == list(consumers) and perms[consumers[0]][0] is not None:
                fixed_out.update(dict.fromkeys(producers, perms[consumers[0]][0]))
        for name, s in scores.items():
            with _layer_errors(name, reports[name].shape):
                mask = _plan_mask(s, perms[name], unit_config, reports[name])
            plans.append((name, mask, perms[name]))
            if len(scores) > 1 and perms[name][0] is not None:
                reports[name].shares_input_perm = tuple(n for n in scores if n != name)
    links = _links(plans, joint, reports, list(heads.values()))
    # 2. Apply them.
    for name, mask, perms in plans:
        module = eligible[name]
        if is_conv1d(module):
            module = _convert_conv1d(model, module)
            reports[name].note = "Conv1D converted to nn.Linear"
        if config.overwrite:
            clear_sparsity(module)
        _apply_mask(module, mask, perms, config.score, reports[name], links.get(name))
    report.layers = list(reports.values())
    logger.info("%s", report.summary())
    return report


def _convert_conv1ds(model: nn.Module, eligible: dict[str, nn.Module], reports: dict[str, LayerReport]) -> None:
    """Every transformers Conv1D among ``eligible`` replaced in ``model`` (and in ``eligible``) with an equivalent
    Conv1DLinear, noted in its report (the layer-by-layer paths take nn.Linear layers)."""
    for name, module in list(eligible.items()):
        if is_conv1d(module):
            eligible[name] = _convert_conv1d(model, module)
            reports[name].note = "Conv1D converted to nn.Linear"


def _convert_conv1d(model: nn.Module, conv: nn.Module) -> nn.Linear:
    """Replace a transformers Conv1D (every reference to it in ``model``) with an equivalent Conv1DLinear."""
    linear = to_linear(conv)
    for parent in model.modules():
        for child_name, child in list(parent._modules.items()):
            if child is conv:
                parent._modules[child_name] = linear
    return linear


def _plan_mask(scores: torch.Tensor, perms: Perms, config: VNMConfig, r: LayerReport) -> torch.Tensor:
    """The mask in original coordinates (_choose_mask); fills the report's pattern, density, importance kept."""
    in_perm, out_perm = perms
    mask = _choose_mask(scores, perms, config.pattern)
    total = float(scores.sum())
    kept = float((scores * mask).sum()) / total if total > 0 else 1.0
    r.pattern, r.density, r.importance_kept = config.pattern, float(mask.float().mean()), kept
    r.permuted = in_perm is not None or out_perm is not None
    return mask


def _apply_mask(module: nn.Module, mask: torch.Tensor, perms: Perms, score: str, r: LayerReport, links=None) -> None:
    """Zero the pruned weights, record the state (pattern from the report, filled by _plan_mask), count bytes."""
    module.weight.mul_(mask.to(module.weight.dtype))
    set_sparsity(module, LinearSparsity(r.pattern, mask, perms[0], perms[1], score, links))
    _account(r, module.weight, r.pattern, perms[0], perms[1])


def _account(r: LayerReport, weight: torch.Tensor, pattern: VNMPattern, in_perm, out_perm) -> None:
    """The bytes the layer holds in each representation (LayerReport.dense_bytes ...)."""
    from .format import compressed_nbytes

    rows, cols = weight.shape
    perms = sum(p.numel() * p.element_size() for p in (in_perm, out_perm) if p is not None)
    r.dense_bytes = weight.numel() * weight.element_size()
    r.mask_bytes = rows * cols + perms  # bool mask, one byte per weight
    r.compressed_bytes = compressed_nbytes(rows, cols, pattern, weight.dtype) + perms


def _choose_mask(scores: torch.Tensor, perms: Perms, pattern: VNMPattern) -> torch.Tensor:
    """S_{V:N:M} of ``scores`` in permuted coordinates, returned in original ones."""
    in_perm, out_perm = perms
    permuted = scores
    if out_perm is not None:
        permuted = permuted[out_perm]
    if in_perm is not None:
        permuted = permuted[:, in_perm]
    return _unpermute(vnm_mask(permuted, pattern), in_perm, out_perm)


def _unpermute(mask_p: torch.Tensor, in_perm, out_perm) -> torch.Tensor:
    """Mask in original coordinates from one in permuted coordinates (mask[out_perm][:, in_perm] == mask_p)."""
    if in_perm is None and out_perm is None:
        return mask_p
    rows = out_perm if out_perm is not None else torch.arange(mask_p.shape[0], device=mask_p.device)
    cols = in_perm if in_perm is not None else torch.arange(mask_p.shape[1], device=mask_p.device)
    mask = torch.empty_like(mask_p)
    mask[rows.unsqueeze(1), cols.unsqueeze(0)] = mask_p
    return mask
