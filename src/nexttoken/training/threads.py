"""How many CPU threads a training step should use: measured, because on a shared machine fewer
threads than cores can be several times faster."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch

from nexttoken.data.parallel import available_cores


def fastest_num_threads(
    step: Callable[[], Any], candidates: Sequence[int] | None = None, repeats: int = 3
) -> tuple[int, dict[int, float]]:
    """Time ``step()`` under each torch thread count (interleaved; median of ``repeats``), leave torch
    set to the fastest, and return ``(threads, {threads: seconds})``.

    On a CPU shared with other programs, fewer threads than cores can be several times faster:
    every parallel op waits for its slowest thread, and a thread whose core is busy waits for a
    whole scheduler time slice (measured on a loaded 2-core VM: 1 thread 10x faster than 2 for a
    small GPT's training step; on the idle VM 2 threads win). ``step`` should run a few ms at least
    and be warmed up.
    """
    original = torch.get_num_threads()
    if candidates is None:
        candidates = sorted({1, max(1, original // 2), original})
    times: dict[int, list[float]] = {n: [] for n in candidates}
    try:
        for _ in range(repeats):
            for n in candidates:
                torch.set_num_threads(n)
                start = time.perf_counter()
                step()
                times[n].append(time.perf_counter() - start)
    except BaseException:
        torch.set_num_threads(original)
        raise
    medians = {n: sorted(t)[len(t) // 2] for n, t in times.items()}
    best = min(medians, key=medians.get)
    torch.set_num_threads(best)
    return best, medians


def threads_set_by_user() -> str | None:
    """The environment variable that fixes the thread count (``OMP_NUM_THREADS``, ...), if any."""
    return next((name for name in THREAD_VARIABLES if os.environ.get(name)), None)


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


class AutoThreads(L.Callback):
    """Pick the CPU thread count of a training run by measuring, unless the user fixed it
    (``OMP_NUM_THREADS``), and say what was chosen.

    * At the first training batch: :func:`fastest_num_threads` over 1 thread and all cores, timing
      the model's forward pass on a quarter of that batch (without gradients, in a forked RNG), so
      the run's own numbers are untouched; unless the same was just timed (:meth:`use_timings`: the
      start summary times a validation batch's forward under each count), whose timings decide.
    * Every ``reprobe_seconds`` of training (0: never) it runs ``probe_steps`` real training steps
      with the other thread count and keeps whichever was faster: on a shared machine the best
      choice changes as other programs come and go, and a wrong count can make every step several
      times slower, so the check is on the clock, not every N steps. A probe whose first timed step
      is 1.5x slower stops at once. Validation time never counts.

    ``choice`` holds what was decided and why (for the report); ``switches`` the (step, threads)
    history.
    """

    def __init__(self, reprobe_seconds: float = 30.0, probe_steps: int = 4) -> None:
        super().__init__()
        self.reprobe_seconds, self.probe_steps = reprobe_seconds, probe_steps
        self._last_probe = 0.0  # when the current count was last confirmed (perf_counter)
        self.choice: str | None = None
        self.switches: list[tuple[int, int]] = []
        self.candidates: list[int] = []
        self._recent: list[float] = []  # step times under the current count
        self._probe: list[float] = []  # step times under the probed count
        self._probing: int | None = None
        self._back_to = 0
        self._start = 0.0
        self._first = True
        self._given: tuple[dict[int, float], str] | None = None

    def use_timings(self, medians: dict[int, float], what: str) -> None:
        """Decide the first count from ``medians`` (seconds by thread count) of ``what`` (a forward
        pass timed under each count) instead of timing one more at the first batch."""
        self._given = (dict(medians), what)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        fixed = threads_set_by_user()
        threads = torch.get_num_threads()
        self._first = True
        if pl_module.device.type != "cpu" or trainer.world_size > 1:
            self.candidates = []  # several processes share the cores: torch's own split stays
        elif fixed:
            self.candidates = []
            self.choice = f"{threads} ({fixed}={os.environ[fixed]})"
        elif getattr(pl_module, "compiled", False):
            # Compiled CPU code is specialized to its thread count: every change would recompile.
            self.candidates = []
            self.choice = (
                f"{threads} (torch's default: torch.compile fixes the count; OMP_NUM_THREADS=N sets it)"
            )
        else:
            self.candidates = sorted({1, available_cores()})
            if len(self.candidates) < 2:
                self.choice = f"{threads} (the only core)"

    def _probe_first_batch(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any) -> None:
        # The forward pass of a quarter of the batch: what decides the count on a shared machine is
        # the load, which a smaller step sees as well, and under load the slow candidate costs several
        # times a full step (measured: 3.6 s of a 100-step run for forward+backward of the whole batch).
        # The re-probes later time real training steps.
        rows = max(1, batch[0].shape[0] // 4)
        input_ids, targets = batch[0][:rows], batch[1][:rows]
        plugin = trainer.precision_plugin

        def forward() -> None:
            with torch.no_grad(), plugin.forward_context():
                pl_module.nll_sum(input_ids, targets) if hasattr(pl_module, "nll_sum") else pl_module(
                    input_ids
                )

        if self._given is not None and sorted(self._given[0]) == self.candidates:
            medians, what = self._given  # timed moments ago: no second probe
            self._given = None
            best = min(medians, key=medians.get)
            torch.set_num_threads(best)
        else:
            with torch.random.fork_rng(devices=[]):
                forward()  # warm-up: first-call allocations, kernel selection
                best, medians = fastest_num_threads(forward, self.candidates, repeats=1)
            what = "forward"
        timings = ", ".join(f"{n}: {t * 1e3:.0f} ms" for n, t in medians.items())
        self.choice = f"{best} (auto: {what} {timings}; OMP_NUM_THREADS=N fixes it)"
        self.switches.append((trainer.global_step, best))
        pl_module.print(f"threads: {self.choice}")

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._first and len(self.candidates) > 1:
            self._probe_first_batch(trainer, pl_module, batch)
        self._start = time.perf_counter()
        if self._first:
            self._last_probe = self._start
        self._first = False

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if len(self.candidates) < 2 or not self.reprobe_seconds:
            return
        now = time.perf_counter()
        seconds = now - self._start
        if self._probing is None:
            self._recent = (self._recent + [seconds])[-self.probe_steps :]
            due = now - self._last_probe >= self.reprobe_seconds
            if due and len(self._recent) == self.probe_steps:
                self._back_to = torch.get_num_threads()
                self._probing = next(n for n in self.candidates if n != self._back_to)
                self._probe = []
                torch.set_num_threads(self._probing)
            return
        self._probe.append(seconds)
        if len(self._probe) > 1 and seconds > 1.5 * statistics.median(self._recent):
            self._end_probe(trainer, self._back_to)  # clearly worse: stop probing at once
        elif len(self._probe) > self.probe_steps:  # the first probed step settles the new count
            faster = statistics.median(self._probe[1:]) < statistics.median(self._recent)
            self._end_probe(trainer, self._probing if faster else self._back_to)

    def _end_probe(self, trainer: L.Trainer, keep: int) -> None:
        torch.set_num_threads(keep)
        self._last_probe = time.perf_counter()
        if keep != self._back_to:
            self.switches.append((trainer.global_step, keep))
        self._probing, self._recent = None, []

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._probing is not None:  # a probe cut by validation decides nothing: back to the count
            self._end_probe(trainer, self._back_to)
        self._recent = []  # the first step after validation is not comparable
