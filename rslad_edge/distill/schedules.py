"""Learning-rate schedules as tiny pure functions of the epoch."""

from __future__ import annotations

from collections.abc import Sequence


def step_lr(epoch: int, base_lr: float, milestones: Sequence[int], gamma: float = 0.1) -> float:
    """A piecewise-constant schedule for 1-based ``epoch``: ``base_lr · gamma^k`` where k counts the milestones
    already reached. A milestone is the first epoch at the lower rate: RSLAD's code lowers the lr after epoch 215,
    so its milestone is 216."""
    return base_lr * gamma ** sum(epoch >= m for m in milestones)
