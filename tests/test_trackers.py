"""`--trainer.logger`: TensorBoard and MLflow beside the run's CSV, the same metric names in each, and
`train/tokens_seen` counted exactly, across a resume too."""

import csv
import json
from pathlib import Path

import pytest
import torch

from nexttoken.cli import main
from nexttoken.training import trackers
from test_cli import fit_args, write_corpus

STEPS, ACCUMULATE, BATCH, BLOCK = 6, 2, 4, 32  # fit_args' batch and block; every target is scored
# The names every logger gets (docs/trackers.md).
TRAIN_NAMES = {
    "train/loss",
    "train/lr",
    "train/lr_decay",
    "train/lr_no_decay",
    "train/grad_norm",
    "train/tokens_seen",
    "train/tokens_per_sec",
    "train/mfu",
}
VAL_NAMES = {"val/loss", "val/perplexity", "val/bits_per_byte"}


def tokens_trained(steps: int, accumulate: int = 1) -> int:
    """The scored tokens of the training batches of ``steps`` optimizer steps: with the bytes tokenizer
    and packed blocks every target is scored, so each micro-batch scores batch_size x block_size."""
    return steps * accumulate * BATCH * BLOCK


def csv_series(run: Path) -> dict[str, dict[int, float]]:
    series: dict[str, dict[int, float]] = {}
    with open(run / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            for name, value in row.items():
                if name not in ("step", "epoch") and value:
                    series.setdefault(name, {})[int(row["step"])] = float(value)
    return series


def tensorboard_series(folder: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def mlflow_series(store: Path) -> dict[str, dict[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    [experiment] = [e for e in client.search_experiments() if e.name == "nexttoken"]
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == store.parent.name  # version_0
    return {
        name: {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
        for name in run.data.metrics
    }


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus")


def test_tensorboard_and_mlflow_get_the_csv_metrics_in_the_run_folder(corpus, tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    root = tmp_path / "runs"
    args = fit_args(
        corpus,
        root,
        tmp_path / "cache",
        STEPS,
        "--trainer.accumulate_grad_batches",
        str(ACCUMULATE),
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.logger",
        "[CSVLogger, TensorBoardLogger, MLFlowLogger]",
    )
    assert main(args) == 0
    run = root / "version_0"
    assert sorted(p.name for p in root.iterdir()) == ["version_0"]  # everything in the run folder
    report = json.loads((run / "report.json").read_text())
    assert report["tokens_seen"] == tokens_trained(STEPS, ACCUMULATE)
    logged = {
        "csv": csv_series(run),
        "tensorboard": tensorboard_series(run / "tensorboard"),
        "mlflow": mlflow_series(run / "mlruns"),
    }
    last = STEPS - 1  # the step a logger files optimizer step N under is N - 1
    for name, series in logged.items():
        assert TRAIN_NAMES | VAL_NAMES <= set(series), (name, TRAIN_NAMES | VAL_NAMES - set(series))
        # Every optimizer step's scored tokens (all of its micro-batches), counted independently.
        assert series["train/tokens_seen"] == {
            step: tokens_trained(step + 1, ACCUMULATE) for step in range(STEPS)
        }, name
        assert series["train/grad_norm"][last] > 0, name
        assert series["train/lr"] == series["train/lr_decay"] == series["train/lr_no_decay"], name
        # The last validation is the report's (the final weights on the whole held-out split).
        final_val = max(series["val/loss"])
        assert final_val == STEPS, name
        for metric in ("loss", "perplexity", "bits_per_byte"):
            assert series[f"val/{metric}"][final_val] == pytest.approx(report["validation"][metric], rel=1e-5)
    for name in TRAIN_NAMES | VAL_NAMES:  # the same numbers in every logger (TensorBoard keeps float32)
        for step, value in logged["csv"][name].items():
            assert logged["tensorboard"][name][step] == pytest.approx(value, rel=1e-6), (name, step)
            assert logged["mlflow"][name][step] == pytest.approx(value, rel=1e-6), (name, step)


def test_a_tracker_alone_keeps_the_csv_first(corpus, tmp_path):
    pytest.importorskip("tensorboard")
    root = tmp_path / "runs"
    args = fit_args(
        corpus,
        root,
        tmp_path / "cache",
        3,
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.logger",
        "TensorBoardLogger",
    )
    assert main(args) == 0
    run = root / "version_0"
    assert (run / "metrics.csv").is_file() and (run / "curves.png").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert "train/tokens_seen" in tensorboard_series(run / "tensorboard")


def test_a_tracker_without_its_package_is_one_line_and_writes_nothing(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(trackers, "module_installed", lambda name: False)
    root, cache = tmp_path / "runs", tmp_path / "cache"
    for logger, extra in (("TensorBoardLogger", "tensorboard"), ("[CSVLogger, MLFlowLogger]", "mlflow")):
        assert main(fit_args(corpus, root, cache, 3, "--trainer.logger", logger)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert err.startswith("error: --trainer.logger ")
        assert err.endswith(f'pip install "nexttoken[{extra}]"'), err
    assert not root.exists() and not cache.exists()


def test_tokens_seen_continues_across_a_resume(corpus, tmp_path):
    cache = tmp_path / "cache"
    full_root, cut_root = tmp_path / "full", tmp_path / "cut"
    # Interrupted at a validation step (every 5): where a real run's last.ckpt is written.
    steps, stop_at = 12, 10
    assert main(fit_args(corpus, full_root, cache, steps, "--trainer.log_every_n_steps", "1")) == 0
    stop = ["--trainer.callbacks+=test_cli.StopAtStep", f"--trainer.callbacks.step={stop_at}"]
    assert main(fit_args(corpus, cut_root, cache, steps, "--trainer.log_every_n_steps", "1", *stop)) == 0
    checkpoint = torch.load(cut_root / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == stop_at and checkpoint["tokens_seen"] == tokens_trained(stop_at)
    resume = ["--trainer.log_every_n_steps", "1", "--ckpt_path", "last"]
    assert main(fit_args(corpus, cut_root, cache, steps, *resume)) == 0
    full = csv_series(full_root / "version_0")["train/tokens_seen"]
    resumed = csv_series(cut_root / "version_0")["train/tokens_seen"]
    assert full[steps - 1] == tokens_trained(steps)
    assert resumed == full
    report = json.loads((cut_root / "version_0" / "report.json").read_text())
    assert report["tokens_seen"] == tokens_trained(steps)
