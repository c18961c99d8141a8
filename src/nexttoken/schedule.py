"""The learning-rate schedules: linear warmup, then cosine down to ``min_lr`` (``WarmupCosine``) or
stable at the peak and a late decay to ``min_lr`` (``WarmupStableDecay``), over the run's steps, over
its clock, or over whichever of the two runs out first.

A run bounded by time (``trainer.max_time``) cannot know in advance how many steps it will get:
on a shared CPU a step's time varies several-fold within minutes, and a schedule laid out in steps
either stops undecayed (the time ran out first) or idles at the floor. So after warmup the cosine
follows the *progress* of the run,

    progress = max(steps done / max_steps,  time used / max_time)        (each after warmup)

which is exactly the step schedule when the steps run out first, exactly a clock schedule when only
time bounds the run, and in every case reaches ``min_lr`` when the run ends. Warmup stays in steps
(it is about the first updates, not about time). The clock is Lightning's ``Timer`` (the callback
behind ``max_time``), whose elapsed time survives a resume.

Warmup-stable-decay holds the peak until the last ``decay_fraction`` of that same progress (or the
last ``decay_steps`` steps) and decays only then, so the weights at the decay's start can be branched
into decays of other lengths (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond
Fixed Training Durations": a 20% decay of shape 1 - sqrt matches or beats the cosine).
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
            done = max(done, self.clock_progress())
        return min(1.0, max(0.0, done))

    def clock_progress(self) -> float | None:
        """The share of the time left after warmup used so far (0..1), None without a clock."""
        if self.clock is None:
            return None
        used = self.clock()
        if self.time_at_warmup_end is None:
            self.time_at_warmup_end = used
        rest = 1.0 - self.time_at_warmup_end
        return 1.0 if rest <= 0 else min(1.0, max(0.0, (used - self.time_at_warmup_end) / rest))

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


def one_minus_sqrt(progress: float, min_lr_ratio: float) -> float:
    """Multiplier at ``progress`` in [0, 1] of the decay: 1 at 0, ``min_lr_ratio`` at 1 and beyond.
    The 1 - sqrt shape drops fast at first and flattens at the floor; it beat the linear decay at
    every length Hägele et al. 2024 measured."""
    progress = min(1.0, max(0.0, progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - math.sqrt(progress))


# The share of the run (after warmup) that decays when neither it nor decay_steps is given: the
# length Hägele et al. 2024 found to match a cosine of the same run.
DEFAULT_DECAY_FRACTION = 0.2


class WarmupStableDecay(WarmupCosine):
    """Warmup over ``warmup_steps`` steps, the peak until the decay starts, then 1 - sqrt down to
    ``min_lr_ratio`` x each group's lr.

    The decay is the last ``decay_steps`` optimizer steps of ``max_steps`` when given, else the last
    ``decay_fraction`` of the run after warmup, counted in steps, on the ``clock``, or by whichever
    runs out first (as :class:`WarmupCosine`). ``decay_start_step`` is the optimizer step whose
    weights the decay starts from: the update after it is the first one below the peak. It is kept in
    the checkpoint; the lengths are not, so a run continued from the decay's start can decay over
    another length (``max_steps`` and ``decay_steps`` come from the continuing run's settings).
    """

    # What the continuing run's settings decide, not the checkpoint (see state_dict).
    SETTINGS = ("max_steps", "decay_steps", "decay_fraction")

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        warmup_steps: int,
        max_steps: int | None,
        min_lr_ratio: float,
        decay_fraction: float = DEFAULT_DECAY_FRACTION,
        decay_steps: int | None = None,
        clock: Callable[[], float] | None = None,
        last_epoch: int = -1,
    ) -> None:
        if not 0.0 < decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction must be in (0, 1], got {decay_fraction}")
        if decay_steps is not None and (decay_steps < 1 or max_steps is None):
            raise ValueError("decay_steps needs a step limit (max_steps) and must be at least 1")
        self.decay_fraction = decay_fraction
        self.decay_steps = decay_steps
        self.decay_start_step: int | None = None
        super().__init__(
            optimizer,
            warmup_steps=warmup_steps,
            max_steps=max_steps,
            min_lr_ratio=min_lr_ratio,
            clock=clock,
            last_epoch=last_epoch,
        )

    def steps_decay(self) -> tuple[int, int] | None:
        """``(first step of the decay, its length)`` in optimizer steps, None without a step limit.
        Integers, so the step the decay starts at never depends on rounding."""
        if self.max_steps is None:
            return None
        if self.decay_steps is not None:
            length = self.decay_steps
        else:
            length = max(1, round(self.decay_fraction * max(0, self.max_steps - self.warmup_steps)))
        return self.max_steps - length, length

    def decay_progress(self) -> float:
        """How far into the decay the run is: below 0 while stable, 0 at its start, 1 at its end."""
        step = self.last_epoch
        parts = []
        steps = self.steps_decay()
        if steps is not None:
            start, length = steps
            parts.append((step - start) / length)
        if self.clock is not None and self.decay_steps is None:
            parts.append((self.clock_progress() - (1.0 - self.decay_fraction)) / self.decay_fraction)
        return max(parts)

    def multiplier(self) -> float:
        step = self.last_epoch
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = self.decay_progress()
        if progress < 0:
            return 1.0
        if self.decay_start_step is None:
            self.decay_start_step = step
        return one_minus_sqrt(progress, self.min_lr_ratio)

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().state_dict().items() if k not in self.SETTINGS}


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
