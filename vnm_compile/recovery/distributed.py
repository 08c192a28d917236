"""Recovery training on models sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

What changes when the parameters are DTensor shards:

* masks are applied shard-wise: ``masking.mask_like`` cuts each recorded (full) mask the way its weight
  is sharded, so every rank multiplies its shard by exactly the matching mask rows;
* gradients are masked explicitly after ``backward()`` (``MaskGuard.mask_grads``): FSDP hands the
  reduce-scattered gradient to the sharded parameter without running tensor hooks on it;
* checkpoints go through ``torch.distributed.checkpoint`` (DCP): every rank writes its shards of the
  weights, the optimizer state and the masks, and a run resumes on a different number of ranks where
  DCP reshards (FSDP2's dim-0 shards always can). Replicated trainer state (config, step, scheduler)
  is written by rank 0; each rank's own state (RNG, its loss history) beside it.

Layout of ``checkpoint_dir``: ``step_00000100/`` (DCP files, ``trainer.pt``, ``rank<r>.pt``) and
``latest`` naming the newest complete one, replaced atomically once every rank has finished writing;
older step folders are then removed. ``checkpoint_dir`` must be one folder all ranks see.

Supported sharded: ``method="fixed"`` (TS1). SR-STE and three-stage LoRA are not (see
``check_sharded_method``).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path
from typing import NoReturn

import torch
from torch import nn

from .masking import mask_like, set_mask_, sparse_linears, sparsity_of

__all__ = [
    "SHARDED_METHODS",
    "check_sharded_method",
    "exit_rank",
    "latest_checkpoint",
    "save_sharded",
    "load_sharded",
]

logger = logging.getLogger(__name__)

SHARDED_METHODS = ("fixed",)
LATEST = "latest"


def check_sharded_method(method: str) -> None:
    """Raise for recovery methods that do not run on a sharded model, saying why."""
    if method in SHARDED_METHODS:
        return
    raise NotImplementedError(
        f"recover_(method={method!r}) does not run on a sharded (FSDP2 fully_shard / DTensor) model; "
        f"supported sharded: {SHARDED_METHODS}. SR-STE and three-stage LoRA add weight parametrizations "
        "that hold a full-size mask on every rank and that merge_ folds by rebinding parameters FSDP "
        "manages, and their mask recomputation needs each layer's whole weight and calibration statistics "
        "reduced over the ranks so that every rank picks the same mask. Run them before sharding "
        "(a model that fits one device), or use method='fixed'."
    )


def exit_rank(code: int = 0) -> NoReturn:
    """End a torchrun rank whose work is done (results written, process group destroyed) without the
    interpreter's teardown: with gloo on CPU a finished rank has aborted in a C++ destructor at exit
    ("terminate called without an active exception", SIGABRT), failing a run after its work was done.
    Standard streams are flushed first; nothing else runs (no atexit handlers, no finalizers)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The newest complete sharded checkpoint under ``checkpoint_dir``, or None."""
    pointer = Path(checkpoint_dir) / LATEST
    if not pointer.exists():
        return None
    return Path(checkpoint_dir) / pointer.read_text().strip()


def _mask_shards(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every sparse linear's mask sharded like its weight (uint8: DCP and gloo move bytes, not bools)."""
    from .masking import dense_weight

    return {
        name: mask_like(sparsity_of(m).mask, dense_weight(m)).to(torch.uint8)
        for name, m in sparse_linears(model).items()
    }


def save_sharded(
    checkpoint_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer: dict,
    local: dict | None = None,
) -> Path:
    """Write a sharded checkpoint of ``step`` (collective: every rank calls it); returns its folder.

    Args:
        trainer: replicated trainer state (config, scheduler: plain Python values); written by rank 0.
        local: this rank's own state (plain Python values, e.g. its loss history), written with its RNG state.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = Path(checkpoint_dir)
    path = root / f"step_{step:08d}"
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd, "masks": _mask_shards(model)}, checkpoint_id=path)
    torch.save({**(local or {}), "rng": torch.get_rng_state(), "cuda_rng": _cuda_rng()}, path / f"rank{_rank()}.pt")
    if _rank() == 0:
        torch.save({**trainer, "step": step}, path / "trainer.pt")
    _barrier()  # every rank's files are complete before ``latest`` points at them
    if _rank() == 0:
        tmp = root / (LATEST + ".tmp")
        tmp.write_text(path.name)
        os.replace(tmp, root / LATEST)
        for old in root.glob("step_*"):
            if old != path and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return path


def _cuda_rng() -> torch.Tensor | None:
    return torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Load a sharded checkpoint into ``model`` (masks first) and ``optimizer``.

    The masks are read shard by shard into the current sharding, gathered into full masks and
    recorded (``set_mask_``), then weights and optimizer state are loaded. This rank's RNG state is
    restored when it wrote one (same or smaller world size); a rank that did not (the run resumes on
    more ranks) keeps its RNG and gets rank 0's local state (logged).

    Returns:
        (trainer state written by rank 0, this rank's local state).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    mods = sparse_linears(model)
    masks = _mask_shards(model)
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd, "masks": masks}
    dcp.load(state, checkpoint_id=path)
    for name, shard in state["masks"].items():
        full = shard.full_tensor() if hasattr(shard, "full_tensor") else shard
        set_mask_(mods[name], full.to(device=sparsity_of(mods[name]).mask.device, dtype=torch.bool))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    own = path / f"rank{_rank()}.pt"
    if own.exists():
        local = torch.load(own, map_location="cpu", weights_only=True)
        torch.set_rng_state(local.pop("rng"))
        cuda_rng = local.pop("cuda_rng")
        if cuda_rng is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(cuda_rng)
    else:
        logger.warning("no state for rank %d in %s (written on fewer ranks): rank 0's history, RNG kept", _rank(), path)
        local = torch.load(path / "rank0.pt", map_location="cpu", weights_only=True)
        del local["rng"], local["cuda_rng"]
    return trainer, local
