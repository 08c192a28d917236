"""When masks change: the three-stage LoRA schedule (TS3) and the SR-STE update interval (TS2).

Steps are counted from 0. Three-stage LoRA (paper section 3, docs/design.md):
stage 1 ``[0, s1)`` dense LoRA (no mask); stage 2 ``[s1, s2)`` masked, masks
recomputed from RIA on ``W + BA`` at its first step and every ``interval``
steps after; stage 3 ``[s2, steps)`` fixed masks. ``s1 = round(f1 * steps)``,
``s2 = round((f1 + f2) * steps)``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ThreeStageSchedule", "srste_update_due"]


@dataclass(frozen=True)
class ThreeStageSchedule:
    """Stage boundaries of a three-stage LoRA run of ``steps`` optimizer steps.

    Args:
        steps: total optimizer steps.
        fractions: (stage 1, stage 2, stage 3) shares of the run; paper default 2.5 % / 2.5 % / 95 %.
        interval: steps between mask recomputations in stage 2 (paper: 20).
    """

    steps: int
    fractions: tuple[float, float, float] = (0.025, 0.025, 0.95)
    interval: int = 20

    def __post_init__(self) -> None:
        object.__setattr__(self, "fractions", tuple(float(f) for f in self.fractions))
        if self.steps < 1:
            raise ValueError(f"ThreeStageSchedule.steps must be >= 1, got {self.steps}")
        if len(self.fractions) != 3 or any(not f >= 0 for f in self.fractions):
            raise ValueError(f"ThreeStageSchedule.fractions must be three non-negative numbers, got {self.fractions}")
        if abs(sum(self.fractions) - 1.0) > 1e-6:
            raise ValueError(f"ThreeStageSchedule.fractions must sum to 1, got {sum(self.fractions)}")
        if self.interval < 1:
            raise ValueError(f"ThreeStageSchedule.interval must be >= 1, got {self.interval}")

    @property
    def stage1_end(self) -> int:
        """First step of stage 2."""
        return round(self.fractions[0] * self.steps)

    @property
    def stage2_end(self) -> int:
        """First step of stage 3."""
        return max(self.stage1_end, round((self.fractions[0] + self.fractions[1]) * self.steps))

    def stage(self, step: int) -> int:
        """1, 2 or 3: the stage that optimizer step ``step`` (0-based) belongs to."""
        if not 0 <= step < self.steps:
            raise ValueError(f"step {step} outside the run [0, {self.steps})")
        if step < self.stage1_end:
            return 1
        return 2 if step < self.stage2_end else 3

    def masked(self, step: int) -> bool:
        """Whether the forward pass of ``step`` applies the masks (stages 2 and 3)."""
        return self.stage(step) > 1

    def update_due(self, step: int) -> bool:
        """Whether masks are recomputed from ``W + BA`` before the forward pass of ``step``."""
        return self.stage(step) == 2 and (step - self.stage1_end) % self.interval == 0


def srste_update_due(step: int, interval: int) -> bool:
    """SR-STE recomputes masks after the optimizer step of every ``interval``-th step (steps interval-1, 2*interval-1, ...)."""
    if interval < 1:
        raise ValueError(f"SR-STE mask interval must be >= 1, got {interval}")
    return (step + 1) % interval == 0
