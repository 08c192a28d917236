"""Losses for recovery training: distillation towards the dense model's outputs.

A recovery loss is any callable ``loss(model, batch) -> scalar Tensor``; a task
loss written by the user fits the same slot.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor, nn

from ..calibration.observer import run_batch

__all__ = ["DistillLoss", "masked_mse"]


def masked_mse(student: Tensor, teacher: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Mean squared error over (tokens, features), counting only tokens where ``attention_mask`` is 1."""
    if student.shape != teacher.shape:
        raise ValueError(f"student output {tuple(student.shape)} != teacher output {tuple(teacher.shape)}")
    diff = (student.float() - teacher.float()).square()
    if attention_mask is None or diff.dim() < 3:
        return diff.mean()
    m = attention_mask.to(diff.dtype).unsqueeze(-1)
    return (diff * m).sum() / (m.sum() * diff.shape[-1]).clamp_min(1)


def _batch_key(batch) -> str:
    h = hashlib.sha1()
    items = (
        sorted(batch.items())
        if isinstance(batch, dict)
        else enumerate(batch if isinstance(batch, (tuple, list)) else [batch])
    )
    for k, v in items:
        h.update(str(k).encode())
        if isinstance(v, Tensor):
            h.update(str((tuple(v.shape), v.dtype)).encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(repr(v).encode())
    return h.hexdigest()


class DistillLoss:
    """MSE between the model's and a dense teacher's outputs on the same batch.

    For Hugging Face encoders (dict batches, outputs with ``last_hidden_state``)
    ``hidden="last"`` matches the token embeddings (padding excluded) and
    ``hidden="all"`` matches every layer's hidden states (mean over layers),
    which gives each block a direct target and recovers faster. Other models:
    MSE between the output tensors.

    Args:
        teacher: the dense model (kept in eval mode, never trained).
        hidden: "last" or "all".
        cache: keep the teacher's outputs per distinct batch (memory for speed when batches repeat).
    """

    def __init__(self, teacher: nn.Module, hidden: str = "last", cache: bool = False) -> None:
        if hidden not in ("last", "all"):
            raise ValueError(f"hidden must be 'last' or 'all', got {hidden!r}")
        self.teacher, self.hidden, self.cache = teacher.eval(), hidden, cache
        self._cache: dict[str, list[Tensor]] = {}

    def _outputs(self, model: nn.Module, batch) -> list[Tensor]:
        if self.hidden == "all":
            if not isinstance(batch, dict):
                raise ValueError("hidden='all' needs dict batches for a Hugging Face model (output_hidden_states=True)")
            out = model(**batch, output_hidden_states=True)
            return list(out.hidden_states[1:])  # [0] is the (dense, untouched) embedding layer
        out = run_batch(model, batch)
        if hasattr(out, "last_hidden_state"):
            return [out.last_hidden_state]
        if isinstance(out, Tensor):
            return [out]
        if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
            return [out[0]]
        raise TypeError(f"cannot distill model output of type {type(out).__name__}; pass a task loss instead")

    def teacher_outputs(self, batch) -> list[Tensor]:
        key = _batch_key(batch) if self.cache else None
        if key is not None and key in self._cache:
            return self._cache[key]
        with torch.no_grad():
            outs = [t.detach() for t in self._outputs(self.teacher, batch)]
        if key is not None:
            self._cache[key] = outs
        return outs

    def __call__(self, model: nn.Module, batch) -> Tensor:
        target = self.teacher_outputs(batch)
        pred = self._outputs(model, batch)
        att = batch.get("attention_mask") if isinstance(batch, dict) else None
        return sum(masked_mse(p, t, att) for p, t in zip(pred, target, strict=True)) / len(pred)
