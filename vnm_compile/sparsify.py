"""VNMConfig and sparsify_: one call that prunes every eligible linear in place."""

from __future__ import annotations

import fnmatch
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .calibration.importance import SCORES, importance
from .calibration.observer import CalibrationStats
from .calibration.reconstruct import METHODS as RECONSTRUCT_METHODS
from .masks import vnm_mask
from .pattern import VNMPattern, as_pattern
from .state import LinearSparsity, get_sparsity, set_sparsity, unique_linears

__all__ = ["VNMConfig", "LayerReport", "SparsifyReport", "sparsify_", "eligible_linears", "matches_ignore"]

logger = logging.getLogger(__name__)

DEFAULT_IGNORE = ("lm_head", "classifier")
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
        ignore: module names (exact, dotted suffix or glob) left dense.
        min_numel: linears with fewer weights than this are left dense.
        reconstruct: re-solve the kept weights of each row from the layer input's second
            moments H = XᵀX (with any score); needs ``data`` in sparsify_.
        sequential: with second moments, calibrate each layer on what the already-pruned
            layers before it produce (False: on the dense model's activations).
        damp: dampening of H, a fraction of its mean diagonal.
        reconstruct_method: "auto", "sparsegpt" or "exact" (calibration/reconstruct.py).
    """

    pattern: VNMPattern | str = "64:2:5"
    score: str = "ria"
    alpha: float = 0.5
    permute: bool = True
    permute_rounds: int = 2
    ignore: tuple[str, ...] = field(default=DEFAULT_IGNORE)
    min_numel: int = 4096
    reconstruct: bool = False
    sequential: bool = True
    damp: float = 0.01
    reconstruct_method: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", as_pattern(self.pattern))
        if isinstance(self.ignore, str):
            raise ValueError("VNMConfig.ignore must be a list of names, not a single string")
        object.__setattr__(self, "ignore", tuple(self.ignore))
        if self.score not in CONFIG_SCORES:
            raise ValueError(f"VNMConfig.score must be one of {CONFIG_SCORES}, got {self.score!r}")
        if not self.alpha >= 0:
            raise ValueError(f"VNMConfig.alpha must be >= 0, got {self.alpha}")
        if self.permute_rounds < 0:
            raise ValueError(f"VNMConfig.permute_rounds must be >= 0, got {self.permute_rounds}")
        if self.min_numel < 0:
            raise ValueError(f"VNMConfig.min_numel must be >= 0, got {self.min_numel}")
        if not self.damp > 0:
            raise ValueError(f"VNMConfig.damp must be > 0, got {self.damp}")
        if self.reconstruct_method not in RECONSTRUCT_METHODS:
            raise ValueError(
                f"VNMConfig.reconstruct_method must be one of {RECONSTRUCT_METHODS}, got {self.reconstruct_method!r}"
            )

    @property
    def needs_second_moments(self) -> bool:
        """Score "obs" or reconstruct=True: sparsify_ calibrates layer by layer on ``data``."""
        return self.score == "obs" or self.reconstruct

    def to_json(self) -> str:
        d = asdict(self)
        d["pattern"] = str(self.pattern)
        d["ignore"] = list(self.ignore)
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> VNMConfig:
        return cls(**json.loads(text))


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
        return (
            f"{len(self.sparsified)} linears sparsified at {self.config.pattern} "
            f"({n_params - kept:,.0f} of {n_params:,} weights zeroed), {len(self.skipped)} left dense; "
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
                note = "permuted" if r.permuted else ""
                if r.shares_input_perm:
                    note += f" (input perm shared by {len(r.shares_input_perm) + 1})"
                if r.error is not None:
                    note += f" output error {r.error_masked:.4f} -> {r.error:.4f}"
                lines.append(f"{r.name:<48} {shape:>12} {str(r.pattern):>9} {r.density:>8.3f} {kept:>6}  {note}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table() + "\n" + self.summary()


def matches_ignore(name: str, ignore: tuple[str, ...]) -> bool:
    """A module name matches an ignore entry exactly, as a dotted suffix, or as a glob."""
    return any(name == pat or name.endswith("." + pat) or fnmatch.fnmatchcase(name, pat) for pat in ignore)


def eligible_linears(model: nn.Module, config: VNMConfig) -> tuple[dict[str, nn.Linear], dict[str, str]]:
    """Split the model's nn.Linear layers into eligible ones and skipped ones (with reasons)."""
    eligible: dict[str, nn.Linear] = {}
    skipped: dict[str, str] = {}
    for name, module in unique_linears(model):  # a shared module is sparsified once, under its first name
        if matches_ignore(name, config.ignore):
            skipped[name] = "ignored by name"
        elif not module.weight.is_floating_point():
            skipped[name] = f"non-float weight ({module.weight.dtype})"
        elif module.weight.numel() < config.min_numel:
            skipped[name] = f"too small ({module.weight.numel()} < min_numel={config.min_numel})"
        elif get_sparsity(module) is not None:
            skipped[name] = "already sparsified"
        else:
            eligible[name] = module
    return eligible, skipped


def _act_norm(stats: CalibrationStats | None, name: str, config: VNMConfig) -> torch.Tensor | None:
    if config.score == "abs":
        return None
    if stats is None:
        raise ValueError(
            f"score {config.score!r} needs calibration statistics: pass stats=calibrate(model, batches), or use score='abs'"
        )
    return stats.act_norm(name) if name in stats else None


Perms = tuple[torch.Tensor | None, torch.Tensor | None]


def _permutations(scores: dict[str, torch.Tensor], config: VNMConfig) -> dict[str, Perms]:
    """(in_perm, out_perm) per layer of one unit; layers of a unit share in_perm. None = identity."""
    if not config.permute or config.permute_rounds == 0 or config.pattern.is_nm or not scores:
        return {name: (None, None) for name in scores}
    from .calibration.permutation import find_permutation, find_shared_permutation

    if len(scores) == 1:
        ((name, s),) = scores.items()
        in_perm, out_perm = find_permutation(s, config.pattern, rounds=config.permute_rounds)
        return {name: (_none_if_identity(in_perm), _none_if_identity(out_perm))}
    in_perm, out_perms = find_shared_permutation(list(scores.values()), config.pattern, rounds=config.permute_rounds)
    return {name: (_none_if_identity(in_perm), _none_if_identity(o)) for name, o in zip(scores, out_perms, strict=True)}


def _none_if_identity(perm: torch.Tensor) -> torch.Tensor | None:
    return None if torch.equal(perm, torch.arange(perm.numel(), device=perm.device)) else perm


def _permutation_units(
    names: list[str], config: VNMConfig, stats: CalibrationStats | None, groups: Sequence[Sequence[str]] | None
) -> list[list[str]]:
    """Split the eligible linears into units that share one input permutation, in model order.

    Groups come from ``groups`` if given, else from ``stats.input_groups`` (traced by
    calibrate()); without either, every layer gets its own input permutation.
    """
    if not config.permute or config.pattern.is_nm:
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
    for group in groups:
        members = [n for n in group if n in eligible and n not in unit_of]
        for n in members:
            unit_of[n] = members
    units, done = [], set()
    for n in names:
        if n in done:
            continue
        unit = unit_of.get(n, [n])
        done.update(unit)
        units.append(unit)
    return units


@torch.no_grad()
def sparsify_(
    model: nn.Module,
    config: VNMConfig | None = None,
    stats: CalibrationStats | None = None,
    *,
    groups: Sequence[Sequence[str]] | None = None,
    progress: bool = True,
    data: Iterable | None = None,
) -> SparsifyReport:
    """Prune every eligible nn.Linear of ``model`` **in place** to ``config.pattern``.

    Each weight is multiplied by its V:N:M mask; the mask and permutations are
    recorded (``vnm_compile.get_sparsity(module)``) so torch.compile's "vnm"
    backend, export and recovery training find them. The model's function is
    that of the masked weights: permutations only choose the mask.

    With ``config.permute``, linears that read the same tensor share one input
    permutation: the groups are those traced by ``calibrate()`` (in ``stats``),
    or ``groups`` (e.g. ``find_input_groups(model, batch)``) when given; with
    neither (score="abs" without stats), input permutations are per layer.

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
        raise ValueError("the model has no nn.Linear layers to sparsify")
    report = SparsifyReport(config)
    reports = {name: LayerReport(name, (m.out_features, m.in_features)) for name, m in unique_linears(model)}
    for name, why in skipped.items():
        reports[name].skipped = why
    if config.needs_second_moments:
        if data is None:
            raise ValueError(
                f"VNMConfig(score={config.score!r}, reconstruct={config.reconstruct}) needs the layer inputs' "
                "second moments: pass data=<calibration batches> to sparsify_"
            )
        from .calibration.second_order import sparsify_second_order

        sparsify_second_order(model, config, data, eligible, reports, progress)
        report.layers = list(reports.values())
        logger.info("%s", report.summary())
        return report
    units = _permutation_units(list(eligible), config, stats, groups)
    for unit in tqdm(units, desc=f"sparsify {config.pattern}", disable=not progress, leave=False):
        scores = {}
        for name in unit:
            norm = _act_norm(stats, name, config)
            if config.score != "abs" and norm is None:
                reports[name].skipped = "no calibration data (layer never called during calibrate)"
                continue
            scores[name] = importance(eligible[name].weight, config.score, norm, config.alpha)
        perms = _permutations(scores, config)
        for name, s in scores.items():
            _prune_layer(eligible[name], s, perms[name], config, reports[name])
            if len(scores) > 1 and perms[name][0] is not None:
                reports[name].shares_input_perm = tuple(n for n in scores if n != name)
    report.layers = list(reports.values())
    logger.info("%s", report.summary())
    return report


def _prune_layer(module: nn.Linear, scores: torch.Tensor, perms: Perms, config: VNMConfig, r: LayerReport) -> None:
    """Mask ``module.weight`` in place (mask chosen in permuted coordinates, stored in original ones)."""
    in_perm, out_perm = perms
    mask = _choose_mask(scores, perms, config.pattern)
    total = float(scores.sum())
    kept = float((scores * mask).sum()) / total if total > 0 else 1.0
    module.weight.mul_(mask.to(module.weight.dtype))
    set_sparsity(module, LinearSparsity(config.pattern, mask, in_perm, out_perm, config.score))
    r.pattern, r.density, r.importance_kept = config.pattern, float(mask.float().mean()), kept
    r.permuted = in_perm is not None or out_perm is not None
    _account(r, module.weight, config.pattern, in_perm, out_perm)


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
