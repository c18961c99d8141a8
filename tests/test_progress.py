"""Plain progress lines (a fake clock, a fake non-terminal stream), the start summary, the bar's label."""

import io
import math
import types

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Timer
from torch.utils.data import DataLoader

from nexttoken.loss import next_token_loss
from nexttoken.training import log_throttle, throughput
from nexttoken.training.module import CausalLMModule
from nexttoken.training.progress import ProgressLog, StepProgressBar, clock_time
from nexttoken.training.throughput import ThroughputCallback

STEPS, BATCH, BLOCK, VOCAB = 6, 2, 8, 32


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class EachStepTakesOneSecond(L.Callback):
    """First in the callback list: the clock moves before the others read it at a batch's end."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    def on_train_batch_end(self, *args) -> None:
        self.clock.now += 1.0


def _data():
    g = torch.Generator().manual_seed(0)
    train = [
        (
            torch.randint(0, VOCAB, (BATCH, BLOCK), generator=g),
            torch.randint(0, VOCAB, (BATCH, BLOCK), generator=g),
        )
        for _ in range(STEPS)
    ]
    val = [
        (
            torch.randint(0, VOCAB, (3, BLOCK), generator=g),
            torch.randint(0, VOCAB, (3, BLOCK), generator=g),
            torch.tensor([5, 7, 9]),
        )
        for _ in range(2)
    ]
    return train, val


def _fit(monkeypatch, progress_bar: bool, *extra_callbacks: L.Callback):
    clock = FakeClock()
    for callback in extra_callbacks:
        callback.clock = clock
    monkeypatch.setattr(throughput, "time", types.SimpleNamespace(perf_counter=clock))
    monkeypatch.setattr(log_throttle, "time", types.SimpleNamespace(perf_counter=clock))
    torch.manual_seed(0)
    # lr 0: the weights stay as initialised, so every step's loss can be computed here afterwards.
    module = CausalLMModule(
        model="tiny",
        vocab_size=VOCAB,
        block_size=BLOCK,
        n_layer=1,
        n_head=2,
        n_embd=16,
        lr=0.0,
        warmup_steps=1,
    )
    module.configure_model()
    peak = 1600 * module.model.flops_per_token(BLOCK)  # 16 tokens/s at this peak is an MFU of 1%
    stream = io.StringIO()
    log = ProgressLog(every_n_steps=4, every_seconds=2.5, stream=stream, clock=clock)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        val_check_interval=3,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress_bar,
        callbacks=[EachStepTakesOneSecond(clock), ThroughputCallback(peak_flops=peak), log, *extra_callbacks],
    )
    train, val = _data()
    trainer.fit(module, DataLoader(train, batch_size=None), DataLoader(val, batch_size=None))
    return module, stream.getvalue().splitlines(), train, val


def test_lines_for_a_short_fit_without_a_terminal(monkeypatch):
    module, lines, train, val = _fit(monkeypatch, progress_bar=False)
    with torch.no_grad():
        loss = [next_token_loss(module.model(x), y).item() for x, y in train]
        nll = sum(next_token_loss(module.model(x), y, reduction="sum").item() for x, y, _ in val)
    tokens = sum(y.numel() for _, y, _ in val)
    n_bytes = sum(b.sum().item() for _, _, b in val)
    validation = (
        f"loss {nll / tokens:.4f}, perplexity {math.exp(nll / tokens):.2f}, "
        f"bits per byte {nll / (math.log(2) * n_bytes):.4f}"
    )
    # 1 s per step, 16 tokens per step: 16 tok/s, MFU 1%. A line every 2.5 s or 4 steps, and the
    # last step; the sanity check's validation prints nothing, the two real ones print their numbers.
    assert lines == [
        f"step 3/6  loss {loss[2]:.4f}  16 tok/s  MFU 1.0%  elapsed 0:00:03  ETA 0:00:03",
        f"validation at step 3: {validation}",
        f"step 4/6  loss {loss[3]:.4f}  16 tok/s  MFU 1.0%  elapsed 0:00:04  ETA 0:00:02",
        f"step 6/6  loss {loss[5]:.4f}  16 tok/s  MFU 1.0%  elapsed 0:00:06  ETA 0:00:00",
        f"validation at step 6: {validation}",
    ]


def test_no_lines_where_a_progress_bar_is_shown(monkeypatch):
    _, lines, _, _ = _fit(monkeypatch, progress_bar=True)
    assert lines == []


class StopAfterStep(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        trainer.should_stop = trainer.global_step >= self.step


class TimeLimitOnTheFakeClock(Timer):
    """Lightning's time limit (2.5 s), measured on the test's clock."""

    def __init__(self) -> None:
        super().__init__(duration={"seconds": 2.5})

    def time_elapsed(self, stage: str = "train") -> float:
        return self.clock.now


@pytest.mark.parametrize("progress_bar", [False, True])
@pytest.mark.parametrize(
    "stopper, last_line",
    [
        (StopAfterStep(4), "training stopped at step 4 of 6"),
        (TimeLimitOnTheFakeClock(), "training stopped at step 3 of 6: the time limit was reached"),
    ],
    ids=["stopped", "time-limit"],
)
def test_a_run_that_stops_early_says_so(monkeypatch, progress_bar, stopper, last_line):
    _, lines, _, _ = _fit(monkeypatch, progress_bar, stopper)
    assert lines[-1] == last_line
    assert sum(line.startswith("training stopped") for line in lines) == 1


def test_clock_time():
    assert [clock_time(s) for s in (0, 59.4, 61, 3600 + 62, 36000)] == [
        "0:00:00",
        "0:00:59",
        "0:01:01",
        "1:01:02",
        "10:00:00",
    ]


@pytest.mark.parametrize("max_steps, max_epochs, label", [(5, -1, "train"), (-1, 2, "Epoch 0/1")])
def test_progress_bar_label_for_a_run_counted_in_steps(max_steps, max_epochs, label):
    pytest.importorskip("rich")
    # max_epochs -1 is what Lightning makes of a run given only max_steps (it wrote "Epoch 0/-2").
    trainer = L.Trainer(max_steps=max_steps, max_epochs=max_epochs, logger=False)
    bar = StepProgressBar()
    bar._trainer = trainer
    assert bar._get_train_description(0).strip() == label
