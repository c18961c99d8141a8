"""Training speed: tokens per second and model FLOPs utilization (MFU).

    MFU = tokens/s x training FLOPs per token / peak FLOP/s of the device

* **FLOPs per token** (forward + backward) follow PaLM (Chowdhery et al. 2022, app. B):
  ``6 N + 12 n_layer d_model T``, with N the parameters used as matmuls (non-embedding parameters
  plus the output head); every model says its own (``CausalLM.flops_per_token``).
* **Peak**: the measured matmul peak of :mod:`nexttoken.peak`.
* :class:`ThroughputCallback` shows both in the progress bar during ``fit`` and logs them
  (``train/tokens_per_sec``, ``train/mfu``). It times whole steps, batch end to batch end, so data
  loading, the optimizer and logging count; validation and the time before the first step do not.
  It only reads clocks and tensor shapes: no host-device synchronization of its own, and it calls
  ``self.log`` only when the logger writes or the progress bar refreshes (:class:`LogThrottle`). It also logs
  ``time/elapsed_sec``, the wall time since training started, for curves against time.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import lightning as L
import torch

from nexttoken.peak import cached_matmul_peak, precision_dtype


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


def mfu(tokens_per_sec: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilization: achieved training FLOP/s over the device's peak (0..1)."""
    if peak_flops <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak_flops}")
    return tokens_per_sec * flops_per_token / peak_flops


class ThroughputCallback(L.Callback):
    """Tokens per second and MFU in the progress bar (``ktok/s``, ``mfu``) and the logs
    (``train/tokens_per_sec``, ``train/mfu``), as a moving average over the last ``window`` training
    batches (micro-batches, under gradient accumulation).

    Tokens are counted from the batch's shape (every position, all processes); the clock runs from
    one batch end to the next, so everything a step costs is included. Validation time is excluded.
    ``peak_flops`` (FLOP/s of the device) skips the measurement (the matmul peak, cached; see the
    module docstring); ``mfu=False`` shows tokens/s only.
    """

    def __init__(self, window: int = 20, peak_flops: float | None = None, mfu: bool = True) -> None:
        super().__init__()
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.window = window
        self.peak_flops = peak_flops
        self.show_mfu = mfu
        self._marks: deque[tuple[float, int]] = deque(maxlen=window + 1)
        self._flops_per_token: int | None = None
        self._seq_len: int | None = None
        self._fit_started = time.perf_counter()
        self._throttle = LogThrottle()
        # What the last update computed (for reports and tests).
        self.tokens_per_sec: float | None = None
        self.mfu: float | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.show_mfu and self.peak_flops is None:
            dtype = precision_dtype(trainer.precision)
            try:
                self.peak_flops = cached_matmul_peak(pl_module.device, dtype)
            except Exception:  # noqa: BLE001 - a speed display must never stop training
                self.show_mfu = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_started = time.perf_counter()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._marks:  # the first step, or the first after validation: start the clock here
            self._marks.append((time.perf_counter(), 0))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        targets = batch[1] if isinstance(batch, (tuple, list)) else batch
        tokens = int(targets.numel()) * trainer.world_size
        self._marks.append((time.perf_counter(), tokens))
        (t0, _), (t1, _) = self._marks[0], self._marks[-1]
        if t1 <= t0:
            return
        self.tokens_per_sec = sum(n for _, n in list(self._marks)[1:]) / (t1 - t0)
        if self.show_mfu and self.peak_flops:
            seq_len = int(targets.shape[-1])
            if seq_len != self._seq_len:
                self._flops_per_token = pl_module.model.flops_per_token(seq_len)
                self._seq_len = seq_len
            self.mfu = mfu(self.tokens_per_sec, self._flops_per_token, self.peak_flops)
        if not self._throttle(trainer, trainer.global_step):
            return
        # CPU tensors: Lightning keeps them where they are, so logging never waits for a GPU.
        log = pl_module.log
        # Wall time since training started (validation included): the x axis of time-based curves.
        log("time/elapsed_sec", torch.tensor(time.perf_counter() - self._fit_started), batch_size=1)
        log("train/tokens_per_sec", torch.tensor(self.tokens_per_sec), batch_size=1)
        # Short names for the progress bar, which shows 3 decimals: "ktok/s: 15.765", "mfu: 0.412".
        log("ktok/s", torch.tensor(self.tokens_per_sec / 1000), prog_bar=True, logger=False, batch_size=1)
        if self.mfu is not None:
            log("train/mfu", torch.tensor(self.mfu), batch_size=1)
            log("mfu", torch.tensor(self.mfu), prog_bar=True, logger=False, batch_size=1)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._marks.clear()  # validation is not training time
