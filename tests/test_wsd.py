"""Warmup-stable-decay: the formula by hand, the decay's start (its checkpoint), and a run continued
from it with another decay length."""

import math

import pytest
import torch

from nexttoken.cli import main
from nexttoken.schedule import WarmupStableDecay
from test_cli import fit_args, metric_rows, write_corpus

LR, MIN_RATIO = 1e-2, 0.1


def wsd_by_hand(step: int, *, warmup: int, decay_start: int, decay_length: int) -> float:
    """The multiplier at ``step``: linear warmup, 1 until ``decay_start``, then 1 - sqrt to MIN_RATIO."""
    if step < warmup:
        return (step + 1) / warmup
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / decay_length)
    return MIN_RATIO + (1 - MIN_RATIO) * (1 - math.sqrt(progress))


def schedule(**settings):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    return optimizer, WarmupStableDecay(optimizer, min_lr_ratio=MIN_RATIO, **settings)


def run(optimizer, sched, steps, clock=None, seconds_per_step=None):
    """The lr of each step, stepping the schedule as Lightning does (once per optimizer step)."""
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if clock is not None:
            clock.used += seconds_per_step
        sched.step()
    return lrs


@pytest.mark.parametrize("fraction, start", [(0.2, 81), (0.25, 76), (1.0, 4)])
def test_steps_follow_the_formula_and_mark_the_decay_start(fraction, start):
    # 100 steps, warmup 4: the decay is round(fraction x 96) steps at the end.
    optimizer, sched = schedule(warmup_steps=4, max_steps=100, decay_fraction=fraction)
    lrs = run(optimizer, sched, 100)
    for step, lr in enumerate(lrs):
        expected = wsd_by_hand(step, warmup=4, decay_start=start, decay_length=100 - start)
        assert lr == pytest.approx(LR * expected), step
    assert sched.decay_start_step == start
    assert lrs[start] == pytest.approx(LR) and lrs[start + 1] < LR  # the last update at the peak, then down


def test_decay_steps_is_the_run_s_last_steps():
    optimizer, sched = schedule(warmup_steps=2, max_steps=30, decay_steps=7)
    lrs = run(optimizer, sched, 30)
    assert lrs == pytest.approx(
        [LR * wsd_by_hand(s, warmup=2, decay_start=23, decay_length=7) for s in range(30)]
    )
    assert sched.decay_start_step == 23


class FakeClock:
    def __init__(self):
        self.used = 0.0

    def __call__(self):
        return self.used


def test_the_clock_decays_the_last_fraction_of_the_time():
    # 1% of the time per step, no step limit: warmup ends at 4%, decay starts at 4% + 0.8 x 96% = 80.8%.
    clock = FakeClock()
    optimizer, sched = schedule(warmup_steps=4, max_steps=None, decay_fraction=0.2, clock=clock)
    lrs = run(optimizer, sched, 110, clock, 0.01)
    for step, lr in enumerate(lrs):
        if step < 4:
            assert lr == pytest.approx(LR * (step + 1) / 4)
            continue
        progress = (step * 0.01 - 0.04) / 0.96
        decay = (progress - 0.8) / 0.2
        expected = 1.0 if decay < 0 else MIN_RATIO + (1 - MIN_RATIO) * (1 - math.sqrt(min(1.0, decay)))
        assert lr == pytest.approx(LR * expected, rel=1e-6), step
    assert sched.decay_start_step == 81  # 0.81 >= 0.808 first at step 81
    assert lrs[-1] == pytest.approx(LR * MIN_RATIO)


def test_a_continued_schedule_decays_over_its_own_length():
    # The original run: 100 steps, decay from 81. Its state at the decay's start, restored into a
    # schedule built with another length (decay 40 steps from 81: max_steps 121), follows that length.
    optimizer, original = schedule(warmup_steps=4, max_steps=100, decay_fraction=0.2)  # round(19.2) = 19
    run(optimizer, original, 81)
    state = original.state_dict()
    assert "max_steps" not in state and "decay_steps" not in state and state["decay_start_step"] == 81
    optimizer2, continued = schedule(warmup_steps=50, max_steps=121, decay_steps=40)
    continued.load_state_dict(state)
    assert continued.warmup_steps == 4  # the run's own warmup, from the checkpoint
    optimizer2.param_groups[0]["lr"] = continued.get_lr()[0]
    lrs = run(optimizer2, continued, 40)
    expected = [LR * wsd_by_hand(s, warmup=4, decay_start=81, decay_length=40) for s in range(81, 121)]
    assert lrs == pytest.approx(expected)


@pytest.mark.slow
def test_a_run_continued_from_decay_start_is_the_run_with_that_decay(tmp_path):
    """Run A decays over its last 6 of 13 steps and keeps decay-start.ckpt (step 7); B continues it with
    a 3-step decay; C is a fresh run with that decay (10 steps, the last 3). A's and C's stable phases
    are bit-identical, B's decay is C's, and B's learning rates are the formula's. (Warmup: 1 step in
    each, the cap of a tenth of the run.)"""
    corpus, cache = write_corpus(tmp_path / "corpus", n_docs=4), tmp_path / "cache"
    wsd = ["--model.schedule", "wsd", "--trainer.log_every_n_steps", "1", "--trainer.val_check_interval", "4"]
    a, c = tmp_path / "a", tmp_path / "c"
    assert main(fit_args(corpus, a, cache, 13, *wsd, "--model.decay_fraction", "0.5")) == 0
    start = a / "version_0" / "checkpoints" / "decay-start.ckpt"
    assert torch.load(start, weights_only=True)["global_step"] == 7
    continued = fit_args(corpus, a, cache, 0, *wsd, "--ckpt_path", str(start), "--model.decay_steps", "3")
    at = continued.index("--trainer.max_steps")
    del continued[at : at + 2]  # the continued run ends 3 steps after the checkpoint
    assert main(continued) == 0
    assert main(fit_args(corpus, c, cache, 10, *wsd, "--model.decay_steps", "3")) == 0
    loss_a, loss_c = metric_rows(a / "version_0", "train/loss"), metric_rows(c / "version_0", "train/loss")
    loss_b, lr_b = metric_rows(a / "version_1", "train/loss"), metric_rows(a / "version_1", "train/lr")
    assert all(loss_a[s] == loss_c[s] for s in range(7)) and loss_a[7] != loss_c[8]
    assert sorted(loss_b) == [7, 8, 9] and all(loss_b[s] == loss_c[s] for s in (7, 8, 9))
    peak = 3e-3
    for step, lr in lr_b.items():
        assert lr == pytest.approx(
            peak * wsd_by_hand(step, warmup=1, decay_start=7, decay_length=3), rel=1e-6
        )
