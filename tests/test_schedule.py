import io
import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from nexttoken.schedule import WarmupCosine, cosine, timer_clock
from nexttoken.training.module import CausalLMModule

LR, MIN_RATIO = 1e-2, 0.1


def warmup_cosine(step: int, *, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """The formula by hand: learning-rate multiplier of a step schedule: linear warmup to 1, then cosine down to ``min_lr_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if max_steps <= warmup_steps:
        return 1.0
    return cosine((step - warmup_steps) / (max_steps - warmup_steps), min_lr_ratio)


class FakeClock:
    """The share of a time budget used, set by the test."""

    def __init__(self):
        self.used = 0.0

    def __call__(self):
        return self.used


def schedule(max_steps=None, clock=None, warmup=4):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    return optimizer, WarmupCosine(
        optimizer, warmup_steps=warmup, max_steps=max_steps, min_lr_ratio=MIN_RATIO, clock=clock
    )


def lr(optimizer):
    return optimizer.param_groups[0]["lr"]


def test_cosine_by_hand():
    assert cosine(0.0, 0.1) == 1.0
    assert cosine(0.5, 0.1) == pytest.approx(0.55)
    assert cosine(1.0, 0.1) == pytest.approx(0.1)
    assert cosine(7.0, 0.1) == pytest.approx(0.1)  # beyond the end: the floor


def test_steps_only_is_the_step_formula():
    optimizer, sched = schedule(max_steps=20)
    for step in range(25):
        expected = LR * warmup_cosine(step, warmup_steps=4, max_steps=20, min_lr_ratio=MIN_RATIO)
        assert lr(optimizer) == pytest.approx(expected), step
        optimizer.step()
        sched.step()


def test_clock_only_follows_the_time_after_warmup():
    clock = FakeClock()
    optimizer, sched = schedule(clock=clock)
    for step in range(4):  # warmup is in steps, whatever the clock says
        assert lr(optimizer) == pytest.approx(LR * (step + 1) / 4)
        clock.used = 0.05 * (step + 1)
        sched.step()
    # Warmup ended at 0.2 of the budget: the cosine spans the remaining 0.8.
    assert lr(optimizer) == pytest.approx(LR)
    for used in (0.4, 0.6, 1.0, 1.3):
        clock.used = used
        sched.step()
        assert lr(optimizer) == pytest.approx(LR * cosine((used - 0.2) / 0.8, MIN_RATIO))
    assert lr(optimizer) == pytest.approx(LR * MIN_RATIO)  # budget spent: schedule complete


@pytest.mark.parametrize("seconds_per_step, ends_by", [(0.1, "steps"), (10.0, "time")])
def test_steps_and_clock_whichever_runs_out_first(seconds_per_step, ends_by):
    # 100 steps or 100 s; warmup 4 steps. Fast steps end by steps, slow steps by time.
    clock = FakeClock()
    optimizer, sched = schedule(max_steps=100, clock=clock)
    lrs, step = [], 0
    while step < 100 and clock.used < 1.0:
        lrs.append(lr(optimizer))
        step += 1
        clock.used = min(1.0, step * seconds_per_step / 100)
        sched.step()
    assert lr(optimizer) == pytest.approx(LR * MIN_RATIO)  # complete when the run ends, either way
    if ends_by == "steps":
        assert step == 100 and clock.used < 0.2
        expected = [
            LR * warmup_cosine(s, warmup_steps=4, max_steps=100, min_lr_ratio=MIN_RATIO) for s in range(100)
        ]
        assert lrs == pytest.approx(expected)  # exactly the step schedule
    else:
        assert step == 10 and clock.used == 1.0


def test_state_dict_holds_plain_values_and_resumes():
    clock = FakeClock()
    optimizer, sched = schedule(clock=clock)
    for used in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6):
        clock.used = used
        sched.step()
    buffer = io.BytesIO()
    torch.save(sched.state_dict(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert "clock" not in state and state["time_at_warmup_end"] == pytest.approx(0.4)
    optimizer2, resumed = schedule(clock=clock)
    resumed.load_state_dict(state)
    clock.used = 0.8
    sched.step()
    resumed.step()
    assert lr(optimizer2) == pytest.approx(lr(optimizer))


def test_a_schedule_needs_an_end():
    with pytest.raises(ValueError, match="max_steps, a clock"):
        schedule()


def _trainer(**kwargs):
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        **kwargs,
    )


def test_timer_clock_needs_max_time():
    assert timer_clock(_trainer(max_steps=5)) is None
    trainer = _trainer(max_time="00:00:00:30")
    assert timer_clock(trainer)() == 0.0  # not started yet


class SteppingClock(L.Callback):
    """Lightning's Timer reads this fake clock, which moves 0.1 s per training step (deterministic
    on a busy machine); records the lr of every step."""

    def __init__(self):
        self.now = 1000.0
        self.lrs = []

    def monotonic(self):
        return self.now

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.now += 0.1


def test_a_time_bounded_run_ends_with_its_schedule_complete(monkeypatch):
    import types

    import lightning.pytorch.callbacks.timer as timer_module

    clock = SteppingClock()
    monkeypatch.setattr(timer_module, "time", types.SimpleNamespace(monotonic=clock.monotonic))
    torch.manual_seed(0)
    module = CausalLMModule(
        model="tiny",
        vocab_size=32,
        block_size=8,
        n_layer=1,
        n_head=2,
        n_embd=16,
        warmup_steps=2,
        lr=1e-2,
        min_lr=1e-3,
    )
    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 32, (2, 8), generator=g), torch.randint(0, 32, (2, 8), generator=g))] * 1000
    trainer = _trainer(max_time="00:00:00:02", max_steps=-1, callbacks=[clock])
    trainer.fit(module, DataLoader(data, batch_size=None))
    assert not math.isfinite(trainer.estimated_stepping_batches)  # no step limit: the clock alone
    assert trainer.global_step == 20  # 2 s of 0.1 s steps
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3)  # the cosine at its floor
    # Warmup over 2 steps, then the cosine over the remaining 1.8 s.
    expected = [5e-3, 1e-2] + [1e-2 * cosine((0.1 * s - 0.2) / 1.8, 0.1) for s in range(2, 20)]
    assert clock.lrs == pytest.approx(expected)


def test_warmup_cosine_formula():
    assert warmup_cosine(0, warmup_steps=4, max_steps=20, min_lr_ratio=0.1) == pytest.approx(0.25)
    mid = warmup_cosine(12, warmup_steps=4, max_steps=20, min_lr_ratio=0.1)
    assert mid == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine(1000, warmup_steps=4, max_steps=20, min_lr_ratio=0.1) == pytest.approx(0.1)
