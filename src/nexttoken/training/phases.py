"""Where a run's wall time goes, phase by phase, for the end-of-run report.

    interpreter   process start -> nexttoken's command runs (Python, its site packages)
    import ...    torch, torchmetrics, Lightning, nexttoken's modules (marked by the command line,
                  :mod:`nexttoken.startup`; a run started from Python has one start-up phase instead)
    arguments     -> ``fit`` is called (parsing, building the Trainer, module and data module objects)
    data          -> the data is ready (documents, tokenizer, token cache: hit or build)
    model         -> training can start (the network, the optimizer, the strategy, the start summary)
    sanity check  Lightning's validation of a few batches before training
    first step    the first training step (with one-off costs: thread probe, allocations, compilation)
    steps         the other training steps (validation during training excluded)
    validation    validation passes during training
    wrap-up       end of training -> the final validation starts (last checkpoint, teardown)
    final validation
    report        compressor baselines, curves, sample (measured by ``nexttoken.training.report``)

Each phase starts where the previous one ended, so they add up to the time since the process started
(the clock and the process start: :mod:`nexttoken.startup`).
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L

from nexttoken.startup import PROCESS_START, startup_phases

_FIT_CALLED: list[float] = []


def fit_called() -> None:
    """Mark the moment ``fit`` starts (called by the CLI just before ``trainer.fit``)."""
    _FIT_CALLED.append(time.perf_counter())


class RunPhases(L.Callback):
    """Times the phases of a ``nexttoken fit`` run (see the module doc); ``seconds`` maps phase ->
    seconds in order, ``notes`` adds a word where it helps (cache hit or build, steps counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.created = time.perf_counter()
        marked, self._mark = startup_phases()
        # Unmarked (a run started from Python): all that came before is one start-up phase.
        self.seconds: dict[str, float] = marked or {"start-up": self.created - PROCESS_START}
        if not marked:
            self._mark = self.created
        self.notes: dict[str, str] = {}
        self._validation_start: float | None = None
        self._first_batch = True
        self._train_steps = 0
        self._steps_start: float | None = None
        self._in_training = False

    def _close(self, phase: str, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        self.seconds[phase] = self.seconds.get(phase, 0.0) + (now - self._mark)
        self._mark = now

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if _FIT_CALLED and _FIT_CALLED[-1] > self._mark:
            self._close("arguments", _FIT_CALLED[-1])
        self._close("data")
        hit = getattr(trainer.datamodule, "cache_hit", None) if trainer.datamodule is not None else None
        if hit is not None:
            self.notes["data"] = "token cache hit" if hit else "token cache built"

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close("model")

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close("sanity check")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close("model" if "sanity check" not in self.seconds else "sanity check")
        self._in_training = True

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._first_batch:
            self._close("first step")
            self._first_batch = False
        else:
            self._train_steps += 1
            self._close("steps")

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if self._in_training:
            self._close("steps")  # the time since the last step end: the loop's own work
        else:
            self._close("wrap-up")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._close("validation" if self._in_training else "final validation")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close("steps")
        self._in_training = False
        self.notes["steps"] = f"{self._train_steps} steps after the first"

    def add(self, phase: str, seconds: float, note: str | None = None) -> None:
        """Record a phase measured elsewhere (the report measures its own), closing any gap before it
        as wrap-up."""
        now = time.perf_counter()
        self._close("wrap-up", now - seconds)
        self._close(phase, now)
        if note:
            self.notes[phase] = note

    def step_seconds(self) -> float | None:
        """Seconds per training step, from the steps after the first."""
        if not self._train_steps:
            return None
        return self.seconds.get("steps", 0.0) / self._train_steps

    def summary(self, total_steps: int) -> dict[str, Any]:
        """Phases, the total so far, and the overhead: the total minus ``total_steps`` typical steps."""
        if self.seconds:  # up to now, so that the phases add up to the total
            self._close(next(reversed(self.seconds)))
        total = self._mark - PROCESS_START
        per_step = self.step_seconds()
        out: dict[str, Any] = {
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "notes": dict(self.notes),
            "total_seconds": round(total, 3),
        }
        if per_step is not None:
            out["step_seconds"] = round(per_step, 5)
            out["overhead_seconds"] = round(total - total_steps * per_step, 3)
        return out


def format_phases(summary: dict[str, Any]) -> str:
    """The report's lines for :meth:`RunPhases.summary`."""
    lines = ["time (seconds):"]
    for phase, seconds in summary["seconds"].items():
        note = summary["notes"].get(phase)
        lines.append(f"  {phase:<19} {seconds:8.2f}" + (f"   ({note})" if note else ""))
    lines.append(
        f"  {'total':<19} {summary['total_seconds']:8.2f}   (process start to the end of the report)"
    )
    if "overhead_seconds" in summary:
        lines.append(
            f"  {'beyond the steps':<19} {summary['overhead_seconds']:8.2f}   "
            f"(the total less every step at {summary['step_seconds'] * 1e3:.1f} ms, the typical step)"
        )
    return "\n".join(lines)
