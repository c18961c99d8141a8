"""nexttoken's per-step values reach ``self.log`` only when the logger writes, at the last step, or
when the progress bar is due (``nexttoken.training.throughput.LogThrottle``)."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from nexttoken.training.log_throttle import LogThrottle
from nexttoken.training.module import CausalLMModule
from nexttoken.training.throughput import ThroughputCallback


@pytest.mark.parametrize("seconds, expected", [(1e9, [1, 10, 20, 25]), (0.0, list(range(1, 26)))])
def test_per_step_logging_follows_the_logger_steps(monkeypatch, seconds, expected):
    monkeypatch.setattr(LogThrottle.__init__, "__defaults__", (seconds,))
    logged: dict[str, list[int]] = {}
    original = CausalLMModule.log

    def spy(self, name, value, *args, **kwargs):
        logged.setdefault(name, []).append(self.trainer.global_step)
        return original(self, name, value, *args, **kwargs)

    monkeypatch.setattr(CausalLMModule, "log", spy)
    torch.manual_seed(0)
    module = CausalLMModule(model="tiny", vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 32, (2, 8), generator=g), torch.randint(0, 32, (2, 8), generator=g))] * 25
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=25,
        log_every_n_steps=10,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[ThroughputCallback(peak_flops=1e9)],
    )
    trainer.fit(module, DataLoader(data, batch_size=None))
    # The first step (for the progress bar), the logger's steps and the last. The module logs in
    # on_before_optimizer_step (global_step not yet counting the step), the
    # throughput callback after it.
    assert [s + 1 for s in logged["train/loss"]] == expected
    assert logged["train/tokens_per_sec"] == expected
