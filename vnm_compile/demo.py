"""`vnm demo`: the whole flow on a real model, offline.

all-MiniLM-L6-v2 is calibrated on standard-library docstrings, pruned to
V:N:M (and 2:4 for comparison) with several importance scores, and each
pruned model's sentence embeddings are compared to the dense model's on
held-out docstrings (disjoint modules).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, replace

import torch

from .calibration import calibrate
from .data import calibration_and_eval_texts
from .models import embed, load_minilm, text_batches
from .sparsify import VNMConfig, sparsify_

__all__ = ["DemoResult", "run_demo", "format_results"]

logger = logging.getLogger(__name__)


@dataclass
class DemoResult:
    pattern: str
    score: str
    permute: bool
    density: float
    importance_kept: float
    cosine: float
    seconds: float
    note: str = ""
    reconstruct: bool = False  # second-order: kept weights re-solved, layer-by-layer calibration
    summary: str = ""  # the SparsifyReport summary of this row
    compiled_max_diff: float | None = None  # |torch.compile(backend="vnm") - eager|, for the checked row
    lowered: int | None = None  # linears lowered to vnm.linear in that compiled model


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum(-1).mean())


def run_demo(
    patterns: tuple[str, ...] = ("64:2:5", "2:4"),
    scores: tuple[str, ...] = ("abs", "ria"),
    permute: tuple[bool, ...] = (False,),
    permute_scores: tuple[str, ...] | None = None,
    n_calibration: int | None = None,
    n_eval: int = 256,
    progress: bool = True,
    recover_steps: int = 0,
    compile_check: bool = False,
    reconstruct_scores: tuple[str, ...] = (),
) -> list[DemoResult]:
    """Prune MiniLM at each (pattern, score, permute) and measure embedding cosine to the dense model.

    ``n_calibration``: calibration paragraphs (None: all, 980, about 37.6k tokens; the first 256 come from
    four modules, mostly ``os``, and gave second-order pruning a cosine 0.04 lower on a validation split
    of the calibration modules, tools/one_shot_sweep.py).
    ``permute_scores`` limits the permuted runs to these scores (None: every score).
    ``recover_steps`` > 0 adds a row: the best V:N:M row after that many recovery-training steps.
    ``reconstruct_scores`` adds, per pattern, rows with those scores and ``reconstruct=True``
    (second-order pruning, calibrated layer by layer on the same calibration batches).
    ``compile_check`` compiles the last V:N:M model with ``torch.compile(backend="vnm")`` and records
    how many linears were lowered and the largest difference to eager on held-out text.
    """
    model, tokenizer = load_minilm()
    calib_texts, eval_texts = calibration_and_eval_texts(n_calibration, n_eval)
    calib = text_batches(tokenizer, calib_texts)
    held_out = text_batches(tokenizer, eval_texts)
    logger.info("calibration: %d paragraphs, evaluation: %d held-out paragraphs", len(calib_texts), len(eval_texts))
    dense = embed(model, held_out)
    stats = calibrate(model, calib, progress=progress)
    results = []
    best_vnm = None  # (row, pruned model) with the highest cosine among V:N:M rows, for the recovery row
    rows = [(score, False) for score in scores] + [(score, True) for score in reconstruct_scores]
    for pattern in patterns:
        for score, rec in rows:
            for perm in permute:
                if perm and VNMConfig(pattern).pattern.is_nm:
                    continue  # N:4 has no column choice to permute for
                if perm and permute_scores is not None and score not in permute_scores:
                    continue
                start = time.perf_counter()
                pruned = copy.deepcopy(model)
                config = VNMConfig(pattern, score=score, permute=perm, reconstruct=rec)
                report = sparsify_(pruned, config, stats, data=calib if rec else None, progress=progress)
                seconds = time.perf_counter() - start
                cos = _cosine(embed(pruned, held_out), dense)
                density = sum(r.density * r.shape[0] * r.shape[1] for r in report.sparsified) / max(
                    1, sum(r.shape[0] * r.shape[1] for r in report.sparsified)
                )
                kept = report.mean_importance_kept()
                results.append(
                    DemoResult(
                        pattern, score, perm, density, kept, cos, seconds, reconstruct=rec, summary=report.summary()
                    )
                )
                logger.info("%s", report.summary())
                is_best = best_vnm is None or cos > best_vnm[0].cosine
                if not VNMConfig(pattern).pattern.is_nm and is_best:
                    best_vnm = (results[-1], pruned)
    if best_vnm is not None and recover_steps > 0:
        results.append(
            _recovery_row(model, tokenizer, calib_texts, held_out, dense, *best_vnm, recover_steps, progress)
        )
    if best_vnm is not None and compile_check:
        _compile_check(results[-1], best_vnm[1], held_out[:2])
    return results


def _compile_check(row: DemoResult, model: torch.nn.Module, batches: list[dict]) -> None:
    """Compile the pruned (and recovered) model with the vnm backend and compare it with eager."""
    from .backend import clear_reports, reports

    clear_reports()
    # Off CUDA the backend keeps layers dense (no fast kernels there): the demo forces the lowering to show it.
    on_cuda = next(model.parameters()).is_cuda
    compiled = torch.compile(model, backend="vnm", options={"inductor": False, "force_sparse": not on_cuda})
    with torch.no_grad():
        diffs = [float((compiled(**b).last_hidden_state - model(**b).last_hidden_state).abs().max()) for b in batches]
    row.compiled_max_diff = max(diffs)
    # Distinct layers over every graph Dynamo captured (a new input length may add a graph).
    row.lowered = len({layer.name for r in reports() for layer in r.lowered})


def _recovery_row(model, tokenizer, texts, held_out, dense, best, student, steps: int, progress: bool) -> DemoResult:
    """The best V:N:M row's pruned model after ``steps`` of fixed-mask distillation (every layer's hidden states)."""
    from .recovery import DistillLoss, RecoveryConfig, length_bucketed_batches, recover_

    start = time.perf_counter()
    student.embeddings.requires_grad_(False)  # dense and equal to the teacher's: nothing to recover there
    # A second-order start is already close to the dense model, and the full fine-tuning default (peak 1e-3)
    # first pushes it away. MiniLM 64:2:5 OBS (one-shot 0.8245), cosine after 20 / 100 steps: 1e-3 0.768 /
    # 0.826, 3e-4 0.817 / 0.833, 1e-4 0.825 / 0.830 (benchmarks/results/cpu/demo_recovery_lr.md): 1e-4 never
    # lost accuracy. A magnitude start (RIA) gains most at the default (benchmarks/results/cpu/recovery_minilm.md).
    lr = 1e-4 if best.reconstruct else None
    config = RecoveryConfig(method="fixed", steps=steps, lr=lr, train_mode=False)
    loss = DistillLoss(model, hidden="all", cache=True)  # batches repeat: the teacher runs once per batch
    recover_(student, length_bucketed_batches(tokenizer, texts, 16), config, loss=loss, progress=progress)
    cos = _cosine(embed(student, held_out), dense)
    note = f"+ {steps} recovery steps (fixed masks, distillation{f', peak LR {lr:g}' if lr else ''})"
    return replace(best, cosine=cos, seconds=time.perf_counter() - start, note=note)


def format_results(results: list[DemoResult]) -> str:
    head = f"{'pattern':>8} {'score':>10} {'permute':>8} {'density':>8} {'imp. kept':>10} {'cosine':>8} {'time s':>7}"
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r.pattern:>8} {r.score + ('+recon' if r.reconstruct else ''):>10} {str(r.permute):>8} {r.density:>8.3f} {r.importance_kept:>10.3f} "
            f"{r.cosine:>8.4f} {r.seconds:>7.1f}" + (f"  {r.note}" if r.note else "")
        )
    for r in results:
        if r.compiled_max_diff is not None:
            lines.append(
                f"\ntorch.compile(backend='vnm') of the {r.pattern} {r.score} model{' (recovered)' if r.note else ''}: "
                f"{r.lowered} linears lowered to vnm.linear, max |compiled - eager| = {r.compiled_max_diff:.2e}"
            )
    return "\n".join(lines)
