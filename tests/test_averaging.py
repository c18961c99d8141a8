"""Weight averaging: the EMA run's validation scores the EMA of the weights (computed here by hand),
and `nexttoken average` writes the average of checkpoints, scored on the run's held-out data."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from nexttoken.cli import main
from nexttoken.commands.fit import run_lightning_cli
from nexttoken.training.averaging import ExponentialMovingAverage
from test_cli import fit_args, metric_rows, write_corpus

DECAY = 0.7
STEPS = 6


class RawWeights(L.Callback):
    """The trained (raw) weights after each optimizer step."""

    def __init__(self) -> None:
        self.after_step: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step not in self.after_step:
            self.after_step[trainer.global_step] = {
                n: p.detach().clone() for n, p in pl_module.model.named_parameters()
            }


def ema_by_hand(after_step: dict[int, dict[str, torch.Tensor]], upto: int) -> dict[str, torch.Tensor]:
    """e_1 = w_1, e_k = DECAY e_(k-1) + (1 - DECAY) w_k (torch.optim.swa_utils' EMA, from the first step)."""
    ema = {n: w.double() for n, w in after_step[1].items()}
    for step in range(2, upto + 1):
        ema = {n: DECAY * ema[n] + (1 - DECAY) * after_step[step][n].double() for n in ema}
    return {n: e.float() for n, e in ema.items()}


def val_loss_by_hand(network, weights: dict[str, torch.Tensor], val_batches) -> float:
    """Token-mean cross-entropy of the held-out batches with ``weights`` in ``network``, by torch."""
    saved = {n: p.detach().clone() for n, p in network.named_parameters()}
    network.load_state_dict(weights, strict=False)
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for input_ids, targets, *_ in val_batches:
            logits = network(input_ids)
            nll += F.cross_entropy(logits.flatten(0, 1).double(), targets.flatten(), reduction="sum").item()
            tokens += int((targets != -100).sum())
    network.load_state_dict(saved, strict=False)
    return nll / tokens


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """A 6-step EMA run (validation at steps 3 and 6, float32) with its raw weights after each step."""
    tmp = tmp_path_factory.mktemp("ema")
    corpus = write_corpus(tmp / "corpus", n_docs=4)
    args = fit_args(corpus, tmp / "runs", tmp / "cache", STEPS, "--model.ema", str(DECAY))
    args[args.index("--trainer.val_check_interval") + 1] = "3"
    cli = run_lightning_cli(
        [*args, "--trainer.precision", "32-true", "--trainer.callbacks+=test_averaging.RawWeights"]
    )
    (raw,) = [c for c in cli.trainer.callbacks if isinstance(c, RawWeights)]
    return cli, raw, tmp / "runs" / "version_0"


def test_validation_scores_the_ema_of_the_weights(ema_run):
    cli, raw, run_dir = ema_run
    assert any(isinstance(c, ExponentialMovingAverage) for c in cli.trainer.callbacks)
    network = cli.model.model
    val = list(cli.datamodule.val_dataloader())
    logged = metric_rows(run_dir, "val/loss")
    for step in (3, STEPS):
        by_hand = val_loss_by_hand(network, ema_by_hand(raw.after_step, step), val)
        on_raw = val_loss_by_hand(network, raw.after_step[step], val)
        assert logged[step - 1] == pytest.approx(by_hand, rel=1e-5), step  # metrics.csv: the step before
        assert abs(on_raw - by_hand) > 1e-3  # the raw weights score otherwise: the test tells them apart
    assert cli.model.last_validation["loss"] == pytest.approx(by_hand, rel=1e-5)
    # After training the model holds the average (the report's sample and score are of it).
    for name, p in network.named_parameters():
        torch.testing.assert_close(p.detach(), ema_by_hand(raw.after_step, STEPS)[name], rtol=1e-5, atol=1e-6)
    report = (run_dir / "report.txt").read_text()
    assert f"weights scored: the EMA of the weights (decay {DECAY:g})" in report


def test_checkpoints_hold_the_ema_and_the_raw_weights(ema_run):
    _, raw, run_dir = ema_run
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    ema = ema_by_hand(raw.after_step, STEPS)
    for name, value in ema.items():
        torch.testing.assert_close(checkpoint["state_dict"][f"model.{name}"], value, rtol=1e-5, atol=1e-6)
        assert torch.equal(checkpoint["current_model_state"][f"model.{name}"], raw.after_step[STEPS][name])


def test_average_writes_the_weighted_average_and_scores_it(ema_run, tmp_path, capsys):
    _, _, run_dir = ema_run
    folder = run_dir / "checkpoints"
    inputs = [folder / "best-3.ckpt", folder / "last.ckpt"]
    if not inputs[0].exists():  # best-N is the better of steps 3 and 6: take the other from the run
        inputs[0] = next(p for p in folder.glob("best-*.ckpt"))
    out = tmp_path / "avg.ckpt"
    capsys.readouterr()
    assert main(["average", *map(str, inputs), str(out), "--weights", "1,3", "--precision", "32-true"]) == 0
    printed = capsys.readouterr().out
    states = [torch.load(p, weights_only=True)["state_dict"] for p in inputs]
    averaged = torch.load(out, weights_only=True)
    for name, value in averaged["state_dict"].items():
        by_hand = (states[0][name].double() + 3 * states[1][name].double()) / 4
        torch.testing.assert_close(value, by_hand.float(), rtol=0, atol=1e-7)
    assert "current_model_state" not in averaged and averaged["global_step"] == STEPS
    # The last input's line is the run's own final validation (the same scoring), then the average's.
    last_line = next(line for line in printed.splitlines() if str(inputs[1]) in line and "loss" in line)
    final = metric_rows(run_dir, "val/loss")[STEPS - 1]
    assert f"loss {final:.4f}" in last_line
    assert any(line.strip().startswith(str(out)) and "loss" in line for line in printed.splitlines())
    # The average is a checkpoint like any: eval scores it, fit trains on from it.
    text = tmp_path / "text.txt"
    text.write_text("The queen of the river was the light of the castle.\n" * 4)
    assert main(["eval", str(out), str(text)]) == 0
    corpus = run_dir.parents[1] / "corpus"
    resumed = fit_args(
        corpus, tmp_path / "runs", run_dir.parents[1] / "cache", STEPS + 1, "--ckpt_path", str(out)
    )
    assert main([*resumed, "--trainer.precision", "32-true"]) == 0
    trained_on = torch.load(tmp_path / "runs" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert trained_on["global_step"] == STEPS + 1


@pytest.mark.parametrize(
    "make, extra, expect",
    [
        ("other_shape", [], "is not of the same run as"),
        ("same", ["--weights", "1"], "has 1 numbers for 2 checkpoints"),
        ("same", ["--weights", "1,-1"], "non-negative"),
        ("one", [], "at least two checkpoints"),
        ("exists", [], "already exists"),
    ],
)
def test_average_refuses_bad_input(ema_run, tmp_path, capfd, make, extra, expect):
    _, _, run_dir = ema_run
    last = run_dir / "checkpoints" / "last.ckpt"
    other = tmp_path / "other.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    if make == "other_shape":
        checkpoint["hyper_parameters"]["n_embd"] = 64
        checkpoint["state_dict"]["model.wte.weight"] = torch.zeros(3, 64)
    torch.save(checkpoint, other)
    out = tmp_path / "avg.ckpt"
    if make == "exists":
        out.write_text("keep me")
    inputs = [str(last)] if make == "one" else [str(last), str(other)]
    capfd.readouterr()
    assert main(["average", *inputs, str(out), *extra]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and expect in err[0], err
    assert (out.read_text() == "keep me") if make == "exists" else not out.exists()


@pytest.mark.parametrize(
    "flags, expect",
    [
        (["--model.decay_steps", "5"], "--model.decay_steps applies to --model.schedule wsd"),
        (
            ["--model.schedule", "wsd", "--model.decay_fraction", "1.5"],
            "--model.decay_fraction must be in (0, 1]",
        ),
        (["--model.ema", "1.0"], "--model.ema is the average's decay"),
    ],
)
def test_bad_settings_are_one_line(tmp_path, capfd, flags, expect):
    corpus = write_corpus(tmp_path / "corpus", n_docs=2)
    capfd.readouterr()
    assert main(fit_args(corpus, tmp_path / "runs", tmp_path / "cache", 2, *flags)) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and expect in err[-1], err


@pytest.mark.slow
def test_an_ema_run_resumes_with_its_average(ema_run, tmp_path):
    """Cut after step 3 and resumed: the EMA goes on from the checkpoint's, and the step-6 validation
    (of the average) equals the uninterrupted run's."""
    _, _, run_dir = ema_run
    corpus, cache = run_dir.parents[1] / "corpus", run_dir.parents[1] / "cache"
    args = fit_args(
        corpus, tmp_path / "runs", cache, STEPS, "--model.ema", str(DECAY), "--trainer.precision", "32-true"
    )
    args[args.index("--trainer.val_check_interval") + 1] = "3"
    stop = ["--trainer.callbacks+=test_cli.StopAtStep", "--trainer.callbacks.step=3"]
    assert main([*args, *stop]) == 0
    assert main([*args, "--ckpt_path", "last"]) == 0
    resumed, full = metric_rows(tmp_path / "runs" / "version_0", "val/loss"), metric_rows(run_dir, "val/loss")
    assert resumed[STEPS - 1] == pytest.approx(full[STEPS - 1], rel=1e-6)
