"""What ``nexttoken fit`` prints while it runs: a short summary at the start, then, where no
progress bar is shown (output to a log file, a batch job, ``nohup``), a plain line every so often
and each validation's numbers as they come::

    step 200/800  loss 4.8123  13,201 tok/s  MFU 4.1%  elapsed 0:01:23  ETA 0:04:10
    validation at step 200: loss 4.6012, perplexity 99.61, bits per byte 1.9912

In a terminal Lightning's progress bar shows the same numbers (:class:`StepProgressBar` labels it
for a run counted in steps). Everything here prints on rank 0 only.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar, Timer
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.trainer.states import TrainerFn

from nexttoken.data.parallel import available_cores
from nexttoken.errors import parameter_name, setting, spelled
from nexttoken.peak import Peak
from nexttoken.training.optim import decay_audit
from nexttoken.training.threads import AutoThreads, fastest_num_threads, threads_set_by_user
from nexttoken.training.throughput import ThroughputCallback


def clock_time(seconds: float) -> str:
    """``seconds`` as ``h:mm:ss``."""
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02}:{seconds % 60:02}"


class ProgressLog(L.Callback):
    """A plain progress line every ``every_n_steps`` optimizer steps or ``every_seconds`` seconds,
    whichever comes first, and at the last step; each validation's numbers during ``fit``; and, bar
    or no bar, a line when training stops before its last step (and why, for a time limit).

    It prints only when the trainer shows no progress bar. Tokens/s and MFU are those of the
    trainer's :class:`~nexttoken.training.throughput.ThroughputCallback`; the ETA is the time per step so
    far (validation included) times the steps left, or the time limit's remainder if that is sooner.

    Args:
        every_n_steps: optimizer steps between lines.
        every_seconds: seconds of wall time after which the next step prints a line anyway.
        stream: where lines go (default: ``sys.stdout`` at the time of printing).
        clock: seconds from a monotonic clock.
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        every_seconds: float = 30.0,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        if every_n_steps < 1 or every_seconds <= 0:
            raise ValueError(
                f"every_n_steps and every_seconds must be positive, got {every_n_steps}, {every_seconds}"
            )
        self.every_n_steps = every_n_steps
        self.every_seconds = every_seconds
        self.stream = stream
        self.clock = clock
        self._started = self._last_line = 0.0
        self._first_step = self._last_step = 0

    def _active(self, trainer: L.Trainer) -> bool:
        return trainer.is_global_zero and trainer.progress_bar_callback is None

    def _print(self, line: str) -> None:
        print(line, file=self.stream or sys.stdout, flush=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = self._last_line = self.clock()
        self._first_step = self._last_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step or not self._active(trainer):
            return  # a micro-batch that ended no optimizer step
        self._last_step = step
        now = self.clock()
        total = _total_steps(trainer)
        if step % self.every_n_steps and now - self._last_line < self.every_seconds and step != total:
            return
        self._last_line = now
        elapsed = now - self._started
        parts = [f"step {step}/{total}" if total else f"step {step}"]
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            parts.append(f"loss {float(loss):.4f}")
        speed = next((c for c in trainer.callbacks if isinstance(c, ThroughputCallback)), None)
        if speed is not None and speed.tokens_per_sec is not None:
            parts.append(f"{speed.tokens_per_sec:,.0f} tok/s")
            if speed.mfu is not None:
                parts.append(f"MFU {speed.mfu:.1%}")
        parts.append(f"elapsed {clock_time(elapsed)}")
        eta = elapsed / (step - self._first_step) * (total - step) if total else None
        timer = _timer(trainer)
        left = timer.time_remaining() if timer is not None else None
        if left is not None:
            eta = left if eta is None else min(eta, left)
        if eta is not None:
            parts.append(f"ETA {clock_time(eta)}")
        self._print("  ".join(parts))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Said with or without a progress bar: Lightning's own line for it is off (nexttoken.console).
        total, step = _total_steps(trainer), trainer.global_step
        if not trainer.is_global_zero or total is None or step >= total:
            return
        timer = _timer(trainer)
        if timer is not None and timer.time_remaining() is not None and timer.time_remaining() <= 0:
            self._print(f"training stopped at step {step} of {total}: the time limit was reached")
        else:
            self._print(f"training stopped at step {step} of {total}")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING or not self._active(trainer):
            return
        metrics = trainer.callback_metrics
        numbers = [
            f"{label} {float(metrics[key]):{spec}}"
            for key, label, spec in (
                ("val/loss", "loss", ".4f"),
                ("val/perplexity", "perplexity", ".2f"),
                ("val/bits_per_byte", "bits per byte", ".4f"),
            )
            if key in metrics
        ]
        if numbers:
            self._print(f"validation at step {trainer.global_step}: {', '.join(numbers)}")


def _total_steps(trainer: L.Trainer) -> int | None:
    total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
    return int(total) if math.isfinite(total) else None


def _timer(trainer: L.Trainer) -> Timer | None:
    return next((c for c in trainer.callbacks if isinstance(c, Timer)), None)


class StartSummary(L.Callback):
    """Prints what this run is, once the model is built and its schedule set (``on_fit_start``):
    the data, the model, the precision, the peak FLOP/s that MFU is counted against and where it comes
    from, the weight-decay audit, notes on the schedule, the run folder.

    Args:
        precision: the precision line (what was chosen, and why), which only the command line knows.
        time_limit: a note on the time limit, when one applies.
        spell: how the command writes the settings the notes name (:func:`nexttoken.errors.setting`).
    """

    def __init__(
        self, precision: str, time_limit: str | None = None, spell: Callable[[str], str] = parameter_name
    ) -> None:
        super().__init__()
        self.precision = precision
        self.time_limit = time_limit
        self.spell = spell

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            lines = start_summary(trainer, pl_module, trainer.datamodule, self.precision, self.time_limit)
            print(spelled("\n".join(lines), self.spell), flush=True)


def start_summary(
    trainer: L.Trainer, module: L.LightningModule, data: Any, precision: str, time_limit: str | None = None
) -> list[str]:
    """The summary's lines for a :class:`~nexttoken.training.module.CausalLMModule` being trained on a
    :class:`~nexttoken.data.datamodule.TextDataModule` that is set up."""
    audit = decay_audit(module.model, getattr(module, "hparams", {}).get("optimizer", "adamw"))
    notes = [*getattr(module, "schedule_notes", []), *([time_limit] if time_limit else [])]
    speed = next((c for c in trainer.callbacks if isinstance(c, ThroughputCallback)), None)
    peak = speed.describe_peak() if speed is not None and speed.resolve_peak(trainer, module) else None
    lines = [
        *data_lines(data, validation_time(trainer, module, data, peak=speed.peak if peak else None)),
        f"model: {module.model_summary_line()}",
        *([module.lora_summary(audit)] if getattr(module, "lora", None) is not None else []),
        *([module.objective_line()] if getattr(module, "preference", False) else []),
        precision,
        # Once here, not on every progress line: what the MFU shown during the run is a share of.
        *([f"MFU peak: {peak}"] if peak is not None else []),
        *([f"compile: on ({module.compile_reason})"] if getattr(module, "compiled", False) else []),
        f"weight decay: {audit.summary()}",
        *([line] if (line := getattr(module, "optimizer_summary", lambda _: None)(audit)) else []),
        *[f"note: {note}" for note in notes],
    ]
    if trainer.logger is not None:
        lines.append(f"run folder: {trainer.logger.log_dir}")
    return lines


def validation_time(
    trainer: L.Trainer, module: L.LightningModule, data: Any, peak: Peak | None = None
) -> str | None:
    """About how long one validation of plain text takes, and how that was found: one validation
    batch's forward pass timed now (:func:`_time_forward`) times the batches each process runs; where the model is sharded or compiled (a forward here would not be the
    validation's), its forward FLOPs (a third of a training step's) at the device's peak, a lower
    bound; None when neither can be had. It never stops a run."""
    if data.examples is not None or data.cache is None:
        return None
    hp = data.hparams
    rows, width = hp.val_batch_size or hp.batch_size, hp.block_size
    blocks = math.ceil(data.scored_val_targets / width)
    batches = math.ceil(math.ceil(blocks / trainer.world_size) / rows)  # per process, as val_batches
    try:
        if isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)) and not getattr(
            module, "compiled", False
        ):
            seconds = _time_forward(trainer, module, rows, width)
            return (
                f"about {_duration(seconds * batches)} (a batch's forward timed now, x {batches:,} batches)"
            )
        if peak is not None:
            flops = module.model.flops_per_token(width) / 3 * rows * width * batches
            return f"at least {_duration(flops / peak.flops)} (its forward FLOPs at the peak)"
    except Exception:  # noqa: BLE001 - an estimate must never stop training
        return None
    return None


