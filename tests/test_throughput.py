from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader

import nexttoken.training.throughput as throughput
from nexttoken.training.module import CausalLMModule
from nexttoken.training.throughput import ThroughputCallback, mfu
from test_module import quiet_trainer


def test_mfu_arithmetic():
    # 1,000 tokens/s x 6 MFLOP/token = 6 GFLOP/s achieved, on a 12 GFLOP/s peak: 50 %.
    assert mfu(1_000, 6e6, 12e9) == pytest.approx(0.5)
    assert mfu(0, 6e6, 12e9) == 0
    with pytest.raises(ValueError):
        mfu(1, 1, 0)


class FakeClock:
    """Stands in for ``time.perf_counter`` inside the throughput module: time moves only when told."""

    def __init__(self, now: float) -> None:
        self.now = now

    def perf_counter(self) -> float:
        return self.now


@pytest.mark.parametrize("world_size", [1, 2])
def test_tokens_per_second_is_tokens_over_clock_time(monkeypatch, world_size):
    # Batches of B rows of T tokens; a window of 2 steps; times in exact binary fractions, so every
    # expected value below is exact.
    B, T, peak, flops_per_token = 3, 8, 1e9, 1234
    clock = FakeClock(100.0)
    monkeypatch.setattr(throughput, "time", clock)
    logged: dict[str, list[float]] = {}
    module = SimpleNamespace(
        log=lambda name, value, **kwargs: logged.setdefault(name, []).append(float(value)),
        model=SimpleNamespace(flops_per_token=lambda seq_len: flops_per_token * seq_len),
    )
    trainer = SimpleNamespace(
        world_size=world_size,
        global_step=0,
        max_steps=-1,
        should_stop=False,
        _logger_connector=SimpleNamespace(should_update_logs=True),  # the logger writes every step
    )
    batch = (torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long))
    callback = ThroughputCallback(window=2, peak_flops=peak)
    callback.on_train_start(trainer, module)

    def step(seconds: float) -> float:
        callback.on_train_batch_start(trainer, module, batch, 0)
        clock.now += seconds
        callback.on_train_batch_end(trainer, module, None, batch, 0)
        return callback.tokens_per_sec

    tokens = B * T * world_size  # every position, every process
    assert step(0.5) == tokens / 0.5
    assert step(0.25) == 2 * tokens / 0.75
    assert step(0.25) == 2 * tokens / 0.5  # the window holds the last 2 steps only
    assert callback.mfu == pytest.approx(2 * tokens / 0.5 * flops_per_token * T / peak, rel=1e-12)
    # Validation time is not training time: the clock restarts at the next batch.
    callback.on_validation_start(trainer, module)
    clock.now += 60.0
    assert step(0.125) == tokens / 0.125
    assert logged["train/tokens_per_sec"] == [
        tokens / 0.5,
        2 * tokens / 0.75,
        2 * tokens / 0.5,
        tokens / 0.125,
    ]
    assert logged["ktok/s"][-1] == pytest.approx(tokens / 0.125 / 1000, rel=1e-6)
    assert logged["time/elapsed_sec"][-1] == 61.125  # since training started, validation included
    assert logged["train/mfu"][-1] == pytest.approx(tokens / 0.125 * flops_per_token * T / peak, rel=1e-6)


def test_callback_shows_tokens_per_sec_and_mfu():
    torch.manual_seed(0)
    V, T, B = 32, 8, 2
    module = CausalLMModule(model="tiny", vocab_size=V, block_size=T, n_layer=1, n_head=2, n_embd=16)
    batches = [(torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))) for _ in range(6)]
    callback = ThroughputCallback(window=3, peak_flops=1e9)
    trainer = quiet_trainer(max_steps=6, callbacks=[callback])
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    assert callback.tokens_per_sec > 0
    expected = mfu(callback.tokens_per_sec, module.model.flops_per_token(T), 1e9)
    assert callback.mfu == pytest.approx(expected)
    assert {"ktok/s", "mfu"} <= set(trainer.progress_bar_metrics)
    assert trainer.callback_metrics["train/tokens_per_sec"] == pytest.approx(
        callback.tokens_per_sec, rel=1e-6
    )
