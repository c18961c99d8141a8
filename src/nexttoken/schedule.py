"""The learning-rate schedule: linear warmup, then cosine down to ``min_lr``, over the run's steps,
over its clock, or over whichever of the two runs out first.

A run bounded by time (``trainer.max_time``) cannot know in advance how many steps it will get:
on a shared CPU a step's time varies several-fold within minutes, and a schedule laid out in steps
either stops undecayed (the time ran out first) or idles at the floor. So after warmup the cosine
follows the *progress* of the run,

    progress = max(steps done / max_steps,  time used / max_time)        (each after warmup)

which is exactly the step schedule when the steps run out first, exactly a clock schedule when only
time bounds the run, and in every case reaches ``min_lr`` when the run ends. Warmup stays in steps
(it is about the first updates, not about time). The clock is Lightning's ``Timer`` (the callback
behind ``max_time``), whose elapsed time survives a resume.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch


def cosine(progress: float, min_lr_ratio: float) -> float:
    """Multiplier at ``progress`` in [0, 1] of the cosine: 1 at 0, ``min_lr_ratio`` at 1 and beyond."""
    progress = min(1.0, max(0.0, progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine(torch.optim.lr_scheduler.LRScheduler):
    """Warmup over ``warmup_steps`` steps, then cosine to ``min_lr_ratio`` x each group's lr.

    Args:
        max_steps: the run's optimizer steps, or None when only time bounds it.
        clock: a function giving the share of the run's time budget used so far (0..1), or None
            when the run has no time limit. The cosine then follows whichever runs out first.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        warmup_steps: int,
        max_steps: int | None,
        min_lr_ratio: float,
        clock: Callable[[], float] | None = None,
        last_epoch: int = -1,
    ) -> None:
        if max_steps is None and clock is None:
            raise ValueError("a schedule needs max_steps, a clock, or both")
        self.warmup_steps = warmup_steps
        self.max_steps = max_steps
        self.min_lr_ratio = min_lr_ratio
        self.clock = clock
        self.time_at_warmup_end: float | None = None  # share of the time budget used when warmup ended
        super().__init__(optimizer, last_epoch)

    def progress(self) -> float:
        """How far through the cosine the run is (0..1)."""
        step = self.last_epoch
        done = 0.0
        if self.max_steps is not None:
            done = (
                1.0
                if self.max_steps <= self.warmup_steps
                else ((step - self.warmup_steps) / (self.max_steps - self.warmup_steps))
            )
        if self.clock is not None:
            used = self.clock()
            if self.time_at_warmup_end is None:
                self.time_at_warmup_end = used
            rest = 1.0 - self.time_at_warmup_end
            done = max(done, 1.0 if rest <= 0 else (used - self.time_at_warmup_end) / rest)
        return min(1.0, max(0.0, done))

    def multiplier(self) -> float:
        step = self.last_epoch
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        return cosine(self.progress(), self.min_lr_ratio)

    def get_lr(self) -> list[float]:
        factor = self.multiplier()
        return [base * factor for base in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        # The clock is re-attached by whoever builds the schedule; checkpoints hold plain values only.
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "clock")}


def timer_clock(trainer: Any) -> Callable[[], float] | None:
    """The share of ``trainer.max_time`` used so far, read from Lightning's ``Timer`` callback
    (validation during training counts, as it does for the Timer's own stop); None without a time
    limit."""
    from lightning.pytorch.callbacks import Timer

    timer = next((c for c in getattr(trainer, "callbacks", []) if isinstance(c, Timer)), None)
    if timer is None or timer.time_remaining("train") is None:
        return None

    def used() -> float:
        elapsed = timer.time_elapsed("train")
        total = elapsed + timer.time_remaining("train")
        return elapsed / total if total > 0 else 1.0

    return used
