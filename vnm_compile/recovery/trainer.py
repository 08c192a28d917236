"""recover_: one call that trains a V:N:M-sparsified model back towards its dense quality.

Methods (paper sections 3 and 4.3, docs/design.md "Recovery training"):

* ``"fixed"`` (TS1): full fine-tuning, masks fixed (``MaskGuard``).
* ``"srste"`` (TS2): full fine-tuning with SR-STE dynamic masks, recomputed every ``srste_interval`` steps.
* ``"three_stage"`` (TS3): LoRA on every linear; stage 1 dense, stage 2 masks recomputed
  from RIA on ``W + BA`` every ``stage2_interval`` steps, stage 3 fixed masks.

On a model sharded with FSDP2 (``fully_shard``: DTensor parameters) ``"fixed"`` runs shard-wise
and checkpoints through ``torch.distributed.checkpoint`` (``distributed.py``); the other methods
raise NotImplementedError there, saying why.

Every run ends with a merge that leaves plain ``nn.Linear`` weights obeying
their recorded (possibly updated) V:N:M masks, so ``torch.compile(model,
backend="vnm")`` lowers them. Checkpoints hold everything a run needs to
continue bit-for-bit: model (with recovery parametrizations), masks,
optimizer, LR schedule, RNG state and history.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from ..calibration.importance import SCORES
from ..calibration.observer import CalibrationStats, calibrate
from .distributed import check_sharded_method, latest_checkpoint, load_sharded, save_sharded
from .lora import LoRAHandle, lora_, lora_weight
from .losses import DistillLoss
from .masking import (
    MaskGuard,
    dense_weight,
    is_sharded,
    merge_,
    set_mask_,
    sparse_linears,
    sparsity_of,
    update_masks_,
)
from .schedule import ThreeStageSchedule, srste_update_due
from .srste import srste_

__all__ = ["METHODS", "RecoveryConfig", "RecoveryResult", "recover_", "CHECKPOINT_NAME"]

logger = logging.getLogger(__name__)

METHODS = ("fixed", "srste", "three_stage")
CHECKPOINT_NAME = "recovery.pt"
# Measured on MiniLM 64:2:5 distillation (benchmarks/recovery_minilm.py): 1e-3 beat 3e-4 for full fine-tuning.
_DEFAULT_LR = {"fixed": 1e-3, "srste": 1e-3, "three_stage": 2e-3}

LossFn = Callable[[nn.Module, object], Tensor]
EvalFn = Callable[[nn.Module], "float | dict[str, float]"]


@dataclass(frozen=True)
class RecoveryConfig:
    """How to run recovery training.

    Args:
        method: "fixed" (TS1), "srste" (TS2) or "three_stage" (TS3).
        steps: optimizer steps (one batch each).
        lr: peak learning rate; None picks 1e-3 for full fine-tuning, 2e-3 for LoRA.
        weight_decay: AdamW weight decay (masked weights stay zero regardless).
        warmup: fraction of the steps with linear warmup; cosine decay to ``min_lr_ratio * lr`` after.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        grad_clip: max gradient norm (None: no clipping).
        score: score for mask recomputation; None: each layer's score from sparsify_ (SR-STE), RIA (three-stage).
        alpha: RIA exponent.
        srste_lambda: SR-STE decay on pruned weights (SR-STE paper: 2e-4).
        srste_interval: SR-STE recomputes masks after every this many steps (never after the last one,
            so the merged masks are always ones the model trained with).
        lora_rank, lora_alpha: LoRA rank and alpha (scale alpha / rank).
        lora_targets: "all" linears or only the "sparse" ones.
        stage_fractions: three-stage shares of the steps (dense LoRA, mask search, fixed masks).
        stage2_interval: stage-2 mask recomputation interval.
        dense_start: with a teacher, SR-STE and three-stage LoRA start from the teacher's dense weights
            (SR-STE keeps training them under the mask; three-stage stage 1 trains densely). SR-STE's
            masked forward is unchanged by this: pruned values return only through mask updates.
        train_mode: call ``model.train()`` while training (False keeps eval mode: no dropout).
        shuffle: visit a sequence of batches in a fresh seeded order every epoch.
        eval_every: call the eval hook every this many steps (0: only at the end).
        checkpoint_every: save a checkpoint every this many steps (0: never; needs checkpoint_dir).
        seed: seeds the global torch RNG (LoRA init, dropout) and the batch order.
        merge: merge at the end (plain weights, V:N:M state recorded).
    """

    method: str = "fixed"
    steps: int = 200
    lr: float | None = None
    weight_decay: float = 0.0
    warmup: float = 0.05
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    score: str | None = None
    alpha: float = 0.5
    srste_lambda: float = 2e-4
    srste_interval: int = 50
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: str = "all"
    stage_fractions: tuple[float, float, float] = (0.025, 0.025, 0.95)
    stage2_interval: int = 20
    dense_start: bool = True
    train_mode: bool = True
    shuffle: bool = True
    eval_every: int = 0
    checkpoint_every: int = 0
    seed: int = 0
    merge: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "stage_fractions", tuple(float(f) for f in self.stage_fractions))
        if self.method not in METHODS:
            raise ValueError(f"RecoveryConfig.method must be one of {METHODS}, got {self.method!r}")
        if self.steps < 1:
            raise ValueError(f"RecoveryConfig.steps must be >= 1, got {self.steps}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"RecoveryConfig.lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"RecoveryConfig.warmup must be in [0, 1), got {self.warmup}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"RecoveryConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"RecoveryConfig.grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.score is not None and self.score not in SCORES:
            raise ValueError(f"RecoveryConfig.score must be one of {SCORES} or None, got {self.score!r}")
        if self.srste_interval < 1 or self.stage2_interval < 1:
            raise ValueError("RecoveryConfig.srste_interval and stage2_interval must be >= 1")
        if self.eval_every < 0 or self.checkpoint_every < 0:
            raise ValueError("RecoveryConfig.eval_every and checkpoint_every must be >= 0")
        if self.method == "three_stage":
            ThreeStageSchedule(self.steps, self.stage_fractions, self.stage2_interval)  # validates
        if self.lora_targets not in ("all", "sparse"):
            raise ValueError(f"RecoveryConfig.lora_targets must be 'all' or 'sparse', got {self.lora_targets!r}")

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else _DEFAULT_LR[self.method]


@dataclass
class RecoveryResult:
    """What a run did: per-step losses and learning rates, eval results, and timing.

    ``checkpoints``: ``{"step", "seconds"}`` of every checkpoint this call wrote; ``resume_seconds``:
    the time the resume took (reading the checkpoint into the model and optimizer; 0 without one).
    """

    config: RecoveryConfig
    history: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: int = 0
    checkpoints: list[dict] = field(default_factory=list)
    resume_seconds: float = 0.0

    @property
    def final_eval(self) -> dict | None:
        return self.evals[-1] if self.evals else None


def _lr_lambda(config: RecoveryConfig) -> Callable[[int], float]:
    warm = round(config.warmup * config.steps)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, config.steps - warm)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def _to_device(batch, device: torch.device):
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _batches(data: Iterable, start: int, config: RecoveryConfig) -> Iterator:
    """Batches from step ``start`` on: a sequence in a seeded order per epoch, any other iterable cycled."""
    if isinstance(data, Sequence) or (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        n = len(data)
        if n == 0:
            raise ValueError("recover_ got no batches")
        step = start
        while True:
            epoch, i = divmod(step, n)
            if config.shuffle:
                g = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
                order = torch.randperm(n, generator=g).tolist()
            else:
                order = list(range(n))
            for j in order[i:]:
                yield data[j]
                step += 1
    seen = 0
    while True:
        empty = True
        for batch in data:
            empty = False
            if seen >= start:
                yield batch
            seen += 1
        if empty:
            raise ValueError("recover_ got no batches")


def _make_loss(loss: str | LossFn | None, teacher: nn.Module | None) -> LossFn:
    if callable(loss):
        return loss
    if loss is None or loss in ("distill", "distill_all"):
        if teacher is None:
            raise ValueError("distillation needs teacher= (the dense model); or pass a task loss callable")
        return DistillLoss(teacher, hidden="all" if loss == "distill_all" else "last")
    raise ValueError(f"loss must be a callable (model, batch) -> Tensor, 'distill' or 'distill_all', got {loss!r}")


def _needs_stats(model: nn.Module, config: RecoveryConfig) -> bool:
    if config.method == "fixed":
        return False
    if config.method == "three_stage":
        return (config.score or "ria") != "abs"
    return any((config.score or sparsity_of(m).score) != "abs" for m in sparse_linears(model).values())


@torch.no_grad()
def _copy_dense_weights(model: nn.Module, dense: nn.Module) -> int:
    """Copy the dense weights of every sparse linear from ``dense`` (same module names and shapes)."""
    from ..linears import is_conv1d

    src = dict(dense.named_modules())
    n = 0
    for name, module in sparse_linears(model).items():
        other = src.get(name)
        w = dense_weight(module)
        if isinstance(other, nn.Linear) and other.weight.shape == w.shape:
            w.copy_(other.weight.to(w.dtype))
            n += 1
        elif other is not None and is_conv1d(other) and other.weight.t().shape == w.shape:  # a GPT-2 teacher
            w.copy_(other.weight.t().to(w.dtype))
            n += 1
    return n


def _save(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-save keeps the previous checkpoint


def recover_(
    model: nn.Module,
    data: Iterable,
    config: RecoveryConfig | None = None,
    *,
    loss: str | LossFn | None = None,
    teacher: nn.Module | None = None,
    stats: CalibrationStats | None = None,
    eval_fn: EvalFn | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = True,
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
    progress: bool = True,
    **overrides,
) -> RecoveryResult:
    """Recovery-train a model sparsified by ``sparsify_`` **in place**; returns the run's history.

    Args:
        model: the sparsified model (its linears carry V:N:M state).
        data: batches (dict -> ``model(**batch)``, tuple -> ``model(*batch)``, tensor -> ``model(batch)``);
            a sequence is shuffled per epoch (exactly resumable), any iterable is cycled.
        config: a RecoveryConfig; keyword ``overrides`` replace its fields (``method="srste", steps=100``).
        loss: ``loss(model, batch) -> Tensor`` (a task loss), or "distill" / "distill_all" (the default
            when a teacher is given): MSE to the teacher's last / every hidden state.
        teacher: the dense model to distill from (also stage 1's dense weights for three-stage LoRA).
        stats: calibration statistics for RIA/Wanda mask recomputation; collected on the first
            8 batches when needed and not given.
        eval_fn: ``eval_fn(model) -> float | dict``, run under no_grad in eval mode every
            ``eval_every`` steps and after the merge.
        checkpoint_dir: where ``recovery.pt`` is written every ``checkpoint_every`` steps (a sharded
            model: a ``torch.distributed.checkpoint`` folder per step and ``latest``; one folder all
            ranks see).
        resume: continue from the checkpoint in ``checkpoint_dir`` when there is one (the model must be
            set up as for the first run: same sparsify_ call, same sharding or another world size).
        optimizer: ``factory(params) -> Optimizer`` (default AdamW(lr, weight_decay)).
        progress: show a tqdm progress bar (rank 0 only when distributed).

    Sharded (FSDP2) models: every rank calls ``recover_`` with its own batches; losses in the
    history are this rank's; ``eval_fn`` runs on every rank (it may run collectives).
    """
    from tqdm.auto import tqdm

    config = replace(config or RecoveryConfig(), **overrides)
    if not sparse_linears(model):
        raise ValueError("the model has no sparsified linears: call vnm_compile.sparsify_(model, ...) first")
    sharded = is_sharded(model)
    if sharded:
        check_sharded_method(config.method)
    loss_fn = _make_loss(loss, teacher)
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if config.checkpoint_every and ckpt_path is None:
        raise ValueError("checkpoint_every is set but checkpoint_dir is not")
    device = next(model.parameters()).device
    was_training = model.training
    torch.manual_seed(config.seed)

    # 1. Method set-up: hooks or parametrizations, trainable parameters.
    guard: MaskGuard | None = None
    handle: LoRAHandle | None = None
    schedule: ThreeStageSchedule | None = None
    if config.method == "three_stage":
        schedule = ThreeStageSchedule(config.steps, config.stage_fractions, config.stage2_interval)
    if config.method != "fixed" and config.dense_start and teacher is not None:
        n = _copy_dense_weights(model, teacher)
        logger.info("%s: the dense weights under the masks start from the teacher's (%d linears)", config.method, n)
    if stats is None and _needs_stats(model, config):
        n_first = min(8, len(data)) if hasattr(data, "__len__") else 8
        first = [
            _to_device(b, device) for b in itertools.islice(_batches(data, 0, replace(config, shuffle=False)), n_first)
        ]
        stats = calibrate(model, first, progress=False)
    if config.method == "fixed":
        guard = MaskGuard(model)
    elif config.method == "srste":
        srste_(model, config.srste_lambda)
    else:
        handle = lora_(model, config.lora_rank, config.lora_alpha, targets=config.lora_targets)
    params = handle.parameters() if handle is not None else [p for p in model.parameters() if p.requires_grad]
    opt = optimizer(params) if optimizer is not None else torch.optim.AdamW(
        params, lr=config.peak_lr, weight_decay=config.weight_decay
    )  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config))
    if guard is not None:
        guard.attach(opt)
    result = RecoveryResult(config)

    # 2. Resume.
    start = 0
    t_resume = time.perf_counter()
    if sharded and checkpoint_dir is not None and resume and latest_checkpoint(checkpoint_dir) is not None:
        start = _load_sharded_checkpoint(latest_checkpoint(checkpoint_dir), model, opt, sched, result, config)
    elif not sharded and ckpt_path is not None and resume and ckpt_path.exists():
        start = _load_checkpoint(ckpt_path, model, opt, sched, result, config)
    if start:
        result.resume_seconds = time.perf_counter() - t_resume
    score = config.score or ("ria" if config.method == "three_stage" else None)
    mode = model.train if config.train_mode else model.eval
    mode()
    t0 = time.perf_counter()
    batches = _batches(data, start, config)
    rank = torch.distributed.get_rank() if sharded and torch.distributed.is_initialized() else 0
    bar = tqdm(total=config.steps, initial=start, desc=f"recover {config.method}", disable=not progress or rank > 0)
    try:
        # 3. Train.
        for step in range(start, config.steps):
            if schedule is not None:
                handle.set_mask_enabled(schedule.masked(step))
                if schedule.update_due(step):
                    update_masks_(model, score, stats, config.alpha, weight_fn=lora_weight)
            batch = _to_device(next(batches), device)
            lr = opt.param_groups[0]["lr"]
            value = loss_fn(model, batch)
            opt.zero_grad(set_to_none=True)
            value.backward()
            if guard is not None:
                guard.mask_grads()  # sharded weights: their gradient hooks do not fire
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            sched.step()
            if config.method == "srste" and srste_update_due(step, config.srste_interval) and step + 1 < config.steps:
                update_masks_(model, score, stats, config.alpha)
            result.history.append({"step": step + 1, "loss": float(value.detach()), "lr": lr})
            bar.update(1)
            bar.set_postfix(loss=f"{float(value.detach()):.4g}")
            if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
                t_save = time.perf_counter()
                if sharded:
                    trainer_state = {"config": asdict(config), "scheduler": sched.state_dict()}
                    local = {"history": result.history, "evals": result.evals}
                    save_sharded(checkpoint_dir, step + 1, model, opt, trainer_state, local)
                else:
                    _save(ckpt_path, _checkpoint(step + 1, model, opt, sched, result, config))
                result.checkpoints.append({"step": step + 1, "seconds": time.perf_counter() - t_save})
            if eval_fn is not None and config.eval_every and (step + 1) % config.eval_every == 0:
                _evaluate(model, eval_fn, step + 1, result, bar)
                mode()
    finally:
        bar.close()
        if guard is not None:
            guard.remove()
    result.seconds = time.perf_counter() - t0

    # 4. Merge: plain weights obeying the recorded masks.
    if config.merge:
        if handle is not None:
            handle.merge()
        else:
            merge_(model)
    model.train(was_training)
    if eval_fn is not None:
        _evaluate(model, eval_fn, config.steps, result, None, final=True)
        model.train(was_training)
    logger.info("recover_ %s: %d steps in %.1f s", config.method, config.steps - start, result.seconds)
    return result


def _evaluate(model: nn.Module, eval_fn: EvalFn, step: int, result: RecoveryResult, bar, final: bool = False) -> None:
    model.eval()
    with torch.no_grad():
        out = eval_fn(model)
    entry = {"step": step, **(out if isinstance(out, dict) else {"eval": float(out)})}
    if final:
        entry["merged"] = True
    result.evals.append(entry)
    if bar is not None:
        bar.set_postfix({k: f"{v:.4g}" for k, v in entry.items() if isinstance(v, float)})
    logger.info("step %d eval: %s", step, entry)


def _checkpoint(step: int, model, opt, sched, result: RecoveryResult, config: RecoveryConfig) -> dict:
    return {
        "step": step,
        "config": asdict(config),
        "model": model.state_dict(),
        "masks": {name: sparsity_of(m).mask for name, m in sparse_linears(model).items()},
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "history": result.history,
        "evals": result.evals,
    }


def _check_same_run(path: Path, saved: dict, config: RecoveryConfig) -> None:
    for key in ("method", "steps", "seed"):
        if saved[key] != getattr(config, key):
            raise ValueError(
                f"checkpoint {path} was written with {key}={saved[key]!r}, this run has {getattr(config, key)!r}"
            )


def _load_sharded_checkpoint(path: Path, model, opt, sched, result: RecoveryResult, config: RecoveryConfig) -> int:
    trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    _check_same_run(path, trainer["config"], config)  # before any collective load: every rank raises alike
    trainer, local = load_sharded(path, model, opt)
    sched.load_state_dict(trainer["scheduler"])
    result.history, result.evals, result.resumed_from = list(local["history"]), list(local["evals"]), trainer["step"]
    logger.info("resumed recovery from %s at step %d", path, trainer["step"])
    return trainer["step"]


def _load_checkpoint(path: Path, model, opt, sched, result: RecoveryResult, config: RecoveryConfig) -> int:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    _check_same_run(path, ckpt["config"], config)
    mods = sparse_linears(model)
    if set(ckpt["masks"]) != set(mods):
        raise ValueError(f"checkpoint {path} holds masks for other layers than this model's sparse linears")
    for name, mask in ckpt["masks"].items():
        set_mask_(mods[name], mask.to(sparsity_of(mods[name]).mask.device))
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    torch.set_rng_state(ckpt["rng"])
    if ckpt["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
    result.history, result.evals, result.resumed_from = list(ckpt["history"]), list(ckpt["evals"]), ckpt["step"]
    logger.info("resumed recovery from %s at step %d", path, ckpt["step"])
    return ckpt["step"]
