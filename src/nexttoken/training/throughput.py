"""Training speed: tokens per second and model FLOPs utilization (MFU).

    MFU = tokens/s x training FLOPs per token / peak FLOP/s of the device

* **FLOPs per token** (forward + backward) follow PaLM (Chowdhery et al. 2022, app. B):
  ``6 N + 12 n_layer d_model T``, with N the parameters used as matmuls (non-embedding parameters
  plus the output head); every model says its own (``CausalLM.flops_per_token``).
* **Peak**: :func:`nexttoken.peak.peak_flops` for the math the matmuls run in (bf16 under
  ``bf16-mixed``, ...): a known GPU's dense datasheet number, else the measured peak of this device
  (cached). The start summary and the report say which (``Peak.describe``); MFU is never clamped.
  A run that goes faster than a *measured* peak raises it to the FLOP/s it reached, and says so.
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

from nexttoken.peak import Peak, format_flops, peak_flops, precision_dtype, raise_peak
from nexttoken.training.log_throttle import LogThrottle


def mfu(tokens_per_sec: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilization: achieved training FLOP/s over the device's peak (0..1 when the peak
    is right; nothing here clamps it)."""
    if peak_flops <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak_flops}")
    return tokens_per_sec * flops_per_token / peak_flops


def peak_devices(trainer: L.Trainer, device: torch.device | None) -> int:
    """How many times the peak of one device the run's tokens are counted against: every process's
    GPU; a CPU's peak is the whole machine's (every core), which the processes on it share."""
    if device is not None and device.type == "cpu":
        return getattr(trainer, "num_nodes", 1)
    return trainer.world_size


class ThroughputCallback(L.Callback):
    """Tokens per second and MFU in the progress bar (``ktok/s``, ``mfu``) and the logs
    (``train/tokens_per_sec``, ``train/mfu``), as a moving average over the last ``window`` training
    batches (micro-batches, under gradient accumulation).

    Tokens are counted from the batch's shape (every position, all processes), and MFU against the
    peak of every device they ran on (:func:`peak_devices`); the clock runs from one batch end to
    the next, so everything a step costs is included. Validation time is excluded.
    ``peak_flops`` (FLOP/s of the device, or a :class:`~nexttoken.peak.Peak`) skips the look-up
    (:func:`nexttoken.peak.peak_flops`, see the module docstring); ``mfu=False`` shows tokens/s only.

    When a full window's training FLOP/s exceed a *measured* peak (the probe read low), the peak is
    raised to them (:func:`nexttoken.peak.raise_peak`, cached) and a line says so; ``peak`` then says
    it was raised. A datasheet or given peak is never changed.
    """

    def __init__(self, window: int = 20, peak_flops: float | Peak | None = None, mfu: bool = True) -> None:
        super().__init__()
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.window = window
        if isinstance(peak_flops, (int, float)):
            peak_flops = Peak(float(peak_flops), "?", "given")
        self.peak: Peak | None = peak_flops
        self.show_mfu = mfu
        self._peak_dtype: tuple[torch.device, torch.dtype] | None = None
        self._devices: int | None = None  # how many of the peak's devices the run's tokens are on
        self._marks: deque[tuple[float, int]] = deque(maxlen=window + 1)
        self._flops_per_token: int | None = None
        self._seq_len: int | None = None
        self._fit_started = time.perf_counter()
        self._throttle = LogThrottle()
        # What the last update computed (for reports and tests).
        self.tokens_per_sec: float | None = None
        self.mfu: float | None = None

    @property
    def peak_flops(self) -> float | None:
        return self.peak.flops if self.peak is not None else None

    def resolve_peak(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Peak | None:
        """The peak MFU is counted against (looked up or measured on the first call), or None when
        MFU is off or the look-up failed."""
        if self.show_mfu and self.peak is None:
            device, dtype = pl_module.device, precision_dtype(trainer.precision)
            try:
                self.peak = peak_flops(device, dtype)
                self._peak_dtype = (device, dtype)
            except Exception:  # noqa: BLE001 - a speed display must never stop training
                self.show_mfu = False
        if self._devices is None:
            self._devices = peak_devices(trainer, pl_module.device)
        return self.peak if self.show_mfu else None

    def describe_peak(self) -> str | None:
        """``989 TFLOP/s (bf16, NVIDIA H100 SXM dense bf16, datasheet)``, ``8 x ...`` for 8 GPUs: what
        MFU is a share of, and where that number comes from."""
        if not self.show_mfu or self.peak is None:
            return None
        devices = self._devices or 1
        return (f"{devices} x " if devices > 1 else "") + self.peak.describe()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.resolve_peak(trainer, pl_module)

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
            if self._devices is None:
                self._devices = peak_devices(trainer, getattr(pl_module, "device", None))
            self.mfu = mfu(self.tokens_per_sec, self._flops_per_token, self.peak_flops * self._devices)
            if self.mfu > 1 and self.peak.measured and len(self._marks) == self._marks.maxlen:
                self._raise_peak(trainer)
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

    def _raise_peak(self, trainer: L.Trainer) -> None:
        """The measured peak read low: a whole window of training steps went faster. Raise it to what
        they reached (and cache that), and say so."""
        old, achieved = self.peak, self.tokens_per_sec * self._flops_per_token / self._devices
        self.peak = Peak(achieved, old.math, f"{old.source}; raised to what training reached", True)
        if self._peak_dtype is not None:  # looked up here: the cache gets the higher reading too
            try:
                self.peak = raise_peak(old, achieved, *self._peak_dtype)
            except Exception:  # noqa: BLE001 - a speed display must never stop training
                pass
        self.mfu = mfu(self.tokens_per_sec, self._flops_per_token, self.peak_flops * self._devices)
        if getattr(trainer, "is_global_zero", True):
            print(
                f"MFU: training reached {format_flops(achieved)}, {achieved / old.flops:.2f}x the measured "
                f"peak of {format_flops(old.flops)}: the probe read low, and the peak is raised to that",
                flush=True,
            )