def _time_forward(trainer: L.Trainer, module: L.LightningModule, rows: int, width: int) -> float:
    """Seconds of one validation batch's forward pass, from a quarter of its rows (the cost per row is
    the same; on a CPU it keeps this to well under a second for a small model). On a CPU that
    :class:`~nexttoken.training.threads.AutoThreads` will tune, under each thread count it chooses
    from, the faster one: validation runs under its choice, and on a shared machine the other
    count can be several times slower. The thread count is left as it was."""
    device = module.device
    part = max(1, rows // 4)
    tokens = torch.zeros((part, width), dtype=torch.long, device=device)

    def forward() -> None:
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            module.nll_sum(tokens, tokens)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    tuned = device.type == "cpu" and trainer.world_size == 1 and not threads_set_by_user()
    candidates = sorted({1, available_cores()}) if tuned else [torch.get_num_threads()]
    original = torch.get_num_threads()
    # Any dropout draws from a forked generator: the run's own random numbers are untouched.
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            forward()  # warm-up: first-call allocations, kernel selection
            _, medians = fastest_num_threads(forward, candidates, repeats=3)
    finally:
        torch.set_num_threads(original)
    if tuned:  # the thread count's own probe at the first step would time the same again
        for callback in trainer.callbacks:
            if isinstance(callback, AutoThreads):
                callback.use_timings(medians, "a validation batch's forward")
    return min(medians.values()) * rows / part


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{max(seconds, 0.1):.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    return clock_time(seconds)


def data_lines(data: Any, time_note: str | None = None) -> list[str]:
    """What the data is: the format ``data.format`` chose (when there was a choice), the split's
    sizes and the cache, and what one validation scores (``time_note``: about how long it takes);
    for chat/instruction data, the examples and what fitting them to the block dropped or cut."""
    lines = [data.format_line] if data.format_line else []
    if data.examples is not None:
        examples = data.examples
        cache = "reused" if data.cache_hit else f"built in {examples.meta['seconds']:.1f} s"
        train, val = examples.counts("train"), examples.counts("val")
        if data.data_format == "preference":  # two examples per pair, chosen and rejected
            lines.append(
                f"data: train {_count(train.examples // 2, 'pair')} ({train.response_tokens:,} reply tokens, "
                f"{train.prompt_tokens_ignored:,} prompt tokens ignored); validation "
                f"{_count(val.examples // 2, 'pair')} ({val.response_tokens:,} reply tokens); "
                f"{'packed' if data.hparams.packing else 'padded'} rows of {data.hparams.block_size} tokens; "
                f"example cache {cache} ({examples.directory})"
            )
            return lines + examples.fit_report().lines()
        lines.append(
            f"data: train {_count(train.examples, 'example')} ({train.response_tokens:,} response tokens, "
            f"{train.prompt_tokens_ignored:,} prompt tokens ignored); validation "
            f"{_count(val.examples, 'example')} ({val.response_tokens:,} response tokens, "
            f"{val.response_bytes:,} bytes); {'packed' if data.hparams.packing else 'padded'} rows of "
            f"{data.hparams.block_size} tokens; example cache {cache} ({examples.directory})"
        )
        scored, held_out = data.scored_val_counts(), val.examples
        what = (
            f"validation: the first {_count(scored.examples, 'example')} of the {held_out:,} held-out"
            if scored.examples < held_out
            else f"validation: all {_count(held_out, 'held-out example')}"
        )
        what += f" ({scored.response_tokens:,} response tokens, {scored.response_bytes:,} bytes)"
        if scored.examples < held_out:
            what += f"; {setting('data.val_tokens')} all scores every one"
        return [*lines, what, *examples.fit_report().lines(), *_trust_lines(data)]
    meta = data.cache.read_meta()
    cache = "reused" if data.cache_hit else f"built in {meta['seconds']:.1f} s"
    lines.append(
        f"data: train {_count(meta['train_documents'], 'document')}, {meta['train_tokens']:,} tokens; "
        f"validation {_count(meta['val_documents'], 'document')}, {meta['val_tokens']:,} tokens "
        f"({meta['val_bytes']:,} bytes); token cache {cache} ({data.cache.directory})"
    )
    scored, held_out = data.scored_val_targets, data.val_targets
    capped = scored < held_out
    what = (
        f"validation: the first {scored:,} of the {held_out:,} held-out tokens"
        if capped
        else f"validation: all {held_out:,} held-out tokens"
    )
    what += f" ({data.scored_val_bytes:,} bytes)"
    what += f", {time_note} each time" if time_note else ""
    if capped:
        what += f"; {setting('data.val_tokens')} all scores every one"
    lines.append(what)
    return lines + _trust_lines(data)


def _trust_lines(data: Any) -> list[str]:
    """The held-out text's overlap with training, duplicates, what starts a document (the data's own words)."""
    return data.trust_report()[0] if hasattr(data, "trust_report") else []


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar, labelled ``train`` when the run is counted in steps (Lightning
    writes "Epoch 0/-2" there), without the logger's version number."""

    def _get_train_description(self, current_epoch: int) -> str:  # Lightning's hook for the label
        if self.trainer.max_epochs is not None and self.trainer.max_epochs < 0:
            return f"{'train':{len(self.validation_description)}}"
        return super()._get_train_description(current_epoch)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items
