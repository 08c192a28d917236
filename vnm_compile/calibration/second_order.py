"""sparsify_ with second moments: score "obs" and/or reconstruct=True, calibrated layer by layer.

Per group of linears reading one input (sequential.py hands them over with
the HessianObserver of that input):

0. with reconstruct and ``dense_target`` (sequential mode), the weight to
   prune is W' = W Cᵀ H⁻¹, the one that maps the pruned model's inputs to the
   dense model's outputs (dense_target.py); otherwise W;
1. scores of that weight: the OBS saliency w² / [H⁻¹]ⱼⱼ for "obs"; ABS,
   Wanda or RIA otherwise, with the activation norms ||X_j|| = sqrt(H_jj) of
   the same (sequential) inputs;
2. permutations: the existing search on those scores, one input permutation
   shared by the group;
3. mask and weights: reconstruct=False masks the weight as sparsify_ always
   did; reconstruct=True re-solves the kept weights (reconstruct.py), the
   "obs" mask then chosen group by group (``mask_blocksize``) from the
   updated weights. With dense targets the report's errors are against the
   dense model's outputs, and a result above the plain masked weight's is
   replaced by it.

Fewer calibration tokens than the input width leave H rank-deficient: a
warning says so, and the dampening (``VNMConfig.damp``) keeps the solve
well-posed by pulling unseen directions towards the original weights.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from ..state import LinearSparsity, set_sparsity
from .dense_target import dense_target
from .hessian import HessianObserver
from .importance import importance
from .reconstruct import HessianFactors, obs_saliency, output_error, prune_second_order
from .sequential import run_layerwise

__all__ = ["sparsify_second_order"]

logger = logging.getLogger(__name__)


def _scores(w: torch.Tensor, factors: HessianFactors, config) -> torch.Tensor:
    if config.score == "obs":
        return obs_saliency(w, factors.inverse_diagonal())
    norm = factors.hessian.diagonal().clamp_min(0).sqrt()
    return importance(w, config.score, None if config.score == "abs" else norm, config.alpha)


def sparsify_second_order(
    model: nn.Module,
    config,
    data: Iterable,
    eligible: dict[str, nn.Linear],
    reports: dict,
    progress: bool,
    *,
    before_block=None,
    after_block=None,
) -> None:
    """Prune ``eligible`` in place block by block and fill their LayerReports (sparsify_'s second-order path;
    ``before_block`` / ``after_block``: run_layerwise's callbacks, e.g. streaming blocks through a GPU)."""
    from ..sparsify import _account, _choose_mask, _permutations

    def prune_group(names: tuple[str, ...], obs: HessianObserver) -> None:
        if obs.hessian is None or obs.tokens == 0:
            for name in names:
                reports[name].skipped = "no calibration data (layer never called on the calibration batches)"
            return
        # H + λI factored once for the whole group (every linear of it reads this input).
        factors = HessianFactors(obs.hessian.to(eligible[names[0]].weight.device), config.damp, names[0])
        h = factors.hessian
        if obs.tokens < obs.in_features:
            logger.warning(
                "%s: %d calibration tokens for a %d-wide input, so H is rank-deficient; the dampening "
                "(damp=%g) pulls the directions the data does not see towards the original weights; "
                "more calibration data gives a better reconstruction",
                names[0], obs.tokens, obs.in_features, config.damp,
            )  # fmt: skip
        # The weights to prune: with dense targets, those that best map these inputs to the dense outputs.
        fitted = {}
        # (Identical inputs, e.g. the first stage of the first block, give W' = W: nothing to fit.)
        if config.reconstruct and config.dense_target and obs.cross is not None and not torch.equal(obs.cross, h):
            target = dense_target(obs)
            fitted = {name: (target, target.fit(eligible[name].weight, config.damp, name)) for name in names}
        targets = {n: fitted[n][1] if n in fitted else eligible[n].weight.detach() for n in names}
        scores = {name: _scores(targets[name], factors, config) for name in names}
        configs = {name: config.for_pattern(config.pattern_for(name)) for name in names}
        perms = {}
        for pattern in dict.fromkeys(c.pattern for c in configs.values()):  # one input permutation per pattern
            same = [name for name in names if configs[name].pattern == pattern]
            perms.update(_permutations({name: scores[name] for name in same}, configs[same[0]]))
        for name in names:
            module, r, (in_perm, out_perm) = eligible[name], reports[name], perms[name]
            cfg = configs[name]  # this layer's pattern
            weight = module.weight
            if cfg.reconstruct:
                fixed = None if cfg.score == "obs" else _choose_mask(scores[name], perms[name], cfg.pattern)
                rec = prune_second_order(
                    targets[name], h, cfg.pattern, mask=fixed, in_perm=in_perm, out_perm=out_perm,
                    method=cfg.reconstruct_method, damp=cfg.damp, mask_blocksize=cfg.mask_blocksize, name=name,
                    factors=factors,
                )  # fmt: skip
                mask, r.error_masked, r.error = rec.mask, rec.error_masked, rec.error
                new = rec.weight
                if name in fitted:  # errors against the dense outputs; never above the plain masked weight's
                    target = fitted[name][0]
                    r.error_masked, r.error = target.errors(weight, [weight * mask, new])
                    if not r.error <= r.error_masked:
                        logger.warning("%s: fitting the dense outputs did not lower the error; kept the masked weight",
                                       name)  # fmt: skip
                        new, r.error = weight * mask, r.error_masked
                weight.copy_(new)
            else:
                mask = _choose_mask(scores[name], perms[name], cfg.pattern)
                dense = weight.detach().float().clone()
                weight.mul_(mask.to(weight.dtype))
                r.error_masked = r.error = output_error(dense, weight, h)
            set_sparsity(module, LinearSparsity(cfg.pattern, mask, in_perm, out_perm, cfg.score))
            total = float(scores[name].sum())
            r.pattern, r.density = cfg.pattern, float(mask.float().mean())
            r.importance_kept = float((scores[name] * mask).sum()) / total if total > 0 else 1.0
            r.permuted = in_perm is not None or out_perm is not None
            _account(r, weight, cfg.pattern, in_perm, out_perm)
            sharing = tuple(n for n in names if n != name and configs[n].pattern == cfg.pattern)
            if sharing and in_perm is not None:
                r.shares_input_perm = sharing

    run_layerwise(
        model, data, eligible, prune_group, sequential=config.sequential, progress=progress,
        before_block=before_block, after_block=after_block, dense_target=config.reconstruct and config.dense_target,
    )  # fmt: skip
    never = [n for n in eligible if reports[n].pattern is None and reports[n].skipped is None]
    for name in never:
        reports[name].skipped = "no calibration data (layer never called on the calibration batches)"
