"""The checkpoint at the start of a warmup-stable-decay run's decay (``decay-start.ckpt`` beside
the run's other checkpoints): the weights and training state from which the run can be continued
with a decay of another length (``nexttoken.schedule.WarmupStableDecay``, docs/training.md)."""

from __future__ import annotations

from pathlib import Path

import lightning as L

DECAY_START_FILE = "decay-start.ckpt"


def decay_start_path(trainer: L.Trainer) -> Path:
    """Where the run keeps it: its checkpoints folder (or the run folder without one)."""
    callback = trainer.checkpoint_callback
    folder = getattr(callback, "dirpath", None) or (trainer.log_dir or trainer.default_root_dir)
    return Path(folder) / DECAY_START_FILE


class DecayStartCheckpoint(L.Callback):
    """Saves the checkpoint once, after the optimizer step the decay starts from (the step whose next
    update is the first below the peak; on a clock, known only when it comes). Written through the
    trainer, so through its atomic checkpoint writer; a run continued from it does not write it again
    (its schedule already knows where the decay started)."""

    def __init__(self) -> None:
        self.saved: Path | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.saved is not None or not trainer.lr_scheduler_configs:
            return
        schedule = trainer.lr_scheduler_configs[0].scheduler
        # The schedule has stepped for this optimizer step: it marks the start once it reaches it.
        if getattr(schedule, "decay_start_step", None) == trainer.global_step and trainer.global_step > 0:
            path = decay_start_path(trainer)
            if not path.exists():  # a resumed run that passes the start again keeps the first one
                trainer.save_checkpoint(path)
            self.saved = path
