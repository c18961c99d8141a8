"""How often a per-step value goes through Lightning's ``self.log``: the one throttle that the
LightningModule and the throughput callback share."""

from __future__ import annotations

import time

import lightning as L


class LogThrottle:
    """Whether a per-step value should go through ``self.log`` this step: at every step the logger
    writes (``log_every_n_steps``), at the last step, and otherwise at most every ``seconds`` (for the
    progress bar, which shows the latest logged value).

    Lightning's ``self.log`` is Python work of ~0.2-2 ms per call (it walks its result collection),
    which at small shapes is several percent of a training step (``benchmarks/small_model_speed.py``);
    the logger only ever writes the values of its own steps, so the others are wasted.
    """

    def __init__(self, seconds: float = 0.5) -> None:
        self.seconds = seconds
        self._last = -float("inf")

    def __call__(self, trainer: L.Trainer, steps_done: int) -> bool:
        """``steps_done``: optimizer steps finished, counting the one being logged."""
        now = time.perf_counter()
        last_step = trainer.should_stop or 0 < trainer.max_steps <= steps_done
        if trainer._logger_connector.should_update_logs or last_step or now - self._last >= self.seconds:
            self._last = now
            return True
        return False
