from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader

import nexttoken.training.throughput as throughput
from nexttoken.peak import Peak, peak_flops
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
    # MFU is against the peak of every device the tokens ran on: the same on 1 GPU as on 2.
    assert callback.mfu == pytest.approx(2 * B * T / 0.5 * flops_per_token * T / peak, rel=1e-12)
    assert callback.mfu == pytest.approx(2 * tokens / 0.5 * flops_per_token * T / (peak * world_size))
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
    assert logged["train/mfu"][-1] == pytest.approx(B * T / 0.125 * flops_per_token * T / peak, rel=1e-6)


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


def _fake_run(monkeypatch, callback: ThroughputCallback):
    """A fake trainer and module around ``callback``; returns ``step(seconds)``, which runs one
    training batch of 10 tokens of 10 GFLOP each taking that long."""
    clock = FakeClock(0.0)
    monkeypatch.setattr(throughput, "time", clock)
    module = SimpleNamespace(
        device=torch.device("cpu"),
        log=lambda *args, **kwargs: None,
        model=SimpleNamespace(flops_per_token=lambda seq_len: 1e10),
    )
    trainer = SimpleNamespace(
        world_size=1,
        num_nodes=1,
        precision="bf16-mixed",
        is_global_zero=True,
        global_step=0,
        max_steps=-1,
        should_stop=False,
        _logger_connector=SimpleNamespace(should_update_logs=True),
    )
    batch = (torch.zeros(1, 10, dtype=torch.long),) * 2
    callback.on_fit_start(trainer, module)
    callback.on_train_start(trainer, module)

    def step(seconds: float) -> None:
        callback.on_train_batch_start(trainer, module, batch, 0)
        clock.now += seconds
        callback.on_train_batch_end(trainer, module, None, batch, 0)

    return step


def test_a_run_faster_than_the_measured_peak_raises_it_and_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("NEXTTOKEN_CACHE", str(tmp_path))
    low = Peak(1e11, "bf16", "measured on this CPU: best of 2 thread counts x 3 repeats; cached", True)
    monkeypatch.setattr(throughput, "peak_flops", lambda device, dtype: low)
    callback = ThroughputCallback(window=2)
    step = _fake_run(monkeypatch, callback)
    assert callback.peak is low and callback.describe_peak() == low.describe()
    step(0.5)  # 200 GFLOP/s, twice the peak, over less than a full window: shown as it is
    assert callback.mfu == 2.0 and callback.peak is low
    step(0.5)  # a full window at twice the peak: the probe read low
    assert callback.peak.flops == 2e11 and callback.mfu == 1.0
    assert callback.describe_peak() == (
        "200 GFLOP/s (bf16, measured on this CPU, raised to what a training step reached "
        "(the probe read 100 GFLOP/s); cached)"
    )
    assert capsys.readouterr().out == (
        "MFU: training reached 200 GFLOP/s, 2.00x the measured peak of 100 GFLOP/s: the probe read low, "
        "and the peak is raised to that\n"
    )
    step(1.0)  # slower again: a share of the raised peak
    assert callback.mfu == pytest.approx(20 / 1.5 * 1e10 / 2e11)
    # The next run starts from the raised peak.
    assert peak_flops("cpu", torch.bfloat16).flops == 2e11


def test_a_datasheet_or_given_peak_is_never_raised(monkeypatch, capsys):
    sheet = Peak(1e11, "bf16", "NVIDIA H100 SXM dense bf16, datasheet")
    for given in (sheet, 1e11):
        callback = ThroughputCallback(window=1, peak_flops=given)
        step = _fake_run(monkeypatch, callback)
        step(0.5)
        step(0.5)
        assert callback.mfu == 2.0 and callback.peak_flops == 1e11  # shown as it is, not clamped
    assert capsys.readouterr().out == ""
